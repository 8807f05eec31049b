"""Ragged paged attention as a Mosaic TPU kernel (Pallas, scalar prefetch + manual double-buffered page DMAs).

Shape letters: T query tokens (all sequences' new tokens concatenated, padded to a bucket), N query heads, K KV heads,
G = N // K query heads per KV head, H head dim, P pages in the cache, C tokens per page, S sequence slots, M page-table
width (max pages per sequence), R = block_q * G query rows of one KV head in a grid step, B = pages_per_block * C keys
per KV block.

Data flow:
  1. The wrapper folds each KV head's query rows together: q [T, N, H] -> [K, T * G, H] (row t * G + g is token t,
     head k * G + g), padded to a whole number of q blocks, so a grid step sees a plain [R, H] matrix per KV head.
     It also finds, per q block, the range [seq_lo, seq_hi) of sequences whose rows touch the block.
  2. Scalar prefetch puts kv_lens, the flattened page table, cu_q_lens, num_seqs and seq_lo/seq_hi in SMEM.
  3. Grid = one step per q block ("parallel": every step is self-contained). A step walks the work list
     (sequence i in [seq_lo, seq_hi), KV block j from the one holding the oldest key in the window of i's first row
     in the block, 0 without a sliding window) in order. KV block j of sequence i is up to pages_per_block pages,
     each copied as one [K, C, H] DMA from HBM (the cache stays in memory_space=ANY) into a VMEM buffer slot
     [K, B, H]; while block n is computed, block n + 1 (of the same or the next sequence) is already in flight into
     the other slot. Only pages in [kv_lo // C, cdiv(kv_end, C)) are copied, kv_end being one past the last position
     any of the sequence's rows in this block can see and kv_lo the first, so table entries past a sequence's used
     pages or before its window are never dereferenced.
  4. For each KV head, scores [R, B] = q @ k^T in f32; a row belongs to sequence i iff its token is in
     [cu_q_lens[i], cu_q_lens[i+1]), and sees key c iff 0 <= kv_len - q_len + r - c < window. Online softmax state m, l
     (f32, lane-replicated [R, 128]) and acc (f32 [R, H]) live in VMEM scratch; rows of other sequences are left
     untouched by a select, so no masked stores are needed.
  5. After the work list, out = acc / l per KV head is written back as the [K, R, H] output block, which the wrapper
     unfolds to [T, N, H]. Rows no sequence owns (bucket padding) have l = 0 and come out as 0.

Keys at positions no row of the block can see (outside [kv_lo, kv_end): the tail of the last page, pages not copied,
stale buffer slots) are masked out of the scores and their values zeroed, so NaN there cannot leak (p = 0 times NaN
is NaN). The window is a scalar-prefetched runtime value (one per layer under a layer scan); soft-capping is static.

Quantized pages (int8 / float8_e4m3fn, one float32 scale per key and head in [P, K, C]): the pages are copied as
stored (half the DMA bytes of bfloat16) with their scales beside them into a lane-major [K, B] buffer; a head's
scales are one [1, B] row, applied to the columns of the scores (q . (k * s) = (q . k) * s) and of the probabilities
before the value matmul (sum p * s * v), so the [B, H] tiles are only converted, never rescaled.

Layout notes: the cache is [P, K, C, H] so a page is one contiguous DMA and one KV head of it is a plain, tile-aligned
[C, H] slab in VMEM (loads of a head need no strided sublane access, which Mosaic only has for 32-bit data). C must be
a multiple of the sublane tiling (8 for f32, 16 for bf16) and block_q a multiple of 8 (16 for bf16).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_MASKED = -1e30  # finite: exp(_MASKED - m) underflows to 0 without inf - inf
_LANES = 128  # m and l are kept replicated across one vreg's lanes


def _cdiv(x, d: int):
  """Ceil division of a non-negative traced int32 (lax.div: jnp's floor division needs a sign op Mosaic lacks)."""
  return lax.div(x + (d - 1), d)


def _kernel(
    # Scalar prefetch (SMEM).
    kv_lens_ref,  # [S] int32
    pages_ref,  # [S * M] int32, the page table flattened
    cu_q_lens_ref,  # [S + 1] int32
    num_seqs_ref,  # [1] int32
    window_ref,  # [1] int32 sliding window (NO_WINDOW for none)
    seq_lo_ref,  # [num_q_blocks] int32, first sequence whose rows touch the block
    seq_hi_ref,  # [num_q_blocks] int32, one past the last such sequence
    # Inputs.
    q_ref,  # VMEM [K, R, H]
    k_hbm_ref,  # ANY [P, K, C, H]
    v_hbm_ref,  # ANY [P, K, C, H]
    *refs,
    # quantized pages only: k_scale_hbm_ref, v_scale_hbm_ref  ANY [P, K, C] float32
    # Output.
    # o_ref  VMEM [K, R, H]
    # Scratch.
    # k_buf_ref, v_buf_ref  VMEM [2, K, B, H] (two slots: double buffering)
    # quantized pages only: k_scale_buf_ref, v_scale_buf_ref  VMEM f32 [2, K, B]
    # sems_ref  DMA semaphores [4 (k, v, k scales, v scales), 2 (slot)]
    # m_ref, l_ref  VMEM f32 [K, R, 128] running max and denominator; acc_ref  VMEM f32 [K, R, H] running numerator
    quantized: bool,
    sm_scale: float,
    soft_cap: float | None,
    block_q: int,
    pages_per_block: int,
    max_pages: int,
    group: int,
):
  if quantized:
    k_scale_hbm_ref, v_scale_hbm_ref, o_ref, k_buf_ref, v_buf_ref, k_scale_buf_ref, v_scale_buf_ref, *rest = refs
  else:
    o_ref, k_buf_ref, v_buf_ref, *rest = refs
  sems_ref, m_ref, l_ref, acc_ref = rest
  K, R, H = q_ref.shape
  B = k_buf_ref.shape[2]
  C = B // pages_per_block
  S = kv_lens_ref.shape[0]
  f32 = jnp.float32
  precision = lax.Precision.HIGHEST if q_ref.dtype == f32 else lax.Precision.DEFAULT

  blk = pl.program_id(0)
  blk_start = blk * block_q  # first token of this q block
  blk_end = blk_start + block_q
  seq_lo = seq_lo_ref[blk]
  seq_hi = jnp.minimum(seq_hi_ref[blk], num_seqs_ref[0])
  window = window_ref[0]

  def seq_info(i):
    """Scalars of sequence i as seen from this q block."""
    i = jnp.clip(i, 0, S - 1)  # loop conditions evaluate this one past the end; keep the SMEM reads in range
    q_start, q_end, kv_len = cu_q_lens_ref[i], cu_q_lens_ref[i + 1], kv_lens_ref[i]
    rows_end = jnp.minimum(q_end, blk_end)
    has_rows = jnp.maximum(q_start, blk_start) < rows_end
    kv_end = kv_len - q_end + rows_end  # one past the last position a row of i in this block can see
    kv_lo = jnp.maximum(kv_len - q_end + jnp.maximum(q_start, blk_start) - window + 1, 0)  # the first one
    num_kv_blocks = jnp.where(has_rows, _cdiv(kv_end, B), 0)
    return q_start, q_end, kv_len, kv_end, num_kv_blocks, kv_lo

  def first_kv_block(i):
    return lax.div(seq_info(i)[5], B)

  def first_busy_seq(i):
    """First sequence >= i with rows in this block (seq_hi if none)."""
    return lax.while_loop(lambda i: (i < seq_hi) & (seq_info(i)[4] == 0), lambda i: i + 1, i)

  def next_item(i, j):
    """The work item after (sequence i, KV block j)."""
    def next_seq():
      i_next = first_busy_seq(i + 1)
      return i_next, first_kv_block(i_next)

    return lax.cond(j + 1 < seq_info(i)[4], lambda: (i, j + 1), next_seq)

  def page_copies(i, j, slot, action):
    """Applies action ("start" / "wait") to the DMAs of KV block j of sequence i into buffer slot."""
    _, _, _, kv_end, _, kv_lo = seq_info(i)
    num_pages = _cdiv(kv_end, C)  # pages at or past this are never read, nor those before the window's first
    first_page = lax.div(kv_lo, C)
    for p in range(pages_per_block):
      page_no = j * pages_per_block + p

      @pl.when((page_no < num_pages) & (page_no >= first_page))
      def _():
        page = pages_ref[i * max_pages + page_no]
        for x_hbm_ref, x_buf_ref, kv in ((k_hbm_ref, k_buf_ref, 0), (v_hbm_ref, v_buf_ref, 1)):
          copy = pltpu.make_async_copy(x_hbm_ref.at[page], x_buf_ref.at[slot, :, pl.ds(p * C, C), :],
                                       sems_ref.at[kv, slot])
          getattr(copy, action)()
        if quantized:  # the page's scales [K, C] land lane-major: key c of head h at [slot, h, p * C + c]
          for x_hbm_ref, x_buf_ref, kv in ((k_scale_hbm_ref, k_scale_buf_ref, 2),
                                           (v_scale_hbm_ref, v_scale_buf_ref, 3)):
            copy = pltpu.make_async_copy(x_hbm_ref.at[page], x_buf_ref.at[slot, :, pl.ds(p * C, C)],
                                         sems_ref.at[kv, slot])
            getattr(copy, action)()

  def compute(i, j, slot):
    q_start, q_end, kv_len, kv_end, _, kv_lo = seq_info(i)
    kv_start = j * B
    # Row r of the block is token blk_start + r // G at position causal_base + r // G. It belongs to sequence i iff
    # lo_r <= r < hi_r, and sees key c iff c <= its position, i.e. (c - causal_base) * G <= r, and c > its position -
    # window, i.e. r < (c - causal_base + window) * G (no vector integer division needed).
    lo_r, hi_r = (q_start - blk_start) * group, (q_end - blk_start) * group
    causal_base = kv_len - q_end + blk_start
    r_RB = lax.broadcasted_iota(jnp.int32, (R, B), 0)
    c_RB = kv_start + lax.broadcasted_iota(jnp.int32, (R, B), 1)
    visible_RB = ((r_RB >= lo_r) & (r_RB < hi_r) & ((c_RB - causal_base) * group <= r_RB)
                  & (r_RB < (c_RB - causal_base + jnp.minimum(window, kv_end)) * group))
    # Values of keys no row here can see (stale slots, pages not copied, the tail past kv_len) are zeroed.
    c_B1 = kv_start + lax.broadcasted_iota(jnp.int32, (B, H), 0)
    c_valid_BH = (c_B1 < kv_end) & (c_B1 >= kv_lo)
    c_1B = kv_start + lax.broadcasted_iota(jnp.int32, (1, B), 1)
    c_valid_1B = (c_1B < kv_end) & (c_1B >= kv_lo)
    r_RL = lax.broadcasted_iota(jnp.int32, (R, _LANES), 0)
    mine_RL = (r_RL >= lo_r) & (r_RL < hi_r)
    r_RH = lax.broadcasted_iota(jnp.int32, (R, H), 0)
    mine_RH = (r_RH >= lo_r) & (r_RH < hi_r)

    def head(h, carry):
      q_RH = q_ref[h]
      k_BH = k_buf_ref[slot, h]
      v_BH = v_buf_ref[slot, h]
      v_BH = jnp.where(c_valid_BH, v_BH.astype(f32), 0.0).astype(q_RH.dtype)
      if quantized:  # per-key scales [1, B] apply to the logits' and the probabilities' columns
        k_scale_1B = k_scale_buf_ref[slot, pl.ds(h, 1), :]
        v_scale_1B = jnp.where(c_valid_1B, v_scale_buf_ref[slot, pl.ds(h, 1), :], 0.0)
        k_BH = k_BH.astype(f32).astype(q_RH.dtype)
      s_RB = lax.dot_general(q_RH, k_BH, (((1,), (1,)), ((), ())), precision=precision,
                             preferred_element_type=f32) * sm_scale
      if quantized:
        s_RB = s_RB * k_scale_1B
      if soft_cap is not None:
        s_RB = soft_cap * jnp.tanh(s_RB / soft_cap)
      s_RB = jnp.where(visible_RB, s_RB, _MASKED)
      m_prev_RL, l_prev_RL, acc_prev_RH = m_ref[h], l_ref[h], acc_ref[h]
      m_prev_R1 = jnp.max(m_prev_RL, axis=1, keepdims=True)
      l_prev_R1 = jnp.max(l_prev_RL, axis=1, keepdims=True)
      m_new_R1 = jnp.maximum(m_prev_R1, jnp.max(s_RB, axis=1, keepdims=True))
      p_RB = jnp.exp(s_RB - m_new_R1)
      alpha_R1 = jnp.exp(m_prev_R1 - m_new_R1)
      l_new_R1 = alpha_R1 * l_prev_R1 + jnp.sum(p_RB, axis=1, keepdims=True)
      p_RB = p_RB * v_scale_1B if quantized else p_RB
      pv_RH = lax.dot_general(p_RB.astype(v_BH.dtype), v_BH, (((1,), (0,)), ((), ())), precision=precision,
                              preferred_element_type=f32)
      m_ref[h] = jnp.where(mine_RL, jnp.broadcast_to(m_new_R1, (R, _LANES)), m_prev_RL)
      l_ref[h] = jnp.where(mine_RL, jnp.broadcast_to(l_new_R1, (R, _LANES)), l_prev_RL)
      acc_ref[h] = jnp.where(mine_RH, alpha_R1 * acc_prev_RH + pv_RH, acc_prev_RH)
      return carry

    lax.fori_loop(0, K, head, 0)

  m_ref[...] = jnp.full(m_ref.shape, _MASKED, f32)
  l_ref[...] = jnp.zeros(l_ref.shape, f32)
  acc_ref[...] = jnp.zeros(acc_ref.shape, f32)

  first = first_busy_seq(seq_lo)

  @pl.when(first < seq_hi)
  def _():
    page_copies(first, first_kv_block(first), 0, "start")

  def step(carry):
    i, j, slot = carry
    next_i, next_j = next_item(i, j)

    @pl.when(next_i < seq_hi)
    def _():
      page_copies(next_i, next_j, 1 - slot, "start")  # overlaps with the compute below

    page_copies(i, j, slot, "wait")
    compute(i, j, slot)
    return next_i, next_j, 1 - slot

  lax.while_loop(lambda carry: carry[0] < seq_hi, step, (first, first_kv_block(first), jnp.int32(0)))

  def finish(h, carry):
    l_R1 = jnp.max(l_ref[h], axis=1, keepdims=True)
    o_ref[h] = (acc_ref[h] / jnp.where(l_R1 == 0.0, 1.0, l_R1)).astype(o_ref.dtype)
    return carry

  lax.fori_loop(0, K, finish, 0)


def default_block_sizes(T: int, page_size: int, max_pages: int, dtype) -> dict:
  """block_q: query tokens per grid step; pages_per_block: pages per KV block (about 128 keys)."""
  align = 16 if jnp.dtype(dtype).itemsize < 4 else 8
  block_q = min(32, -(-T // align) * align)
  pages_per_block = max(1, min(max_pages, 128 // page_size))
  return dict(block_q=block_q, pages_per_block=pages_per_block)


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "block_q", "pages_per_block", "interpret"))
def ragged_paged_attention_tpu(
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
    soft_cap: float | None = None,
    block_q: int | None = None,
    pages_per_block: int | None = None,
    interpret: bool = False,
) -> jax.Array:
  """The TPU kernel; arguments as in `ragged_paged_attention` (validated there). Returns [T, N, H] in q's dtype."""
  T, N, H = q_TNH.shape
  P, K, C, _ = k_PKCH.shape
  S, M = page_indices_SM.shape
  G = N // K
  defaults = default_block_sizes(T, C, M, q_TNH.dtype)
  block_q = block_q or defaults["block_q"]
  pages_per_block = pages_per_block or defaults["pages_per_block"]
  num_q_blocks = -(-T // block_q)
  T_pad = num_q_blocks * block_q
  R = block_q * G
  B = pages_per_block * C

  q_KQH = jnp.pad(q_TNH, ((0, T_pad - T), (0, 0), (0, 0)))
  q_KQH = q_KQH.reshape(T_pad, K, G, H).transpose(1, 0, 2, 3).reshape(K, T_pad * G, H)

  num_seqs_1 = jnp.reshape(num_seqs, (1,)).astype(jnp.int32)
  active_S = jnp.arange(S) < num_seqs_1[0]
  blk_start_Q = jnp.arange(num_q_blocks, dtype=jnp.int32)[:, None] * block_q
  seq_lo_Q = jnp.sum(active_S & (cu_q_lens_S1[1:] <= blk_start_Q), axis=1, dtype=jnp.int32)
  seq_hi_Q = jnp.sum(active_S & (cu_q_lens_S1[:-1] < blk_start_Q + block_q), axis=1, dtype=jnp.int32)

  quantized = k_scales_PKC is not None
  kernel = functools.partial(_kernel, sm_scale=sm_scale, soft_cap=soft_cap, block_q=block_q, pages_per_block=pages_per_block,
                             max_pages=M, group=G, quantized=quantized)
  q_spec = pl.BlockSpec((K, R, H), lambda b, *_: (0, b, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  scales = (k_scales_PKC, v_scales_PKC) if quantized else ()
  scale_bufs = [pltpu.VMEM((2, K, B), jnp.float32)] * len(scales)
  o_KQH = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=7,
          grid=(num_q_blocks,),
          in_specs=[q_spec, any_spec, any_spec] + [any_spec] * len(scales),
          out_specs=q_spec,
          scratch_shapes=[
              pltpu.VMEM((2, K, B, H), k_PKCH.dtype),
              pltpu.VMEM((2, K, B, H), v_PKCH.dtype),
              *scale_bufs,
              pltpu.SemaphoreType.DMA((4, 2)),
              pltpu.VMEM((K, R, _LANES), jnp.float32),
              pltpu.VMEM((K, R, _LANES), jnp.float32),
              pltpu.VMEM((K, R, H), jnp.float32),
          ],
      ),
      out_shape=jax.ShapeDtypeStruct((K, T_pad * G, H), q_TNH.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
      interpret=pltpu.InterpretParams() if interpret else False,
      name="ragged_paged_attention_tpu",
  )(kv_lens_S, page_indices_SM.reshape(-1), cu_q_lens_S1, num_seqs_1, jnp.reshape(window, (1,)).astype(jnp.int32),
    seq_lo_Q, seq_hi_Q, q_KQH, k_PKCH, v_PKCH, *scales)
  return o_KQH.reshape(K, T_pad, G, H).transpose(1, 0, 2, 3).reshape(T_pad, N, H)[:T]
