"""Plain-jnp ragged paged attention: the definition the Pallas kernels are tested against.

Data flow: for each sequence slot i (a Python loop over the static S, slots >= num_seqs masked off) the sequence's
pages are gathered from the cache into a contiguous [1, L, K, H] window (L = max_pages * page_size), and the whole
[T, N, H] query block is handed to the project's position-causal oracle `attention_reference` with per-row positions:
rows of sequence i sit at kv_len - q_len + r, every other row gets position -1 (it sees nothing and is discarded).
Keys at positions >= kv_len get a position no query reaches. The rows of sequence i are then selected into the output.

Unused pages are never read: page-table entries past cdiv(kv_len, page_size), and with a sliding window those wholly
before the window of the sequence's first row, are replaced by the sequence's last used entry before the gather, and
the keys/values of every slot outside [window start, kv_len) (the tail of the last page included) are zeroed, so NaN
or garbage there cannot reach the result (p * NaN would be NaN even with p = 0).

Cost is S * T * L per head (every slot scores every query row): this is the oracle the implementations ("xla" in
xla.py, the TPU and GPU kernels) are tested against, not a serving path.
"""

import jax
import jax.numpy as jnp

from jaxllm.pallas_kernels.kv_quant import dequantize_kv
from jaxllm.pallas_kernels.reference import attention_reference, window_or_none


def ragged_paged_attention_reference(
    q_TNH: jax.Array,
    k_PKCH: jax.Array,
    v_PKCH: jax.Array,
    kv_lens_S: jax.Array,
    page_indices_SM: jax.Array,
    cu_q_lens_S1: jax.Array,
    num_seqs: jax.Array,
    window=None,
    k_scales=None,
    v_scales=None,
    *,
    sm_scale: float,
    soft_cap: float | None = None,
) -> jax.Array:
  """Ragged paged attention, [T, N, H] in q's dtype; arguments as in `ragged_paged_attention` (cache [P, K, C, H]).

  Quantized pages (with k_scales / v_scales) are dequantized to q's dtype first: the definition the kernels' in-kernel
  dequantization is tested against. Rows past cu_q_lens[num_seqs] (bucket padding) come back as zeros.
  """
  if k_scales is not None:
    k_PKCH, v_PKCH = dequantize_kv(k_PKCH, k_scales, q_TNH.dtype), dequantize_kv(v_PKCH, v_scales, q_TNH.dtype)
  T, N, H = q_TNH.shape
  P, K, page_size, _ = k_PKCH.shape
  S, max_pages = page_indices_SM.shape
  L = max_pages * page_size
  num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)
  window = window_or_none(window)
  t_T = jnp.arange(T, dtype=jnp.int32)
  l_L = jnp.arange(L, dtype=jnp.int32)
  page_M = jnp.arange(max_pages, dtype=jnp.int32)

  o_TNH = jnp.zeros((T, N, H), q_TNH.dtype)
  for i in range(S):
    active = i < num_seqs
    q_start, q_end, kv_len = cu_q_lens_S1[i], cu_q_lens_S1[i + 1], kv_lens_S[i]
    kv_len = jnp.where(active, kv_len, 0)
    # Gather this sequence's pages; entries it does not use (past kv_len, or before its first row's window) are
    # redirected to its last used page, never dereferenced.
    lo = jnp.maximum(kv_len - (q_end - q_start) - window + 1, 0)  # the first row's oldest visible key
    last_page = jnp.maximum((kv_len + page_size - 1) // page_size - 1, 0)
    used_M = (page_M <= last_page) & (page_M >= lo // page_size)
    pages_M = jnp.where(used_M, page_indices_SM[i], page_indices_SM[i, last_page])
    pages_M = jnp.clip(pages_M, 0, P - 1)  # an unused slot may hold any value; keep the gather in range
    visible_L = (l_L < kv_len) & (l_L >= lo)
    k_LKH = k_PKCH[pages_M].transpose(0, 2, 1, 3).reshape(L, K, H)
    v_LKH = v_PKCH[pages_M].transpose(0, 2, 1, 3).reshape(L, K, H)
    k_LKH = jnp.where(visible_L[:, None, None], k_LKH, 0)
    v_LKH = jnp.where(visible_L[:, None, None], v_LKH, 0)

    in_seq_T = active & (t_T >= q_start) & (t_T < q_end)
    q_pos_T = jnp.where(in_seq_T, kv_len - q_end + t_T, -1)  # row r of the sequence: kv_len - q_len + r
    kv_pos_L = jnp.where(visible_L, l_L, jnp.iinfo(jnp.int32).max)
    o_i_TNH = attention_reference(q_TNH[None], k_LKH[None], v_LKH[None], q_pos_T[None], kv_pos_L[None],
                                  sm_scale=sm_scale, window=window, soft_cap=soft_cap)[0]
    o_TNH = jnp.where(in_seq_T[:, None, None], o_i_TNH, o_TNH)
  return o_TNH

