"""The OpenAI request schemas the server accepts (pydantic), and their translation into `SamplingParams`.

Every field of OpenAI's chat / completions request schema (as the `openai` package types it) is one of three kinds:
  honoured        it changes the output as OpenAI defines (sampling fields, logprobs, stream_options, ...);
  ignored         accepted with any value because ignoring it cannot change what the client gets (`store`,
                  `metadata`, `service_tier`, `user`, `prompt_cache_key`, ...): IGNORED;
  unsupported     accepted only when null or empty; any other value is a 400 that names the field and says why
                  (audio output, predicted outputs, web search, ...): UNSUPPORTED.
Names outside OpenAI's schema (and vLLM's extensions: `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`min_tokens`, `stop_token_ids`, `prompt_logprobs`, `stream_options.continuous_usage_stats`, ...) stay errors, so a
typo such as `max_token` is never silently ignored; types are strict enough that `"max_tokens": "5"` is refused.
`tests/serving/test_protocol.py` walks the `openai` package's own request types so a new OpenAI field fails a test.

Messages follow the reference: text content or text parts (image / audio / file parts are a 400), `name`, assistant
messages with `tool_calls` and `content: null` (and `refusal` / `annotations` / `audio` as the client returns them,
ignored), `tool` messages with `tool_call_id`, and `developer` rendered as the system turn.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, model_validator

from jaxllm.sampling import SamplingParams
from jaxllm.structured_outputs import StructuredOutputsParams

# Accepted with any value; ignoring them cannot change the output a client gets.
IGNORED = ("metadata", "store", "service_tier", "user", "safety_identifier", "prompt_cache_key",
           "prompt_cache_options", "prompt_cache_retention", "reasoning_effort", "verbosity",
           # the Responses API's: no reasoning model here, nothing extra to include, inputs are never truncated
           "reasoning", "include", "truncation")
# Accepted when null / empty (or the value that means "off"); anything else is a 400 naming the field and this reason.
UNSUPPORTED = {
    "audio": "audio output is not supported by this text model",
    "prediction": "predicted outputs are not supported",
    "web_search_options": "web search is not supported",
    "moderation": "moderation is not supported",
    "functions": "the deprecated `functions` are not supported; use `tools`",
    "function_call": "the deprecated `function_call` is not supported; use `tool_choice`",
    "modalities": "only the 'text' modality is supported",
    "suffix": "suffix (insertion) is not supported",
}
# The Responses API's own besides (`prompt` there is a stored prompt template, not the completions prompt).
RESPONSES_UNSUPPORTED = {
    **UNSUPPORTED,
    "background": "background responses are not supported; send the request and wait, or stream it",
    "background_options": "background responses are not supported",
    "conversation": "stored conversations are not supported; send the history as input or use previous_response_id",
    "prompt": "reusable prompt templates are not supported; send the instructions and input",
    "image": "image generation is not supported by this text model",
    "access_programs": "access programs are not supported",
    "context_management": "server-side context management is not supported",
}
RESPONSES_IGNORED = tuple(k for k in IGNORED if k != "store")  # store is honoured there (previous_response_id)
_OFF_VALUES = {"modalities": (["text"],)}


class FieldError(ValueError):
  """A request error that names its field (the server's 400 carries it as `param`)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field


def _check_unsupported(values: dict, refused: dict, names) -> None:
  for name in names:
    v = values.get(name)
    if v is None or v == [] or v == {} or v in _OFF_VALUES.get(name, ()):
      continue
    raise FieldError(name, f"{refused[name]}.")


class _Strict(BaseModel):
  """Unknown fields are errors. An explicit null for a field that has a default means the default, as OpenAI's API
  and vLLM take it (its SDKs and many proxies send every optional field, null when unset): `"temperature": null`
  is temperature 1."""

  model_config = ConfigDict(extra="forbid")

  @model_validator(mode="before")
  @classmethod
  def _null_is_default(cls, values):
    if isinstance(values, dict) and None in values.values():
      fields = cls.model_fields
      values = {k: v for k, v in values.items()
                if not (v is None and k in fields and not fields[k].is_required() and fields[k].default is not None)}
    return values


class StreamOptions(_Strict):
  include_usage: StrictBool = False
  continuous_usage_stats: StrictBool = False  # vLLM: usage in every chunk (guidellm asks for it)
  include_obfuscation: Any = None  # OpenAI's padding against side channels: ignored


def structured_outputs_params(so: dict) -> StructuredOutputsParams:
  """vLLM's `structured_outputs` request object (a FieldError naming it when it is wrong)."""
  unknown = set(so) - {f.name for f in dataclasses.fields(StructuredOutputsParams)}
  if unknown:
    raise FieldError("structured_outputs", f"unknown keys {sorted(unknown)}; expected one of json, regex, choice, "
                     "grammar, json_object, plus disable_any_whitespace, whitespace_pattern or "
                     "disable_additional_properties.")
  try:
    return StructuredOutputsParams(**so)
  except ValueError as e:
    raise FieldError("structured_outputs", str(e)) from None


class _Refusing(_Strict):
  """A request schema whose `refused` fields are 400s that name themselves unless null / off; `ignored` lists those
  it accepts with any value."""

  refused: ClassVar[dict] = UNSUPPORTED
  ignored: ClassVar[tuple] = IGNORED

  @model_validator(mode="before")
  @classmethod
  def _unsupported(cls, values):
    if isinstance(values, dict):
      _check_unsupported(values, cls.refused, (name for name in cls.refused if name in cls.model_fields))
    return values


class _Sampling(_Refusing):
  model: str | None = None
  n: StrictInt = 1
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: StrictInt = 0
  min_p: float = 0.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  logit_bias: dict[str, float] | None = None
  seed: StrictInt | None = None
  stop: str | list[str] | None = None
  stop_token_ids: list[StrictInt] | None = None
  ignore_eos: StrictBool = False
  min_tokens: StrictInt = 0
  prompt_logprobs: StrictInt | None = None  # vLLM's: each prompt token's logprob, rank and top-n (not streamed)
  stream: StrictBool = False
  stream_options: StreamOptions | None = None
  metadata: Any = None
  store: Any = None
  service_tier: Any = None
  user: Any = None
  safety_identifier: Any = None
  prompt_cache_key: Any = None
  prompt_cache_options: Any = None
  prompt_cache_retention: Any = None
  # Structured outputs: OpenAI's response_format (text / json_object / json_schema), or vLLM's structured_outputs
  # ({"json" | "regex" | "choice" | "grammar" | "json_object": ..., ...}; it replaced guided_json & co. in v0.12).
  response_format: Any = None
  structured_outputs: dict | None = None

  def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """Raises ValueError naming the bad field (SamplingParams' own checks)."""
    bias = None
    if self.logit_bias:
      try:
        bias = {int(k): v for k, v in self.logit_bias.items()}
      except ValueError:
        raise ValueError(f"logit_bias keys must be token ids; got {list(self.logit_bias)[:5]}.") from None
    return SamplingParams(
        n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
        min_p=self.min_p, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
        repetition_penalty=self.repetition_penalty, logit_bias=bias, seed=self.seed, stop=self.stop,
        stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
        logprobs=logprobs, prompt_logprobs=self.prompt_logprobs,
        structured_outputs=self.structured_output_params())


  def structured_output_params(self) -> StructuredOutputsParams | None:
    """The request's constraint, from response_format or structured_outputs (a FieldError naming the bad one)."""
    rf, so = self.response_format, self.structured_outputs
    if rf == {"type": "text"}:
      rf = None
    if rf is not None and so is not None:
      raise FieldError("structured_outputs", "give either response_format or structured_outputs, not both.")
    if so is not None:
      return structured_outputs_params(so)
    if rf is None:
      return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "json_object":
      return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
      spec = rf.get("json_schema")
      if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), (dict, bool)):
        raise FieldError("response_format", "json_schema must be an object holding the JSON schema under 'schema'.")
      try:
        return StructuredOutputsParams(json=spec.get("schema", {}))
      except ValueError as e:
        raise FieldError("response_format", str(e)) from None
    raise FieldError("response_format", f"type {kind!r} is not supported; use 'text', 'json_object' or "
                     "'json_schema'.")


