"""Prefill flash attention: the jnp reference vs a float64 numpy oracle, both Pallas kernels (interpret mode on CPU) vs
the reference, the TPU kernel's DMA-skipping index maps, input validation, and lowering for TPU (Mosaic) and CUDA
(Triton) via jax.export.

Error criterion for the kernels, over real rows only (t < length):
  max |o_kernel - o_reference| <= tol * max |o_reference|,   tol = 1e-5 (float32), 2e-2 (bfloat16)
and padding rows (t >= length) must be exactly zero. In every kernel case k / v hold NaN at every s >= length, so a
stray read of a padded key would turn real rows into NaN; the reference is computed on the clean inputs.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.pallas_kernels.flash_attention import flash_attention, flash_attention_reference
from jaxllm.pallas_kernels.flash_attention.kernel_tpu import kv_block_index, q_block_index
from jaxllm.pallas_kernels.reference import NO_WINDOW
from tests.pallas_kernels import interpret

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
# Small blocks so a few dozen rows already span several blocks; bq != bkv in both directions.
BLOCKS = {"tpu": dict(block_q=8, block_kv=16), "gpu": dict(block_q=32, block_kv=16)}


def _inputs(rng, B, T, S, N, K, H, dtype=jnp.float32):
  q = 2.0 * rng.standard_normal((B, T, N, H))  # sharper softmax: the running max moves between blocks
  k = rng.standard_normal((B, S, K, H))
  v = rng.standard_normal((B, S, K, H))
  return tuple(jnp.asarray(x, jnp.float32).astype(dtype) for x in (q, k, v))


def _poison(x_BSKH, lengths):
  """NaN at every key position s >= lengths[b]."""
  s_S = np.arange(x_BSKH.shape[1])
  pad_BS = s_S[None, :] >= np.asarray(lengths)[:, None]
  return jnp.where(jnp.asarray(pad_BS)[:, :, None, None], jnp.nan, x_BSKH)


def _numpy_attention(q, k, v, lengths, sm_scale, causal, window=None, soft_cap=None):
  """Independent oracle: float64, one (batch, head, row) at a time, padding rows zero."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  S, K = k.shape[1:3]
  G = N // K
  o = np.zeros((B, T, N, H))
  for b in range(B):
    for n in range(N):
      for t in range(min(T, lengths[b])):
        keys = [s for s in range(min(S, lengths[b])) if not causal or (s <= t and (window is None or t - s < window))]
        logits = k[b, keys, n // G] @ q[b, t, n] * sm_scale
        if soft_cap is not None:
          logits = soft_cap * np.tanh(logits / soft_cap)
        p = np.exp(logits - logits.max())
        o[b, t, n] = p @ v[b, keys, n // G] / p.sum()
  return o


def _check(o, ref, lengths, dtype):
  o, ref = np.asarray(o, np.float32), np.asarray(ref, np.float32)
  real_BT = np.arange(o.shape[1])[None, :] < np.asarray(lengths)[:, None]
  assert np.all(np.isfinite(o)), "non-finite output"
  assert np.all(o[~real_BT] == 0), "padding rows must be zero"
  err = np.max(np.abs(o[real_BT] - ref[real_BT]))
  scale = np.max(np.abs(ref[real_BT]))
  assert err <= TOL[dtype] * scale, f"max abs err {err:.3g} > {TOL[dtype]} * {scale:.3g}"


# --- reference vs numpy oracle -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "causal, T, S, N, K, lengths",
  [
    (True, 7, 7, 6, 2, (7, 3, 0)),  # GQA 3, a short row and an empty one
    (False, 5, 9, 4, 1, (9, 2, 6)),  # MQA, non-causal, S > T
  ],
)
def test_reference_matches_numpy_oracle(rng, causal, T, S, N, K, lengths):
  q, k, v = _inputs(rng, len(lengths), T, S, N, K, 8)
  lengths_B = jnp.asarray(lengths, jnp.int32)
  o = flash_attention_reference(q, k, v, lengths_B, causal=causal)
  want = _numpy_attention(q, k, v, lengths, 8**-0.5, causal)
  np.testing.assert_allclose(np.asarray(o), want, atol=2e-6, rtol=2e-6)
  # NaN in the padded keys does not reach the reference either.
  o_poisoned = flash_attention_reference(q, _poison(k, lengths), _poison(v, lengths), lengths_B, causal=causal)
  np.testing.assert_array_equal(np.asarray(o_poisoned), np.asarray(o))


def test_dispatch_on_cpu_is_the_reference(rng):
  q, k, v = _inputs(rng, 2, 9, 9, 4, 2, 8)
  lengths = jnp.array([9, 4], jnp.int32)
  np.testing.assert_array_equal(
    np.asarray(flash_attention(q, k, v, lengths, sm_scale=0.3)),
    np.asarray(flash_attention_reference(q, k, v, lengths, sm_scale=0.3)),
  )


# --- kernels (interpret mode) vs the reference ---------------------------------------------------------------------

CASES = {  # (B, T, N, K, H, lengths); T is a multiple of neither block size
  "mha": (2, 41, 4, 4, 32, (41, 17)),  # G = 1
  "gqa3_len1": (2, 37, 6, 2, 32, (1, 37)),  # G = 3, a length-1 row
  "gqa4_h128": (1, 44, 8, 2, 128, (30,)),  # G = 4, H = 128: the TPU kernel's heads-in-lanes layout
  "mqa8_h24": (2, 33, 8, 1, 24, (33, 9)),  # G = 8, H not a power of two (the GPU path pads it)
}


def _kernel_case(rng, impl, case, dtype, causal=True, S=None, blocks="small"):
  """blocks: "small" (BLOCKS), "default" (the dispatch's choice) or a dict of block_q / block_kv."""
  B, T, N, K, H, lengths = case
  S = T if S is None else S
  q, k, v = _inputs(rng, B, T, S, N, K, H, dtype)
  lengths_B = jnp.asarray(lengths, jnp.int32)
  ref = flash_attention_reference(q, k, v, lengths_B, causal=causal)
  block_kw = BLOCKS[impl] if blocks == "small" else {} if blocks == "default" else blocks
  o = flash_attention(
    q, _poison(k, lengths), _poison(v, lengths), lengths_B, causal=causal, implementation=impl,
    interpret=interpret(impl),
    **block_kw,
  )
  assert o.shape == q.shape and o.dtype == q.dtype
  _check(o, ref, lengths, dtype)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_f32(rng, impl, case):
  _kernel_case(rng, impl, CASES[case], jnp.float32)


@pytest.mark.parametrize("case", ["gqa3_len1", "gqa4_h128"])
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_bf16(rng, impl, case):
  _kernel_case(rng, impl, CASES[case], jnp.bfloat16)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_non_causal_longer_keys(rng, impl):
  _kernel_case(rng, impl, CASES["mha"], jnp.float32, causal=False, S=70)


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_default_blocks(rng, impl):
  _kernel_case(rng, impl, CASES["gqa3_len1"], jnp.float32, blocks="default")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("impl", ["tpu", "gpu"])
def test_kernel_larger(rng, impl, dtype):
  blocks = dict(block_q=64 if impl == "gpu" else 32, block_kv=64)
  _kernel_case(rng, impl, (2, 250, 8, 2, 128, (250, 131)), dtype, blocks=blocks)


# --- sliding window and soft-capping --------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["tpu", "gpu"])
@pytest.mark.parametrize("window,soft_cap", [(5, None), (17, 20.0), (1, None), (40, 5.0)])
def test_kernel_sliding_window(rng, impl, window, soft_cap):
  """Windows below, at and above the block sizes, with and without soft-capping; oracle: float64 numpy."""
  B, T, N, K, H, lengths = 2, 70, 6, 2, 32, (70, 33)
  q, k, v = _inputs(rng, B, T, T, N, K, H)
  want = _numpy_attention(q, k, v, lengths, H**-0.5, True, window, soft_cap)
  lengths_B = jnp.asarray(lengths, jnp.int32)
  ref = flash_attention_reference(q, k, v, lengths_B, window=window, soft_cap=soft_cap)
  _check(ref, want, lengths, jnp.float32)
  for blocks in (BLOCKS[impl], dict(block_q=16, block_kv=16)):
    o = flash_attention(q, _poison(k, lengths), _poison(v, lengths), lengths_B, implementation=impl,
                        interpret=interpret(impl), window=window, soft_cap=soft_cap, **blocks)
    _check(o, want, lengths, jnp.float32)


def test_window_needs_causal(rng):
  q, k, v = _inputs(rng, 1, 4, 4, 2, 2, 8)
  with pytest.raises(ValueError, match="sliding window needs causal"):
    flash_attention(q, k, v, causal=False, window=2)


# --- TPU index maps: a DMA only for blocks that are computed on ----------------------------------------------------


@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 20), (True, 40)])
def test_tpu_index_maps_skip_dma(causal, window):
  bq, bkv, T = 16, 32, 128
  nq, nk = T // bq, T // bkv
  w = NO_WINDOW if window is None else window
  for length in (0, 1, 31, 32, 77, 128):
    steps = [(i, j) for i in range(nq) for j in range(nk)]  # grid order for one (b, kv head)
    q_idx = [int(q_block_index(i, length, block_q=bq)) for i, _ in steps]
    kv_idx = [int(kv_block_index(i, j, length, w, block_q=bq, block_kv=bkv, causal=causal)) for i, j in steps]
    computed = [i * bq < length and j * bkv < length and (not causal or j * bkv < (i + 1) * bq)
                and (j + 1) * bkv - 1 > i * bq - w for i, j in steps]
    for n, (i, j) in enumerate(steps):
      if computed[n]:
        assert q_idx[n] == i and kv_idx[n] == j, (length, i, j)
    # The pipeline fetches a block whenever the indices change; every fetched block must be computed on before the
    # indices change again (a window's first block is fetched at j = 0 and computed at its own j).
    runs = [n for n in range(1, len(steps)) if (kv_idx[n], q_idx[n]) != (kv_idx[n - 1], q_idx[n - 1])]
    for start, end in zip(runs, runs[1:] + [len(steps)]):
      assert any(computed[start:end]), f"DMA for a skipped block: length={length} step={steps[start]}"


