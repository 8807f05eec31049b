"""`jaxllm serve`: the OpenAI-compatible HTTP server (`jaxllm.serving.server`), flags named like vLLM's (the engine's
are `jaxllm.commands.engine_flags`)."""

from absl import flags

from jaxllm.commands import device_flags, engine_flags, fail

_MODEL = flags.DEFINE_string("model", "default", "'default', a .gguf file, an HF checkpoint dir or a convert dir.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tokenizer path to use instead of the checkpoint's own.")
_SERVED = flags.DEFINE_string("served_model_name", None, "The model name clients send and /v1/models lists "
                              "(default: --model).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Parameter dtype: float32, bfloat16 or auto (bfloat16 on a GPU / TPU, "
                              "float32 on CPU).")
_MAX_WAITING = flags.DEFINE_integer("max_waiting", 1024, "Sequences (prompts x n) waiting for a slot beyond which a "
                                     "request is answered 503 (queued whole or not at all; one asking for more is "
                                     "400).")
_MAX_STOP_STRINGS = flags.DEFINE_integer("max_stop_strings", 64, "Stop strings a request may send (each is searched "
                                         "for after every token it generates).")
_MAX_STOP_CHARS = flags.DEFINE_integer("max_stop_chars", 4096, "Total characters of a request's stop strings.")
_MAX_CONNECTIONS = flags.DEFINE_integer("max_connections", None, "Open connections beyond which a new one is answered "
                                        "503 and closed (default: the open-file limit minus 256).")
_TIMEOUT_KEEP_ALIVE = flags.DEFINE_float("timeout_keep_alive", 5.0, "Seconds a connection with no request in progress "
                                         "(idle, or still sending its request line and headers) stays open.")
_BODY_TIMEOUT = flags.DEFINE_float("body_timeout", 30.0, "Seconds a request's body has to arrive (else 408).")
_DRAIN_TIMEOUT = flags.DEFINE_float("drain_timeout", 60.0, "Seconds SIGTERM / SIGINT waits for in-flight requests "
                                    "before cancelling them.")
_API_KEY = flags.DEFINE_string("api_key", None, "If set, /v1/, /tokenize and /detokenize requests need "
                                 "'Authorization: Bearer KEY'.")
_WARMUP = flags.DEFINE_bool("warmup", True, "Compile every shape bucket before reporting ready.")
_LOG_LEVEL = flags.DEFINE_enum("log_level", "info", ["debug", "info", "warning", "error"], "Log level.")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}.")
  import asyncio
  import logging

  from jaxllm.serving.server import Server, ServerConfig, serve

  logging.basicConfig(level=_LOG_LEVEL.value.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  try:
    config = ServerConfig(model=_MODEL.value, served_model_name=_SERVED.value, tokenizer=_TOKENIZER.value,
                          host=_HOST.value, port=_PORT.value, dtype=_DTYPE.value,
                          quantization=device_flags.quantization(), engine=engine_flags.engine_config(),
                          max_waiting=_MAX_WAITING.value, max_stop_strings=_MAX_STOP_STRINGS.value,
                          max_stop_chars=_MAX_STOP_CHARS.value, max_connections=_MAX_CONNECTIONS.value,
                          timeout_keep_alive=_TIMEOUT_KEEP_ALIVE.value, body_timeout=_BODY_TIMEOUT.value,
                          drain_timeout=_DRAIN_TIMEOUT.value, api_key=_API_KEY.value, warmup=_WARMUP.value)
    mesh, layout = device_flags.setup()
  except ValueError as e:
    fail(str(e))
  import os
  import sys

  from jaxllm.serving import multihost

  if not device_flags.is_primary():  # a multi-process server: process 0 serves HTTP, this one follows its steps
    status = multihost.serve_follower(config, mesh, layout)
    if status:  # process 0 (or another) is gone: no orderly distributed shutdown to wait for
      logging.shutdown()
      os._exit(status)
    return
  server = Server(config, mesh, layout)
  asyncio.run(serve(server))
  if server.state == "failed" and multihost.process_count() > 1:
    # Another process died, or this one failed to load: no orderly distributed shutdown to wait for (its barrier
    # would wait minutes for the missing process), and the others exit when this one's channel closes.
    print(f"error: {server.load_error}", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(1)
  if server.state == "failed":
    fail(server.load_error)
  if server.state == "stopped":  # signalled while loading / warming up: the load thread may be inside XLA
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)
