"""Paged KV cache for a ragged batch: the layout the ragged paged attention kernel reads.

    k, v: [L, P, K, C, H]     P pages of C tokens per layer (KV head before token: one contiguous [C, H] tile per
                              head and page, see jaxllm.pallas_kernels.ragged_paged_attention)

A step feeds the model B = 1 and the new tokens of all sequences concatenated on the T axis (sequence i owns rows
cu_q_lens[i]:cu_q_lens[i+1]). `slot_page_T` / `slot_offset_T` say where each new token's K/V go (vLLM's slot mapping:
page id and offset within the page, computed by the host allocator from the page table); the view writes them, then
ragged paged attention reads every sequence's pages up to its kv_len. Padding rows point at a scratch page the
allocator never hands out. Decode tokens (one row for their sequence) and prefill chunks (many rows, possibly after a
cached prefix) mix freely in one step: this is the serving engine's only attention path.
"""

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm import pallas_kernels
from jaxllm.config import ModelConfig


@struct.dataclass
class PagedKVCache:
  """Pages plus one step's metadata. Shapes: T new tokens, S sequence slots, M pages per sequence."""

  k: jax.Array  # [L, P, K, C, H]
  v: jax.Array  # [L, P, K, C, H]
  slot_page_T: jax.Array  # int32 page id for each new token's K/V
  slot_offset_T: jax.Array  # int32 offset in that page
  kv_lens: jax.Array  # [S] int32, context length including this step's tokens
  page_indices: jax.Array  # [S, M] int32
  cu_q_lens: jax.Array  # [S + 1] int32
  num_seqs: jax.Array  # int32 scalar

  @staticmethod
  def zero_pages(config: ModelConfig, num_pages: int, page_size: int, dtype) -> tuple[jax.Array, jax.Array]:
    shape = (config.num_layers, num_pages, config.num_kv_heads, page_size, config.head_dim)
    return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

  def view(self, k, v, layer, attention_impl):
    return PagedCacheView(self, k, v, layer, attention_impl)


class PagedCacheView:
  """One layer's view of [L, P, K, C, H] pages inside the layer scan, with the step's metadata."""

  def __init__(self, meta: PagedKVCache, k, v, layer, attention_impl):
    self.meta, self.k, self.v, self.layer = meta, k, v, layer
    self.impl, self.interpret = pallas_kernels.split_impl(attention_impl)

  def attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale):
    if q_BTNH.shape[0] != 1:
      raise ValueError(f"a paged step takes the ragged tokens as B=1, T=tokens; got B={q_BTNH.shape[0]}.")
    m = self.meta
    # Advanced indices on axes 1 and 3 with a slice between: the update is laid out [T, K, H].
    self.k = self.k.at[self.layer, m.slot_page_T, :, m.slot_offset_T].set(k_BTKH[0])
    self.v = self.v.at[self.layer, m.slot_page_T, :, m.slot_offset_T].set(v_BTKH[0])
    o_TNH = pallas_kernels.ragged_paged_attention(
        q_BTNH[0], self.k[self.layer], self.v[self.layer], m.kv_lens, m.page_indices, m.cu_q_lens, m.num_seqs,
        sm_scale=sm_scale, implementation=self.impl, interpret=self.interpret)
    return o_TNH[None]
