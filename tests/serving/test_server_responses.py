"""OpenAI's Responses API with the official `openai` client: text in and out (the same greedy text as chat
completions), the typed stream events (well ordered, deltas adding up to the final response), function tools round
trips (function_call -> function_call_output, with the whole input sent back or with previous_response_id),
text.format json_schema, and 400s / 404s naming what is not supported."""

import json

import jsonschema

from tests.serving.conftest import raw

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                          "properties": {"city": {"type": "string", "maxLength": 20}}}}
QUESTION = "What is the capital of France?"


def test_text_response_equals_chat_completion(client):
  r = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=16, temperature=0)
  chat = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": QUESTION}],
                                        max_tokens=16, temperature=0)
  assert r.object == "response" and r.output_text == chat.choices[0].message.content
  assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
  assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
  assert client.responses.retrieve(r.id).output_text == r.output_text  # stored (store defaults to true)
  # instructions become the system turn; message items with input_text parts are the same as a string input
  items = client.responses.create(model="smollm2", instructions="Answer briefly.", max_output_tokens=16,
                                  temperature=0, input=[{"role": "user", "content": [
                                      {"type": "input_text", "text": QUESTION}]}])
  chat = client.chat.completions.create(model="smollm2", max_tokens=16, temperature=0, messages=[
      {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTION}])
  assert items.output_text == chat.choices[0].message.content


def test_stream_events_are_well_formed_and_add_up(client):
  events = list(client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=24, temperature=0,
                                        stream=True))
  kinds = [e.type for e in events]
  assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                      "response.incomplete")
  assert [e.sequence_number for e in events] == list(range(len(events)))
  assert kinds.index("response.output_item.added") < kinds.index("response.content_part.added") < kinds.index(
      "response.output_text.delta") < kinds.index("response.output_text.done") < kinds.index(
      "response.content_part.done") < kinds.index("response.output_item.done")
  text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
  final = events[-1].response
  assert text == final.output_text == next(e.text for e in events if e.type == "response.output_text.done")
  assert final.output[0].id == next(e.item_id for e in events if e.type == "response.output_text.delta")
  whole = client.responses.create(model="smollm2", input=QUESTION, max_output_tokens=24, temperature=0)
  assert whole.output_text == text


def test_a_message_cut_short_by_max_output_tokens_is_incomplete(client):
  """The response and its message item are both "incomplete" (OpenAI's shape), whole and streamed."""
  whole = client.responses.create(model="smollm2", input="Write a long story.", max_output_tokens=5)
  assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
  assert [item.status for item in whole.output] == ["incomplete"]
  events = list(client.responses.create(model="smollm2", input="Write a long story.", max_output_tokens=5,
                                        stream=True))
  done = [e.item for e in events if e.type == "response.output_item.done"]
  assert events[-1].type == "response.incomplete" and [i.status for i in done] == ["incomplete"]
  assert [item.status for item in events[-1].response.output] == ["incomplete"]


def test_function_call_round_trips(client):
  # One call (greedy, this small model repeats a call for as long as a list of calls may go on).
  first = client.responses.create(model="smollm2", input="What is the weather in Paris?", tools=[WEATHER],
                                  tool_choice="required", parallel_tool_calls=False, temperature=0,
                                  max_output_tokens=60)
  (call,) = [o for o in first.output if o.type == "function_call"]
  assert call.name == "get_weather" and first.status == "completed"
  jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
  answer = {"type": "function_call_output", "call_id": call.call_id, "output": "21 C and sunny"}
  # The whole conversation sent back (store-less clients, e.g. codex) ...
  history = [{"role": "user", "content": "What is the weather in Paris?"},
             {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments}]
  sent_back = client.responses.create(model="smollm2", input=history + [answer], tools=[WEATHER], tool_choice="none",
                                      temperature=0, max_output_tokens=20)
  # ... or the server's stored one: the same prompt, so the same greedy answer.
  chained = client.responses.create(model="smollm2", previous_response_id=first.id, input=[answer], tools=[WEATHER],
                                    tool_choice="none", temperature=0, max_output_tokens=20)
  assert sent_back.output_text and chained.output_text == sent_back.output_text


def test_streamed_function_call_matches_the_whole_one(client):
  kw = dict(model="smollm2", input="What is the weather in Rome?", tools=[WEATHER], temperature=0,
            max_output_tokens=60, tool_choice={"type": "function", "name": "get_weather"})
  whole = [o for o in client.responses.create(**kw).output if o.type == "function_call"]
  events = list(client.responses.create(**kw, stream=True))
  args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
  done = next(e for e in events if e.type == "response.function_call_arguments.done")
  assert args == done.arguments == whole[0].arguments and done.name == "get_weather"
  assert [o.type for o in events[-1].response.output] == ["function_call"]


def test_text_format_json_schema(client):
  schema = {"type": "object", "required": ["city", "country"], "additionalProperties": False,
            "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}}}
  r = client.responses.create(model="smollm2", input="Name the capital of France as JSON.", max_output_tokens=60,
                              temperature=1.0, text={"format": {"type": "json_schema", "name": "c", "schema": schema,
                                                                "strict": True}})
  jsonschema.validate(json.loads(r.output_text), schema)


def test_what_is_left_out_is_named(server):
  cases = [({"tools": [{"type": "web_search"}]}, 400, "tools"),
           ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input"),
           ({"background": True}, 400, "background"), ({"top_logprobs": 3}, 400, "top_logprobs"),
           ({"previous_response_id": "resp_nope"}, 404, "previous_response_id"),
           ({"input": [{"type": "computer_call"}]}, 400, "input"), ({"max_tool_calls": 0}, 400, "max_tool_calls"),
           ({"text": {"format": "json_object"}}, 400, "text")]  # a string where the format object goes: not a 500
  for extra, status, param in cases:
    code, body = raw(server, "/v1/responses", {"input": "hi", "max_output_tokens": 4, **extra})
    assert code == status and body["error"]["param"] == param, (extra, body)
  assert raw(server, "/v1/responses/resp_nope")[0] == 404


def test_streamed_items_open_and_close_in_order(server, client):
  """Text before a call (Hermes syntax, forced by a regex in auto mode): the message item is closed before the
  function_call item opens, every item's deltas add up to its done event, and output indexes agree."""
  from jaxllm.tool_calls import HermesToolFormat

  saved, server.tool_format = server.tool_format, HermesToolFormat()
  try:
    events = list(client.responses.create(
        model="smollm2", input="What is the weather in Paris?", tools=[WEATHER], temperature=0, max_output_tokens=60,
        stream=True, extra_body={"structured_outputs": {"regex": r'Let me check\.\n<tool_call>\{"name": '
                                                                 r'"get_weather", "arguments": \{"city": "Paris"\}\}'
                                                                 r"</tool_call>"}}))
  finally:
    server.tool_format = saved
  flow = [(e.type, getattr(e, "output_index", None)) for e in events if e.type.startswith("response.output_item")]
  assert flow == [("response.output_item.added", 0), ("response.output_item.done", 0),
                  ("response.output_item.added", 1), ("response.output_item.done", 1)]
  text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
  args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
  final = events[-1].response
  assert [o.type for o in final.output] == ["message", "function_call"]
  assert text == final.output[0].content[0].text and text.strip() == "Let me check."
  assert args == final.output[1].arguments and json.loads(args) == {"city": "Paris"}
