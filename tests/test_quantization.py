"""Weight-only int8 (`quantization="int8"`): the quantizer's error bound, the int8 model computing exactly the float
model on its dequantized weights, memory, accuracy on the default model, engine guarantees, the orbax round trip and
the planner.

Held-out text for perplexity: the Apache-2.0 license text shipped in jax's wheel (~2,200 SmolLM2 tokens of English
prose no other fixture uses).
"""

import functools
import importlib.metadata
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm import LLM, SamplingParams, checkpoint
from jaxllm.checkpoint import orbax_io
from jaxllm.config import ModelConfig
from jaxllm.layers.ops import quantize_blocks, quantize_int8
from jaxllm.layers.paged import PagedKVCache
from jaxllm.sharding import planner
from tests.oracle import Generator
from tests.test_hf_parity import make_hf_model

# The quantized matrices (stacked [L, ...]): their scale's name and their contraction axes.
MATRICES = {"attn": {"wq_DNH": ("wq_scale", (1,)), "wk_DKH": ("wk_scale", (1,)),
                     "wv_DKH": ("wv_scale", (1,)), "wo_NHD": ("wo_scale", (1, 2))},
            "mlp": {"w_gate_DF": ("w_gate_scale", (1,)), "w_up_DF": ("w_up_scale", (1,)),
                    "w_down_FD": ("w_down_scale", (1,))}}


def heldout_text() -> str:
  return next(f for f in importlib.metadata.files("jax") if f.name == "LICENSE").locate().read_text()


def heldout_texts() -> list[str]:
  """heldout_text() and a second English text no fixture uses (the MPL 2.0, shipped with ml_dtypes, a jax
  dependency): 5,884 tokens between them."""
  eigen = next(f for f in importlib.metadata.files("ml_dtypes") if f.name == "LICENSE.eigen").locate().read_text()
  return [heldout_text(), eigen]


def test_quantizer_error_is_at_most_half_a_step(rng):
  w = rng.standard_normal((64, 3, 8)).astype(np.float32) * rng.uniform(0.01, 10, (1, 3, 8)).astype(np.float32)
  w[:, 0, 0] = 0.0  # an all-zero channel
  q, scale = quantize_int8(w, (0,))
  assert q.dtype == np.int8 and scale.shape == (3, 8) and np.abs(q).max() <= 127
  assert scale[0, 0] == 1.0 and (q[:, 0, 0] == 0).all()
  half_step = np.broadcast_to(scale / 2 * (1 + 1e-6) + 1e-12, w.shape)
  np.testing.assert_array_less(np.abs(w - q * scale), half_step)
  peak = np.abs(q).max(axis=0)
  assert peak[0, 0] == 0 and (peak.reshape(-1)[1:] == 127).all()  # every other channel uses the full range


def dequantized(params: dict) -> dict:
  """The float params a quantized tree stands for, in numpy: each matrix q * scale, a per-channel scale broadcast over
  the contraction axes, a q8_0 scale over its block of 32 along the axis it is shorter on."""
  out = {**params, "layers": dict(params["layers"])}
  for block, names in MATRICES.items():
    b = dict(params["layers"][block])
    for name, (scale_name, axes) in names.items():
      q, scale = np.asarray(b[name], np.float32), np.asarray(b.pop(scale_name), np.float32)
      if scale.ndim == q.ndim:
        (axis,) = [i for i in range(q.ndim) if q.shape[i] != scale.shape[i]]
        scale = np.repeat(scale, 32, axis=axis)
      else:
        scale = np.expand_dims(scale, axes)
      b[name] = q * scale
    out["layers"][block] = b
  return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llama")
  return make_hf_model(path, 4, 2, False, None), path


@pytest.mark.parametrize("quantization", ["int8", "q8_0"])
def test_quantized_model_is_the_float_model_on_its_dequantized_weights(tiny_h32, rng, quantization):
  _, path = tiny_h32
  q = checkpoint.load_checkpoint(str(path), quantization=quantization)
  f = checkpoint.load_checkpoint(str(path))
  assert q.params["layers"]["attn"]["wq_DNH"].dtype == np.int8 and q.params["embed_VD"].dtype == np.float32
  tokens = rng.integers(0, 300, size=(2, 24))
  got = Generator(checkpoint.build_model(q.config, q.params, "float32", quantization=quantization)).logits(tokens)
  want = Generator(checkpoint.build_model(f.config, dequantized(q.params), "float32")).logits(tokens)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  full = Generator(checkpoint.build_model(f.config, f.params, "float32")).logits(tokens)
  assert 1e-5 < np.abs(got - full).max() < 0.05 * np.abs(full).max()  # quantized (not a no-op), and close


