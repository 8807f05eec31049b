"""Structured outputs over HTTP with real clients: OpenAI's response_format (json_object, json_schema, the `openai`
client's `beta.chat.completions.parse` with a pydantic model), vLLM's structured_outputs (choice, regex) on chat and
completions, streamed and not; bad constraints are 400s that name the field and the server keeps serving."""

import json
import re
import urllib.request

import jsonschema
import pydantic
import pytest

from tests.serving.conftest import raw

CITY = {"type": "object", "additionalProperties": False, "required": ["city", "country", "population"],
        "properties": {"city": {"type": "string", "maxLength": 30}, "country": {"type": "string", "maxLength": 30},
                       "population": {"type": "integer", "minimum": 0, "maximum": 40000000}}}
ASK = [{"role": "user", "content": "Tell me about Paris as JSON."}]
NESTED = {"type": "string"}
for _ in range(100):
  NESTED = {"type": "object", "properties": {"x": NESTED}}


class Capital(pydantic.BaseModel):
  city: str = pydantic.Field(max_length=30)
  country: str = pydantic.Field(max_length=30)
  is_large: bool


def test_json_schema_response_format(client):
  r = client.chat.completions.create(
      model="smollm2", messages=ASK, temperature=1.0, seed=7, n=3, max_tokens=120,
      response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}})
  for c in r.choices:
    assert c.finish_reason == "stop"
    jsonschema.validate(json.loads(c.message.content), CITY)


def test_openai_parse_with_a_pydantic_model(client):
  r = client.beta.chat.completions.parse(model="smollm2", messages=ASK, response_format=Capital, max_tokens=120)
  parsed = r.choices[0].message.parsed
  assert isinstance(parsed, Capital), r.choices[0].message.content


def test_json_object_streamed_reassembles(client):
  chunks = client.chat.completions.create(model="smollm2", messages=ASK, temperature=0.8, seed=3, max_tokens=150,
                                          response_format={"type": "json_object"}, stream=True)
  text, reasons = "", []
  for ch in chunks:
    if ch.choices:
      text += ch.choices[0].delta.content or ""
      reasons.append(ch.choices[0].finish_reason)
  assert reasons[-1] == "stop"
  assert isinstance(json.loads(text), dict)


def test_vllm_structured_outputs_choice_and_regex(client):
  yes_no = client.chat.completions.create(
      model="smollm2", messages=[{"role": "user", "content": "Is Paris in France?"}], temperature=1.0, n=4, seed=1,
      max_tokens=5, extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
  assert {c.message.content for c in yes_no.choices} <= {"yes", "no"}
  phone = client.completions.create(model="smollm2", prompt=["Call me at", "My number:"], temperature=1.0, seed=2,
                                    max_tokens=20, extra_body={"structured_outputs": {"regex": r" \d{3}-\d{4}"}})
  assert all(re.fullmatch(r" \d{3}-\d{4}", c.text) for c in phone.choices), [c.text for c in phone.choices]


@pytest.mark.parametrize("extra, param, message", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "int"}}}},
     "response_format", "int"),
    ({"response_format": {"type": "grammar"}}, "response_format", "not supported"),
    ({"response_format": {"type": "json_schema", "json_schema": "no"}}, "response_format", "json_schema"),
    ({"structured_outputs": {"regex": "(a"}}, "structured_outputs", "unclosed group"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty list"),
    ({"structured_outputs": {"json_schema": {}}}, "structured_outputs", "unknown keys"),
    ({"structured_outputs": {"json": NESTED, "disable_additional_properties": True}}, "structured_outputs", "nested"),
    ({"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, "structured_outputs",
     "not both"),
])
def test_bad_constraints_are_400s_naming_the_field(server, extra, param, message):
  status, body = raw(server, "/v1/chat/completions", {"messages": ASK, "max_tokens": 4, **extra})
  assert status == 400, body
  assert body["error"]["param"] == param and message in body["error"]["message"], body
  assert raw(server, "/health")[0] == 200


def test_logprobs_under_a_constraint_are_strict_json(server):
  """Tokens a mask refused have logprob -inf: they are left out of top_logprobs (and -Infinity, which is not JSON,
  never reaches the wire)."""
  body = {"messages": ASK, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 5,
          "structured_outputs": {"choice": ["yes", "no"]}}
  req = urllib.request.Request(f"http://127.0.0.1:{server.port}/v1/chat/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=120) as r:
    text = r.read().decode()

  def refuse(name):
    raise AssertionError(f"{name} in the response")

  out = json.loads(text, parse_constant=refuse)
  (first,) = out["choices"][0]["logprobs"]["content"][:1]
  # Only tokens that can start "yes" or "no" are alternatives at the first position.
  assert first["top_logprobs"] and {t["token"] for t in first["top_logprobs"]} <= {"y", "ye", "yes", "n", "no"}
