"""Tool calling over HTTP on the default model (its template does not render tools: the generic format) with real
clients: the `openai` client's round trip (tool_calls -> the client's own message object sent back -> a tool message
-> the answer), named and "required" choices always valid for the function's schema, streamed tool-call deltas that
reassemble to the non-streamed calls, auto-mode parsing of the generic and Hermes syntaxes, and LangChain's
`bind_tools`, `with_structured_output` and a plain multi-turn conversation."""

import json

import jsonschema
import pydantic
import pytest

from jaxllm.tool_calls import HermesToolFormat
from tests.serving.conftest import raw

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The time in a timezone.",
    "parameters": {"type": "object", "required": ["tz"], "additionalProperties": False,
                   "properties": {"tz": {"type": "string", "maxLength": 20}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def reassemble(chunks):
  """(content, [(name, arguments)], finish_reason) of a streamed chat completion, the way clients rebuild calls."""
  content, calls, reason = "", {}, None
  for ch in chunks:
    if not ch.choices:
      continue
    d = ch.choices[0].delta
    content += d.content or ""
    for tc in d.tool_calls or []:
      c = calls.setdefault(tc.index, {"name": "", "arguments": ""})
      c["name"] += (tc.function.name or "") if tc.function else ""
      c["arguments"] += (tc.function.arguments or "") if tc.function else ""
    reason = ch.choices[0].finish_reason or reason
  return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())], reason


def test_openai_round_trip_with_required(client):
  messages = list(ASK)
  first = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, TIME],
                                         tool_choice="required", temperature=0, max_tokens=80)
  choice = first.choices[0]
  assert choice.finish_reason == "tool_calls" and choice.message.content is None
  call = choice.message.tool_calls[0]
  assert call.function.name in ("get_weather", "get_time") and call.id
  spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]["parameters"]
  jsonschema.validate(json.loads(call.function.arguments), spec)
  messages.append(choice.message)  # the client's own object, as agent loops send it back
  messages.append({"role": "tool", "tool_call_id": call.id, "content": "21 C and sunny"})
  final = client.chat.completions.create(model="smollm2", messages=messages, tools=[WEATHER, TIME],
                                         tool_choice="none", temperature=0, max_tokens=30)
  assert final.choices[0].message.content and final.choices[0].message.tool_calls is None
  assert final.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_calls_reassemble_to_the_non_streamed_ones(client, tool_choice):
  kw = dict(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice=tool_choice, temperature=0,
            max_tokens=60)
  whole = client.chat.completions.create(**kw).choices[0]
  content, calls, reason = reassemble(client.chat.completions.create(**kw, stream=True))
  # "required" ends in "tool_calls"; a named function's call in "stop" (OpenAI's choice: the caller forced it).
  assert reason == whole.finish_reason == ("stop" if isinstance(tool_choice, dict) else "tool_calls")
  assert content == ""
  assert calls == [(c.function.name, c.function.arguments) for c in whole.message.tool_calls]
  if isinstance(tool_choice, dict):
    assert [n for n, _ in calls] == ["get_time"]
    jsonschema.validate(json.loads(calls[0][1]), TIME["function"]["parameters"])


def test_sampled_required_calls_always_validate(client):
  r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                     parallel_tool_calls=False, temperature=1.0, seed=5, n=4, max_tokens=80)
  for c in r.choices:
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    fn = c.message.tool_calls[0].function
    spec = {"get_weather": WEATHER, "get_time": TIME}[fn.name]["function"]["parameters"]
    jsonschema.validate(json.loads(fn.arguments), spec)


GENERIC_CALL = r'\{"tool_calls": \[\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}\]\}'
HERMES_CALL = (r'Let me check\.\n<tool_call>\{"name": "get_weather", "arguments": \{"city": "(Paris|Rome)"\}\}'
               r"</tool_call>")


@pytest.mark.parametrize("fmt, regex, content", [(None, GENERIC_CALL, None),
                                                 (HermesToolFormat(), HERMES_CALL, "Let me check.")])
def test_auto_parses_what_the_model_writes(server, client, fmt, regex, content):
  """In auto mode the output is the model's own; a regex constraint makes it write a call in the format's syntax, and
  the server reads it back the same streamed or not (the Hermes case streams the text before the call as content)."""
  saved = server.tool_format
  server.tool_format = fmt or saved
  try:
    kw = dict(model="smollm2", messages=ASK, tools=[WEATHER], temperature=0, max_tokens=60,
              extra_body={"structured_outputs": {"regex": regex}})
    whole = client.chat.completions.create(**kw).choices[0]
    streamed = reassemble(client.chat.completions.create(**kw, stream=True))
  finally:
    server.tool_format = saved
  assert whole.finish_reason == "tool_calls" and whole.message.content == content
  (call,) = whole.message.tool_calls
  assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in ("Paris", "Rome")
  assert streamed[0].strip() == (content or "") and streamed[2] == "tool_calls"
  assert streamed[1] == [(call.function.name, call.function.arguments)]


def test_plain_text_in_auto_mode_stays_content(client):
  r = client.chat.completions.create(model="smollm2", messages=ASK, tools=[WEATHER], tool_choice="auto",
                                     temperature=0, max_tokens=20,
                                     extra_body={"structured_outputs": {"regex": "It is sunny[.]"}})
  assert r.choices[0].message.content == "It is sunny." and r.choices[0].message.tool_calls is None
  assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra, param, message", [
    ({"tools": [{"type": "function"}]}, "tool_choice", "tools[0]"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not among"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "constrains the output"),
    ({"tool_choice": "required"}, "tools", "at least one tool"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": "get_weather"}}, "tool_choice", "not among"),

    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "int"}}}}}], "tool_choice": "required"}, "tools", "int")])
def test_bad_tool_requests_are_400s(server, extra, param, message):
  status, body = raw(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 4, **extra})
  assert status == 400 and body["error"]["param"] == param and message in body["error"]["message"], body


def test_langchain_bind_tools_loop_and_structured_output(server):
  from langchain_core.messages import HumanMessage, ToolMessage
  from langchain_core.tools import tool
  from langchain_openai import ChatOpenAI

  @tool
  def get_weather(city: str) -> str:
    """The current weather in a city."""
    return f"21 C and sunny in {city}"

  llm = ChatOpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", model="smollm2", temperature=0,
                   max_tokens=60, max_retries=0)
  messages = [HumanMessage("What is the weather in Paris?")]
  # One call per turn: greedy, this small model repeats a call for as long as a list of calls may go on.
  ai = llm.bind_tools([get_weather], tool_choice="required", parallel_tool_calls=False).invoke(messages)
  assert ai.tool_calls and ai.tool_calls[0]["name"] == "get_weather"
  messages.append(ai)
  for call in ai.tool_calls:
    messages.append(ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"]))
  answer = llm.bind_tools([get_weather]).invoke(messages)  # auto: the loop ends when the model answers in text
  assert isinstance(answer.content, str)

  class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)

  city = llm.with_structured_output(City).invoke("Name a city in France.")
  assert isinstance(city, City) and city.name

  # A plain multi-turn conversation: LangChain's own message objects, each answer appended and sent back.
  chat = [HumanMessage("Hi! My name is Ada.")]
  for turn in ("What is the capital of France?", "What is my name?"):
    chat.append(llm.invoke(chat))
    chat.append(HumanMessage(turn))
  final = llm.invoke(chat)
  assert final.content and final.response_metadata["finish_reason"] in ("stop", "length")
