"""Ragged paged attention in plain XLA ops: the general path for any backend without a kernel
(a CPU without a C++ compiler to build kernel_cpu.cc; a GPU where Triton cannot tile the shapes).

Shape letters: T query tokens, N query heads, K KV heads, G = N // K, H head dim, P pages, C page size, S sequence
slots, M page-table width, b = block_q rows of a query block, W query-block pairs, p = pages_per_block pages of a KV
block, I = items_per_step KV items per loop iteration.

Flash-decoding in XLA: the work is split along the keys as well as the queries, so every step reads each sequence's
cached keys about once, whatever the longest sequence in the batch.
  Pairs. The T query rows (padded to a multiple of block_q) are cut into blocks of block_q rows; a pair is a
    (sequence i, block) for every block that sequence i's rows [cu_q_lens[i], cu_q_lens[i+1]) touch, so a block shared
    by two sequences is computed once for each. W = min(T, cdiv(T, block_q) + min(S, T) - 1) pairs always suffice
    (each sequence adds at most one block it shares with the previous one); the list is built on device (a cumsum of
    blocks per sequence and a searchsorted from pair to sequence), pairs past the real count are masked.
  Items. A pair needs the KV blocks (p pages, p * C keys, in its sequence's page order) from the one holding its first
    row's oldest key in the sliding window (block 0 without a window) up to the position of its last row: causal, so
    a chunk's early blocks read few keys, a decode row reads cdiv(kv_len, p * C) blocks, and a sliding-window layer
    reads about cdiv(window, p * C) + 1 blocks per row however long the sequence. The items
    (pair, KV block) are numbered by a cumsum of blocks per pair; their real count R is known only on device.
  Loop. A `fori_loop` with a dynamic trip count cdiv(R, I) takes I items per iteration: gather their query blocks
    [I, b, K, G, H] and pages [I, p, K, C, H] (entries past cdiv(kv_len, C) redirected to the sequence's first page,
    never dereferenced), score "IbKGH,IpKCH->IKGbpC" in float32 (GQA without repeating K/V), mask, and fold each item's
    (max, sum, weighted values) into its pair's running softmax [W, K, G, b] with scatter-max / scatter-add (the
    log-sum-exp merge; items of one pair may share an iteration). One program serves every context length: nothing
    is bucketed by pages, and the work done is the work needed, rounded up to I items.
  Masks. A key is visible to a row iff the row belongs to the item's sequence and the key's position is <= the row's
    position kv_len - (cu_q_lens[i+1] - t) and > that position - window. Invisible logits are replaced (not added to),
    and values outside [the pair's first window position, kv_len) are zeroed, so garbage or NaN in page tails,
    unused pages and pages before the window never reaches the output. Logit soft-capping (Gemma 2) comes before the
    mask.
  Scatter. Each row is valid in exactly one pair; valid rows are written to o [T, N, H], the others dropped. Rows past
    cu_q_lens[num_seqs] (bucket padding) come back as 0.

Cost model, per query head: compute ~ R * b * p * C; gathered KV ~ R * p * C * K * H elements each for K and V, where
R ~ sum over pairs of cdiv(last row position + 1, p * C). block_q = 1 (decode-shaped buckets) wastes no rows; a
larger block_q divides the number of times a prefill chunk's keys are gathered by up to block_q.
"""

import jax
import jax.numpy as jnp

from jaxllm.pallas_kernels.kv_quant import dequantize_kv
from jaxllm.pallas_kernels.reference import soft_cap_logits

_MASKED = -1e30  # finite: a fully masked row gets a uniform softmax, never exp(-inf - -inf) = NaN


