"""Tool calling: OpenAI `tools` / `tool_choice` onto a model's own tool-call syntax, and that syntax back into calls.

    fmt = tool_format(tokenizer.chat_template)          # "hermes" | "llama3_json" | "generic"
    messages = fmt.prompt_messages(messages, tools)     # what the chat template renders (tools=tools beside it)
    c = constraint(fmt, specs, choice, parallel)        # StructuredOutputsParams for "required" / a named function
    calls, content = fmt.parse(text)                    # after generation: [ToolCall], the text outside them

The formats of the families we load, picked from the chat template:
  hermes       Hermes / Qwen 2.5+ templates (they mention `<tool_call>`): the template renders the tools; the model
               writes `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, any number, maybe after text.
  llama3_json  Llama 3.1 / 3.2 templates (`<|python_tag|>`, "Environment: ipython"): the template renders the tools;
               the model answers with `{"name": ..., "parameters": {...}}` objects (`;`-separated when several),
               maybe after `<|python_tag|>` (a special token, not in the text).
  generic      any other template (it does not render tools): the tools and the call syntax go into the system
               message, like llama.cpp's generic handler; the model answers `{"tool_calls": [{"name": ...,
               "arguments": {...}}]}` (a bare call object or a list of them is read too) or in plain text. Earlier
               calls in the history are rendered in that same JSON, so the model sees its own syntax.
`tool_choice`:
  "none"       no tools in the prompt, nothing parsed (vLLM's default for "none");
  "auto"       tools in the prompt; whatever the model writes is parsed;
  "required"   the output is constrained (structured outputs) to one or more calls in the format's own syntax (the
               model writes what it was trained, or told, to write), each naming one of the tools with arguments
               valid for that tool's schema (one call when parallel_tool_calls is false; llama3_json: one call);
  a name       the output is constrained to that function's parameters: they are the call's arguments (vLLM's way).
So "required" and named calls always parse: their arguments are valid JSON for the function's schema by
construction. (vLLM constrains "required" to a JSON list of calls whatever the model's syntax; asking a model for
its own syntax keeps it on familiar ground, which is what lets a small model end its list of calls.)
"""

from __future__ import annotations

import dataclasses
import json
import re
import uuid

from jaxllm.structured_outputs import StructuredOutputsParams, close_objects

# Tool arguments are read by programs: no free whitespace (small models wander off in it) and no keys beyond the
# function's parameters (a model told nothing more may invent keys without end), as OpenAI's strict mode.
_TIGHT = dict(disable_any_whitespace=True, disable_additional_properties=True)


@dataclasses.dataclass
class ToolCall:
  name: str
  arguments: str  # JSON text, as OpenAI returns it
  id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

  def to_openai(self) -> dict:
    return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def check_tools(tools, tool_choice) -> tuple[list[dict], object]:
  """The request's tools as a list of {"name", "description", "parameters"} and its tool_choice ("none" / "auto" /
  "required" / a tool name); raises ValueError naming what is wrong."""
  specs = []
  for i, t in enumerate(tools or []):
    fn = t.get("function") if isinstance(t, dict) and t.get("type", "function") == "function" else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
      raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}.")
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    if not isinstance(params, dict):
      raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object.")
    specs.append({"name": fn["name"], "description": fn.get("description") or "", "parameters": params})
  names = [s["name"] for s in specs]
  if len(set(names)) != len(names):
    raise ValueError(f"tool names must be unique; got {names}.")
  choice = "auto" if tool_choice is None and specs else "none" if tool_choice is None else tool_choice
  if isinstance(choice, dict):
    fn = choice.get("function") if choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if name not in names:
      raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools {names}.")
    return specs, name
  if choice not in ("none", "auto", "required"):
    raise ValueError(f"tool_choice must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                     f"{{'name': ...}}}}; got {choice!r:.60}.")
  if choice == "required" and not specs:
    raise ValueError("tool_choice 'required' needs at least one tool.")
  return specs, choice


