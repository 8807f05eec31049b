"""`jaxllm generate`: one prompt (or chat turn) in, the model's continuation out."""

from absl import flags

from jaxllm.commands import device_flags, engine_flags, fail

_MODEL = flags.DEFINE_string("model", "default", "'default', a .gguf file, an HF checkpoint dir or a convert dir.")
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text.")
_PROMPT_IDS = flags.DEFINE_string("prompt_token_ids", None, "The prompt as comma-separated token ids (instead of "
                                  "--prompt). A model without a tokenizer prints the generated ids the same way.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt as a user message in the model's chat template.")
_SYSTEM = flags.DEFINE_string("system", None, "Optional system message (with --chat).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "Maximum number of generated tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k filter (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Top-p (nucleus) filter.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed.")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Parameter dtype: float32, bfloat16 or auto (bfloat16 on a GPU / TPU, "
                              "float32 on CPU).")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass the prompt with --prompt.")
  if bool(_PROMPT.value) == bool(_PROMPT_IDS.value):
    fail("pass exactly one of --prompt (a non-empty string) or --prompt_token_ids.")
  if _PROMPT_IDS.value and _CHAT.value:
    fail("--chat takes a --prompt text, not --prompt_token_ids.")
  prompt_ids = None
  if _PROMPT_IDS.value:
    try:
      prompt_ids = [int(t) for t in _PROMPT_IDS.value.split(",")]
    except ValueError:
      fail(f"--prompt_token_ids={_PROMPT_IDS.value!r} is not a comma-separated list of integers.")
  from jaxllm import LLM, SamplingParams

  try:
    params = SamplingParams(max_tokens=_MAX_TOKENS.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                            top_p=_TOP_P.value, seed=_SEED.value)
    mesh, layout = device_flags.setup()
    llm = LLM(_MODEL.value, dtype=_DTYPE.value, quantization=device_flags.quantization(), mesh=mesh, layout=layout,
              engine_config=engine_flags.engine_config())
    if _CHAT.value:
      messages = ([{"role": "system", "content": _SYSTEM.value}] if _SYSTEM.value else [])
      out = llm.chat(messages + [{"role": "user", "content": _PROMPT.value}], params)[0]
    elif prompt_ids is not None:
      out = llm.generate(prompt_token_ids=[prompt_ids], sampling_params=params)[0]
    else:
      out = llm.generate(_PROMPT.value, params)[0]
  except (ValueError, OSError) as e:
    fail(str(e))
  if device_flags.is_primary():
    print(out.text if llm.tokenizer is not None else ",".join(str(t) for t in out.token_ids))
