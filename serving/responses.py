"""OpenAI's Responses API (`POST /v1/responses`, `GET /v1/responses/{id}`) over the same engine as chat completions.

What it takes: `input` as a string or a list of items (messages with text content or input_text / output_text parts;
`function_call` and `function_call_output` items from earlier turns; reasoning items are skipped), `instructions`,
function `tools` (`{"type": "function", "name", "description", "parameters"}`) with `tool_choice` ("none", "auto",
"required", `{"type": "function", "name"}`), `parallel_tool_calls`, `max_tool_calls`, `max_output_tokens`,
`temperature`, `top_p`, `text.format` (text, json_object, json_schema: structured outputs; or vLLM's
`structured_outputs`), `stream` (the typed
events: response.created / in_progress, output_item.added / done, content_part.added / done, output_text.delta /
done, function_call_arguments.delta / done, response.completed or response.incomplete), and `previous_response_id`
over the responses this server keeps (in memory, the last RESPONSES_KEPT with `store` not false).
Left out (a 400 naming the field, or ignored where that cannot change the output): hosted tools (web / file search,
computer use, code interpreter, MCP, image generation), image / file / audio input, `background`, `conversation`,
reusable `prompt`s, `top_logprobs`, reasoning summaries (`reasoning` is ignored: no reasoning model here).
"""

from __future__ import annotations

import collections
import json
import time
import uuid

from aiohttp import web

from jaxllm import tool_calls
from jaxllm.sampling import SamplingParams
from jaxllm.serving import protocol
from jaxllm.serving.server import (OPEN_SSE, APIError, _body, _cached_tokens, _chat_prompt_ids, _check_model,
                                   _finish_reason, _grammar, _max_tokens, _run, _server, _submit, _ToolCalls)
from jaxllm.structured_outputs import StructuredOutputsParams

RESPONSES_KEPT = 1000  # stored responses (for previous_response_id and GET), oldest dropped first ...
RESPONSES_KEPT_CHARS = 64 << 20  # ... and beyond this many characters of stored conversation


# The app's stored responses: id -> (response object, the conversation's messages after it, their size).
STORE = web.AppKey("responses", collections.OrderedDict)


def _text_of(content, where: str) -> str:
  if isinstance(content, str):
    return content
  if not isinstance(content, list):
    raise APIError(400, f"{where}.content must be a string or a list of text parts.", param="input")
  parts = []
  for j, part in enumerate(content):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text") and isinstance(part.get("text"), str):
      parts.append(part["text"])
    elif kind == "refusal":
      parts.append(str(part.get("refusal", "")))
    else:
      raise APIError(400, f"{where}.content[{j}] of type {kind!r} is not supported by this text model; send "
                     "input_text parts.", param="input")
  return "".join(parts)


def _messages(items) -> list[dict]:
  """Input items as chat messages (what the chat template renders)."""
  if isinstance(items, str):
    return [{"role": "user", "content": items}]
  out: list[dict] = []
  for i, item in enumerate(items):
    kind = item.get("type", "message")
    if kind == "message":
      if item.get("role") not in ("user", "assistant", "system", "developer"):
        raise APIError(400, f"input[{i}].role must be user, assistant, system or developer.", param="input")
      out.append({"role": item["role"], "content": _text_of(item.get("content"), f"input[{i}]")})
    elif kind == "function_call":
      if not all(isinstance(item.get(k), str) for k in ("call_id", "name")):
        raise APIError(400, f"input[{i}]: a function_call item needs call_id and name.", param="input")
      call = {"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}}
      if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
        out[-1]["tool_calls"].append(call)  # parallel calls: one assistant turn
      else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})
    elif kind == "function_call_output":
      output = item.get("output")
      if not isinstance(item.get("call_id"), str):
        raise APIError(400, f"input[{i}]: a function_call_output item needs the call_id it answers.", param="input")
      text = output if isinstance(output, str) else _text_of(output, f"input[{i}].output")
      out.append({"role": "tool", "tool_call_id": item["call_id"], "content": text})
    elif kind == "reasoning":
      continue  # an earlier reasoning model's summary: nothing for this model to read
    else:
      raise APIError(400, f"input[{i}]: items of type {kind!r} are not supported (messages, function_call and "
                     "function_call_output are).", param="input")
  return out


