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

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, inv_freq: np.ndarray, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    D, N, K, H = d_model, num_heads, num_kv_heads, head_dim
    self.inv_freq = tuple(float(f) for f in inv_freq)  # static (a tuple is not pytree data), not a parameter
    self.wq_DNH = nnx.Param(_init(rngs.params(), (D, N, H), dtype), out_sharding=("embed", "heads", "head_dim"))
    self.wk_DKH = nnx.Param(_init(rngs.params(), (D, K, H), dtype), out_sharding=("embed", "kv_heads", "head_dim"))
    self.wv_DKH = nnx.Param(_init(rngs.params(), (D, K, H), dtype), out_sharding=("embed", "kv_heads", "head_dim"))
    self.wo_NHD = nnx.Param(_init(rngs.params(), (N, H, D), dtype), out_sharding=("heads", "head_dim", "embed"))

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: CacheView) -> jax.Array:
    q_BTNH = dense("BTD,DNH->BTNH", x_BTD, self.wq_DNH[...])
    k_BTKH = dense("BTD,DKH->BTKH", x_BTD, self.wk_DKH[...])
    v_BTKH = dense("BTD,DKH->BTKH", x_BTD, self.wv_DKH[...])
    inv_freq = np.asarray(self.inv_freq, np.float32)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
    o_BTNH = cache.attend(q_BTNH, k_BTKH, v_BTKH, positions_BT, q_BTNH.shape[-1] ** -0.5)
    return dense("BTNH,NHD->BTD", o_BTNH, self.wo_NHD[...])
