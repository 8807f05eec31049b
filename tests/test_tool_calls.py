"""Tool-call syntax both ways, without a model: the formats of the families we load are detected from their chat
templates, parsed back into calls (text outside them kept as content, anything else left as text), held back from a
stream only while they may be a call, and "required" / named choices become constraints whose outputs parse."""

import json

import pytest

from jaxllm.structured_outputs import GrammarCompiler
from jaxllm.tool_calls import HermesToolFormat, JsonToolFormat, check_tools, constraint, parse_named, tool_format

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
SPECS, _ = check_tools([WEATHER, TIME], None)


def calls(found):
  return [(c.name, json.loads(c.arguments)) for c in found]


def test_formats_are_detected_from_the_template():
  assert tool_format("{% for t in tools %}<tool_call>{{ t }}</tool_call>{% endfor %}").name == "hermes"
  assert tool_format("{{- '<|python_tag|>' }}{% if tools %}Environment: ipython{% endif %}").name == "llama3_json"
  assert tool_format("<|im_start|>{{ message['content'] }}").name == "generic"
  assert tool_format(None).name == "generic"


def test_hermes_blocks_parse_with_content_before_them():
  text = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
  found, content = HermesToolFormat().parse(text, SPECS)
  assert calls(found) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
  assert content.strip() == "Let me look."
  # An unclosed last block (cut by a stop) still parses; unknown functions and bad JSON stay text.
  assert calls(HermesToolFormat().parse('<tool_call>{"name": "get_time", "arguments": {}}', SPECS)[0]) == [
      ("get_time", {})]
  for bad in ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', "<tool_call>{oops</tool_call>",
              "no calls here", '<tool_call>{"name": "get_time", "argu'):
    assert HermesToolFormat().parse(bad, SPECS) == ([], bad)
  # Cut short by max_tokens after complete calls: those complete calls.
  cut = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n<tool_call>{"name": "get_ti'
  assert calls(HermesToolFormat().parse(cut, SPECS)[0]) == [("get_time", {})]


def test_json_formats_parse_llama3_generic_and_lists():
  llama, generic = JsonToolFormat("llama3_json"), JsonToolFormat("generic")
  assert calls(llama.parse('{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", '
                           '"parameters": {}}', SPECS)[0]) == [("get_weather", {"city": "Rome"}), ("get_time", {})]
  assert calls(generic.parse('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}}]}',
                             SPECS)[0]) == [("get_weather", {"city": "Oslo", "unit": "C"})]
  assert calls(generic.parse('[{"function": {"name": "get_time", "arguments": "{}"}}]', SPECS)[0]) == [
      ("get_time", {})]
  for text in ('{"answer": 42}', 'Sure: {"name": "get_time", "parameters": {}}', '{"name": "nope", "arguments": {}}',
               '{"tool_calls": [{"name": "get_ti'):
    assert generic.parse(text, SPECS) == ([], text)
  cut = '{"tool_calls":[{"name":"get_time","arguments":{}},{"name":"get_weather","arguments":{"city":"Pa'
  assert calls(generic.parse(cut, SPECS)[0]) == [("get_time", {})]


def test_streams_hold_back_only_what_may_be_a_call():
  h = HermesToolFormat()
  assert h.safe_prefix("Hello there") == 11
  assert h.safe_prefix("Hello <tool") == 6  # may be the start of <tool_call>
  assert h.safe_prefix("Hello <toolbox>") == 15
  assert h.safe_prefix('Hi <tool_call>{"name"') == 3
  j = JsonToolFormat("generic")
  assert j.safe_prefix("  ") == 0 and j.safe_prefix(' {"tool') == 0 and j.safe_prefix("The answer") == 10


CALL = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


@pytest.mark.parametrize("text", [f"Let me check. \n{CALL}", "Paris is sunny.\n\nAnything else? ", f"On it.{CALL}",
                                  f"\n\n{CALL}", f"\nSure. {CALL}"],
                         ids=["text_then_call", "text_only", "no_space", "blank_then_call", "leading_newline"])
def test_streamed_content_adds_up_to_the_whole_message(text):
  """Token by token, a Hermes sample's streamed content deltas join to the whole message's content (whitespace
  before a call included: the message drops it, so the stream holds it back until the next word)."""
  from jaxllm.serving.server import _ToolCalls

  whole = _ToolCalls(HermesToolFormat(), SPECS, "auto", 1).message(0, text)
  stream, content, called = _ToolCalls(HermesToolFormat(), SPECS, "auto", 1), "", []
  for i in range(0, len(text), 3):  # 3-character deltas, the last one finishing the sample
    delta = stream.stream(0, text[i:i + 3], finished=i + 3 >= len(text))
    content += delta.get("content", "")
    called += delta.get("tool_calls", [])
  assert content == (whole["content"] or "")
  assert [c["function"]["name"] for c in called] == [c["function"]["name"] for c in whole.get("tool_calls", [])]


def test_generic_prompt_carries_the_tools_and_earlier_calls_in_its_syntax():
  msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
          {"role": "assistant", "content": "", "tool_calls": [
              {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
          {"role": "tool", "content": "21 C", "tool_call_id": "c1"}]
  out = JsonToolFormat("generic").prompt_messages(msgs, SPECS)
  assert out[0]["content"].startswith("Be brief.") and '"get_weather"' in out[0]["content"]
  assert json.loads(out[2]["content"]) == {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
  assert "tool_calls" not in out[2] and out[3] == msgs[3]
  assert HermesToolFormat().prompt_messages(msgs, SPECS) == msgs  # its template renders tools and calls itself


def test_required_and_named_constraints_accept_exactly_valid_calls(default_llm):
  """Each format's "required" constraint, compiled for the default tokenizer, accepts its own syntax for valid calls
  (and what it accepts parses back to those calls), and refuses a call with bad arguments or to an unknown tool."""
  tok = default_llm.tokenizer
  grammars = GrammarCompiler(tok, default_llm.config.vocab_size, tok.eos_ids)
  good = [("get_weather", {"city": "Paris"}), ("get_time", {})]
  docs = {"generic": json.dumps({"tool_calls": [{"name": n, "arguments": a} for n, a in good]}, separators=(",", ":")),
          "llama3_json": '{"name":"get_weather","parameters":{"city":"Paris"}}',
          "hermes": "\n".join(f'<tool_call>\n{json.dumps({"name": n, "arguments": a}, separators=(",", ":"))}\n'
                             "</tool_call>" for n, a in good)}
  for fmt in (JsonToolFormat("generic"), JsonToolFormat("llama3_json"), HermesToolFormat()):
    doc = docs[fmt.name]
    m = grammars.compile(constraint(fmt, SPECS, "required"))
    assert m.consume_tokens(tok.encode(doc, add_bos=False)) and m.is_accepting(), fmt.name
    assert calls(fmt.parse(doc, SPECS)[0]) == (good if fmt.name != "llama3_json" else good[:1])
    for bad in (doc.replace("Paris", "P" * 30), doc.replace("get_weather", "get_wether")):  # maxLength 20 in city
      m = grammars.compile(constraint(fmt, SPECS, "required"))
      assert not m.consume_tokens(tok.encode(bad, add_bos=False)) or not m.is_accepting(), (fmt.name, bad)
  single = constraint(JsonToolFormat("generic"), SPECS, "required", parallel=False)
  assert single.json["properties"]["tool_calls"]["maxItems"] == 1
  assert "call)*" not in constraint(HermesToolFormat(), SPECS, "required", parallel=False).grammar
  assert constraint(HermesToolFormat(), SPECS, "get_weather").json == WEATHER["function"]["parameters"]
  assert calls(parse_named('{"city": "Rome"}', "get_weather")) == [("get_weather", {"city": "Rome"})]
  assert constraint(HermesToolFormat(), SPECS, "auto") is None and constraint(HermesToolFormat(), SPECS, "none") is None


@pytest.mark.parametrize("tools, choice, message", [
    ([{"type": "function"}], None, "tools\\[0\\]"), ([WEATHER, WEATHER], None, "unique"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among"), ([WEATHER], "always", "must be"),
    ([WEATHER], {"type": "function", "function": "get_weather"}, "not among"),
    (None, "required", "at least one tool")])
def test_bad_tools_are_named(tools, choice, message):
  with pytest.raises(ValueError, match=message):
    check_tools(tools, choice)


def test_choice_defaults():
  assert check_tools(None, None) == ([], "none")
  assert check_tools([WEATHER], None)[1] == "auto"
  assert check_tools([WEATHER], {"type": "function", "function": {"name": "get_weather"}})[1] == "get_weather"
