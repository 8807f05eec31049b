"""Render Hugging Face style Jinja chat templates.

A chat template is a Jinja2 program shipped with a model (in ``tokenizer_config.json``,
``chat_template.jinja`` or the GGUF key ``tokenizer.chat_template``) that turns a list of
``{"role": ..., "content": ...}`` messages into the exact prompt string the model was trained on.

This module reproduces what ``transformers``' ``apply_chat_template(..., tokenize=False)`` does,
without importing ``transformers``:

    template text --compile_chat_template()--> jinja2.Template (sandboxed, cached)
    messages + flags + special-token strings --render_chat_template()--> prompt string

The environment is configured the way transformers configures it: an immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` tag
(rendered as a plain block), the globals ``raise_exception`` and ``strftime_now``, restricted
``dict``/``namespace`` helpers, and a ``tojson`` filter that does not escape HTML or non-ASCII
text. Errors raised by a template (``raise_exception``) or by Jinja itself come out as
:class:`ChatTemplateError`, a ``ValueError``.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

__all__ = ["ChatTemplateError", "compile_chat_template", "render_chat_template"]

# Names under which a message's reasoning text may arrive; templates read the first one
# (transformers copies the value under every name, so we do too).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(ValueError):
  """A chat template could not be compiled or rendered, or it raised an exception itself."""


class _GenerationTag(jinja2.ext.Extension):
  """``{% generation %}...{% endgeneration %}``: marks assistant text; rendered unchanged."""

  tags = {"generation"}

  def parse(self, parser):
    lineno = next(parser.stream).lineno
    body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
    return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

  def _render(self, caller):
    return caller()


def _raise_exception(message):
  raise ChatTemplateError(str(message))


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.datetime.now().strftime(fmt)


class _TemplateDict:
  """``dict(...)`` inside templates, without exposing the ``dict`` type itself."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
  """``namespace(...)`` that refuses underscore-prefixed attribute names."""

  def __init__(*args, **kwargs):  # noqa: N805 - same signature trick as jinja2.utils.Namespace
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _TemplateNamespace._check_name(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check_name(name):
    if isinstance(name, str) and name.startswith("_"):
      raise ChatTemplateError(f"Chat templates may not set underscore-prefixed namespace attributes ({name!r}).")


@functools.lru_cache(maxsize=64)
def compile_chat_template(template: str) -> jinja2.Template:
  """Compile ``template`` in a sandboxed environment configured like transformers' (cached)."""
  env = ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _TemplateNamespace
  try:
    return env.from_string(template)
  except jinja2.TemplateError as exc:
    raise ChatTemplateError(f"The chat template does not compile: {exc}") from exc


def _alias_reasoning_fields(messages: list[dict]) -> list[dict]:
  out = []
  for message in messages:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
      message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    out.append(message)
  return out


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: list | None = None,
    documents: list | None = None,
    **context: Any,
) -> str:
  """Render ``messages`` with ``template`` and return the prompt string.

  ``context`` holds the remaining template variables: usually the special-token strings
  (``bos_token``, ``eos_token``, ...) plus caller extras such as ``enable_thinking``.
  """
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
    raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts.")
  chat = []
  for message in messages:
    if not isinstance(message, Mapping):
      raise ChatTemplateError(f"Each chat message must be a dict, got {type(message).__name__}: {message!r}.")
    chat.append(dict(message))
  compiled = compile_chat_template(template)
  try:
    return compiled.render(
        messages=_alias_reasoning_fields(chat),
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **context,
    )
  except ChatTemplateError:
    raise
  except Exception as exc:  # a Jinja error, or a Python error raised by an expression in the template
    raise ChatTemplateError(f"The chat template failed to render: {type(exc).__name__}: {exc}") from exc