# --- input validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(q=(2, 8, 4)), r"q_BTNH must be a rank-4 array, got shape \(2, 8, 4\)"),
    (dict(q=(2, 8, 6, 8), k=(2, 8, 4, 8), v=(2, 8, 4, 8)), r"N=6 must be a multiple of KV heads K=4"),
    (dict(v=(2, 8, 2, 4)), r"same shape, got \(2, 8, 2, 8\) and \(2, 8, 2, 4\)"),
    (dict(k=(2, 8, 2, 16), v=(2, 8, 2, 16)), r"must match q"),
    (dict(k_dtype=jnp.bfloat16), r"share one dtype, got float32, bfloat16, float32"),
    (dict(dtype=jnp.float16), r"float16 is not supported"),
    (dict(k=(2, 9, 2, 8), v=(2, 9, 2, 8)), r"S == T .* T=8, S=9"),
    (dict(k=(2, 6, 2, 8), v=(2, 6, 2, 8), causal=False), r"S >= T, got T=8, S=6"),
    (dict(lengths=np.array([8, 8, 8])), r"lengths_B must have shape \(2,\), got \(3,\)"),
    (dict(lengths=np.array([8.0, 8.0])), r"integer array, got dtype float64"),
    (dict(implementation="cuda"), r"implementation='cuda'"),
    (dict(implementation="gpu", block_q=24), r"block_q=24 must be a power of two"),
    (dict(implementation="tpu", block_kv=12), r"block_kv=12 must be a multiple of 8"),
    (dict(sm_scale=float("nan")), r"sm_scale must be finite"),
  ],
)
def test_validation(bad, match):
  bad = dict(bad)
  dtype = bad.pop("dtype", jnp.float32)
  q = jnp.zeros(bad.pop("q", (2, 8, 4, 8)), dtype)
  k = jnp.zeros(bad.pop("k", (2, 8, 2, 8)), bad.pop("k_dtype", dtype))
  v = jnp.zeros(bad.pop("v", (2, 8, 2, 8)), dtype)
  with pytest.raises(ValueError, match=match):
    flash_attention(q, k, v, bad.pop("lengths", None), **bad)


