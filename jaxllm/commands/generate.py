"""`jaxllm generate`: one prompt (or chat turn) in, the model's continuation out."""

from absl import flags

from jaxllm.commands import fail

_MODEL = flags.DEFINE_string("model", "default", "'default', a .gguf file, an HF checkpoint dir or a convert dir.")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt as a user message in the model's chat template.")
_SYSTEM = flags.DEFINE_string("system", None, "Optional system message (with --chat).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Maximum number of generated tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filter (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p (nucleus) filter.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Parameter dtype: float32 or bfloat16.")
_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'model=8', 'data=2,model=4' or 'auto'; default: one device.")
_LAYOUT = flags.DEFINE_enum("layout", "tp", ["tp", "2d", "dp"], "Sharding layout over the mesh.")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass the prompt with --prompt.")
  if not _PROMPT.value:
    fail("--prompt is required (a non-empty string).")
  from jaxllm import LLM, SamplingParams

  try:
    params = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, seed=_SEED.value)
    llm = LLM(_MODEL.value, dtype=_DTYPE.value, mesh=_MESH.value, layout=_LAYOUT.value)
    if _CHAT.value:
      messages = ([{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else [])
      out = llm.chat(messages + [{"role": "user", "content": _PROMPT.value}], params)[0]
    else:
      out = llm.generate(_PROMPT.value, params)[0]
  except (ValueError, OSError) as e:
    fail(str(e))
  print(out.text)