def constraint(fmt: "ToolFormat", specs: list[dict], choice, parallel: bool = True) -> StructuredOutputsParams | None:
  """The structured-output constraint that enforces tool_choice "required" (calls in the format's own syntax) or a
  named function (its arguments); None for "none" and "auto"."""
  if choice in ("none", "auto"):
    return None
  if choice == "required":
    return fmt.call_constraint(specs, parallel)
  return StructuredOutputsParams(json=next(s["parameters"] for s in specs if s["name"] == choice), **_TIGHT)


def parse_named(text: str, name: str) -> list[ToolCall]:
  """The call of an output made under a named tool_choice: the text is its arguments."""
  return [ToolCall(name, text)]


def _call_schemas(specs: list[dict], arguments: str = "arguments") -> list[dict]:
  """One JSON schema per tool for a call object {"name": <the tool's>, <arguments>: <its parameters>}."""
  return [{"type": "object", "additionalProperties": False, "required": ["name", arguments],
           "properties": {"name": {"const": s["name"]}, arguments: s["parameters"]}} for s in specs]


def _one_of(schemas: list[dict]) -> dict:
  return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def _call_of(obj) -> ToolCall | None:
  """A {"name": ..., "arguments" | "parameters": {...}} object (or {"function": {...}}) as a call."""
  if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
    obj = obj["function"]
  if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
    return None
  args = obj.get("arguments", obj.get("parameters", {}))
  if isinstance(args, str):  # already JSON text (some models write it that way)
    try:
      json.loads(args)
    except ValueError:
      return None
    return ToolCall(obj["name"], args)
  return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _json_values(text: str) -> list | None:
  """Every JSON value in text (separated by whitespace or ';'), or None if anything else is there."""
  decoder, out, i, n = json.JSONDecoder(), [], 0, len(text)
  while i < n:
    while i < n and text[i] in " \t\r\n;":
      i += 1
    if i == n:
      break
    try:
      value, i = decoder.raw_decode(text, i)
    except ValueError:
      return None
    out.append(value)
  return out


def _complete_calls(text: str) -> list | None:
  """The complete calls of a `{"tool_calls": [...` cut short (max_tokens): [{"tool_calls": [those]}], or None."""
  head = re.match(r'\s*\{\s*"tool_calls"\s*:\s*\[', text)
  if head is None:
    return None
  decoder, calls, i = json.JSONDecoder(), [], head.end()
  while True:
    while i < len(text) and text[i] in " \t\r\n,":
      i += 1
    try:
      value, i = decoder.raw_decode(text, i)
    except ValueError:
      return [{"tool_calls": calls}] if calls else None
    calls.append(value)


class ToolFormat:
  name = "generic"

  def prompt_messages(self, messages: list[dict], specs: list[dict]) -> list[dict]:
    """The messages the chat template renders when tools are on (their calls in history in this format's syntax)."""
    return messages

  def parse(self, text: str, specs: list[dict]) -> tuple[list[ToolCall], str]:
    """(calls, content): the tool calls the model wrote and the text outside them. Calls to unknown functions are
    kept as text."""
    return [], text

  def call_constraint(self, specs: list[dict], parallel: bool) -> StructuredOutputsParams:
    """Output that is one or more calls (one unless `parallel`) in this format's syntax, each to one of the tools with
    arguments valid for its schema (tool_choice "required"); JSON as _TIGHT says."""
    raise NotImplementedError

  def safe_prefix(self, text: str) -> int:
    """How much of the text generated so far is surely content, not (the start of) a tool call: a stream sends that
    much as content and holds the rest back until it knows (at the latest, when the sample ends)."""
    return len(text)


