"""The Llama decoder: embedding -> L x (RMSNorm, GQA attention, RMSNorm, SwiGLU) -> RMSNorm -> LM head.

The families beside Llama are the same block with the config's variations (flags and numbers, never family names):
q/k/v biases and q/k norms (Qwen), sliding-window layers (Mistral, Phi-3, Gemma), GeGLU, (1 + w) norms, post-norms
around attention and MLP, scaled embeddings and logit soft-capping (Gemma 2 / 3).

The L decoder layers are one `DecoderLayer` module whose parameters carry a leading L axis (built with `nnx.vmap`), run
with `jax.lax.scan`: a 30-layer model traces and compiles one layer, not thirty. What differs between layers (the
sliding window of local vs global layers, Gemma 3's per-layer RoPE base) rides through the scan as per-layer arrays
(`ModelConfig.layer_windows`, `layer_inv_freq`), not as Python branches that would unroll the stack.

    h_BTD, cache = model(tokens_BT, positions_BT, cache)     # cache=None: full forward over the given tokens
    logits_BTV = model.logits(h_BTD)                          # float32

A cache is any `LayerCache`: per-layer K/V stacked on a leading L axis that ride through the layer scan as carry (so
each step writes only its new entries in place), and a `view` per layer that stores the new K/V and picks the kernel.
The library's cache is `jaxllm.layers.paged.PagedKVCache`; the tests' contiguous oracle cache (`tests/oracle.py`)
plugs in the same way.
"""

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.layers.attention import Attention, CacheView, NoCache
from jaxllm.layers.mlp import MLP
from jaxllm.layers.norm import RMSNorm
from jaxllm.layers.ops import DenseWeight, LayerSlice, check_quantization, weight
from jaxllm.pallas_kernels import matmul_cpu


class DecoderLayer(nnx.Module):

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, quantization: str | None = None, rngs: nnx.Rngs):
    c = config
    norm = lambda: RMSNorm(c.d_model, eps=c.rms_norm_eps, dtype=dtype, plus_one=c.norm_plus_one)  # noqa: E731
    self.attn_norm = norm()
    self.attn = Attention(c.d_model, c.num_heads, c.num_kv_heads, c.head_dim, qkv_bias=c.qkv_bias, o_bias=c.o_bias,
                          qk_norm_eps=c.rms_norm_eps if c.qk_norm else None, norm_plus_one=c.norm_plus_one,
                          scale=c.attn_scale, soft_cap=c.attn_soft_cap, quantization=quantization, dtype=dtype,
                          rngs=rngs)
    self.mlp_norm = norm()
    self.mlp = MLP(c.d_model, c.d_ff, activation=c.mlp_activation, quantization=quantization, dtype=dtype, rngs=rngs)
    self.post_attn_norm = norm() if c.post_norms else None
    self.post_mlp_norm = norm() if c.post_norms else None

  def __call__(self, x_BTD, positions_BT, cache: CacheView, inv_freq_h, window):
    a_BTD = self.attn(self.attn_norm(x_BTD), positions_BT, cache, inv_freq_h, window)
    x_BTD = x_BTD + (a_BTD if self.post_attn_norm is None else self.post_attn_norm(a_BTD))
    m_BTD = self.mlp(self.mlp_norm(x_BTD))
    return x_BTD + (m_BTD if self.post_mlp_norm is None else self.post_mlp_norm(m_BTD))


class LayerCache(Protocol):
  """A cache with per-layer K/V stacked on a leading L axis (`k`, `v`) that hands each layer a view of itself.

  A `flax.struct.dataclass` fits: `Llama.__call__` returns `cache.replace(k=..., v=...)` after the layer scan.
  """

  k: jax.Array
  v: jax.Array

  def view(self, k, v, layer, attention_impl, sharding=None) -> CacheView:
    """`sharding`: the model's `ActivationSharding` (None on one device), for kernels that run per head shard."""
    ...

  def replace(self, **updates) -> "LayerCache":
    ...


