"""`jaxllm convert --model SRC --output DIR [--mesh model=8]`: any checkpoint jaxllm reads -> jaxllm's orbax format
(fast reloads). With --mesh the params are placed on the mesh first and orbax writes each shard from its device, so
a later `LLM(DIR, mesh=...)` restores each shard straight onto its device."""

import os
import time

from absl import flags

from jaxllm.commands import device_flags, fail

_MODEL = flags.DEFINE_string("model", None, "Source: 'default', a .gguf file or an HF checkpoint directory.")
_OUTPUT = flags.DEFINE_string("output", None, "Output directory (must not hold a checkpoint already).")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Stored dtype: float32 or bfloat16.")


def main(argv):
  del argv
  if not _MODEL.value or not _OUTPUT.value:
    fail("both --model and --output are required.")
  from jaxllm import checkpoint
  from jaxllm.checkpoint import orbax_io

  start = time.time()
  try:
    mesh, layout = device_flags.setup()
    ckpt = checkpoint.load_checkpoint(_MODEL.value, _DTYPE.value, mesh, layout, device_flags.quantization())
    params = ckpt.params
    if mesh is not None:  # written shard by shard from the devices (on many hosts: each host writes its own)
      params = checkpoint.place_params(params, checkpoint.param_shardings(ckpt.config, ckpt.dtype, mesh, layout,
                                                                          ckpt.quantization))
    orbax_io.save(_OUTPUT.value, ckpt.config, params, ckpt.dtype, source=ckpt.source, quantization=ckpt.quantization)
    if ckpt.tokenizer is not None and device_flags.is_primary():
      ckpt.tokenizer.save(_OUTPUT.value)
  except (ValueError, OSError) as e:
    fail(str(e))
  if device_flags.is_primary():
    weights = ckpt.dtype if ckpt.quantization is None else f"{ckpt.quantization} weights, {ckpt.dtype} scales"
    print(f"wrote {os.path.abspath(_OUTPUT.value)} ({ckpt.config.name}, {weights}) in {time.time() - start:.1f}s")
