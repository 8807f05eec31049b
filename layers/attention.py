"""Grouped-query self-attention with RoPE, writing and reading K/V through a cache view.

Data flow for one layer:  x_BTD --wq/wk/wv--> q_BTNH, k_BTKH, v_BTKH --rope--> cache.update(k, v) --> all keys of the
sequence so far --pallas_kernels.attention--> o_BTNH --wo--> BTD.  K/V are never repeated to N heads.

A cache view is anything with `update(k_BTKH, v_BTKH, positions_BT) -> (k_BSKH, v_BSKH, kv_pos_BS)`; `NoCache` (a
full forward pass over the given tokens) and `jaxllm.layers.llama.StackedCacheView` (the contiguous per-layer cache of
the first generation path) are the two here; the paged engine supplies its own.
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

  def update(self, k_BTKH, v_BTKH, positions_BT) -> tuple[jax.Array, jax.Array, jax.Array]:
    ...


class NoCache:
  """Attend only to the tokens of this call (a full forward pass, e.g. scoring)."""

  def update(self, k_BTKH, v_BTKH, positions_BT):
    return k_BTKH, v_BTKH, positions_BT


class Attention(nnx.Module):

  def __init__(self, d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, inv_freq: np.ndarray, *,
               dtype=jnp.float32, rngs: nnx.Rngs):
    D, N, K, H = d_model, num_heads, num_kv_heads, head_dim
    self.inv_freq = tuple(float(f) for f in inv_freq)  # static (a tuple is not pytree data), not a parameter
    self.wq_DNH = nnx.Param(_init(rngs.params(), (D, N, H), dtype), out_sharding=("embed", "heads", "head_dim"))
    self.wk_DKH = nnx.Param(_init(rngs.params(), (D, K, H), dtype), out_sharding=("embed", "kv_heads", "head_dim"))
    self.wv_DKH = nnx.Param(_init(rngs.params(), (D, K, H), dtype), out_sharding=("embed", "kv_heads", "head_dim"))
    self.wo_NHD = nnx.Param(_init(rngs.params(), (N, H, D), dtype), out_sharding=("heads", "head_dim", "embed"))

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array, cache: CacheView,
               attention_impl: str | None = None) -> jax.Array:
    q_BTNH = dense("BTD,DNH->BTNH", x_BTD, self.wq_DNH[...])
    k_BTKH = dense("BTD,DKH->BTKH", x_BTD, self.wk_DKH[...])
    v_BTKH = dense("BTD,DKH->BTKH", x_BTD, self.wv_DKH[...])
    inv_freq = np.asarray(self.inv_freq, np.float32)
    q_BTNH = apply_rope(q_BTNH, positions_BT, inv_freq)
    k_BTKH = apply_rope(k_BTKH, positions_BT, inv_freq)
    k_BSKH, v_BSKH, kv_pos_BS = cache.update(k_BTKH, v_BTKH, positions_BT)
    o_BTNH = pallas_kernels.attention(q_BTNH, k_BSKH, v_BSKH, positions_BT, kv_pos_BS,
                                      sm_scale=q_BTNH.shape[-1] ** -0.5, implementation=attention_impl)
    return dense("BTNH,NHD->BTD", o_BTNH, self.wo_NHD[...])
