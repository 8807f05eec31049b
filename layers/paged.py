"""Paged KV cache for a ragged batch: the layout the ragged paged attention kernel reads.

    k, v: [L * P, K, C, H]   the L layers' pages of C tokens as one pool: layer l's page p is pool page l * P + p
                             (KV head before token: one contiguous [C, H] tile per head and page, see
                             jaxllm.pallas_kernels.ragged_paged_attention). The engine's state holds the pools
                             themselves, never a stacked [L, P, K, C, H] view: with one KV head per device (Llama-3-70B
                             on 8 devices, any MQA model) XLA lays the size-1 axis out differently on either side of
                             that reshape and copies the whole pool in and out of every step (seen on XLA:CPU).

Why one pool rather than a per-layer slice: the K/V write and attention read inside the layer scan must both work in
place on the scan's carry. Slicing out k[layer] copies the layer's whole pool whenever its reader is a loop or a
kernel call rather than a fusable gather, and carrying [L, P, ...] while attention reads a reshaped pool lets XLA split
the write into two buffers (a copy of the whole cache per layer; seen on XLA:CPU for one-row steps). Either way a
step would cost in proportion to the cache, not to the batch. With the pool as the carry, the write is one in-place
scatter and every attention implementation reads the same buffer with page ids offset by layer * P.

A step feeds the model B = 1 and the new tokens of all sequences concatenated on the T axis (sequence i owns rows
cu_q_lens[i]:cu_q_lens[i+1]). `slot_page_T` / `slot_offset_T` say where each new token's K/V go (vLLM's slot mapping:
page id and offset within the page, computed by the host allocator from the page table); the view writes them, then
ragged paged attention reads every sequence's pages up to its kv_len. Padding rows point at a scratch page the
allocator never hands out. A quantized cache (`--kv_cache_dtype int8|fp8`) holds `QuantizedPages` (int8 / float8 values
and a float32 scale per token and KV head, `jaxllm.pallas_kernels.kv_quant`) in place of each array: the view quantizes
each new token's K/V as it writes them, and the kernels dequantize what they read. Decode tokens (one row for their
sequence) and prefill chunks (many rows, possibly after a cached prefix) mix freely in one step: this is the serving
engine's only attention path.
"""

import jax
import jax.numpy as jnp
from flax import struct

from jaxllm import pallas_kernels
from jaxllm.config import ModelConfig
from jaxllm.pallas_kernels.kv_quant import SCALE_DTYPE, QuantizedPages, is_quantized, quantize_kv
from jaxllm.sharding.rules import over_heads


@struct.dataclass
class PagedKVCache:
  """Pages plus one step's metadata. Shapes: T new tokens, S sequence slots, M pages per sequence."""

  k: jax.Array | QuantizedPages  # [L * P, K, C, H] (a quantized cache: values and [L * P, K, C] scales)
  v: jax.Array | QuantizedPages
  slot_page_T: jax.Array  # int32 page id (in [0, P)) for each new token's K/V
  slot_offset_T: jax.Array  # int32 offset in that page
  kv_lens: jax.Array  # [S] int32, context length including this step's tokens
  page_indices: jax.Array  # [S, M] int32, page ids in [0, P)
  cu_q_lens: jax.Array  # [S + 1] int32
  num_seqs: jax.Array  # int32 scalar
  num_layers: int = struct.field(pytree_node=False)  # L: the pool holds L * P pages

  @staticmethod
  def zero_pages(config: ModelConfig, num_pages: int, page_size: int, dtype):
    """Zero pools of `num_pages` pages per layer, [L * num_pages, K, C, H]; for a quantized dtype (int8,
    float8_e4m3fn) `QuantizedPages` with [L * num_pages, K, C] float32 scales."""
    shape = (config.num_layers * num_pages, config.num_kv_heads, page_size, config.head_dim)

    def zeros():
      if is_quantized(dtype):
        return QuantizedPages(values=jnp.zeros(shape, dtype), scales=jnp.zeros(shape[:-1], SCALE_DTYPE))
      return jnp.zeros(shape, dtype)

    return zeros(), zeros()

  def view(self, k, v, layer, attention_impl, sharding=None):
    return PagedCacheView(self, k, v, layer, attention_impl, sharding)


class PagedCacheView:
  """One layer's view of the [L * P, K, C, H] pool inside the layer scan, with the step's metadata. On a mesh whose
  layout splits the heads (`sharding`), the K/V write and the kernel run on each device's own heads."""

  def __init__(self, meta: PagedKVCache, k, v, layer, attention_impl, sharding=None):
    self.meta, self.k, self.v, self.layer, self.sharding = meta, k, v, layer, sharding
    self.impl, self.interpret = pallas_kernels.split_impl(attention_impl)

  def attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale, window, soft_cap):
    if q_BTNH.shape[0] != 1:
      raise ValueError(f"a paged step takes the ragged tokens as B=1, T=tokens; got B={q_BTNH.shape[0]}.")
    m = self.meta
    offset = self.layer * (jax.tree.leaves(self.k)[0].shape[0] // m.num_layers)  # this layer's first pool page

    def local(k_pages, v_pages, q_TNH, k_TKH, v_TKH, page_T, offset_T, kv_lens, page_indices, cu_q_lens, num_seqs,
              window):
      # Advanced indices on axes 0 and 2 with a slice between: the update is laid out [T, K, H] ([T, K] for scales).
      write = lambda pages, x: pages.at[page_T, :, offset_T].set(x)  # noqa: E731
      if isinstance(k_pages, QuantizedPages):  # each new token's K/V quantized once, with a scale per KV head
        k_pages = jax.tree.map(write, k_pages, QuantizedPages(*quantize_kv(k_TKH, k_pages.values.dtype)))
        v_pages = jax.tree.map(write, v_pages, QuantizedPages(*quantize_kv(v_TKH, v_pages.values.dtype)))
        pages = dict(k_pages=k_pages.values, v_pages=v_pages.values, k_scales=k_pages.scales, v_scales=v_pages.scales)
      else:
        k_pages, v_pages = write(k_pages, k_TKH), write(v_pages, v_TKH)
        pages = dict(k_pages=k_pages, v_pages=v_pages)
      o_TNH = pallas_kernels.ragged_paged_attention(
          q_TNH, kv_lens=kv_lens, page_indices=page_indices, cu_q_lens=cu_q_lens, num_seqs=num_seqs,
          sm_scale=sm_scale, window=window, soft_cap=soft_cap, implementation=self.impl, interpret=self.interpret,
          **pages)
      return o_TNH, k_pages, v_pages

    args = (self.k, self.v, q_BTNH[0], k_BTKH[0], v_BTKH[0], m.slot_page_T + offset, m.slot_offset_T, m.kv_lens,
            m.page_indices + offset, m.cu_q_lens, m.num_seqs, window)
    # pages [LP, K, C, H], q [T, N, H], new k / v [T, K, H]: split on their head axis; the metadata whole
    o_TNH, self.k, self.v = over_heads(self.sharding, local, args, (1, 1, 1, 1, 1) + (None,) * 7, (1, 1, 1),
                                       (q_BTNH.shape[2], k_BTKH.shape[2]))
    return o_TNH[None]
