"""What every benchmark script shares: the device's measured copy bandwidth and matmul FLOP/s (the denominators of
the bandwidth and compute floors), the device's name for the results heading, and appending a table to RESULTS.md."""

import os
import platform
import time

import numpy as np

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def copy_bandwidth_gbs() -> float:
  """Memory bandwidth of the device jax runs on (read + write bytes counted), best of 5 copies: 256 MB with numpy on
  CPU (XLA:CPU does not beat it), 1 GiB through a jitted op on an accelerator."""
  import jax
  import jax.numpy as jnp

  best = float("inf")
  if jax.default_backend() == "cpu":
    src = np.ones(64 * 2**20, np.float32)
    dst = np.empty_like(src)
    for _ in range(5):
      start = time.perf_counter()
      np.copyto(dst, src)
      best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9
  src = jnp.ones(256 * 2**20, jnp.float32)
  copy = jax.jit(lambda x: x * 1.0)
  jax.block_until_ready(copy(src))
  for _ in range(5):
    start = time.perf_counter()
    jax.block_until_ready(copy(src))
    best = min(best, time.perf_counter() - start)
  return 2 * src.nbytes / best / 1e9


def matmul_tflops(dtype: str = "float32", shape: tuple[int, int, int] | None = None) -> float:
  """Achievable matmul throughput of the device jax runs on, 2 m k n FLOPs per [m, k] x [k, n] product. Default: the
  device's peak, best of 5 square products (n = 1024 on CPU, 8192 on an accelerator; on CPU the better of XLA's dot
  and the native kernel the model's weight matmuls run, `jaxllm.pallas_kernels.matmul_cpu`). shape=(m, k, n): that
  product, median of rounds of back-to-back calls (`median_ms`), e.g. (32 rows, d_model, d_ff) for what a 32-sequence
  decode step's GEMMs reach, on the matmul the model runs (the native kernel on CPU where it builds)."""
  import jax
  import jax.numpy as jnp

  mms = [jax.jit(lambda x, y: x @ y)]
  if jax.default_backend() == "cpu" and jnp.dtype(dtype) == jnp.float32:
    from jaxllm.pallas_kernels import matmul_cpu

    if matmul_cpu.library() is not None:
      mms.append(jax.jit(lambda x, y: matmul_cpu.matmul(x, y[None], 0)))
  if shape is not None:
    m, k, n = shape
    return 2 * m * k * n / median_ms(mms[-1], jnp.ones((m, k), dtype), jnp.ones((k, n), dtype), reps=7) / 1e9
  n = 1024 if jax.default_backend() == "cpu" else 8192
  a = jnp.ones((n, n), dtype)
  best = float("inf")
  for mm in mms:
    jax.block_until_ready(mm(a, a))
    for _ in range(5):
      start = time.perf_counter()
      jax.block_until_ready(mm(a, a))
      best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best / 1e12


def median_ms(fn, *args, reps: int) -> float:
  """Milliseconds per call of a jitted fn: the median over `reps` rounds, after a compile + warm-up call. A round is
  as many back-to-back calls as fill ~20 ms, so sub-millisecond calls are not one timer read each."""
  import jax

  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  calls = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return float(np.median(times)) * 1e3


def decode_batch(eng, slots: int, context: int):
  """An engine step batch of `slots` sequences each decoding one token at `context` (distinct pages each, greedy),
  dealt round-robin over the engine's data-parallel replicas."""
  from jaxllm.sampling import SamplingArrays
  from jaxllm.serving.engine import Row

  n, D = -(-(context + 1) // eng.config.page_size), eng.num_replicas
  return eng.build([Row(slot=i // D, replica=i % D, start=context, tokens=[None],
                        pages=list(range(1 + (i // D) * n, 1 + (i // D + 1) * n)),
                        sampling=SamplingArrays.create(1, temperature=0.0), sample=True) for i in range(slots)])


class RandomModel:
  """A preset's shape with random weights (no checkpoint, no tokenizer), e.g. Llama-3-8B in bfloat16 on a GPU, with
  the parts of `LLM` the benchmarks drive: `engine`, `scheduler`, `warmup()`, `generate(prompt_token_ids, params)`.
  `num_layers` cuts the stack (compile time on an accelerator grows with it: the layers are unrolled there)."""

  def __init__(self, preset, dtype, max_model_len, max_num_seqs, *, max_num_batched_tokens, page_size=16,
               num_layers=None, quantization=None, kv_cache_dtype="auto"):
    import dataclasses

    import jax.numpy as jnp
    from flax import nnx

    from jaxllm.config import ModelConfig
    from jaxllm.layers import Llama
    from jaxllm.serving.config import EngineConfig
    from jaxllm.serving.engine import Engine
    from jaxllm.serving.scheduler import Scheduler

    self.config = ModelConfig.from_preset(preset)
    if num_layers is not None:
      windows = self.config.sliding_layers
      self.config = dataclasses.replace(self.config, num_layers=num_layers,
                                        sliding_layers=None if windows is None else windows[:num_layers])
    model = Llama(self.config, dtype=jnp.dtype(dtype), quantization=quantization, rngs=nnx.Rngs(0))
    config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, page_size=page_size,
                          max_num_batched_tokens=max_num_batched_tokens, kv_cache_dtype=kv_cache_dtype)
    # Pages for every sequence at full length (and the scratch page), not a fraction of the device's memory: a
    # transformers opponent may share the device.
    pages = max_num_seqs * -(-max_model_len // page_size) + 1
    self.engine = Engine(model, dataclasses.replace(config, num_pages=pages))
    self.scheduler = Scheduler(self.engine)

  def warmup(self) -> None:
    self.scheduler.state = self.engine.warmup(self.scheduler.state)

  def generate(self, prompt_token_ids, sampling_params, use_tqdm=False):
    import types

    reqs = [self.scheduler.add(p, sp) for p, sp in zip(prompt_token_ids, sampling_params)]
    self.scheduler.run_until_done()
    return [types.SimpleNamespace(token_ids=r.output_ids) for r in reqs]


def device_name() -> str:
  import jax

  if jax.default_backend() == "cpu":
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
  return jax.devices()[0].device_kind


def publish(lines: list[str], path: str = RESULTS) -> None:
  """Prints the table and appends it to `path`."""
  table = "\n".join(lines)
  print(table)
  with open(path, "a") as f:
    f.write(table + "\n")
