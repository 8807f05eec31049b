"""Attention kernel benchmark: flash attention (prefill) and ragged paged attention (decode), against the device's
measured ceilings.

For each shape in the sweep it times every implementation available on this backend:
  prefill: our Pallas kernel ("tpu"/"gpu"), the plain-jnp reference under XLA ("xla"), and on GPU
           `jax.nn.dot_product_attention(..., implementation="cudnn")`;
  decode:  our ragged paged kernel ("tpu" / "gpu" / the native "cpu") and the XLA path;
  chunk:   the same for a prefill chunk read through the page table after a cached prefix (chunked prefill).
Prefill reports TFLOP/s (causal: 2 * B * N * H * T * (T + 1) flops for QK^T and PV together) as a fraction of a
measured matmul peak; decode reports GB/s of K/V bytes read (sum over sequences of kv_len * K * H * 2 * itemsize) as a
fraction of a measured device copy bandwidth; a chunk reports TFLOP/s (its causal score and value products). Prints a
table and appends it to benchmarks/RESULTS.md.

    python benchmarks/attention_kernels.py [--dtype bfloat16] [--quick]
    python benchmarks/attention_kernels.py --dtype float32        # on CPU: the native kernel against the XLA path

On CPU the prefill rows time the XLA reference only (Pallas interpret mode says nothing about speed); the ragged rows
time the native kernel beside the XLA path, on the default model's attention shape (9 query heads, 3 KV heads, 64).
"""

import argparse
import datetime
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import common