@pytest.fixture(scope="module")
def tiny_h32(tmp_path_factory):
  """head_dim 32, d_model 64, d_ff 96: every contraction axis a whole number of q8_0 blocks."""
  path = tmp_path_factory.mktemp("tiny_llama_h32")
  return make_hf_model(path, 2, 1, False, None), path


@pytest.mark.parametrize("quantization", [None, "int8", "q8_0"])
def test_accelerator_dots_are_plain_in_the_activation_dtype(rng, monkeypatch, quantization):
  """On an accelerator `dense` never asks for a float32 dot result (XLA:GPU answered that by upcasting a one-row GEMM's
  operands to float32: a float32 copy of the weights per step), quantized weights included; CPU asks for it. Both
  agree to bfloat16 rounding."""
  from jaxllm.layers import ops

  w = rng.standard_normal((64, 4, 32)).astype(np.float32) * 0.05
  x = jnp.asarray(rng.standard_normal((3, 64)), jnp.bfloat16)
  q, scale = (w, None) if quantization is None else ops.quantize(w, quantization, (0,), jnp.bfloat16)
  q = jnp.asarray(q, jnp.bfloat16 if quantization is None else q.dtype)
  scale = None if scale is None else jnp.asarray(scale)

  def dots(backend):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    jaxpr = jax.make_jaxpr(lambda a: ops.dense("BD,DNH->BNH", a, q, scale))(x)
    return ([e.outvars[0].aval.dtype for e in jaxpr.eqns if e.primitive.name == "dot_general"],
            np.asarray(ops.dense("BD,DNH->BNH", x, q, scale), np.float32))

  cpu_dtypes, on_cpu = dots("cpu")
  gpu_dtypes, on_gpu = dots("gpu")
  assert cpu_dtypes == [jnp.float32] and gpu_dtypes == [jnp.bfloat16]
  np.testing.assert_allclose(on_gpu, on_cpu, rtol=2e-2, atol=2e-2 * np.abs(on_cpu).max())


@pytest.mark.parametrize("quantization", [None, "int8", "q8_0"])
def test_output_projection_reads_its_weight_as_stored(rng, quantization):
  """The attention output projection "BTNH,NHD->BTD" contracts (N, H) in the weight's own order: `jnp.einsum` listed
  them as (H, N) and XLA:CPU transposed the whole [N, H, D] weight (and the activations) before every dot. The
  compiled program has no transpose or copy, and the product equals einsum's."""
  from jaxllm.layers import ops

  w = rng.standard_normal((3, 32, 64)).astype(np.float32) * 0.05
  x = jnp.asarray(rng.standard_normal((1, 2, 3, 32)), jnp.float32)
  q, scale = (w, None) if quantization is None else ops.quantize(w, quantization, (0, 1), jnp.float32)
  q, scale = jnp.asarray(q), None if scale is None else jnp.asarray(scale)
  project = jax.jit(lambda x, q, scale: ops.dense("BTNH,NHD->BTD", x, q, scale))
  hlo = project.lower(x, q, scale).compile().as_text()
  assert not re.search(r"= \S+ (transpose|copy)\(", hlo), hlo
  want = np.einsum("btnh,nhd->btd", np.asarray(x), w)
  np.testing.assert_allclose(np.asarray(project(x, q, scale)), want, rtol=1e-5 if quantization is None else 2e-2,
                             atol=1e-6 if quantization is None else 2e-2 * np.abs(want).max())


def test_block_quantizer_rounds_like_llama_cpp(rng):
  w = rng.standard_normal((64, 3, 8)).astype(np.float32) * rng.uniform(0.01, 10, (1, 3, 8)).astype(np.float32)
  w[32:, 0, 0] = 0.0  # an all-zero block
  q, scale = quantize_blocks(w, 0)
  assert q.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (2, 3, 8)
  assert scale[1, 0, 0] == 0 and (q[32:, 0, 0] == 0).all()
  step = np.repeat(scale.astype(np.float32), 32, axis=0)
  np.testing.assert_array_less(np.abs(w - q * step), step / 2 * (1 + 1e-3) + 1e-12)
  peak = np.abs(q).reshape(2, 32, 3, 8).max(axis=1)
  assert peak[1, 0, 0] == 0 and (np.delete(peak.reshape(-1), 3 * 8) == 127).all()  # full range where not zero
  again = quantize_blocks(q * step, 0)  # dequantized Q8_0 blocks requantize to themselves
  np.testing.assert_array_equal(again[0], q)
  np.testing.assert_array_equal(again[1], scale)
  with pytest.raises(ValueError, match="blocks of 32 along a contraction axis of size 48"):
    quantize_blocks(w[:48], 0)