def num_work_items(T: int, S: int, block_q: int) -> int:
  """W, the static number of (sequence, query block) pairs that covers any valid ragged layout of T rows."""
  return min(T, -(-T // block_q) + min(S, T) - 1)


def ragged_paged_attention_xla(
    q_TNH: jax.Array,
    k_PKCH: jax.Array,
    v_PKCH: jax.Array,
    kv_lens_S: jax.Array,
    page_indices_SM: jax.Array,
    cu_q_lens_S1: jax.Array,
    num_seqs: jax.Array,
    window: jax.Array,
    k_scales_PKC: jax.Array | None = None,
    v_scales_PKC: jax.Array | None = None,
    *,
    sm_scale: float,
    soft_cap: float | None,
    block_q: int,
    pages_per_block: int,
    items_per_step: int,
) -> jax.Array:
  """Ragged paged attention over (sequence, query block, KV block) items, I per loop iteration.

  Args:
    q_TNH: [T, N, H] float32 or bfloat16, every sequence's new tokens concatenated.
    k_PKCH, v_PKCH: [P, K, C, H] paged keys/values in q's dtype, already holding this step's tokens.
    kv_lens_S: [S] int32, context length of each slot including the new tokens.
    page_indices_SM: [S, M] int32 page table; entries past cdiv(kv_len, C) are never dereferenced.
    cu_q_lens_S1: [S + 1] int32 cumulative query lengths.
    num_seqs: int32 scalar (or [1]); slots >= num_seqs are ignored.
    window: int32 scalar sliding window (NO_WINDOW for none); may be traced.
    k_scales_PKC, v_scales_PKC: [P, K, C] float32 scales of int8 / float8 pages (None for float pages): the gathered
      pages are dequantized to q's dtype, so only the quantized bytes are read from the pool.
    sm_scale: softmax scale (static).
    soft_cap: logit soft-cap (static float) or None.
    block_q: query rows per pair (static, >= 1).
    pages_per_block: pages per KV item (static, >= 1).
    items_per_step: KV items per loop iteration (static, >= 1).

  Returns:
    [T, N, H] in q's dtype; rows no sequence owns are 0. Arguments are as in `ragged_paged_attention`, which
    validates them; this function assumes they are valid.
  """
  T, N, H = q_TNH.shape
  P, K, C, _ = k_PKCH.shape
  S, M = page_indices_SM.shape
  if S == 0:
    return jnp.zeros_like(q_TNH)
  G, b, p, I = N // K, block_q, pages_per_block, items_per_step
  num_blocks = -(-T // b)
  W = num_work_items(T, S, b)
  num_seqs = jnp.reshape(num_seqs, ()).astype(jnp.int32)

  # Pairs: blocks per sequence = blocks its rows touch; pair w belongs to the first sequence whose inclusive count
  # exceeds w (sequences without rows are skipped). "compare_all": W * S compares, no sequential loop.
  start_S, end_S = cu_q_lens_S1[:-1], cu_q_lens_S1[1:]
  active_S = (jnp.arange(S) < num_seqs) & (end_S > start_S)
  first_block_S = start_S // b
  pairs_S = jnp.where(active_S, (end_S - 1) // b - first_block_S + 1, 0)
  pairs_end_S = jnp.cumsum(pairs_S)
  w_W = jnp.arange(W, dtype=jnp.int32)
  pair_valid_W = w_W < pairs_end_S[-1]
  seq_W = jnp.minimum(jnp.searchsorted(pairs_end_S, w_W, side="right", method="compare_all"), S - 1)
  seq_W = seq_W.astype(jnp.int32)
  block_W = jnp.clip(first_block_S[seq_W] + w_W - (pairs_end_S[seq_W] - pairs_S[seq_W]), 0, num_blocks - 1)
  kv_len_W, end_W = kv_lens_S[seq_W], end_S[seq_W]

  # Rows of each pair: row t = block * b + r belongs to it iff it is one of its sequence's rows.
  t_Wb = block_W[:, None] * b + jnp.arange(b, dtype=jnp.int32)
  in_seq_Wb = pair_valid_W[:, None] & (t_Wb >= start_S[seq_W][:, None]) & (t_Wb < end_W[:, None])
  q_pos_Wb = kv_len_W[:, None] - (end_W[:, None] - t_Wb)

  # Items: the KV blocks each pair needs, from its first row's window start up to its last row's position (causal).
  last_pos_W = kv_len_W - (end_W - jnp.minimum(end_W, (block_W + 1) * b)) - 1
  first_pos_W = kv_len_W - (end_W - jnp.maximum(start_S[seq_W], block_W * b))
  lo_W = jnp.maximum(first_pos_W - window + 1, 0)  # keys before this are outside every row's window
  first_kv_block_W = lo_W // (p * C)
  kv_blocks_W = jnp.where(pair_valid_W, jnp.maximum(jnp.maximum(last_pos_W + p * C, 0) // (p * C) - first_kv_block_W,
                                                    0), 0)
  items_end_W = jnp.cumsum(kv_blocks_W)
  num_items = items_end_W[-1]

  q_pad_TNH = jnp.pad(q_TNH, ((0, num_blocks * b - T), (0, 0), (0, 0)))
  q_WbKGH = _take(q_pad_TNH.reshape(num_blocks, b, K, G, H), block_W)
  pos_pC = jnp.arange(p * C, dtype=jnp.int32).reshape(p, C)
  # float32 queries get exact float32 products (a GPU's default would be TF32, as in the Triton kernel's IEEE dots);
  # bfloat16 ones the backend's default, accumulated in float32.
  precision = jax.lax.Precision.HIGHEST if q_TNH.dtype == jnp.float32 else None

  def gather(pages, scales, ids):
    """Pages [I, p, K, C, H] in q's dtype (dequantized when the cache is quantized)."""
    x = _take(pages, ids)
    return x if scales is None else dequantize_kv(x, _take(scales, ids), q_TNH.dtype)

  def fold(it, carry):
    m_WKGb, l_WKGb, o_WKGbH = carry
    r_I = it * I + jnp.arange(I, dtype=jnp.int32)
    item_valid_I = r_I < num_items
    w_I = jnp.minimum(jnp.searchsorted(items_end_W, r_I, side="right", method="compare_all"), W - 1)
    kv_block_I = first_kv_block_W[w_I] + r_I - (items_end_W[w_I] - kv_blocks_W[w_I])
    seq_I, kv_len_I, lo_I = seq_W[w_I], kv_len_W[w_I], lo_W[w_I]

    # Table entries past the used pages or wholly before the window are redirected to the window's first page.
    page_slot_Ip = kv_block_I[:, None] * p + jnp.arange(p, dtype=jnp.int32)
    used_Ip = (page_slot_Ip < ((kv_len_I + C - 1) // C)[:, None]) & (page_slot_Ip >= (lo_I // C)[:, None])
    pages_Ip = page_indices_SM[seq_I[:, None], jnp.where(used_Ip, page_slot_Ip, 0)]
    pages_Ip = jnp.clip(jnp.where(used_Ip, pages_Ip, page_indices_SM[seq_I, lo_I // C][:, None]), 0, P - 1)
    key_pos_IpC = kv_block_I[:, None, None] * (p * C) + pos_pC

    s_IKGbpC = jnp.einsum("IbKGH,IpKCH->IKGbpC", _take(q_WbKGH, w_I), gather(k_PKCH, k_scales_PKC, pages_Ip),
                          precision=precision, preferred_element_type=jnp.float32) * sm_scale
    s_IKGbpC = soft_cap_logits(s_IKGbpC, soft_cap)
    behind_IbpC = q_pos_Wb[w_I][:, :, None, None] - key_pos_IpC[:, None]
    visible_IbpC = ((item_valid_I[:, None] & in_seq_Wb[w_I])[:, :, None, None]
                    & (behind_IbpC >= 0) & (behind_IbpC < window))
    s_IKGbpC = jnp.where(visible_IbpC[:, None, None], s_IKGbpC, _MASKED)
    m_IKGb = jnp.max(s_IKGbpC, axis=(-2, -1))
    e_IKGbpC = jnp.exp(s_IKGbpC - m_IKGb[..., None, None])
    key_used_IpC = (key_pos_IpC < kv_len_I[:, None, None]) & (key_pos_IpC >= lo_I[:, None, None])
    v_IpKCH = jnp.where(key_used_IpC[:, :, None, :, None], gather(v_PKCH, v_scales_PKC, pages_Ip), 0)
    o_IKGbH = jnp.einsum("IKGbpC,IpKCH->IKGbH", e_IKGbpC, v_IpKCH.astype(jnp.float32), precision=precision)

    # Log-sum-exp merge into the pairs' running softmax; items past the real count go out of range and are dropped.
    into_I = jnp.where(item_valid_I, w_I, W)
    m_new = m_WKGb.at[into_I].max(m_IKGb, mode="drop")
    alpha_WKGb = jnp.exp(m_WKGb - m_new)
    beta_IKGb = jnp.exp(m_IKGb - m_new[w_I])
    l_WKGb = (l_WKGb * alpha_WKGb).at[into_I].add(jnp.sum(e_IKGbpC, axis=(-2, -1)) * beta_IKGb, mode="drop")
    o_WKGbH = (o_WKGbH * alpha_WKGb[..., None]).at[into_I].add(o_IKGbH * beta_IKGb[..., None], mode="drop")
    return m_new, l_WKGb, o_WKGbH

  init = (jnp.full((W, K, G, b), _MASKED, jnp.float32), jnp.zeros((W, K, G, b), jnp.float32),
          jnp.zeros((W, K, G, b, H), jnp.float32))
  _, l_WKGb, o_WKGbH = jax.lax.fori_loop(0, (num_items + I - 1) // I, fold, init)
  o_WKGbH = o_WKGbH / jnp.where(l_WKGb > 0, l_WKGb, 1.0)[..., None]

  # Scatter each pair's own rows back; rows of other sequences (and unused pairs) go out of range and are dropped.
  row_Wb = jnp.where(in_seq_Wb, t_Wb, T)
  o_WbNH = jnp.moveaxis(o_WKGbH, 3, 1).reshape(W * b, N, H)
  o_TNH = jnp.zeros((T, N, H), q_TNH.dtype)
  return o_TNH.at[row_Wb.reshape(-1)].set(o_WbNH.astype(q_TNH.dtype), mode="drop")


def _take(x, indices):
  """x[indices] along axis 0 for indices already in range. `mode="clip"` skips the out-of-bounds handling of plain
  indexing, which XLA:CPU runs about 7x slower (8 ms vs 1.2 ms to gather 2,048 pages of [3, 16, 64] float32)."""
  return jnp.take(x, indices, axis=0, mode="clip")
