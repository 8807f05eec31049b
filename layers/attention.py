"""Grouped-query self-attention with RoPE; a cache view stores the new K/V and runs the attention kernel.

Data flow for one layer:  x_BTD --wq/wk/wv--> q_BTNH, k_BTKH, v_BTKH --rope--> cache.attend(q, k, v, positions)
--> o_BTNH --wo--> BTD.  K/V are never repeated to N heads.

A cache view is anything with `attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale, window, soft_cap) -> o_BTNH`
(window: this layer's sliding window, an int32 scalar carried by the layer scan, NO_WINDOW for a global layer;
soft_cap: static). It decides where the new K/V go and which kernel reads them:
  NoCache                        a prompt from position 0 attending to itself: flash attention, nothing stored;
  layers.paged.PagedCacheView    paged K/V and a flat (ragged) token axis: ragged paged attention;
  tests.oracle.StackedCacheView  the tests' contiguous oracle cache [L, B, S, K, H]: the position-causal reference.
"""

from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm import pallas_kernels
from jaxllm.layers.norm import RMSNorm
from jaxllm.layers.ops import dense, value, weight
from jaxllm.layers.rope import apply_rope
from jaxllm.sharding.rules import over_heads

class CacheView(Protocol):

  def attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale: float, window, soft_cap) -> jax.Array:
    ...


class NoCache:
  """Attend only to the tokens of this call, which start at position 0 (a full forward pass, e.g. scoring).

  Right-padded rows need no lengths: pads sit after every real token, so causality alone keeps them out.
  """

  def __init__(self, impl: str | None = None, sharding=None):
    self.impl, self.interpret = pallas_kernels.split_impl(impl)
    self.sharding = sharding  # on a mesh whose layout splits the heads: the kernel runs on each device's own

  def attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale, window, soft_cap):
    del positions_BT  # arange(T) by contract

    def local(q, k, v, window):
      return pallas_kernels.flash_attention(q, k, v, sm_scale=sm_scale, causal=True, window=window,
                                            soft_cap=soft_cap, implementation=self.impl, interpret=self.interpret)

    return over_heads(self.sharding, local, (q_BTNH, k_BTKH, v_BTKH, window), (2, 2, 2, None), 2,
                      (q_BTNH.shape[2], k_BTKH.shape[2]))


class Attention(nnx.Module):
  """The config's variations are optional parameters, absent (None) when off: q/k/v biases (Qwen2), an output bias,
  and RMSNorm over head_dim on q and k before RoPE (Qwen3, Gemma 3); and static numbers: the logit scale (None:
  head_dim ** -0.5) and soft-cap (Gemma 2). What varies per layer (RoPE frequencies, sliding window) is a call
  argument, so the layer scan carries it as data."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               qkv_bias: bool = False, o_bias: bool = False, qk_norm_eps: float | None = None,
               norm_plus_one: bool = False, scale: float | None = None, soft_cap: float | None = None,
               quantization: str | None = None, dtype=jnp.float32, rngs: nnx.Rngs):
    D, N, K, H = d_model, num_heads, num_kv_heads, head_dim
    self.scale = float(H ** -0.5 if scale is None else scale)
    self.soft_cap = soft_cap
    # Projections; quantized (int8 / q8_0, see layers.ops) each has its scales (wq_scale, ...), else None.
    self.wq_DNH, self.wq_scale = weight(rngs.params(), (D, N, H), ("embed", "heads", "head_dim"), dtype,
                                           quantization, reduce_axes=(0,))
    self.wk_DKH, self.wk_scale = weight(rngs.params(), (D, K, H), ("embed", "kv_heads", "head_dim"), dtype,
                                           quantization, reduce_axes=(0,))
    self.wv_DKH, self.wv_scale = weight(rngs.params(), (D, K, H), ("embed", "kv_heads", "head_dim"), dtype,
                                           quantization, reduce_axes=(0,))
    self.wo_NHD, self.wo_scale = weight(rngs.params(), (N, H, D), ("heads", "head_dim", "embed"), dtype,
                                          quantization, reduce_axes=(0, 1))
    zeros = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
    self.bq_NH = nnx.Param(zeros(N, H), out_sharding=("heads", "head_dim")) if qkv_bias else None
    self.bk_KH = nnx.Param(zeros(K, H), out_sharding=("kv_heads", "head_dim")) if qkv_bias else None
    self.bv_KH = nnx.Param(zeros(K, H), out_sharding=("kv_heads", "head_dim")) if qkv_bias else None
    self.bo_D = nnx.Param(zeros(D), out_sharding=("embed",)) if o_bias else None
    norm = qk_norm_eps is not None
    self.q_norm = RMSNorm(H, eps=qk_norm_eps, dtype=dtype, axis="head_dim", plus_one=norm_plus_one) if norm else None
    self.k_norm = RMSNorm(H, eps=qk_norm_eps, dtype=dtype, axis="head_dim", plus_one=norm_plus_one) if norm else None

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: CacheView, inv_freq_h: jax.Array,
               window: jax.Array) -> jax.Array:
    """inv_freq_h: this layer's RoPE inverse frequencies [H/2]; window: its sliding window (int32 scalar)."""
    q_BTNH = dense("BTD,DNH->BTNH", x_BTD, self.wq_DNH[...], value(self.wq_scale))
    k_BTKH = dense("BTD,DKH->BTKH", x_BTD, self.wk_DKH[...], value(self.wk_scale))
    v_BTKH = dense("BTD,DKH->BTKH", x_BTD, self.wv_DKH[...], value(self.wv_scale))
    if self.bq_NH is not None:
      q_BTNH, k_BTKH, v_BTKH = q_BTNH + self.bq_NH[...], k_BTKH + self.bk_KH[...], v_BTKH + self.bv_KH[...]
    if self.q_norm is not None:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq_h)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq_h)
    o_BTNH = cache.attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, self.scale, window, self.soft_cap)
    out_BTD = dense("BTNH,NHD->BTD", o_BTNH, self.wo_NHD[...], value(self.wo_scale))
    return out_BTD if self.bo_D is None else out_BTD + self.bo_D[...]