class Llama(nnx.Module):
  """quantization=None: every weight in `dtype`. "int8" / "q8_0": the attention projections and the MLP are int8 with a
  float scale per output channel / a float16 scale per 32 weights (see `jaxllm.layers.ops`); the embedding / LM head,
  norms, biases and activations stay in `dtype`. The LM head stays float because its error lands on every logit directly
  (int8 there alone costs SmolLM2 +0.4% perplexity, as much as all the projections together), as vLLM's and AQT's
  weight-only int8 keep it."""

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, quantization: str | None = None, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    self.quantization = check_quantization(quantization)
    # Set by `jaxllm.checkpoint.build_model` on a mesh: constrains [B, T, D] at block boundaries to the layout.
    self.activation_sharding = None
    # The layer loop: None picks by backend (`_unroll`); True / False force an unrolled loop / a scan.
    self.unroll_layers = None
    # The weight matmuls on the native CPU kernel: None picks (`_native_matmul`); True / False force it.
    self.native_matmul = None
    with _lazy_sharding():
      V, D = config.vocab_size, config.d_model
      self.embed_VD, _ = weight(rngs.params(), (V, D), ("vocab", "embed"), dtype, None, reduce_axes=(1,),
                                param=nnx.Param)

      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=config.num_layers,
                transform_metadata={nnx.PARTITION_NAME: "layers"})
      def make_layers(r):
        return DecoderLayer(config, dtype=dtype, quantization=quantization, rngs=r)

      self.layers = make_layers(rngs)
      self.final_norm = RMSNorm(config.d_model, eps=config.rms_norm_eps, dtype=dtype, plus_one=config.norm_plus_one)
      self.lm_head_DV = None if config.tie_embeddings else weight(
          rngs.params(), (D, V), ("embed", "vocab"), dtype, None, reduce_axes=(0,), param=nnx.Param)[0]

  def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array, cache: LayerCache | None = None,
               attention_impl: str | None = None):
    """Hidden states [B, T, D] after the final norm, and the updated cache.

    cache=None: the tokens are whole prompts from position 0 (flash attention, nothing stored). Otherwise the cache (a
    `LayerCache`, e.g. `jaxllm.layers.paged.PagedKVCache` with B = 1 and the ragged token axis as T) hands each layer a
    view that stores the new K/V and picks the kernel. `attention_impl` names the kernel implementation (see
    `jaxllm.pallas_kernels`).
    """
    c = self.config
    x_BTD = jnp.take(self.embed_VD[...], tokens_BT, axis=0)
    if c.scale_embeddings:  # HF Gemma: times sqrt(D) rounded to the activation dtype
      x_BTD = x_BTD * jnp.asarray(c.d_model ** 0.5, x_BTD.dtype)
    x_BTD = self._constrain(x_BTD)
    graphdef, weights, rest = nnx.split(self.layers, DenseWeight, ...)
    per_layer = (jnp.asarray(c.layer_inv_freq()), jnp.asarray(c.layer_windows()))  # [L, H/2], [L]
    layer_ids = jnp.arange(c.num_layers)
    # What the scan slices per layer: every parameter, or (weights read in place) none, and the body takes the rest.
    sliced = None if self._native_matmul() else (weights, rest)

    def layer_at(sliced, index):
      if sliced is not None:
        return nnx.merge(graphdef, *sliced)
      take = lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False)  # noqa: E731
      return nnx.merge(graphdef, jax.tree.map(lambda a: LayerSlice(a, index), weights), jax.tree.map(take, rest))

    if cache is None:
      def body(x, xs):
        layer_sliced, index, (inv_freq_h, window) = xs
        view = NoCache(attention_impl, self.activation_sharding)
        return self._constrain(layer_at(layer_sliced, index)(x, positions_BT, view, inv_freq_h, window)), None

      x_BTD, _ = jax.lax.scan(body, x_BTD, (sliced, layer_ids, per_layer), unroll=self._unroll())
    else:
      def body(carry, xs):
        x, k, v = carry
        layer_sliced, index, (inv_freq_h, window) = xs
        view = cache.view(k, v, index, attention_impl, self.activation_sharding)
        x = self._constrain(layer_at(layer_sliced, index)(x, positions_BT, view, inv_freq_h, window))
        return (x, view.k, view.v), None

      (x_BTD, k, v), _ = jax.lax.scan(body, (x_BTD, cache.k, cache.v), (sliced, layer_ids, per_layer),
                                      unroll=self._unroll())
      cache = cache.replace(k=k, v=v)
    return self.final_norm(x_BTD), cache

  def _unroll(self) -> bool:
    """The layers run as a scan on CPU: one body to compile, which keeps the tests' and `make serve`'s warmup short.
    On an accelerator the loop is unrolled: in a scan, XLA:GPU copies each layer's slice of the stacked weights out
    before its GEMMs read it, three passes over the weights instead of one (a Llama-3-8B decode forward on an H200:
    14.8 ms scanned, 7.8 ms unrolled, against a 5.4 ms bandwidth floor; benchmarks/RESULTS.md). The price is compile
    time, about L times the body's (28-38 s per program for 32 layers there)."""
    return jax.default_backend() != "cpu" if self.unroll_layers is None else bool(self.unroll_layers)

  def _native_matmul(self) -> bool:
    """Whether the weight matmuls run the native CPU kernel (`jaxllm.pallas_kernels.matmul_cpu`): the layer scan
    hands each layer its weights as `LayerSlice`s of the stacked arrays, read in place (XLA:CPU copies a scanned
    slice out before its GEMM; see `jaxllm.layers.ops`), and the LM head reads the embedding table in place. On CPU,
    in a scan, on one device (the custom calls have no sharding rule), where the kernel builds. `native_matmul` set
    to True / False forces it (benchmarks and tests compare both)."""
    if self.native_matmul is not None:
      return bool(self.native_matmul)
    return (jax.default_backend() == "cpu" and not self._unroll() and self.activation_sharding is None
            and matmul_cpu.library() is not None)

  def _constrain(self, x_BTD):
    if self.activation_sharding is None:
      return x_BTD
    return self.activation_sharding(x_BTD, ("batch", "length", "embed"))

  def logits(self, h_BTD: jax.Array) -> jax.Array:
    """Float32 logits [B, T, V] of hidden states [B, T, D]."""
    if self._native_matmul() and h_BTD.dtype in (jnp.float32, jnp.bfloat16):
      x = h_BTD.reshape(-1, h_BTD.shape[-1]).astype(jnp.float32)
      if self.lm_head_DV is None:
        logits = matmul_cpu.matmul_transposed(x, self.embed_VD[...])
      else:
        logits = matmul_cpu.matmul(x, self.lm_head_DV[...][None], 0)
      logits = logits.reshape(*h_BTD.shape[:-1], logits.shape[-1])
    elif self.lm_head_DV is None:
      logits = jnp.einsum("BTD,VD->BTV", h_BTD, self.embed_VD[...], preferred_element_type=jnp.float32)
    else:
      logits = jnp.einsum("BTD,DV->BTV", h_BTD, self.lm_head_DV[...], preferred_element_type=jnp.float32)
    cap = self.config.final_soft_cap
    return logits if cap is None else cap * jnp.tanh(logits / cap)


class _lazy_sharding:
  """Params carry logical axis names as metadata; `jaxllm.sharding` resolves them to a mesh later."""

  def __enter__(self):
    self._ctx = nnx.use_eager_sharding(False) if hasattr(nnx, "use_eager_sharding") else None
    if self._ctx is not None:
      self._ctx.__enter__()

  def __exit__(self, *exc):
    if self._ctx is not None:
      self._ctx.__exit__(*exc)
