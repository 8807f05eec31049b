"""`jaxllm chat`: a conversation with a model on the terminal (one answer to --prompt when stdin is not a terminal)."""

import sys

from absl import flags

from jaxllm.commands import device_flags, engine_flags, fail

_MODEL = flags.DEFINE_string("model", "default", "'default', a .gguf file, an HF checkpoint dir or a convert dir.")
_PROMPT = flags.DEFINE_string("prompt", "What is the capital of France?", "First user message.")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 256, "Maximum tokens per reply.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Parameter dtype: float32, bfloat16 or auto (bfloat16 on a GPU / TPU, "
                              "float32 on CPU).")


def main(argv):
  del argv
  import jax

  from jaxllm import LLM, SamplingParams

  try:
    params = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value)
    print(f"loading {_MODEL.value} ...", file=sys.stderr)
    mesh, layout = device_flags.setup()
    llm = LLM(_MODEL.value, dtype=_DTYPE.value, quantization=device_flags.quantization(), mesh=mesh, layout=layout,
              engine_config=engine_flags.engine_config())
  except (ValueError, OSError) as e:
    fail(str(e))
  print(repr(llm), file=sys.stderr)
  # Every process of a multi-host run must see the same turns, so only a single-process chat reads the terminal.
  interactive = sys.stdin.isatty() and jax.process_count() == 1
  primary = device_flags.is_primary()
  messages = []
  user = _PROMPT.value
  if primary:
    print(f"\n>>> {user}")
  while True:
    messages.append({"role": "user", "content": user})
    try:
      reply = llm.chat(messages, params)[0].text
    except ValueError as e:  # e.g. the conversation outgrew max_model_len
      print(f"error: {e}", file=sys.stderr)
      messages.pop()
      reply = None
    if reply is not None and primary:
      print(reply)
      messages.append({"role": "assistant", "content": reply})
    if not interactive:
      return
    try:
      user = input("\n>>> (empty line or Ctrl-D to quit) ").strip()
    except EOFError:
      return
    if not user:
      return