def test_q8_0_gguf_loads_bit_exactly_and_computes_its_dequantized_logits(tiny_h32, tmp_path, rng):
  """A Q8_0 GGUF with quantization="q8_0": each matrix holds the file's own int8 values and float16 block scales (its
  dequantization equals the float load's exactly, and every non-zero block spans the full [-127, 127]), and the
  logits equal the float load's."""
  import gguf

  from tests.test_gguf_writer import write_gguf

  write_gguf(tmp_path / "q8.gguf", tiny_h32[0], quantize=gguf.GGMLQuantizationType.Q8_0)
  q = checkpoint.load_checkpoint(str(tmp_path / "q8.gguf"), quantization="q8_0")
  f = checkpoint.load_checkpoint(str(tmp_path / "q8.gguf"), quantization=None)
  attn = q.params["layers"]["attn"]
  assert attn["wq_DNH"].dtype == np.int8 and attn["wq_scale"].shape == (3, 2, 2, 32)  # [L, D / 32, N, H]
  assert attn["wo_scale"].shape == (3, 2, 1, 64) and attn["wo_scale"].dtype == np.float16  # [L, N, H / 32, D]
  deq, ref = dequantized(q.params), f.params
  for block, names in MATRICES.items():
    for name in names:
      np.testing.assert_array_equal(deq["layers"][block][name], ref["layers"][block][name])
      values = np.abs(np.asarray(q.params["layers"][block][name], np.int32))
      scale = np.asarray(q.params["layers"][block][names[name][0]])
      (axis,) = [i for i in range(values.ndim) if values.shape[i] != scale.shape[i]]
      peak = values.reshape(*values.shape[:axis], -1, 32, *values.shape[axis + 1:]).max(axis=axis + 1)
      assert ((peak == 127) | (scale == 0)).all()
  # The file's raw blocks (34 bytes: float16 scale, 32 int8) of layer 1's down_proj [D rows, blocks along F].
  reader = gguf.GGUFReader(str(tmp_path / "q8.gguf"))
  raw = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight").data.reshape(64, 3, 34)
  np.testing.assert_array_equal(raw[..., 2:].copy().view(np.int8).reshape(64, 96).T,
                                q.params["layers"]["mlp"]["w_down_FD"][1])
  np.testing.assert_array_equal(raw[..., :2].copy().view(np.float16)[..., 0].T,
                                q.params["layers"]["mlp"]["w_down_scale"][1])
  tokens = rng.integers(0, 300, size=(2, 24))
  got = Generator(checkpoint.build_model(q.config, q.params, "float32", quantization="q8_0")).logits(tokens)
  want = Generator(checkpoint.build_model(f.config, f.params, "float32")).logits(tokens)
  assert np.abs(got - want).max() <= 1e-3 * np.abs(want).max()


def test_auto_keeps_quantized_ggufs_quantized(tiny, tiny_h32, tmp_path, default_gguf):
  """quantization="auto" (LLM's default): a GGUF stored block-quantized loads as q8_0 (a Q8_0 file bit-exactly, as
  asked explicitly); a float GGUF, an HF checkpoint, or a model whose dims do not split into blocks of 32 loads float;
  the default model (Q4_1) runs q8_0."""
  import gguf

  from tests.test_gguf_writer import write_gguf

  write_gguf(tmp_path / "q8.gguf", tiny_h32[0], quantize=gguf.GGMLQuantizationType.Q8_0)
  auto = checkpoint.load_checkpoint(str(tmp_path / "q8.gguf"))
  asked = checkpoint.load_checkpoint(str(tmp_path / "q8.gguf"), quantization="q8_0")
  assert auto.quantization == "q8_0"
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, auto.params, asked.params)))
  write_gguf(tmp_path / "f32.gguf", tiny_h32[0])
  assert checkpoint.load_checkpoint(str(tmp_path / "f32.gguf")).quantization is None
  assert checkpoint.load_checkpoint(str(tiny_h32[1])).quantization is None  # HF safetensors
  write_gguf(tmp_path / "q8_h16.gguf", tiny[0], quantize=gguf.GGMLQuantizationType.Q8_0)  # head_dim 16
  assert checkpoint.load_checkpoint(str(tmp_path / "q8_h16.gguf")).quantization is None
  default = checkpoint.GGUFCheckpoint(default_gguf)
  assert default.matrices_quantized() and checkpoint.auto_quantization(default) == "q8_0"