def _tools(req) -> tuple[list[dict] | None, object]:
  """The request's function tools and tool_choice in the chat completions form (hosted tools are a 400)."""
  tools = None
  if req.tools:
    tools = []
    for i, t in enumerate(req.tools):
      if t.get("type") != "function":
        raise APIError(400, f"tools[{i}]: {t.get('type')!r} tools are not supported; only function tools are.",
                       param="tools")
      tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters")
                                                      if t.get(k) is not None}})
  choice = req.tool_choice
  if isinstance(choice, dict):
    if choice.get("type") != "function":
      raise APIError(400, f"tool_choice of type {choice.get('type')!r} is not supported.", param="tool_choice")
    choice = {"type": "function", "function": {"name": choice.get("name")}}
  return tools, choice


def _text_format(req) -> StructuredOutputsParams | None:
  """The output constraint: text.format (json_object / json_schema), or vLLM's structured_outputs."""
  if req.structured_outputs is not None:
    try:
      return protocol.structured_outputs_params(req.structured_outputs)
    except ValueError as e:
      raise APIError(400, str(e), param="structured_outputs") from None
  fmt = (req.text or {}).get("format") or {"type": "text"}
  if not isinstance(fmt, dict):
    raise APIError(400, f"text.format must be an object such as {{\"type\": \"json_object\"}}, not {fmt!r}.",
                   param="text")
  try:
    if fmt.get("type") == "text":
      return None
    if fmt.get("type") == "json_object":
      return StructuredOutputsParams(json_object=True)
    if fmt.get("type") == "json_schema":
      return StructuredOutputsParams(json=fmt.get("schema", {}))
  except ValueError as e:
    raise APIError(400, f"text.format: {e}", param="text") from None
  raise APIError(400, f"text.format type {fmt.get('type')!r} is not supported; use text, json_object or json_schema.",
                 param="text")


