"""The request schemas against OpenAI's own: every field the `openai` package types for a chat or completions request
is honoured, ignored on purpose, or refused with a 400 that names it — so a field OpenAI adds shows up here as a
failing test, not as a client that breaks. (The server's HTTP handling of these is in test_server.py.)"""

import typing

import pytest
from openai.types import completion_create_params as legacy
from openai.types.chat import completion_create_params as chat
from openai.types.chat import ChatCompletionAssistantMessageParam, ChatCompletionToolMessageParam
from openai.types.responses import response_create_params as responses
from pydantic import ValidationError

from jaxllm.serving import protocol

OPENAI = {"chat": (chat.CompletionCreateParamsStreaming, protocol.ChatCompletionRequest),
          "completions": (legacy.CompletionCreateParamsStreaming, protocol.CompletionRequest),
          "responses": (responses.ResponseCreateParamsStreaming, protocol.ResponsesRequest)}
MINIMAL = {"chat": {"messages": [{"role": "user", "content": "hi"}]}, "completions": {"prompt": "hi"},
           "responses": {"input": "hi"}}
# Fields that change the output as OpenAI defines them (everything else must be IGNORED or UNSUPPORTED).
HONOURED = {
    "chat": {"messages", "model", "frequency_penalty", "logit_bias", "logprobs", "max_completion_tokens", "max_tokens",
             "n", "parallel_tool_calls", "presence_penalty", "response_format", "seed", "stop", "stream",
             "stream_options", "temperature", "tool_choice", "tools", "top_logprobs", "top_p"},
    "completions": {"prompt", "model", "best_of", "echo", "frequency_penalty", "logit_bias", "logprobs",
                    "max_tokens", "n", "presence_penalty", "seed", "stop", "stream", "stream_options",
                    "temperature", "top_p"},
    "responses": {"input", "model", "instructions", "tools", "tool_choice", "parallel_tool_calls", "max_tool_calls",
                  "max_output_tokens", "temperature", "top_p", "text", "stream", "stream_options", "store",
                  "previous_response_id", "top_logprobs"},  # (top_logprobs: refused when asked for, by its own check)
}
# A value of each unsupported field that asks for the feature (null / empty / "off" values are accepted).
ASKING = {"audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
          "web_search_options": {"search_context_size": "low"}, "moderation": {"enabled": True},
          "functions": [{"name": "f", "parameters": {}}], "function_call": "auto",
          "modalities": ["text", "audio"], "suffix": "end",
          "background": True, "background_options": {"x": 1}, "conversation": "conv_1", "prompt": {"id": "pmpt_1"},
          "image": {"size": "1024x1024"}, "access_programs": {"x": 1}, "context_management": [{"type": "x"}]}


def openai_fields(kind):
  return set(typing.get_type_hints(OPENAI[kind][0]))


@pytest.mark.parametrize("kind", OPENAI)
def test_every_openai_field_is_classified(kind):
  fields = openai_fields(kind)
  schema = OPENAI[kind][1]
  ignored, unsupported = fields & set(schema.ignored), fields & set(schema.refused)
  unclassified = fields - HONOURED[kind] - ignored - unsupported
  assert not unclassified, f"OpenAI {kind} fields neither honoured, ignored nor refused: {sorted(unclassified)}"
  assert not (HONOURED[kind] & (ignored | unsupported))
  assert HONOURED[kind] <= set(OPENAI[kind][1].model_fields)


@pytest.mark.parametrize("kind", OPENAI)
def test_ignored_fields_accept_any_value(kind):
  schema = OPENAI[kind][1]
  for name in sorted(openai_fields(kind) & set(schema.ignored)):
    for value in (None, "x", {"k": "v"}, ["a"], 3, True):
      schema.model_validate({**MINIMAL[kind], name: value})


@pytest.mark.parametrize("kind", OPENAI)
def test_unsupported_fields_accept_off_and_name_themselves_otherwise(kind):
  schema = OPENAI[kind][1]
  for name in sorted(openai_fields(kind) & set(schema.refused)):
    schema.model_validate({**MINIMAL[kind], name: None})
    with pytest.raises(ValidationError) as e:
      schema.model_validate({**MINIMAL[kind], name: ASKING[name]})
    cause = e.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, protocol.FieldError) and cause.field == name, (name, cause)
  if kind == "chat":  # the values that mean "off"
    schema.model_validate({**MINIMAL[kind], "modalities": ["text"], "response_format": {"type": "text"},
                           "tool_choice": "none", "tools": []})


@pytest.mark.parametrize("kind", OPENAI)
def test_unknown_names_stay_errors(kind):
  with pytest.raises(ValidationError, match="max_token"):
    OPENAI[kind][1].model_validate({**MINIMAL[kind], "max_token": 5})


def test_message_fields_of_openai_are_accepted():
  """Every field OpenAI types for an assistant or tool message is a field of ours (values in tests below)."""
  for param in (ChatCompletionAssistantMessageParam, ChatCompletionToolMessageParam):
    assert set(typing.get_type_hints(param)) <= set(protocol.ChatMessage.model_fields), param.__name__


def test_history_as_the_openai_client_returns_it():
  """`message.model_dump()` of the openai client's ChatCompletionMessage, sent back in the next turn."""
  from openai.types.chat.chat_completion_message import ChatCompletionMessage

  returned = ChatCompletionMessage(role="assistant", content="Hello!").model_dump()
  assert {"refusal", "annotations", "audio", "function_call", "tool_calls"} <= set(returned)
  req = protocol.ChatCompletionRequest.model_validate(
      {"messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}, returned,
                    {"role": "user", "content": [{"type": "text", "text": "and "}, {"type": "text", "text": "now?"}]}]})
  assert [m.template_message() for m in req.messages] == [
      {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "and now?"}]


def test_tool_round_trip_messages():
  req = protocol.ChatCompletionRequest.model_validate({"messages": [
      {"role": "user", "content": "weather in Paris?"},
      {"role": "assistant", "content": None, "tool_calls": [
          {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
      {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]})
  assert [m.template_message() for m in req.messages][1:] == [
      {"role": "assistant", "content": "", "tool_calls": [
          {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
      {"role": "tool", "content": "18 C", "tool_call_id": "call_1"}]


@pytest.mark.parametrize("message,error", [
    ({"role": "tool", "content": "x"}, "tool_call_id"),
    ({"role": "user", "content": "x", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
     "assistant"),
    ({"role": "function", "content": "x", "name": "f"}, "role"),
])
def test_bad_messages(message, error):
  with pytest.raises(ValidationError, match=error):
    protocol.ChatCompletionRequest.model_validate({"messages": [message]})


@pytest.mark.parametrize("part,error", [
    ({"type": "image_url", "image_url": {"url": "http://x/y.png"}}, "image_url content parts are not supported"),
    ({"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}, "input_audio content parts"),
    ({"type": "video"}, "unknown content part"),
])
def test_non_text_parts_are_clear_errors(part, error):
  req = protocol.ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": [part]}]})
  with pytest.raises(ValueError, match=error):
    req.messages[0].template_message()


def test_bad_tool_call_arguments():
  call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}
  req = protocol.ChatCompletionRequest.model_validate(
      {"messages": [{"role": "assistant", "content": None, "tool_calls": [call]}]})
  with pytest.raises(ValueError, match="not valid JSON"):
    req.messages[0].template_message()