def test_q8_0_needs_whole_blocks(tiny):
  with pytest.raises(ValueError, match="q8_0 quantizes blocks of 32 .* size 16.*use quantization='int8'"):
    checkpoint.load_checkpoint(str(tiny[1]), quantization="q8_0")  # head_dim 16: wo's blocks would span heads


def test_int8_engine_outputs_do_not_depend_on_the_batch(tiny, rng):
  """Batch invariance with int8 weights: each prompt alone and all of them together, chunked prefill included."""
  _, path = tiny
  llm = LLM(str(path), quantization="int8", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=16)
  prompts = [rng.integers(0, 300, size=n).tolist() for n in (3, 17, 30, 9)]
  sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
  together = [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]
  alone = [llm.generate(prompt_token_ids=[p], sampling_params=sp)[0].outputs[0].token_ids for p in prompts]
  assert together == alone
  llm.scheduler.check_pages()
  assert llm.scheduler.num_pages_held() == 0  # every page back


@pytest.mark.parametrize("quantization", ["int8", "q8_0"])
def test_quantized_orbax_round_trip(tiny_h32, tmp_path, quantization):
  _, path = tiny_h32
  q = checkpoint.load_checkpoint(str(path), quantization=quantization)
  orbax_io.save(str(tmp_path / "c"), q.config, q.params, q.dtype, quantization=q.quantization)
  back = checkpoint.load_checkpoint(str(tmp_path / "c"))  # quantized whatever is asked: it is what the files hold
  assert back.quantization == quantization
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back.params, q.params)
  other = "q8_0" if quantization == "int8" else "int8"
  with pytest.raises(ValueError, match=f"holds {quantization} weights; quantization='{other}' needs"):
    checkpoint.load_checkpoint(str(tmp_path / "c"), quantization=other)
  f = checkpoint.load_checkpoint(str(path))
  orbax_io.save(str(tmp_path / "f"), f.config, f.params, f.dtype)
  with pytest.raises(ValueError, match="holds float weights; quantization='int8' needs `jaxllm convert"):
    checkpoint.load_checkpoint(str(tmp_path / "f"), quantization="int8")


def test_unknown_quantization_is_refused(tiny):
  with pytest.raises(ValueError, match="quantization='int4' is not supported"):
    checkpoint.load_checkpoint(str(tiny[1]), quantization="int4")


def _param_bytes(tree) -> tuple[int, int]:
  """(bytes of the quantizable matrices, bytes of everything else) of a params tree (arrays or ShapeDtypeStructs)."""
  names = set(MATRICES["attn"]) | set(MATRICES["mlp"])
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  size = lambda x: np.dtype(x.dtype).itemsize * int(np.prod(x.shape))  # noqa: E731
  mats = sum(size(x) for path, x in flat if any(str(getattr(k, "key", "")) in names for k in path))
  return mats, sum(size(x) for _, x in flat) - mats


def test_int8_weight_bytes(default_llm):
  """int8 matrices (and their scales) <= 0.27x their float32 bytes; the embedding / LM head, norms and biases stay
  float by design. Measured on the placed arrays of the default model and on a Llama-3.2-1B-shaped tree."""
  q = LLM("default", quantization="int8", max_model_len=256)
  f32_mats, f32_rest = _param_bytes(default_llm.engine.params)  # the placed arrays
  q_mats, q_rest = _param_bytes(q.engine.params)
  scales = q_rest - f32_rest
  assert (q_mats + scales) <= 0.27 * f32_mats, (q_mats, scales, f32_mats)
  c = ModelConfig.from_preset("llama3.2-1b")
  f32_mats, f32_rest = _param_bytes(checkpoint.abstract_params(c, "float32"))
  q_mats, q_rest = _param_bytes(checkpoint.abstract_params(c, "float32", "int8"))
  assert q_mats + (q_rest - f32_rest) <= 0.27 * f32_mats
  assert q_mats * 4 == f32_mats  # every matrix at 1 byte


