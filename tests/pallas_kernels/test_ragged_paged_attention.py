"""Ragged paged attention: the plain-jnp oracle vs naive float64 numpy, the "xla" implementation vs naive numpy over
ragged layouts and block sizes, Pallas kernels (interpreted) vs the oracle, validation, and lowering of both kernels
for TPU (Mosaic) and CUDA (Triton) with jax.export.

Every case poisons the cache: pages no sequence uses, page-table entries past a sequence's used pages, padding slots
(>= num_seqs), the tail of each last page past kv_len and the bucket-padding query rows are all NaN, so any stray read
shows up as NaN. Error criterion: max |out - ref| over real rows <= tol * max |ref| (tol 1e-5 f32, 2e-2 bf16).
"""

import functools
import importlib
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxllm.pallas_kernels import native
from jaxllm.pallas_kernels.kv_quant import dequantize_kv, quantize_kv
from jaxllm.pallas_kernels.ragged_paged_attention import kernel_cpu, ragged_paged_attention
from jaxllm.pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference
from jaxllm.pallas_kernels.ragged_paged_attention.xla import num_work_items
from jaxllm.pallas_kernels.reference import NO_WINDOW
from tests.pallas_kernels import CPU, interpret, needs_cpu_kernel

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_case(rng, q_lens, kv_lens, *, N, K, H=128, C=16, dtype=jnp.float32, pad_seqs=0, pad_rows=0, spare_pages=1,
              num_nan_pages=3, unused_out_of_range=False):
  """A ragged batch over a shuffled, NaN-poisoned paged cache [P, K, C, H].

  Unused page-table entries point at NaN pages, or with unused_out_of_range at ids outside [0, P) (legal: they are
  never dereferenced), which the TPU interpreter turns into an out-of-bounds error if a kernel copies them.
  """
  num_seqs = len(q_lens)
  S = num_seqs + pad_seqs
  need = [-(-kv // C) for kv in kv_lens]
  M = max(need) + spare_pages
  P = sum(need) + num_nan_pages
  k = rng.standard_normal((P, K, C, H)).astype(np.float32)
  v = rng.standard_normal((P, K, C, H)).astype(np.float32)
  perm = rng.permutation(P).astype(np.int32)
  used, nan_pages = perm[:sum(need)], perm[sum(need):]
  k[nan_pages] = np.nan
  v[nan_pages] = np.nan
  page_indices = rng.choice(nan_pages, size=(S, M)).astype(np.int32)  # every unused entry points at a NaN page
  if unused_out_of_range:
    page_indices = rng.choice([-1, P, P + 1000], size=(S, M)).astype(np.int32)
  o = 0
  for i, n in enumerate(need):
    page_indices[i, :n] = used[o:o + n]
    o += n
    if n:  # poison the slots of the last page past kv_len
      tail = kv_lens[i] - (n - 1) * C
      k[page_indices[i, n - 1], :, tail:] = np.nan
      v[page_indices[i, n - 1], :, tail:] = np.nan
  T = sum(q_lens) + pad_rows
  kv = np.full(S, 5, np.int32)  # padding slots hold junk
  kv[:num_seqs] = kv_lens
  cu = np.full(S + 1, T, np.int32)
  cu[0] = 0
  cu[1:num_seqs + 1] = np.cumsum(q_lens)
  q = rng.standard_normal((T, N, H)).astype(np.float32)
  q[sum(q_lens):] = np.nan
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(k), cast(v), jnp.asarray(kv), jnp.asarray(page_indices), jnp.asarray(cu),
          jnp.asarray(num_seqs, jnp.int32))


def naive_numpy(q, k, v, kv_lens, page_indices, cu_q_lens, num_seqs, sm_scale, window=None, soft_cap=None):
  """Independent float64 oracle: gather each sequence's pages, causal (and sliding-window) mask by position, softmax,
  one row at a time."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  T, N, H = q.shape
  _, K, C, _ = k.shape
  out = np.zeros((T, N, H))
  for i in range(int(num_seqs)):
    q_start, q_end, kv_len = int(cu_q_lens[i]), int(cu_q_lens[i + 1]), int(kv_lens[i])
    if q_end == q_start:
      continue
    pages = page_indices[i, :-(-kv_len // C)]
    k_KLH = np.concatenate([k[p] for p in pages], axis=1)[:, :kv_len]
    v_KLH = np.concatenate([v[p] for p in pages], axis=1)[:, :kv_len]
    for r in range(q_end - q_start):
      pos = kv_len - (q_end - q_start) + r
      lo = 0 if window is None else max(0, pos - window + 1)
      for n in range(N):
        kh = n // (N // K)
        s = k_KLH[kh, lo:pos + 1] @ q[q_start + r, n] * sm_scale
        if soft_cap is not None:
          s = soft_cap * np.tanh(s / soft_cap)
        p = np.exp(s - s.max())
        out[q_start + r, n] = (p / p.sum()) @ v_KLH[kh, lo:pos + 1]
  return out


def as_numpy(args):
  """The case's arrays as numpy (float arrays as float32, so bf16 inputs reach naive_numpy exactly)."""
  return [np.asarray(a.astype(jnp.float32)) if jnp.issubdtype(a.dtype, jnp.floating) else np.asarray(a) for a in args]


_reference_jit = jax.jit(ragged_paged_attention_reference, static_argnames=("sm_scale", "soft_cap"))


def reference(args):
  """The plain-jnp oracle at the default scale."""
  return _reference_jit(*args, sm_scale=args[0].shape[-1] ** -0.5)


def assert_close(out, ref, args, dtype):
  q_len_total = int(args[5][int(args[6])])
  out = np.asarray(out.astype(jnp.float32))
  ref = np.asarray(ref, np.float64) if not isinstance(ref, jax.Array) else np.asarray(ref.astype(jnp.float32))
  assert np.isfinite(out).all(), "NaN/inf in the output (a poisoned page or padding row leaked)"
  np.testing.assert_array_equal(out[q_len_total:], 0.0)  # bucket padding comes back as zeros
  err = np.abs(out[:q_len_total] - ref[:q_len_total]).max()
  scale = np.abs(ref[:q_len_total]).max()
  assert err <= TOL[dtype] * scale, f"max abs err {err:.3g} > {TOL[dtype]} * scale {scale:.3g}"
  return err / scale


def run_kernel(impl, args, **kw):
  if impl == "tpu":
    # "eager": a DMA lands as soon as it is started, so refilling a buffer that is still being read would show.
    with pltpu.force_tpu_interpret_mode(pltpu.InterpretParams(dma_execution_mode="eager")):
      return ragged_paged_attention(*args, implementation="tpu", interpret=True, **kw)
  return ragged_paged_attention(*args, implementation=impl, interpret=interpret(impl), **kw)


def test_reference_matches_naive_numpy(rng):
  args = make_case(rng, [1, 17, 5, 1], [30, 40, 5, 70], N=6, K=2, H=32, pad_seqs=1, pad_rows=3)
  expected = naive_numpy(*(np.asarray(a) for a in args), sm_scale=32 ** -0.5)
  assert_close(reference(args), expected, args, jnp.float32)


# The "xla" cases are metadata in two fixed buckets (T, S, M, P), as in serving: one compiled program per bucket,
# block_q and dtype serves every layout. C = 4, H = 16. (name, bucket, q_lens, kv_lens, make_case options).
DECODE_BUCKET = (8, 8, 17, 48)  # T <= S: default block_q 1
MIXED_BUCKET = (30, 8, 12, 48)  # T > S: default block_q 8; 30 is not a multiple of 4, 8 or 16
XLA_LAYOUTS = [
    ("decode", DECODE_BUCKET, [1] * 8, [1, 16, 17, 50, 64, 3, 4, 9], dict(unused_out_of_range=True)),
    ("decode_padded", DECODE_BUCKET, [1] * 5, [7, 33, 2, 12, 40], {}),
    ("decodes_then_chunks", MIXED_BUCKET, [1, 1, 1, 7, 12], [5, 20, 33, 7, 30], {}),
    ("chunks_then_decodes", MIXED_BUCKET, [12, 7, 1, 1, 1], [30, 7, 5, 20, 33], dict(unused_out_of_range=True)),
    ("interleaved_empty", MIXED_BUCKET, [1, 9, 0, 1, 0, 13, 1], [40, 9, 6, 3, 0, 20, 17], {}),
    # Every sequence but the first starts inside a block: needs all W items for block_q 4, 8 and 16.
    ("straddling", MIXED_BUCKET, [3, 4, 4, 4, 4, 6, 4, 1], [3, 10, 4, 20, 8, 6, 30, 12], {}),
]
# dtype: (N, K, block_q values). bf16 runs the default block_q only (1 in the decode bucket, 8 in the mixed one).
XLA_DTYPES = {jnp.float32: (8, 2, (1, 4, 8, 16)), jnp.bfloat16: (6, 2, ())}


def num_items(q_lens, block_q):
  """The number of (sequence, query block) work items a layout needs, counted in Python."""
  cu = np.cumsum([0] + q_lens)
  return sum((e - 1) // block_q - s // block_q + 1 for s, e in zip(cu[:-1], cu[1:]) if e > s)


@pytest.mark.parametrize("dtype", XLA_DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", XLA_LAYOUTS, ids=[c[0] for c in XLA_LAYOUTS])
def test_xla_matches_naive_numpy(rng, layout, dtype):
  """Any ragged layout, several block sizes (and the defaults): decodes and chunks with cached prefixes in any order,
  q_len 0 slots, padding slots and rows, NaN in unused pages and page tails."""
  name, (T, S, M, P), q_lens, kv_lens, opts = layout
  N, K, block_qs = XLA_DTYPES[dtype]
  C = 4
  need = [-(-kv // C) for kv in kv_lens]
  args = make_case(rng, q_lens, kv_lens, N=N, K=K, H=16, C=C, dtype=dtype, pad_rows=T - sum(q_lens),
                   pad_seqs=S - len(q_lens), spare_pages=M - max(need), num_nan_pages=P - sum(need), **opts)
  assert args[0].shape[0] == T and args[4].shape == (S, M) and args[1].shape[0] == P
  if name == "straddling":
    assert all(num_items(q_lens, b) == num_work_items(T, S, b) for b in (4, 8, 16))
  expected = naive_numpy(*as_numpy(args), sm_scale=16 ** -0.5)
  # KV splits: one page per item, one item per iteration (a pair's items across many iterations); 3 pages per item,
  # 5 items per iteration (a pair's items in one iteration, iterations straddling pairs); the defaults.
  kv_splits = [dict(pages_per_block=1, items_per_step=1), dict(pages_per_block=3, items_per_step=5)]
  sizes = [dict(block_q=b, **kv) for b in block_qs for kv in ([{}] + kv_splits if b in (1, 8) else [{}])]
  for kw in sizes + [{}]:
    out = ragged_paged_attention(*args, implementation="xla", **kw)
    assert out.shape == args[0].shape and out.dtype == dtype
    try:
      assert_close(out, expected, args, dtype)
    except AssertionError as e:
      raise AssertionError(f"{kw or 'default block sizes'}: {e}") from e


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", XLA_DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", XLA_LAYOUTS, ids=[c[0] for c in XLA_LAYOUTS])
@pytest.mark.parametrize("C,H", [(4, 16), (16, 32), (32, 64)], ids=["general", "fast_h32", "fast_h64"])
def test_cpu_matches_naive_numpy(rng, layout, dtype, C, H):
  """The native CPU kernel on the same ragged layouts: its general path (page size 4) and its 16-key fast path (page
  sizes 16 and 32, head dims 32 and 64)."""
  name, (T, S, M, P), q_lens, kv_lens, opts = layout
  N, K, _ = XLA_DTYPES[dtype]
  args = make_case(rng, q_lens, kv_lens, N=N, K=K, H=H, C=C, dtype=dtype, pad_rows=T - sum(q_lens),
                   pad_seqs=S - len(q_lens), spare_pages=1, num_nan_pages=2, **opts)
  out = ragged_paged_attention(*args, implementation="cpu")
  assert out.shape == args[0].shape and out.dtype == dtype
  assert_close(out, naive_numpy(*as_numpy(args), sm_scale=H ** -0.5), args, dtype)


@needs_cpu_kernel
@pytest.mark.parametrize("C", [4, 16], ids=["general", "fast"])
def test_cpu_rows_do_not_depend_on_the_batch(rng, C):
  """A row's output is bitwise the same whatever shares its call: a decode alone or among others, a prompt's rows as
  one chunk or in chunks of 5 and 1 (each chunk's keys include the earlier chunks', as in chunked prefill)."""
  f = jax.jit(functools.partial(ragged_paged_attention, implementation="cpu"))
  q_lens, kv_lens = [1, 23, 1, 1], [40, 23, 9, 61]
  args = make_case(rng, q_lens, kv_lens, N=6, K=2, H=32, C=C)
  q, k, v, kv, pages, cu, _ = args
  whole = np.asarray(f(*args))
  for i in (0, 3):  # each decode alone
    alone = f(q[cu[i]:cu[i] + 1], k, v, kv[i:i + 1], pages[i:i + 1], jnp.array([0, 1], jnp.int32), jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(alone)[0], whole[cu[i]])
  rows = []
  for lo, hi in ((0, 5), (5, 22), (22, 23)):  # sequence 1's prompt in three chunks
    chunk = f(q[cu[1] + lo:cu[1] + hi], k, v, jnp.array([hi], jnp.int32), pages[1:2],
              jnp.array([0, hi - lo], jnp.int32), jnp.int32(1))
    rows.append(np.asarray(chunk))
  np.testing.assert_array_equal(np.concatenate(rows), whole[cu[1]:cu[2]])


@pytest.mark.parametrize("impl", ["xla", CPU])
def test_fully_masked_row_stays_local(rng, impl):
  """A sequence whose rows see no key (q_len > kv_len, only reachable with traced metadata) shares both of its
  blocks with other sequences; their rows are unchanged and nothing is NaN."""
  args = make_case(rng, [3, 2, 3], [10, 6, 12], N=4, K=2, H=16, C=4)  # block 0: rows 0-3, block 1: rows 4-7
  f = jax.jit(functools.partial(ragged_paged_attention, implementation=impl, **({"block_q": 4} if impl == "xla" else
                                                                                {})))
  good = np.asarray(f(*args))
  bad = np.asarray(f(*args[:3], args[3].at[1].set(0), *args[4:]))
  assert np.isfinite(bad).all()
  np.testing.assert_array_equal(bad[:3], good[:3])  # sequence 0: rows 0-2, sequence 1: rows 3-4
  np.testing.assert_array_equal(bad[5:], good[5:])


# (name, q_lens, kv_lens, N, K, C, dtype, extra make_case/kernel options)
CASES = [
    ("decode_g4", [1, 1, 1, 1, 1], [1, 16, 17, 50, 64], 8, 2, 16, jnp.float32,
     dict(pad_seqs=2, pad_rows=3, unused_out_of_range=True)),
    ("prefill_g1", [40, 9, 23], [40, 30, 23], 2, 2, 16, jnp.float32, dict(block_q=16, pages_per_block=2)),
    ("mixed_g8_p64", [1, 0, 17, 128, 0], [100, 0, 60, 200, 30], 8, 1, 64, jnp.float32, dict(pad_rows=5)),
    ("mixed_g3_bf16", [17, 1, 6, 1], [40, 33, 6, 9], 6, 2, 16, jnp.bfloat16,
     dict(pad_seqs=1, pages_per_block=2, unused_out_of_range=True)),
    ("mixed_g4_bf16_p64", [1, 33, 1], [150, 90, 64], 4, 1, 64, jnp.bfloat16, dict(pad_rows=2)),
]


@pytest.mark.parametrize("impl", ["tpu", "gpu", CPU])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(rng, impl, case):
  _, q_lens, kv_lens, N, K, C, dtype, opts = case
  opts = dict(opts)
  make_opts = {k: opts.pop(k) for k in ("pad_seqs", "pad_rows", "unused_out_of_range") if k in opts}
  if impl == "gpu":  # the GPU kernel has its own block_q default (rows per program)
    opts.pop("block_q", None)
  if impl == "cpu":  # no block sizes to tune
    opts = {}
  args = make_case(rng, q_lens, kv_lens, N=N, K=K, C=C, dtype=dtype, **make_opts)
  ref = reference(args)
  out = run_kernel(impl, args, **opts)
  assert out.shape == args[0].shape and out.dtype == dtype
  assert_close(out, ref, args, dtype)


def repage(args, C):
  """The case's cache cut into pages of C tokens (a divisor of its page size): the same keys, more pages."""
  q, k, v, kv_lens, pages, cu, num_seqs = args
  P, K, C0, H = k.shape
  split = lambda x: x.reshape(P, K, C0 // C, C, H).transpose(0, 2, 1, 3, 4).reshape(P * (C0 // C), K, C, H)  # noqa
  sub = jnp.arange(C0 // C, dtype=jnp.int32)
  pages = (pages[:, :, None] * (C0 // C) + sub).reshape(pages.shape[0], -1)
  return q, split(k), split(v), kv_lens, pages, cu, num_seqs


def poison_before_windows(args, window):
  """NaN in every page that lies wholly before the window of its sequence's first new row: no implementation may read
  them (they may already be freed or reused by a sliding-window allocator)."""
  q, k, v, kv_lens, pages, cu, num_seqs = args
  C = k.shape[2]
  dead = [int(pages[i, j]) for i in range(int(num_seqs))
          for j in range(max(0, int(kv_lens[i]) - int(cu[i + 1] - cu[i]) - window + 1) // C)]
  assert dead, "the case must have pages before a window"
  dead = jnp.asarray(dead)
  return (q, k.at[dead].set(jnp.nan), v.at[dead].set(jnp.nan)) + tuple(args[3:])


# Sliding window and soft-capping: long contexts (pages far before the window), chunks whose rows' windows start in
# different pages, decodes; window 1 (a row sees only itself), windows smaller and larger than a page / KV block.
WINDOW_LAYOUT = ([1, 17, 40, 1, 3], [30, 200, 140, 5, 99])


@pytest.mark.parametrize("impl", ["xla", "tpu", "gpu", CPU])
@pytest.mark.parametrize("window,soft_cap", [(20, None), (7, 30.0), (33, None), (1, None)])
def test_sliding_window_skips_pages_before_it(rng, impl, window, soft_cap):
  args = make_case(rng, *WINDOW_LAYOUT, N=6, K=2, H=32, C=16, pad_seqs=1, pad_rows=3)
  expected = naive_numpy(*as_numpy(args), sm_scale=32 ** -0.5, window=window, soft_cap=soft_cap)
  args = poison_before_windows(args, window)
  kw = dict(window=window, soft_cap=soft_cap)
  if impl == "xla":
    for sizes in ({}, dict(block_q=4, pages_per_block=2, items_per_step=3)):
      assert_close(ragged_paged_attention(*args, implementation="xla", **kw, **sizes), expected, args, jnp.float32)
    assert_close(_reference_jit(*args, window, sm_scale=32 ** -0.5, soft_cap=soft_cap), expected, args, jnp.float32)
  else:
    sizes = dict(block_q=8, pages_per_block=2) if impl == "tpu" else {}
    if impl == "cpu":  # the general path too: the same case on pages of 4
      assert_close(run_kernel(impl, repage(args, 4), **kw), expected, args, jnp.float32)
    assert_close(run_kernel(impl, args, **kw, **sizes), expected, args, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", CPU])
def test_traced_window_per_layer(rng, impl):
  """The window is a runtime value: one jitted program serves a layer scan's local (window) and global (None) layers."""
  args = make_case(rng, *WINDOW_LAYOUT, N=6, K=2, H=32, C=16)
  f = jax.jit(lambda w: ragged_paged_attention(*args, window=w, implementation=impl))
  for window in (20, NO_WINDOW):
    expected = naive_numpy(*as_numpy(args), sm_scale=32 ** -0.5, window=None if window == NO_WINDOW else window)
    assert_close(f(jnp.int32(window)), expected, args, jnp.float32)


@pytest.mark.parametrize("impl", ["xla", "tpu", "gpu", CPU])
def test_no_sequences(rng, impl):
  """num_seqs = 0: nothing to attend, every row is padding and comes back as 0."""
  args = make_case(rng, [2, 1], [20, 9], N=4, K=2, H=64)
  args = args[:6] + (jnp.int32(0),)
  out = run_kernel(impl, args) if impl != "xla" else ragged_paged_attention(*args)
  np.testing.assert_array_equal(np.asarray(out), 0.0)


def test_traced_metadata_under_jit(rng):
  """Under jit the value checks are skipped and the kernel still matches (metadata is traced)."""
  args = make_case(rng, [3, 1], [20, 9], N=4, K=2)
  f = jax.jit(functools.partial(ragged_paged_attention, implementation="gpu", interpret=interpret("gpu")))
  assert_close(f(*args), reference(args), args, jnp.float32)


def quantize_case(args, dtype):
  """The case's K/V pages quantized (a scale per token and head); the NaN poison carries into the scales."""
  q, k, v = args[:3]
  (kq, ks), (vq, vs) = quantize_kv(k, dtype), quantize_kv(v, dtype)
  assert not np.isfinite(np.asarray(ks)).all(), "the poison must reach the scales"
  return (q, kq, vq) + tuple(args[3:]), dict(k_scales=ks, v_scales=vs)


# Quantized pages (int8 / float8_e4m3fn values, float32 scales): every implementation dequantizes inside the kernel
# and must equal the oracle on the dequantized pages; with windows, NaN in every page wholly before them.
@pytest.mark.parametrize("impl", ["xla", "tpu", "gpu", CPU])
@pytest.mark.parametrize("kv_dtype,window,soft_cap", [(jnp.int8, None, None), (jnp.float8_e4m3fn, 20, 30.0)],
                         ids=["int8", "fp8_window_softcap"])
def test_quantized_pages_match_reference_on_dequantized(rng, impl, kv_dtype, window, soft_cap):
  args = make_case(rng, [1, 17, 1, 6], [40, 33, 70, 6], N=6, K=2, H=32, C=32, pad_seqs=1, pad_rows=3)
  if window is not None:
    args = poison_before_windows(args, window)
  args, scales = quantize_case(args, kv_dtype)
  deq = lambda x, s: dequantize_kv(x, s, jnp.float32)  # noqa: E731
  ref_args = args[:1] + (deq(args[1], scales["k_scales"]), deq(args[2], scales["v_scales"])) + args[3:]
  ref = _reference_jit(*ref_args, window, sm_scale=32 ** -0.5, soft_cap=soft_cap)
  kw = dict(window=window, soft_cap=soft_cap, **scales)
  out = ragged_paged_attention(*args, implementation="xla", **kw) if impl == "xla" else run_kernel(impl, args, **kw)
  assert out.dtype == jnp.float32
  assert_close(out, ref, args, jnp.float32)


def _valid_args():
  q = jnp.zeros((4, 4, 32), jnp.float32)
  k = jnp.zeros((6, 2, 16, 32), jnp.float32)
  kv_lens = jnp.array([20, 3], jnp.int32)
  page_indices = jnp.array([[0, 1, 5], [2, 5, 5]], jnp.int32)
  cu_q_lens = jnp.array([0, 3, 4], jnp.int32)
  return dict(q_TNH=q, k_pages=k, v_pages=k, kv_lens=kv_lens, page_indices=page_indices, cu_q_lens=cu_q_lens,
              num_seqs=jnp.int32(2))


VALIDATION = [
    ("head_count", dict(q_TNH=jnp.zeros((4, 3, 32))), "multiple of KV heads"),
    ("head_dim", dict(q_TNH=jnp.zeros((4, 4, 64))), "head dim of q"),
    ("dtype", dict(q_TNH=jnp.zeros((4, 4, 32), jnp.bfloat16)), "share q.s dtype"),
    ("v_shape", dict(v_pages=jnp.zeros((6, 2, 8, 32))), "v_pages shape"),
    ("page_indices_shape", dict(page_indices=jnp.zeros((3, 3), jnp.int32)), "kv_lens shape"),
    ("page_indices_rank", dict(page_indices=jnp.zeros((6,), jnp.int32)), "page_indices must be"),
    ("cu_q_lens_shape", dict(cu_q_lens=jnp.array([0, 3], jnp.int32)), "cu_q_lens shape"),
    ("float_metadata", dict(kv_lens=jnp.array([20.0, 3.0])), "kv_lens must be an integer"),
    ("page_out_of_range", dict(page_indices=jnp.array([[0, 6, 5], [2, 5, 5]], jnp.int32)), r"page_indices\[0, 1\]=6"),
    ("negative_page", dict(page_indices=jnp.array([[0, 1, 5], [-1, 5, 5]], jnp.int32)), r"page_indices\[1, 0\]=-1"),
    ("kv_len_too_long", dict(kv_lens=jnp.array([49, 3], jnp.int32)), r"kv_lens\[0\]=49"),
    ("q_len_gt_kv_len", dict(kv_lens=jnp.array([2, 3], jnp.int32)), "q_len=3 > kv_len=2"),
    ("cu_not_monotone", dict(cu_q_lens=jnp.array([0, 3, 2], jnp.int32)), "non-decreasing"),
    ("cu_not_zero", dict(cu_q_lens=jnp.array([1, 3, 4], jnp.int32)), "start at 0"),
    ("cu_past_T", dict(cu_q_lens=jnp.array([0, 3, 5], jnp.int32), kv_lens=jnp.array([20, 5], jnp.int32)),
     "do not fit"),
    ("num_seqs_too_big", dict(num_seqs=jnp.int32(3)), "num_seqs=3"),
    ("implementation", dict(implementation="cuda"), "implementation='cuda'"),
    ("interpret_xla", dict(implementation="xla", interpret=True), "interpret=True"),
    ("interpret_cpu", dict(implementation="cpu", interpret=True), "interpret=True"),
    ("cpu_block_q", dict(implementation="cpu", block_q=4), "block_q"),
    ("block_size_name", dict(implementation="tpu", block_k=8), "block_k"),
    ("xla_block_q", dict(implementation="xla", block_q=0), "positive int"),
    ("xla_items_per_step", dict(implementation="xla", items_per_step=0), "items_per_step=0"),
    ("tpu_page_size", dict(implementation="tpu", k_pages=jnp.zeros((6, 2, 12, 32)), v_pages=jnp.zeros((6, 2, 12, 32)),
                           kv_lens=jnp.array([20, 3], jnp.int32)), "multiple of 8"),
    ("gpu_block_q", dict(implementation="gpu", block_q=3), "power of two"),
    ("window_zero", dict(window=0), "window=0 must be >= 1"),
    ("window_float", dict(window=jnp.float32(4.0)), "window must be None, an int"),
    ("soft_cap_negative", dict(soft_cap=-1.0), "soft_cap=-1.0 must be a positive"),
    ("quantized_without_scales", dict(k_pages=jnp.zeros((6, 2, 16, 32), jnp.int8),
                                      v_pages=jnp.zeros((6, 2, 16, 32), jnp.int8)), "need k_scales"),
    ("quantized_k_only", dict(v_pages=jnp.zeros((6, 2, 16, 32), jnp.int8)), "share q's dtype"),
    ("scales_shape", dict(k_pages=jnp.zeros((6, 2, 16, 32), jnp.int8), v_pages=jnp.zeros((6, 2, 16, 32), jnp.int8),
                          k_scales=jnp.zeros((6, 2, 16)), v_scales=jnp.zeros((6, 2, 8))),
     r"v_scales must be \[P, K, C\]"),
    ("scales_with_float_pages", dict(k_scales=jnp.zeros((6, 2, 16))), "go with quantized pages"),
    ("tpu_int8_page_size", dict(implementation="tpu", k_pages=jnp.zeros((6, 2, 16, 32), jnp.int8),
                                v_pages=jnp.zeros((6, 2, 16, 32), jnp.int8), k_scales=jnp.zeros((6, 2, 16)),
                                v_scales=jnp.zeros((6, 2, 16))), "multiple of 32 for int8"),
]


@pytest.mark.parametrize("override,message", [v[1:] for v in VALIDATION], ids=[v[0] for v in VALIDATION])
def test_validation_errors(override, message):
  kwargs = {**_valid_args(), **override}
  with pytest.raises(ValueError, match=message):
    ragged_paged_attention(**kwargs)


def test_valid_args_pass():
  out = ragged_paged_attention(**_valid_args())
  assert out.shape == (4, 4, 32) and np.isfinite(np.asarray(out)).all()


def test_gpu_default_takes_xla_for_shapes_triton_cannot_tile(rng, monkeypatch):
  """On a GPU backend, implementation=None runs the Triton kernel where it can and the XLA path for Phi-3's head_dim
  96 (not a power of two), which an explicit implementation="gpu" refuses."""
  rpa = importlib.import_module("jaxllm.pallas_kernels.ragged_paged_attention")  # the module, not its function
  monkeypatch.setattr(rpa, "default_implementation", lambda: "gpu")
  picked, xla = [], rpa._xla_jit
  monkeypatch.setattr(rpa, "_xla_jit", lambda *a, **kw: picked.append("xla") or xla(*a, **kw))
  args = make_case(rng, [1, 5], [20, 9], N=4, K=2, H=96)
  assert_close(ragged_paged_attention(*args), reference(args), args, jnp.float32)
  assert picked == ["xla"]
  with pytest.raises(ValueError, match=r"head dim \(H=96"):
    ragged_paged_attention(*args, implementation="gpu")
  assert rpa._best_implementation(args[0][..., :64], args[1][..., :64]) == "gpu"


_NO_TRITON = """
import sys
sys.modules["jax.experimental.pallas.triton"] = None  # a jax without Pallas' Triton lowering: importing it fails
import jax, jax.numpy as jnp, numpy as np, pytest
from jaxllm import LLM  # noqa: F401 (the package imports)
from jaxllm.pallas_kernels import backend, flash_attention, ragged_paged_attention
from tests.pallas_kernels.test_ragged_paged_attention import make_case
jax.default_backend = lambda: "gpu"
assert backend.triton() is None and backend.default_implementation() == "xla"
args = make_case(np.random.default_rng(0), [1, 5], [20, 9], N=4, K=2, H=32)
assert np.isfinite(np.asarray(ragged_paged_attention(*args))).all()  # None: the XLA path
for call in (lambda: ragged_paged_attention(*args, implementation="gpu", interpret=True),
             lambda: flash_attention(*(jnp.ones((1, 16, 2, 32)),) * 3, implementation="gpu", interpret=True)):
  with pytest.raises(ValueError, match="needs Pallas' Triton lowering"):
    call()
print("ok")
"""


def test_a_jax_without_pallas_triton_still_imports_and_serves_gpus_through_xla():
  """jax 0.11 deprecates Pallas' Triton lowering, which the GPU kernels use: a jax without it must keep `import
  jaxllm` working (the Triton module is imported when a GPU kernel is built, not at import), pick the XLA path on a
  GPU, and answer an explicit implementation="gpu" with an error saying why."""
  run = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=300,
                       cwd=pathlib.Path(__file__).parents[2], env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
  assert "no Pallas Triton lowering" in run.stderr


_NO_COMPILER = """
import importlib, jax, numpy as np, pytest
rpa = importlib.import_module("jaxllm.pallas_kernels.ragged_paged_attention")  # the module, not its function
from tests.pallas_kernels.test_ragged_paged_attention import make_case
assert rpa.kernel_cpu.library() is None
args = make_case(np.random.default_rng(0), [1, 5], [20, 9], N=4, K=2, H=32)
assert rpa._best_implementation(args[0], args[1]) == "xla"
assert np.isfinite(np.asarray(rpa.ragged_paged_attention(*args))).all()
with pytest.raises(ValueError, match="needs the native CPU kernel"):
  rpa.ragged_paged_attention(*args, implementation="cpu")
print("ok")
"""


def test_cpu_default_is_the_native_kernel_and_xla_without_a_compiler(rng, tmp_path):
  """Where a C++ compiler is found the CPU default is the native kernel; where none is (an empty PATH, no $CXX),
  the package still works: the XLA path, a logged reason, and an explicit "cpu" answered with an error."""
  rpa = importlib.import_module("jaxllm.pallas_kernels.ragged_paged_attention")
  args = make_case(rng, [1, 5], [20, 9], N=4, K=2, H=32)
  if native.compiler() is not None:
    assert rpa._best_implementation(args[0], args[1]) == "cpu"
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PATH": str(tmp_path), "JAXLLM_KERNEL_CACHE": str(tmp_path / "k")}
  env.pop("CXX", None)
  run = subprocess.run([sys.executable, "-c", _NO_COMPILER], capture_output=True, text=True, timeout=300,
                       cwd=pathlib.Path(__file__).parents[2], env=env)
  assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
  assert "no C++ compiler found" in run.stderr


def build(compiler):
  return native.build(kernel_cpu.SOURCE, "ragged_paged_attention_cpu", compiler)


def test_cpu_kernel_cache_rebuilds_a_damaged_file(monkeypatch, tmp_path):
  """A cached build is loaded only when its sha256 sidecar matches (a truncated library would crash the process that
  maps it): a damaged file is rebuilt in place; builds are readable to every user of a shared cache."""
  monkeypatch.setenv("JAXLLM_KERNEL_CACHE", str(tmp_path))
  compiler = native.compiler()
  if compiler is None:
    pytest.skip("no C++ compiler here")
  path = build(compiler)
  good = path.read_bytes()
  assert path.stat().st_mode & 0o444 == 0o444 and path.with_suffix(".sha256").read_text() == native.digest(path)
  path.write_bytes(good[:1000])  # truncated, as after a crash mid-write
  assert build(compiler) == path and path.read_bytes() == good
  assert not list(tmp_path.glob("*.tmp"))


def test_cpu_kernel_builds_in_a_temporary_folder_where_home_is_read_only(monkeypatch, tmp_path):
  compiler = native.compiler()
  if compiler is None:
    pytest.skip("no C++ compiler here")
  monkeypatch.delenv("JAXLLM_KERNEL_CACHE", raising=False)
  monkeypatch.setenv("HOME", "/proc/no-home")  # nothing can be created under /proc
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
  path = build(compiler)
  assert path.parent.parent == tmp_path and path.with_suffix(".sha256").exists()


@needs_cpu_kernel
def test_cpu_kernel_refuses_operands_it_cannot_read(rng):
  """Called directly (the dispatch validates shapes first), the custom call checks the shapes it indexes by."""
  q, k, v, kv_lens, pages, cu, num_seqs = make_case(rng, [1, 5], [20, 9], N=4, K=2, H=32)
  call = functools.partial(kernel_cpu.ragged_paged_attention_cpu, sm_scale=0.1, soft_cap=None)
  window = jnp.int32(NO_WINDOW)
  bad_operands = [(q, k, v[:-1], kv_lens, pages, cu, num_seqs, window),  # fewer V pages than K pages
                  (q, k, v, kv_lens, pages, cu[:-1], num_seqs, window),  # cu_q_lens short of S + 1
                  (q, k, v, kv_lens[:1], pages, cu, num_seqs, window)]  # kv_lens short of S
  for bad in bad_operands:
    with pytest.raises(Exception, match="v_pages must match k_pages"):
      jax.block_until_ready(call(*bad))
  np.testing.assert_allclose(np.asarray(call(q, k, v, kv_lens, pages, cu, num_seqs, window)),
                             np.asarray(_reference_jit(q, k, v, kv_lens, pages, cu, num_seqs, sm_scale=0.1)),
                             atol=1e-5)


LOWERING_SHAPES = [  # (dtype, pages dtype, T, N, K, H, P, C, S, M)
    ("f32_p16", jnp.float32, jnp.float32, 256, 32, 8, 128, 512, 16, 32, 128),
    ("bf16_p64", jnp.bfloat16, jnp.bfloat16, 256, 32, 8, 128, 512, 64, 32, 128),
    ("bf16_g3_odd_sizes", jnp.bfloat16, jnp.bfloat16, 200, 24, 8, 128, 500, 16, 20, 100),
    ("bf16_int8_pages", jnp.bfloat16, jnp.int8, 256, 32, 8, 128, 512, 32, 32, 128),
    ("bf16_fp8_pages", jnp.bfloat16, jnp.float8_e4m3fn, 256, 32, 8, 128, 512, 64, 32, 128),
]


@pytest.mark.parametrize("impl,platform", [("tpu", "tpu"), ("gpu", "cuda")])
@pytest.mark.parametrize("dtype,kv_dtype,T,N,K,H,P,C,S,M", [s[1:] for s in LOWERING_SHAPES],
                         ids=[s[0] for s in LOWERING_SHAPES])
def test_lowers(impl, platform, dtype, kv_dtype, T, N, K, H, P, C, S, M):
  """The kernel lowers (Mosaic for TPU, Triton for CUDA) on realistic shapes; checked on a CPU-only jax."""
  sds = jax.ShapeDtypeStruct
  shapes = [sds((T, N, H), dtype), sds((P, K, C, H), kv_dtype), sds((P, K, C, H), kv_dtype), sds((S,), jnp.int32),
            sds((S, M), jnp.int32), sds((S + 1,), jnp.int32), sds((), jnp.int32)]
  scales = {}
  if kv_dtype != dtype:
    scales = dict(k_scales=sds((P, K, C), jnp.float32), v_scales=sds((P, K, C), jnp.float32))
  # A traced window (as under a layer scan) and soft-capping (Gemma 2) lower too.
  f = jax.jit(functools.partial(ragged_paged_attention, implementation=impl, soft_cap=50.0))
  # Triton custom calls carry no serialization-compatibility guarantee; we only need the lowering, not the artifact.
  exported = jax.export.export(f, platforms=[platform], disabled_checks=[
      jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*shapes, window=sds((), jnp.int32),
                                                                           **scales)
  text = exported.mlir_module()
  assert ("tpu_custom_call" in text) if impl == "tpu" else ("__gpu$xla.gpu.triton" in text)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype,C", [(jnp.float32, 16), (jnp.bfloat16, 64)], ids=["f32_p16", "bf16_p64"])
@pytest.mark.parametrize("N,K", [(4, 4), (6, 2), (8, 2), (8, 1)], ids=["g1", "g3", "g4", "g8"])
def test_kernel_sweep(impl, dtype, C, N, K):
  """GQA ratios 1/3/4/8 x page sizes on one ragged mix (decodes, a chunked prefill, a prompt, padding)."""
  rng = np.random.default_rng(C * 100 + N * 10 + K)
  q_lens = [1, 17, 1, 40, 1, 3]
  kv_lens = [int(q + rng.integers(0, 3 * C)) for q in q_lens]
  args = make_case(rng, q_lens, kv_lens, N=N, K=K, C=C, dtype=dtype, pad_seqs=2, pad_rows=7,
                   unused_out_of_range=bool(N % 4))
  ref = reference(args)
  out = run_kernel(impl, args, pages_per_block=2)
  assert_close(out, ref, args, dtype)
