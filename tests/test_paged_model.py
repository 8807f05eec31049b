"""The model over a paged KV cache (ragged paged attention) equals a full forward pass, for every implementation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.layers import Llama
from jaxllm.layers.paged import PagedKVCache
from jaxllm.pallas_kernels.kv_quant import QuantizedPages, quantize_kv
from tests.oracle import Generator
from tests.pallas_kernels import CPU

PAGE = 8
NUM_PAGES = 40
SCRATCH = 0  # padding tokens write here; never in a page table
# The GPU kernels run compiled on a GPU (`JAX_PLATFORMS=cuda pytest tests/test_paged_model.py -k gpu`), interpreted
# elsewhere.
GPU = "gpu" if jax.default_backend() == "gpu" else "gpu-interpret"


@pytest.fixture(scope="module")
def model():
  return Llama(ModelConfig.from_preset("tiny-gqa"), rngs=nnx.Rngs(3))


def zero_pages(config, num_pages, page, dtype):
  """Zero K and V pages stacked [L, P, K, C, H] (the pools `PagedKVCache` takes, one layer a row: easier to index)."""
  return [stacked(pool, config.num_layers) for pool in PagedKVCache.zero_pages(config, num_pages, page, dtype)]


def stacked(pool, num_layers):
  return jax.tree.map(lambda x: x.reshape(num_layers, -1, *x.shape[1:]), pool)


def run_step(model, k, v, seqs, new_tokens, impl):
  """One ragged step over stacked pages. seqs: list of (page table, tokens already cached); new_tokens: list of token
  lists."""
  tokens, positions, pages, offsets, kv_lens, cu = [], [], [], [], [], [0]
  for (table, cached), toks in zip(seqs, new_tokens):
    for r, t in enumerate(toks):
      p = cached + r
      tokens.append(t)
      positions.append(p)
      pages.append(table[p // PAGE])
      offsets.append(p % PAGE)
    kv_lens.append(cached + len(toks))
    cu.append(cu[-1] + len(toks))
  pad = 16 - len(tokens) % 16  # a bucketed T: padding rows go to the scratch page
  tokens += [0] * pad
  positions += [0] * pad
  pages += [SCRATCH] * pad
  offsets += [0] * pad
  M = max(len(t) for t, _ in seqs)
  table = np.full((len(seqs), M), -1, np.int32)
  for i, (t, _) in enumerate(seqs):
    table[i, :len(t)] = t
  L = model.config.num_layers
  pool = lambda x: jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), x)  # noqa: E731
  cache = PagedKVCache(k=pool(k), v=pool(v), slot_page_T=jnp.array(pages, jnp.int32),
                       slot_offset_T=jnp.array(offsets, jnp.int32), kv_lens=jnp.array(kv_lens, jnp.int32),
                       page_indices=jnp.array(table), cu_q_lens=jnp.array(cu, jnp.int32),
                       num_seqs=jnp.int32(len(seqs)), num_layers=L)
  h, cache = model(jnp.array([tokens], jnp.int32), jnp.array([positions], jnp.int32), cache, attention_impl=impl)
  return np.asarray(model.logits(h)[0]), stacked(cache.k, L), stacked(cache.v, L)


@pytest.mark.parametrize("impl", ["xla", CPU, GPU, "tpu-interpret"])
def test_ragged_paged_steps_equal_full_forward(model, impl, rng):
  gen = Generator(model)
  prompts = [rng.integers(0, 512, size=n).tolist() for n in (13, 5, 20)]
  conts = [rng.integers(0, 512, size=3).tolist() for _ in prompts]
  perm = rng.permutation(np.arange(1, NUM_PAGES))  # pages handed out in random order
  tables = [perm[0:5].tolist(), perm[5:10].tolist(), perm[10:15].tolist()]
  k, v = zero_pages(model.config, NUM_PAGES, PAGE, jnp.float32)
  k = k.at[:, perm[15:]].set(jnp.nan)  # pages no sequence owns: a stray read turns the output NaN
  v = v.at[:, perm[15:]].set(jnp.nan)

  # Step 1: sequences 0 and 1 prefill whole prompts; sequence 2 prefills its first 12 tokens (a chunk).
  logits, k, v = run_step(model, k, v, [(tables[0], 0), (tables[1], 0), (tables[2], 0)],
                          [prompts[0], prompts[1], prompts[2][:12]], impl)
  full = [gen.logits(np.array([p + c]))[0] for p, c in zip(prompts, conts)]
  np.testing.assert_allclose(logits[:13], full[0][:13], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[13:18], full[1][:5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[18:30], full[2][:12], atol=1e-5, rtol=0)
  # Step 2 (mixed): 0 and 1 decode one token each while 2 prefills the rest of its prompt.
  logits, k, v = run_step(model, k, v, [(tables[0], 13), (tables[1], 5), (tables[2], 12)],
                          [conts[0][:1], conts[1][:1], prompts[2][12:]], impl)
  np.testing.assert_allclose(logits[0], full[0][13], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[1], full[1][5], atol=1e-5, rtol=0)
  np.testing.assert_allclose(logits[2:10], full[2][12:20], atol=1e-5, rtol=0)
  # Step 3: pure decode for all three.
  logits, k, v = run_step(model, k, v, [(tables[0], 14), (tables[1], 6), (tables[2], 20)],
                          [conts[0][1:2], conts[1][1:2], conts[2][:1]], impl)
  for i, pos in enumerate((14, 6, 20)):
    np.testing.assert_allclose(logits[i], full[i][pos], atol=1e-5, rtol=0)


def test_unrolled_layer_loop_equals_the_scan(model, rng):
  """The layer loop is a scan on CPU and unrolled on an accelerator (`Llama._unroll`): both forms give the same logits
  and K/V pages, over a paged cache and on whole prompts."""
  prompts = [rng.integers(0, 512, size=n).tolist() for n in (9, 4)]
  tokens = jnp.array(rng.integers(0, 512, size=(2, 12)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(12, dtype=jnp.int32), (2, 12))
  got = {}
  try:
    for unroll in (False, True):
      model.unroll_layers = unroll
      k, v = zero_pages(model.config, NUM_PAGES, PAGE, jnp.float32)
      paged = run_step(model, k, v, [([1, 2], 0), ([3], 0)], prompts, "xla")
      got[unroll] = paged + (np.asarray(model(tokens, positions, attention_impl="xla")[0]),)
      jaxpr = str(jax.make_jaxpr(lambda t, p: model(t, p, attention_impl="xla")[0])(tokens, positions))
      assert f"unroll={model.config.num_layers if unroll else 1}" in jaxpr  # the form asked for is the one traced
  finally:
    model.unroll_layers = None
  for scanned, unrolled in zip(got[False], got[True]):
    np.testing.assert_allclose(unrolled, scanned, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", [GPU, "tpu-interpret"])
def test_flash_prefill_in_the_model_equals_reference(model, impl, rng):
  tokens = jnp.array(rng.integers(0, 512, size=(2, 24)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(24, dtype=jnp.int32), (2, 24))
  ref, _ = model(tokens, positions, attention_impl="xla")
  got, _ = model(tokens, positions, attention_impl=impl)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kv_dtype", [jnp.int8, jnp.float8_e4m3fn], ids=["int8", "fp8"])
def test_quantized_cache_stores_each_token_quantized_once(model, kv_dtype, rng):
  """The same two steps over a float and a quantized cache: layer 0's quantized pages hold exactly quantize_kv of the
  float cache's K (its K comes from the embeddings alone; later layers' K already differ through the quantized
  attention), and the logits stay close to the float cache's."""
  prompts = [rng.integers(0, 512, size=n).tolist() for n in (13, 20)]
  tables = [[3, 7], [1, 5, 9]]
  seqs = lambda done: [(tables[0], done[0]), (tables[1], done[1])]  # noqa: E731
  out = {}
  for dtype in (jnp.float32, kv_dtype):
    k, v = zero_pages(model.config, NUM_PAGES, PAGE, dtype)
    logits1, k, v = run_step(model, k, v, seqs((0, 0)), [prompts[0], prompts[1][:12]], "xla")
    k1 = k
    logits2, k, v = run_step(model, k, v, seqs((13, 12)), [[5], prompts[1][12:]], "xla")
    out[dtype] = (np.concatenate([logits1[:25], logits2[:9]]), k1)
  (want, k_float), (got, k_quant) = out[jnp.float32], out[kv_dtype]
  assert isinstance(k_quant, QuantizedPages) and k_quant.values.dtype == kv_dtype
  values, scales = quantize_kv(k_float[0], kv_dtype)  # layer 0's [P, K, C, H]: every page (zeros stay zeros)
  as_f32 = lambda x: np.asarray(x.astype(jnp.float32))  # noqa: E731
  np.testing.assert_array_equal(as_f32(k_quant.values[0]), as_f32(values))
  np.testing.assert_array_equal(np.asarray(k_quant.scales[0]), np.asarray(scales))
  assert np.abs(as_f32(values)).max() == (127 if kv_dtype == jnp.int8 else 448)
  err = np.abs(got - want).max() / np.abs(want).max()
  assert 0 < err < (0.02 if kv_dtype == jnp.int8 else 0.1), err