@pytest.mark.slow  # ~1.5 min: the held-out text scored three times by the default model
@pytest.mark.parametrize("quantization", ["int8", "q8_0"])
def test_quantized_perplexity_within_one_percent_of_float32(default_llm, quantization):
  """Measured: float32 13.175, int8 13.289 (+0.87%), q8_0 13.177 (+0.02%: blocks of 32 follow the GGUF's own Q4_1
  blocks)."""
  text = heldout_text()
  q = LLM("default", quantization=quantization, max_model_len=default_llm.max_model_len)  # the same scoring windows
  base, got = default_llm.score([text])[0], q.score([text])[0]
  assert base.num_tokens == got.num_tokens >= 2000
  assert got.perplexity / base.perplexity - 1 < 0.01, (got.perplexity, base.perplexity)


PAGE = 16  # tokens per page of the test's paged cache


@functools.partial(jax.jit, static_argnames=("graphdef", "window", "chunk"))
def _paged_chunk(graphdef, params, k, v, toks_T, start, n, *, window, chunk):
  """One prefill chunk of a single sequence through a paged cache (page 0 scratch, pages 1.. the window in order):
  log p of the next token at each of the chunk's positions, and the written pages."""
  model = nnx.merge(graphdef, params)
  pos_T = start + jnp.arange(chunk, dtype=jnp.int32)
  real_T = jnp.arange(chunk) < n
  cache = PagedKVCache(
      k=k, v=v, slot_page_T=jnp.where(real_T, 1 + pos_T // PAGE, 0), slot_offset_T=jnp.where(real_T, pos_T % PAGE, 0),
      kv_lens=(start + n)[None], page_indices=1 + jnp.arange(window // PAGE, dtype=jnp.int32)[None],
      cu_q_lens=jnp.stack([0, n]), num_seqs=jnp.int32(1), num_layers=model.config.num_layers)
  h, cache = model(toks_T[None], pos_T[None], cache, "xla")
  return jax.nn.log_softmax(model.logits(h)[0], axis=-1), cache.k, cache.v


def paged_logprobs(llm, tokens: list[int], kv_dtype, window: int = 1024, chunk: int = 256):
  """Yields (window's tokens, chunk start, log p [chunk, V]) for a text in windows of `window` tokens, computed as
  the engine does: prefilled chunk by chunk into a paged cache of `kv_dtype` and read back by ragged paged attention
  (the score path's full forward never touches a cache)."""
  k0, v0 = PagedKVCache.zero_pages(llm.engine.model_config, window // PAGE + 1, PAGE, kv_dtype)
  for w in range(0, len(tokens), window):
    text, k, v = tokens[w:w + window], k0, v0
    for start in range(0, len(text), chunk):
      part = text[start:start + chunk]
      logp, k, v = _paged_chunk(llm.engine.graphdef, llm.engine.params, k, v,
                                jnp.asarray(part + [0] * (chunk - len(part)), jnp.int32), jnp.int32(start),
                                jnp.int32(len(part)), window=window, chunk=chunk)
      yield text, start, np.asarray(logp)


def paged_nll(llm, tokens: list[int], kv_dtype) -> np.ndarray:
  """-log p(token | earlier tokens of its window) for every token but each window's first, through the paged
  cache."""
  nll = []
  for text, start, logp in paged_logprobs(llm, tokens, kv_dtype):
    targets = text[start + 1:start + len(logp) + 1]
    nll += (-logp[np.arange(len(targets)), targets]).tolist()
  return np.asarray(nll)


@pytest.mark.slow  # ~2.5 min: 3 x 5,877 tokens through the default model in 256-token chunks
def test_quantized_kv_cache_perplexity_within_one_percent_of_float32(default_llm):
  """int8 and fp8 KV pages (a scale per token and head), through the paged cache, on two held-out texts (jax's
  LICENSE and ml_dtypes' LICENSE.eigen, 5,877 scored tokens in 1,024-token windows).

  fp8 (e4m3: 3 mantissa bits) moves each token's log-likelihood by about 0.21 nats (standard deviation over tokens;
  int8 0.07), so the measured ratio carries noise of about 0.21 / sqrt(n): 0.45% on one 2,212-token text, 0.27% on
  both. On the first text alone fp8 read +0.49% and +1.03% for two programs that differ only in the order of one
  float32 sum (the output projection's), int8 +0.46% / +0.25%; on both texts fp8 +0.57% / +0.84%, int8 +0.12% /
  +0.10%, against perplexity 13.499 with float32 pages."""
  tokens = [default_llm.tokenizer.encode(text) for text in heldout_texts()]
  base = np.concatenate([paged_nll(default_llm, t, jnp.float32) for t in tokens])
  assert len(base) >= 5000
  for dtype in (jnp.int8, jnp.float8_e4m3fn):
    nll = np.concatenate([paged_nll(default_llm, t, dtype) for t in tokens])
    ratio = np.exp(nll.mean() - base.mean())
    assert 1 - 0.01 < ratio < 1 + 0.01, (dtype, ratio)


def test_planner_counts_int8_weights():
  """Llama-3-70B int8 on model=8 with 16 GiB per device fits (bf16 does not), with its batch x context."""
  c = ModelConfig.from_preset("llama3-70b")
  q = planner.plan(c, {"model": 8}, "bfloat16", 8192, 16 * planner.GiB, "tp", quantization="int8")
  b = planner.plan(c, {"model": 8}, "bfloat16", 8192, 16 * planner.GiB, "tp")
  assert q.fits and not b.fits and q.max_batch >= 16
  assert q.weight_bytes_per_device < 0.55 * b.weight_bytes_per_device
  assert q.weight_bytes_total == pytest.approx(c.num_params * 2 * 0.53, rel=0.03)  # 93% of params at 1 byte


@pytest.mark.parametrize("quantization", ["int8", "q8_0"])
def test_planner_quantized_bytes_equal_the_models(quantization):
  c = ModelConfig.from_preset("smollm2-135m")
  p = planner.plan(c, {"model": 1}, "float32", 256, planner.GiB, "tp", quantization=quantization)
  assert p.weight_bytes_per_device == sum(_param_bytes(checkpoint.abstract_params(c, "float32", quantization)))
  assert p.weight_bytes_total == p.weight_bytes_per_device


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The three primary colors are",
           "Water boils at", "The largest planet in the solar system", "In 1492,", "To make a cup of tea,",
           "import numpy as np\n", "The quick brown fox", "Photosynthesis is", "My favorite book is",
           "The speed of light", "Dear Sir or Madam,", "A haiku about autumn:", "SELECT * FROM"]


@pytest.mark.slow  # ~8 min: four loads of the default model, 4 x 16 x 32 greedy tokens, 2 x 16 paged prefills
def test_greedy_agreement_with_float32(default_llm):
  """Greedy continuations of 16 prompts, the first 32 tokens, against float32's, measured two ways:
  - teacher-forced: at each of the 32 positions of float32's continuation, given float32's prefix, the variant's
    argmax is float32's token — per-token agreement, held to the issue's >= 90% (measured: int8 98.2%, q8_0 98.2%,
    int8 KV 99.0%, fp8 KV 97.5%; int8 / fp8 KV pages with float32 weights, through the paged cache);
  - free-running: the variant's own continuation, position by position. SmolLM2 has near-ties that any rounding flips
    and a flip changes everything after it, so this measures where the first flip falls more than the quantization
    (measured: bf16 weights 78-80%, int8 74%, q8_0 71%, int8 KV 85%, fp8 KV 62%); held to >= 50%, which a broken
    quantization (a few % agreement) cannot reach."""
  sp = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
  prompts = [default_llm.tokenizer.encode(p) for p in PROMPTS]

  def tokens(llm):
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=prompts, sampling_params=sp)]

  def agreement(got, want):
    return sum(a == b for g, w in zip(got, want) for a, b in zip(g, w)) / (32 * len(want))

  base = tokens(default_llm)
  measured = {}
  for name, kwargs in (("int8", dict(quantization="int8")), ("q8_0", dict(quantization="q8_0")),
                       ("kv-int8", dict(kv_cache_dtype="int8")), ("kv-fp8", dict(kv_cache_dtype="fp8"))):
    llm = LLM("default", max_model_len=256, **{"quantization": None, **kwargs})
    free = agreement(tokens(llm), base)
    if name.startswith("kv-"):
      kv_dtype = llm.engine.kv_dtype
      forced = [np.argmax(next(paged_logprobs(default_llm, p + c, kv_dtype))[2], -1)[len(p) - 1:len(p) + 31]
                for p, c in zip(prompts, base)]
    else:
      scores = llm.score(token_pairs=list(zip(prompts, base)), num_top_logprobs=1)
      forced = [[max(top, key=top.get) for top in s.top_logprobs] for s in scores]
    measured[name] = (float(agreement(forced, base)), free)
    del llm
  print(f"agreement with float32 (teacher-forced, free-running): {measured}")
  for name, (forced, free) in measured.items():
    assert forced >= 0.9, (name, forced)
    assert free >= 0.5, (name, free)