# --- lowering: Mosaic for TPU, Triton for CUDA ---------------------------------------------------------------------


def _export(impl, platform, dtype, H, **export_kw):
  B, T, N, K = 2, 512, 8, 2
  q = jax.ShapeDtypeStruct((B, T, N, H), dtype)
  kv = jax.ShapeDtypeStruct((B, T, K, H), dtype)
  lengths = jax.ShapeDtypeStruct((B,), jnp.int32)
  window = jax.ShapeDtypeStruct((), jnp.int32)  # traced, as under a layer scan; soft-capping on (Gemma 2)
  fn = jax.jit(partial(flash_attention, implementation=impl, soft_cap=50.0))
  return jax.export.export(fn, platforms=[platform], **export_kw)(q, kv, kv, lengths, window=window).mlir_module()


@pytest.mark.parametrize("H", [128, 64])  # heads-in-lanes and head-major layouts
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_kernel_lowers_to_mosaic(dtype, H):
  assert "tpu_custom_call" in _export("tpu", "tpu", dtype, H)


# The Triton custom call carries no export-compatibility guarantee, so jax.export refuses it unless told otherwise;
# lowering itself (Pallas -> Triton IR) succeeds.
_TRITON = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_kernel_lowers_to_triton(dtype):
  assert "__gpu$xla.gpu.triton" in _export("gpu", "cuda", dtype, 128, disabled_checks=[_TRITON])


def test_gpu_export_needs_the_triton_safety_check_disabled():
  with pytest.raises(ValueError, match="no compatibility guarantees"):
    _export("gpu", "cuda", jnp.bfloat16, 128)