class CompletionRequest(_Sampling):
  prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
  max_tokens: StrictInt | None = 16
  logprobs: StrictInt | None = None
  echo: StrictBool = False
  suffix: Any = None
  best_of: StrictInt | None = None


class ToolCallFunction(BaseModel):
  model_config = ConfigDict(extra="ignore")
  name: str
  arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
  model_config = ConfigDict(extra="ignore")
  id: str
  type: Literal["function"] = "function"
  function: ToolCallFunction


class ChatMessage(_Strict):
  role: Literal["system", "user", "assistant", "developer", "tool"]
  content: str | list[dict] | None = None
  name: str | None = None
  tool_calls: list[ToolCall] | None = None  # assistant
  tool_call_id: str | None = None  # tool
  # What the openai client returns in `message` and multi-turn loops send back: ignored in history.
  refusal: Any = None
  annotations: Any = None
  audio: Any = None
  function_call: Any = None

  @model_validator(mode="after")
  def _check_role_fields(self):
    if self.tool_calls and self.role != "assistant":
      raise ValueError(f"tool_calls belong to assistant messages, not {self.role!r} ones.")
    if self.role == "tool" and not self.tool_call_id:
      raise ValueError("a tool message needs the tool_call_id of the call it answers.")
    if self.function_call is not None:
      raise FieldError("function_call", f"{UNSUPPORTED['function_call']}.")
    return self

  def text(self) -> str:
    if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
      parts = []
      for part in self.content:
        kind = part.get("type")
        if kind == "text" and isinstance(part.get("text"), str):
          parts.append(part["text"])
        elif kind == "refusal":  # an assistant's refusal part in history: kept as its text
          parts.append(str(part.get("refusal", "")))
        elif kind in ("image_url", "input_image", "input_audio", "file", "input_file"):
          raise ValueError(f"{kind} content parts are not supported by this text model; send text parts only.")
        else:
          raise ValueError(f"unknown content part {part!r:.80}; expected {{'type': 'text', 'text': ...}}.")
      return "".join(parts)
    return self.content or ""

  def template_message(self) -> dict:
    """The message as chat templates expect it (transformers' conventions): developer -> system, tool calls with
    their arguments parsed from JSON text."""
    out: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
    if self.name is not None:
      out["name"] = self.name
    if self.tool_calls:
      calls = []
      for c in self.tool_calls:
        try:
          args = json.loads(c.function.arguments) if c.function.arguments else {}
        except json.JSONDecodeError:
          raise ValueError(f"tool call {c.id!r}: function.arguments is not valid JSON.") from None
        calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
      out["tool_calls"] = calls
    if self.tool_call_id is not None:
      out["tool_call_id"] = self.tool_call_id
    return out


