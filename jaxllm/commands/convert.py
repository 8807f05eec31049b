"""`jaxllm convert --model SRC --output DIR`: any checkpoint jaxllm reads -> jaxllm's orbax format (fast reloads)."""

import os
import time

from absl import flags

from jaxllm.commands import fail

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
    ckpt = checkpoint.load_checkpoint(_MODEL.value, _DTYPE.value)
    orbax_io.save(_OUTPUT.value, ckpt.config, ckpt.params, ckpt.dtype, source=ckpt.source)
    if ckpt.tokenizer is not None:
      ckpt.tokenizer.save(_OUTPUT.value)
  except (ValueError, OSError) as e:
    fail(str(e))
  print(f"wrote {os.path.abspath(_OUTPUT.value)} ({ckpt.config.name}, {ckpt.dtype}) in {time.time() - start:.1f}s")