def timeit(fn, *args, reps=10) -> float:
  """Median seconds per call of a jitted fn, after a compile+warm-up call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def measured_ceilings(dtype) -> tuple[float, float]:
  """(matmul TFLOP/s, copy GB/s with read+write counted) measured on the default device (benchmarks/common.py)."""
  return common.matmul_tflops(jnp.dtype(dtype).name), common.copy_bandwidth_gbs()


def prefill_rows(dtype, quick):
  from jaxllm.pallas_kernels.flash_attention import flash_attention

  backend = jax.default_backend()
  impls = ["xla"] + (["tpu"] if backend == "tpu" else ["gpu"] if backend == "gpu" else [])
  shapes = [(1, 1024, 32, 8, 128), (1, 4096, 32, 8, 128)] + ([] if quick else [(4, 2048, 32, 8, 128),
                                                                                 (1, 8192, 32, 8, 128)])
  if backend == "cpu":
    shapes = [(1, 256, 8, 2, 64), (1, 1024, 8, 2, 64)]
  rows = []
  key = jax.random.key(0)
  for B, T, N, K, H in shapes:
    q = jax.random.normal(key, (B, T, N, H), dtype)
    k = jax.random.normal(key, (B, T, K, H), dtype)
    v = jax.random.normal(key, (B, T, K, H), dtype)
    flops = 2 * B * N * H * T * (T + 1)
    for impl in impls:
      fn = jax.jit(functools.partial(flash_attention, implementation=impl))
      rows.append(("prefill", f"B={B} T={T} N={N} K={K} H={H}", impl, timeit(fn, q, k, v), flops / 1e12, "TFLOP/s"))
    if backend == "gpu":
      def cudnn(q, k, v):
        rep = N // K
        return jax.nn.dot_product_attention(q, jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2),
                                            is_causal=True, implementation="cudnn")
      try:
        rows.append(("prefill", f"B={B} T={T} N={N} K={K} H={H}", "cudnn", timeit(jax.jit(cudnn), q, k, v),
                     flops / 1e12, "TFLOP/s"))
      except Exception as e:  # cuDNN missing or shape unsupported: say so in the table
        rows.append(("prefill", f"B={B} T={T} N={N} K={K} H={H}", f"cudnn ({type(e).__name__})", float("nan"),
                     flops / 1e12, "TFLOP/s"))
  return rows


def ragged_impls() -> list[str]:
  backend = jax.default_backend()
  return ["xla"] + {"tpu": ["tpu"], "gpu": ["gpu"], "cpu": ["cpu"]}.get(backend, [])


def paged_case(rng, dtype, S, ctx, q_len, N, K, H, page=16):
  """S sequences at context ctx (their last q_len tokens new), pages scattered over the pool at random."""
  pages_per_seq = -(-ctx // page)
  P = S * pages_per_seq + 1
  kp = jnp.asarray(rng.standard_normal((P, K, page, H)), dtype)  # [P, K, C, H]
  vp = jnp.asarray(rng.standard_normal((P, K, page, H)), dtype)
  table = jnp.asarray(rng.permutation(P - 1)[:S * pages_per_seq].reshape(S, pages_per_seq), jnp.int32)
  q = jnp.asarray(rng.standard_normal((S * q_len, N, H)), dtype)
  kv_lens = jnp.full((S,), ctx, jnp.int32)
  cu = jnp.arange(S + 1, dtype=jnp.int32) * q_len
  return q, kp, vp, kv_lens, table, cu, jnp.int32(S)


def decode_rows(dtype, quick):
  from jaxllm.pallas_kernels.ragged_paged_attention import ragged_paged_attention

  page = 16
  shapes = [(32, 2048, 32, 8, 128), (64, 4096, 32, 8, 128)] + ([] if quick else [(1, 4096, 32, 8, 128),
                                                                                  (128, 2048, 32, 8, 128)])
  if jax.default_backend() == "cpu":
    shapes = [(32, 256, 9, 3, 64), (8, 2048, 9, 3, 64)]
  rows = []
  rng = np.random.default_rng(0)
  for S, ctx, N, K, H in shapes:
    args = paged_case(rng, dtype, S, ctx, 1, N, K, H, page)
    nbytes = S * ctx * K * H * 2 * jnp.dtype(dtype).itemsize
    for impl in ragged_impls():
      fn = jax.jit(functools.partial(ragged_paged_attention, implementation=impl))
      t = timeit(fn, *args)
      rows.append(("decode", f"seqs={S} ctx={ctx} N={N} K={K} H={H} page={page}", impl, t, nbytes / 1e9, "GB/s"))
  return rows


def chunk_rows(dtype, quick):
  """One sequence's prefill chunk of T tokens after ctx - T cached ones: FLOPs of its causal QK^T and PV."""
  from jaxllm.pallas_kernels.ragged_paged_attention import ragged_paged_attention

  shapes = [(512, 4096, 32, 8, 128)] + ([] if quick else [(2048, 8192, 32, 8, 128)])
  if jax.default_backend() == "cpu":
    shapes = [(256, 2048, 9, 3, 64)]
  rows = []
  rng = np.random.default_rng(1)
  for T, ctx, N, K, H in shapes:
    args = paged_case(rng, dtype, 1, ctx, T, N, K, H)
    keys = sum(ctx - T + r + 1 for r in range(T))  # keys each new row sees
    flops = 4 * N * H * keys
    for impl in ragged_impls():
      fn = jax.jit(functools.partial(ragged_paged_attention, implementation=impl))
      rows.append(("chunk", f"T={T} ctx={ctx} N={N} K={K} H={H} page=16", impl, timeit(fn, *args), flops / 1e12,
                   "TFLOP/s"))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--results", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md"))
  args = ap.parse_args()
  dtype = jnp.dtype(args.dtype)
  peak_tflops, bandwidth = measured_ceilings(dtype)
  rows = prefill_rows(dtype, args.quick) + decode_rows(dtype, args.quick) + chunk_rows(dtype, args.quick)
  device = jax.devices()[0].device_kind
  lines = [f"### attention_kernels.py — {datetime.date.today()} — {device} ({jax.default_backend()}, jax {jax.__version__})", "",
           f"{args.dtype}; measured ceilings: matmul {peak_tflops:.3g} TFLOP/s, copy bandwidth {bandwidth:.0f} GB/s.",
           "", "| op | shape | impl | time ms | achieved | of ceiling |", "|---|---|---|---:|---:|---:|"]
  for op, shape, impl, t, work, unit in rows:
    rate = work / t if t == t else float("nan")
    ceiling = peak_tflops if unit == "TFLOP/s" else bandwidth
    lines.append(f"| {op} | {shape} | {impl} | {t * 1e3:.3f} | {rate:.3g} {unit} | {rate / ceiling:.0%} |")
  table = "\n".join(lines) + "\n"
  print(table)
  with open(args.results, "a") as f:
    f.write(table + "\n")


if __name__ == "__main__":
  main()