class ChatCompletionRequest(_Sampling):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: StrictInt | None = None
  max_completion_tokens: StrictInt | None = None
  logprobs: StrictBool | None = False
  top_logprobs: StrictInt | None = None
  add_generation_prompt: StrictBool = True
  reasoning_effort: Any = None
  verbosity: Any = None
  parallel_tool_calls: StrictBool | None = None  # False: at most one call (enforced for "required")
  audio: Any = None
  prediction: Any = None
  web_search_options: Any = None
  moderation: Any = None
  functions: Any = None
  function_call: Any = None
  tools: list | None = None  # [{"type": "function", "function": {...}}] (jaxllm.tool_calls checks them)
  tool_choice: Any = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name": ...}}
  modalities: Any = None


class TokenizeRequest(_Strict):
  model: str | None = None
  prompt: str | None = None
  messages: list[ChatMessage] | None = None
  add_special_tokens: StrictBool = True


class DetokenizeRequest(_Strict):
  model: str | None = None
  tokens: list[StrictInt]


class ResponsesRequest(_Refusing):
  """OpenAI's Responses API request (`POST /v1/responses`): text input and output, function tools, structured output
  (`text.format`), streaming events, and `previous_response_id` over the responses this server keeps in memory."""

  refused: ClassVar[dict] = RESPONSES_UNSUPPORTED
  ignored: ClassVar[tuple] = RESPONSES_IGNORED

  model: str | None = None
  input: str | list[dict]
  instructions: str | None = None
  tools: list[dict] | None = None
  tool_choice: Any = None
  parallel_tool_calls: StrictBool | None = None
  max_tool_calls: StrictInt | None = None
  max_output_tokens: StrictInt | None = None
  temperature: float | None = None
  top_p: float | None = None
  text: dict | None = None
  structured_outputs: dict | None = None  # vLLM's extension, as on chat / completions (instead of text.format)
  stream: StrictBool = False
  store: StrictBool | None = None
  previous_response_id: str | None = None
  top_logprobs: StrictInt | None = None
  # Ignored: they cannot change the text this server returns (no reasoning model, no hosted tools, no obfuscation).
  metadata: Any = None
  user: Any = None
  service_tier: Any = None
  safety_identifier: Any = None
  prompt_cache_key: Any = None
  prompt_cache_options: Any = None
  prompt_cache_retention: Any = None
  reasoning: Any = None
  include: Any = None
  truncation: Any = None
  stream_options: StreamOptions | None = None  # include_obfuscation only (padding against side channels): accepted
  # Refused unless null (UNSUPPORTED).
  background: Any = None
  background_options: Any = None
  conversation: Any = None
  prompt: Any = None
  image: Any = None
  moderation: Any = None
  access_programs: Any = None
  context_management: Any = None

  @model_validator(mode="after")
  def _check(self):
    if self.max_tool_calls is not None and self.max_tool_calls < 1:
      raise FieldError("max_tool_calls", f"must be at least 1; got {self.max_tool_calls}.")
    if self.top_logprobs:
      raise FieldError("top_logprobs", "logprobs are not supported on the Responses API here; use chat completions.")
    if self.structured_outputs is not None and ((self.text or {}).get("format") or {}).get("type", "text") != "text":
      raise FieldError("structured_outputs", "give either text.format or structured_outputs, not both.")
    return self