def _output_items(calls: _ToolCalls, text: str, max_tool_calls: int | None) -> tuple[list[dict], list]:
  """The response's output items (a message with the text outside any calls, then one function_call per call)."""
  found, content = calls.parse(0, text)
  found = found[:max_tool_calls] if max_tool_calls is not None else found
  out = []
  message = content.strip() if found else text
  if message or not found:
    out.append({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": message, "annotations": [], "logprobs": []}]})
  for c in found:
    out.append({"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": c.id, "name": c.name,
                "arguments": c.arguments, "status": "completed"})
  return out, found


async def responses(request: web.Request) -> web.StreamResponse:
  server = _server(request)
  req = await _body(request, protocol.ResponsesRequest)
  _check_model(server, req.model)
  store = request.app[STORE]
  history = []
  if req.previous_response_id is not None:
    if req.previous_response_id not in store:
      raise APIError(404, f"no response {req.previous_response_id!r} is stored here (this server keeps the last "
                     f"{RESPONSES_KEPT}, in memory).", "not_found_error", "previous_response_id")
    history = store[req.previous_response_id][1]
  turn = _messages(req.input)
  instructions = [{"role": "system", "content": req.instructions}] if req.instructions else []
  conversation = history + turn
  try:
    messages = [protocol.ChatMessage.model_validate(m) for m in instructions + conversation]
  except ValueError as e:
    raise APIError(400, f"input: {e}", param="input") from None
  tools, tool_choice = _tools(req)
  try:
    specs, choice = tool_calls.check_tools(tools, tool_choice)
    constraint = tool_calls.constraint(server.tool_format, specs, choice,
                                       req.parallel_tool_calls is not False and req.max_tool_calls != 1)
  except ValueError as e:
    raise APIError(400, str(e), param="tool_choice" if tools else "tools") from None
  text_format = _text_format(req)
  if constraint is not None and text_format is not None:
    raise APIError(400, f"tool_choice {choice!r} constrains the output itself; drop text.format.", param="tool_choice")
  fmt = server.tool_format if choice != "none" else None
  ids = await server.off_loop(_chat_prompt_ids, server.tokenizer, messages, True, tools if fmt else None, fmt, specs)
  try:
    params = SamplingParams(max_tokens=_max_tokens(server, len(ids), req.max_output_tokens),
                            temperature=1.0 if req.temperature is None else req.temperature,
                            top_p=1.0 if req.top_p is None else req.top_p,
                            structured_outputs=constraint or text_format)
  except ValueError as e:
    raise APIError(400, str(e)) from None
  field = "tools" if constraint is not None else "structured_outputs" if req.structured_outputs is not None else "text"
  (stream,) = _submit(request, [(ids, params)], None, await _grammar(server, params, field))
  calls = _ToolCalls(fmt, specs, choice, 1)
  rid, created = f"resp_{uuid.uuid4().hex}", int(time.time())

  def response(status: str, output: list, r=None) -> dict:
    used = len(r.output_ids) if r is not None else 0
    incomplete = r is not None and _finish_reason(r) == "length"
    if incomplete and output and output[-1]["type"] == "message":  # the message max_output_tokens cut short
      output = output[:-1] + [{**output[-1], "status": "incomplete"}]
    return {"id": rid, "object": "response", "created_at": created, "model": server.model_name,
            "status": "incomplete" if incomplete else status, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": req.instructions, "tools": req.tools or [], "tool_choice": req.tool_choice or "auto",
            "parallel_tool_calls": req.parallel_tool_calls is not False, "max_tool_calls": req.max_tool_calls,
            "temperature": params.temperature, "top_p": params.top_p, "max_output_tokens": req.max_output_tokens,
            "previous_response_id": req.previous_response_id, "store": req.store is not False,
            "text": req.text or {"format": {"type": "text"}}, "metadata": req.metadata or {}, "truncation": "disabled",
            "usage": None if r is None else {
                "input_tokens": len(ids), "output_tokens": used, "total_tokens": len(ids) + used,
                "input_tokens_details": {"cached_tokens": _cached_tokens([stream])},
                "output_tokens_details": {"reasoning_tokens": 0}}}

  def finish(text: str, output: list | None = None) -> dict:
    """The final response (output: the streamed items, else built from the text), stored for a next turn."""
    r = stream.requests[0]
    if output is None:
      output, found = _output_items(calls, text, req.max_tool_calls)
    else:  # streamed: the items the events built (the calls they carry are the parsed ones)
      found = calls.parse(0, text)[0][:req.max_tool_calls]
    body = response("completed", output, r)
    if req.store is not False:  # the conversation so far, for a next turn's previous_response_id
      said = [{"role": "assistant", "content": None if found else text,
               "tool_calls": [c.to_openai() for c in found] or None}]
      _keep(store, rid, body, conversation + said)
    return body

  if not req.stream:
    parts: list[str] = []

    async def collect(_, u):
      parts.append(u.delta)

    await _run(server, [stream], collect)
    server.metrics.requests.labels("responses", "200").inc()
    return web.json_response(finish("".join(parts)))

  http = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
  await http.prepare(request)
  events = _Events(http)
  request[OPEN_SSE] = events  # an error from here on (the engine stopped) is this stream's last event
  await events.send("response.created", response=response("in_progress", []))
  await events.send("response.in_progress", response=response("in_progress", []))
  full: list[str] = []

  async def on_update(_, u):
    full.append(u.delta)
    delta = calls.stream(0, u.delta, u.finished)
    if delta.get("content"):
      await events.text(delta["content"])
    for call in delta.get("tool_calls", []):
      if req.max_tool_calls is None or call["index"] < req.max_tool_calls:
        await events.call(call)

  await _run(server, [stream], on_update)
  if not events.items:  # nothing at all was generated: an empty message, as the whole response has
    await events.text("")
  if _finish_reason(stream.requests[0]) == "length" and events.open is not None and events.open["type"] == "message":
    events.open["status"] = "incomplete"  # its output_item.done says so, as the final response does
  await events.close()
  body = finish("".join(full), events.items)
  await events.send("response.completed" if body["status"] == "completed" else "response.incomplete", response=body)
  server.metrics.requests.labels("responses", "200").inc()
  await http.write_eof()
  return http


class _Events:
  """A streamed response's typed events (with their sequence numbers) and the output items they build, each item
  opened, filled by deltas, and closed before the next one opens (OpenAI's order)."""

  def __init__(self, http: web.StreamResponse):
    self.http, self.seq = http, 0
    self.items: list[dict] = []  # the output, in order, as the client has rebuilt it
    self.open: dict | None = None
    self.calls: dict[int, dict] = {}  # a call's index in the sample -> its item

  async def error(self, body: dict) -> web.StreamResponse:
    """The Responses API's `error` event (an `APIError`'s body) closes the stream."""
    e = body["error"]
    await self.send("error", code=str(e["code"]), message=e["message"], param=e["param"])
    await self.http.write_eof()
    return self.http

  async def send(self, kind: str, **fields):
    data = json.dumps({"type": kind, "sequence_number": self.seq, **fields}, ensure_ascii=False)
    self.seq += 1
    await self.http.write(f"event: {kind}\ndata: {data}\n\n".encode())

  async def _add(self, item: dict):
    await self.close()
    self.open = item
    self.items.append(item)
    await self.send("response.output_item.added", output_index=len(self.items) - 1,
                    item={**item, "status": "in_progress", **({"content": []} if item["type"] == "message" else {})})

  async def text(self, delta: str):
    if self.open is None or self.open["type"] != "message":
      part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
      await self._add({"type": "message", "id": f"msg_{uuid.uuid4().hex}", "status": "completed",
                       "role": "assistant", "content": [part]})
      await self.send("response.content_part.added", item_id=self.open["id"], output_index=len(self.items) - 1,
                      content_index=0, part=part)
    self.open["content"][0]["text"] += delta
    if delta:
      await self.send("response.output_text.delta", item_id=self.open["id"], output_index=len(self.items) - 1,
                      content_index=0, delta=delta, logprobs=[])

  async def call(self, call: dict):
    """A `delta.tool_calls` entry: a new call (id, name) opens its item; its arguments go out as deltas."""
    item = self.calls.get(call["index"])
    if item is None:
      item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
              "name": call["function"]["name"], "arguments": "", "status": "completed"}
      self.calls[call["index"]] = item
      await self._add(item)
    args = call["function"].get("arguments") or ""
    if args:
      item["arguments"] += args
      await self.send("response.function_call_arguments.delta", item_id=item["id"],
                      output_index=self.items.index(item), delta=args)

  async def close(self):
    item, self.open = self.open, None
    if item is None:
      return
    index = self.items.index(item)
    if item["type"] == "message":
      part = item["content"][0]
      await self.send("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=part["text"], logprobs=[])
      await self.send("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=part)
    else:
      await self.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                      name=item["name"], arguments=item["arguments"])
    await self.send("response.output_item.done", output_index=index, item=item)


def _keep(store: collections.OrderedDict, rid: str, body: dict, conversation: list[dict]) -> None:
  """Stores a response and its conversation, dropping the oldest beyond RESPONSES_KEPT entries or
  RESPONSES_KEPT_CHARS characters of conversation (a client cannot pin unbounded memory)."""
  size = sum(len(m.get("content") or "") + len(json.dumps(m.get("tool_calls") or [])) for m in conversation)
  store[rid] = (body, conversation, size)
  total = sum(entry[2] for entry in store.values())
  while len(store) > 1 and (len(store) > RESPONSES_KEPT or total > RESPONSES_KEPT_CHARS):
    total -= store.popitem(last=False)[1][2]


async def get_response(request: web.Request) -> web.Response:
  rid = request.match_info["response_id"]
  found = request.app[STORE].get(rid)
  if found is None:
    raise APIError(404, f"no response {rid!r} is stored here.", "not_found_error", "response_id")
  return web.json_response(found[0])


def setup(app: web.Application) -> None:
  """Adds the Responses API's routes and its store of responses to the server's app."""
  app[STORE] = collections.OrderedDict()
  app.add_routes([web.post("/v1/responses", responses, name="responses"),
                  web.get("/v1/responses/{response_id}", get_response, name="response")])
