"""Grouped-query self-attention with RoPE; a cache view stores the new K/V and runs the attention kernel.

Data flow for one layer:  x_BTD --wq/wk/wv--> q_BTNH, k_BTKH, v_BTKH --rope--> cache.attend(q, k, v, positions)
--> o_BTNH --wo--> BTD.  K/V are never repeated to N heads.

A cache view is anything with `attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale) -> o_BTNH`. It decides where the
new K/V go and which kernel reads them:
  NoCache                        a prompt from position 0 attending to itself: flash attention, nothing stored;
  layers.paged.PagedCacheView    paged K/V and a flat (ragged) token axis: ragged paged attention;
  tests.oracle.StackedCacheView  the tests' contiguous oracle cache [L, B, S, K, H]: the position-causal reference.
"""

from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm import pallas_kernels
from jaxllm.layers.norm import RMSNorm
from jaxllm.layers.ops import dense
from jaxllm.layers.rope import apply_rope

_init = nnx.initializers.normal(0.02)


class CacheView(Protocol):

  def attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale: float) -> jax.Array:
    ...


class NoCache:
  """Attend only to the tokens of this call, which start at position 0 (a full forward pass, e.g. scoring).

  Right-padded rows need no lengths: pads sit after every real token, so causality alone keeps them out.
  """

  def __init__(self, impl: str | None = None):
    self.impl, self.interpret = pallas_kernels.split_impl(impl)

  def attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale):
    del positions_BT  # arange(T) by contract
    return pallas_kernels.flash_attention(q_BTNH, k_BTKH, v_BTKH, sm_scale=sm_scale, causal=True,
                                          implementation=self.impl, interpret=self.interpret)


class Attention(nnx.Module):
  """The config's variations are optional parameters, absent (None) when off: q/k/v biases (Qwen2), an output bias,
  and RMSNorm over head_dim on q and k before RoPE (Qwen3)."""

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, inv_freq: np.ndarray, *,
               qkv_bias: bool = False, o_bias: bool = False, qk_norm_eps: float | None = None,
               dtype=jnp.float32, rngs: nnx.Rngs):
    D, N, K, H = d_model, num_heads, num_kv_heads, head_dim
    self.inv_freq = tuple(float(f) for f in inv_freq)  # static (a tuple is not pytree data), not a parameter
    self.wq_DNH = nnx.Param(_init(rngs.params(), (D, N, H), dtype), out_sharding=("embed", "heads", "head_dim"))
    self.wk_DKH = nnx.Param(_init(rngs.params(), (D, K, H), dtype), out_sharding=("embed", "kv_heads", "head_dim"))
    self.wv_DKH = nnx.Param(_init(rngs.params(), (D, K, H), dtype), out_sharding=("embed", "kv_heads", "head_dim"))
    self.wo_NHD = nnx.Param(_init(rngs.params(), (N, H, D), dtype), out_sharding=("heads", "head_dim", "embed"))
    zeros = lambda *shape: jnp.zeros(shape, dtype)  # noqa: E731
    self.bq_NH = nnx.Param(zeros(N, H), out_sharding=("heads", "head_dim")) if qkv_bias else None
    self.bk_KH = nnx.Param(zeros(K, H), out_sharding=("kv_heads", "head_dim")) if qkv_bias else None
    self.bv_KH = nnx.Param(zeros(K, H), out_sharding=("kv_heads", "head_dim")) if qkv_bias else None
    self.bo_D = nnx.Param(zeros(D), out_sharding=("embed",)) if o_bias else None
    norm = qk_norm_eps is not None
    self.q_norm = RMSNorm(H, eps=qk_norm_eps, dtype=dtype, axis="head_dim") if norm else None
    self.k_norm = RMSNorm(H, eps=qk_norm_eps, dtype=dtype, axis="head_dim") if norm else None

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: CacheView) -> jax.Array:
    q_BTNH = dense("BTD,DNH->BTNH", x_BTD, self.wq_DNH[...])
    k_BTKH = dense("BTD,DKH->BTKH", x_BTD, self.wk_DKH[...])
    v_BTKH = dense("BTD,DKH->BTKH", x_BTD, self.wv_DKH[...])
    if self.bq_NH is not None:
      q_BTNH, k_BTKH, v_BTKH = q_BTNH + self.bq_NH[...], k_BTKH + self.bk_KH[...], v_BTKH + self.bv_KH[...]
    if self.q_norm is not None:
      q_BTNH, k_BTKH = self.q_norm(q_BTNH), self.k_norm(k_BTKH)
    inv_freq = np.asarray(self.inv_freq, np.float32)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
    o_BTNH = cache.attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, q_BTNH.shape[-1] ** -0.5)
    out_BTD = dense("BTNH,NHD->BTD", o_BTNH, self.wo_NHD[...])
    return out_BTD if self.bo_D is None else out_BTD + self.bo_D[...]