class JsonToolFormat(ToolFormat):
  """Calls as bare JSON (llama3_json: {"name", "parameters"}; generic: {"tool_calls": [...]}, a call, or a list)."""

  def __init__(self, name: str):
    self.name = name

  def prompt_messages(self, messages, specs):
    if self.name != "generic":
      return messages
    out = []
    for m in messages:
      if m.get("tool_calls"):  # the call as this format writes it, so the model sees its own syntax
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in m["tool_calls"]]
        text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
        m = {**m, "content": (m.get("content") or "") + text}
        m.pop("tool_calls")
      out.append(m)
    if not specs:
      return out
    tools = "\n".join(json.dumps({"name": s["name"], "description": s["description"], "parameters": s["parameters"]},
                                 ensure_ascii=False) for s in specs)
    note = ("You can call these tools (one JSON object each):\n" + tools + "\nTo call tools, reply with only "
            '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}; otherwise answer in text.')
    if out and out[0].get("role") == "system":
      return [{**out[0], "content": f"{out[0].get('content') or ''}\n\n{note}".lstrip()}] + out[1:]
    return [{"role": "system", "content": note}] + out

  def parse(self, text, specs):
    values = _json_values(text.strip())
    if values is None and self.name == "generic":
      values = _complete_calls(text)
    if not values:
      return [], text
    calls, known = [], {s["name"] for s in specs}
    for v in values:
      items = v.get("tool_calls") if isinstance(v, dict) and "tool_calls" in v else v
      for item in items if isinstance(items, list) else [items]:
        call = _call_of(item)
        if call is None or call.name not in known:
          return [], text
        calls.append(call)
    return calls, ""

  def call_constraint(self, specs, parallel):
    if self.name == "llama3_json":  # one {"name", "parameters"} object: the form Llama 3.1 / 3.2 are trained on
      return StructuredOutputsParams(json=_one_of(_call_schemas(specs, "parameters")), **_TIGHT)
    calls = {"type": "array", "minItems": 1, "items": _one_of(_call_schemas(specs))}
    if not parallel:
      calls["maxItems"] = 1
    return StructuredOutputsParams(json={"type": "object", "additionalProperties": False, "required": ["tool_calls"],
                                         "properties": {"tool_calls": calls}}, **_TIGHT)

  def safe_prefix(self, text):
    """Nothing while the text is blank or opens with a JSON object or list; all of it otherwise."""
    return 0 if text.lstrip()[:1] in ("", "{", "[") else len(text)


class HermesToolFormat(ToolFormat):
  """`<tool_call>{json}</tool_call>` blocks (Hermes 2 Pro, Qwen 2.5 / 3)."""

  name = "hermes"
  OPEN, CLOSE = "<tool_call>", "</tool_call>"
  _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)

  def parse(self, text, specs):
    if self.OPEN not in text:
      return [], text
    calls, known = [], {s["name"] for s in specs}
    blocks = self._BLOCK.findall(text)
    for k, body in enumerate(blocks):
      values = _json_values(body.strip())
      call = _call_of(values[0]) if values and len(values) == 1 else None
      if call is None and k == len(blocks) - 1 and calls and not text.rstrip().endswith(self.CLOSE):
        break  # a last block cut short (max_tokens) after complete ones: those are the calls
      if call is None or call.name not in known:
        return [], text
      calls.append(call)
    return calls, text[:text.index(self.OPEN)]

  def call_constraint(self, specs, parallel):
    call = {**close_objects(_one_of(_call_schemas(specs))), "x-guidance": {"whitespace_flexible": False}}
    more = ' ("\\n" call)*' if parallel else ""  # calls one per line, as Qwen / Hermes write them
    return StructuredOutputsParams(grammar=f'start: call{more}\ncall: "<tool_call>\\n" body "\\n</tool_call>"\n'
                                           f"body: %json {json.dumps(call)}\n")

  def safe_prefix(self, text):
    """Up to the first `<tool_call>`, or to a trailing piece of text that may be the start of one."""
    if self.OPEN in text:
      return text.index(self.OPEN)
    return len(text) - max((k for k in range(1, len(self.OPEN)) if text.endswith(self.OPEN[:k])), default=0)


def tool_format(chat_template: str | None) -> ToolFormat:
  """The tool-call syntax a chat template's model speaks (see the module docstring)."""
  t = chat_template or ""
  if "<tool_call>" in t:
    return HermesToolFormat()
  if "<|python_tag|>" in t or ("ipython" in t and "tools" in t):
    return JsonToolFormat("llama3_json")
  return JsonToolFormat("generic")
