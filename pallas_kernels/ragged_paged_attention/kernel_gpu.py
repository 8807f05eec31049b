"""Ragged paged attention as a Pallas GPU kernel (Triton lowering).

Shape letters: T query tokens, N query heads, K KV heads, G = N // K query heads per KV head, Gp = G rounded up to a
power of two (Triton tensors are power-of-two sized), H head dim, P pages, C tokens per page, S sequence slots, M
page-table width, U work units, Q = block_q tokens of one unit, W = Q * Gp query rows of a unit, B = pages_per_block * C
keys per KV block.

Data flow:
  1. The wrapper cuts every sequence's query tokens into units of at most block_q tokens, so that a unit belongs to
     exactly one sequence (U = T // block_q + min(S, T) is a static upper bound; spare units do nothing). Per unit it
     computes [sequence, position of its first row, number of rows, kv_len] and gathers its queries, folded per KV head:
     q_UKWH[u, k, t * Gp + g] = q[first token + t, k * G + g] (rows past the unit's tokens or g >= G are filler).
  2. Grid = (U, K): one program per (unit, KV head). It streams the sequence's pages, pages_per_block at a time, as a
     gather k_pages[page_ids, kv_head] -> [B, H], from the block holding the oldest key in its first row's sliding
     window (kv_lo; 0 without a window) up to the last position its rows can see (kv_end = last row's position + 1),
     and keeps the online-softmax state (m, l, acc in f32) in registers. Table entries outside
     [kv_lo // C, cdiv(kv_end, C)) are replaced by the page holding kv_lo before the gather, so unused pages and
     pages before the window are never read; keys outside [kv_lo, kv_end) (the tail of the last page, redirected
     slots) are masked and their values zeroed, so NaN there cannot leak (p = 0 times NaN is NaN).
  3. The program writes its [W, H] tile; the wrapper gathers every real token's rows back into [T, N, H]
     (bucket-padding rows past cu_q_lens[num_seqs] come out as 0).

Quantized pages (int8 / float8_e4m3fn with [P, K, C] float32 scales) are gathered as they are stored and dequantized
to q's dtype in registers, block by block: HBM traffic is the quantized bytes plus 4 per key.

f32 dots run at IEEE precision (Triton's default for f32 would be TF32); bf16 dots accumulate in f32.
Requires: page_size, head_dim, block_q and pages_per_block powers of two; W >= 16 and B >= 16 (tl.dot minimum).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.pallas_kernels.backend import require_triton

_MASKED = -1e30  # finite: exp(_MASKED - m) underflows to 0 without inf - inf


def _next_pow2(x: int) -> int:
  return 1 << (x - 1).bit_length()


def _kernel(
    meta_ref,  # [4] int32 of this unit: sequence, position of row 0, number of rows, sliding window
    pages_ref,  # [S, M'] int32 page table (M' = M padded to a multiple of pages_per_block)
    q_ref,  # [W, H] this unit's queries of one KV head
    k_ref,  # [P, C, H] the cache of this KV head
    v_ref,  # [P, C, H]
    *refs,  # (k_scale_ref, v_scale_ref [P, C] float32, with quantized pages), o_ref [W, H]
    sm_scale: float,
    soft_cap: float | None,
    group_pad: int,
    pages_per_block: int,
):
  *scale_refs, o_ref = refs
  W, H = q_ref.shape
  C = k_ref.shape[1]
  B = pages_per_block * C
  f32 = jnp.float32
  precision = lax.Precision.HIGHEST if q_ref.dtype == f32 else lax.Precision.DEFAULT
  seq, pos0, num_rows, window = meta_ref[0], meta_ref[1], meta_ref[2], meta_ref[3]

  kv_end = pos0 + num_rows  # one past the last position any row of the unit sees
  kv_lo = jnp.maximum(pos0 - window + 1, 0)  # the first position any row of the unit sees
  num_kv_blocks = jnp.where(num_rows > 0, (kv_end + B - 1) // B, 0)
  num_pages = (kv_end + C - 1) // C  # table entries at or past this are never dereferenced, nor those before lo_page
  lo_page = kv_lo // C
  first_page = pages_ref[seq, lo_page]
  q_WH = q_ref[...]
  pos_W = pos0 + lax.broadcasted_iota(jnp.int32, (W,), 0) // group_pad

  def body(j, carry):
    m_W, l_W, acc_WH = carry
    page_no_p = j * pages_per_block + lax.broadcasted_iota(jnp.int32, (pages_per_block,), 0)
    page_ids_p = pages_ref[seq, pl.ds(j * pages_per_block, pages_per_block)]
    page_ids_p = jnp.where((page_no_p < num_pages) & (page_no_p >= lo_page), page_ids_p, first_page)
    k_BH = k_ref[page_ids_p].reshape(B, H)
    v_BH = v_ref[page_ids_p].reshape(B, H)
    if scale_refs:  # quantized pages: dequantize the block to q's dtype in registers
      k_scale_ref, v_scale_ref = scale_refs
      k_BH = (k_BH.astype(f32) * k_scale_ref[page_ids_p].reshape(B)[:, None]).astype(q_WH.dtype)
      v_BH = (v_BH.astype(f32) * v_scale_ref[page_ids_p].reshape(B)[:, None]).astype(q_WH.dtype)
    c_B = j * B + lax.broadcasted_iota(jnp.int32, (B,), 0)
    s_WB = lax.dot_general(q_WH, k_BH, (((1,), (1,)), ((), ())), precision=precision,
                           preferred_element_type=f32) * sm_scale
    if soft_cap is not None:
      s_WB = soft_cap * jnp.tanh(s_WB / soft_cap)
    used_B = (c_B < kv_end) & (c_B >= kv_lo)
    behind_WB = pos_W[:, None] - c_B[None, :]
    visible_WB = (behind_WB >= 0) & (behind_WB < window) & used_B[None, :]  # filler rows stay finite too
    s_WB = jnp.where(visible_WB, s_WB, _MASKED)
    m_new_W = jnp.maximum(m_W, jnp.max(s_WB, axis=1))
    p_WB = jnp.exp(s_WB - m_new_W[:, None])
    alpha_W = jnp.exp(m_W - m_new_W)
    l_W = alpha_W * l_W + jnp.sum(p_WB, axis=1)
    v_BH = jnp.where(used_B[:, None], v_BH, jnp.zeros_like(v_BH))
    pv_WH = lax.dot_general(p_WB.astype(v_BH.dtype), v_BH, (((1,), (0,)), ((), ())), precision=precision,
                            preferred_element_type=f32)
    return m_new_W, l_W, alpha_W[:, None] * acc_WH + pv_WH

  init = (jnp.full((W,), _MASKED, f32), jnp.zeros((W,), f32), jnp.zeros((W, H), f32))
  _, l_W, acc_WH = lax.fori_loop(jnp.minimum(kv_lo // B, num_kv_blocks), num_kv_blocks, body, init)
  o_ref[...] = (acc_WH / jnp.where(l_W == 0.0, 1.0, l_W)[:, None]).astype(o_ref.dtype)


def default_block_sizes(num_q_heads: int, num_kv_heads: int, page_size: int, max_pages: int) -> dict:
  """block_q: tokens per unit (W = block_q * Gp = 16 rows); pages_per_block: about 64 keys per step."""
  group_pad = _next_pow2(num_q_heads // num_kv_heads)
  return dict(block_q=max(1, 16 // group_pad),
              pages_per_block=max(1, 16 // page_size, min(_next_pow2(max_pages), 64 // page_size)))


@functools.partial(jax.jit,
                   static_argnames=("sm_scale", "soft_cap", "block_q", "pages_per_block", "num_warps", "num_stages", "interpret"))
def ragged_paged_attention_gpu(
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
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool = False,
) -> jax.Array:
  """The GPU kernel; arguments as in `ragged_paged_attention` (validated there). Returns [T, N, H] in q's dtype."""
  T, N, H = q_TNH.shape
  P, K, C, _ = k_PKCH.shape
  S, M = page_indices_SM.shape
  G = N // K
  Gp = _next_pow2(G)
  defaults = default_block_sizes(N, K, C, M)
  Q = block_q or defaults["block_q"]
  pages_per_block = pages_per_block or defaults["pages_per_block"]
  W = Q * Gp
  U = T // Q + min(S, T)
  i32 = jnp.int32

  # Units: sequence i owns cdiv(q_len_i, Q) consecutive units starting at unit_start_S[i].
  num_seqs = jnp.reshape(num_seqs, ()).astype(i32)
  active_S = jnp.arange(S) < num_seqs
  q_len_S = jnp.where(active_S, cu_q_lens_S1[1:] - cu_q_lens_S1[:-1], 0)
  units_S = (q_len_S + Q - 1) // Q
  unit_end_S = jnp.cumsum(units_S, dtype=i32)
  unit_start_S = unit_end_S - units_S
  u_U = jnp.arange(U, dtype=i32)
  seq_U = jnp.sum(unit_end_S[None, :] <= u_U[:, None], axis=1, dtype=i32)  # == S for spare units
  valid_U = seq_U < S
  seq_U = jnp.minimum(seq_U, S - 1)
  first_tok_U = cu_q_lens_S1[seq_U] + (u_U - unit_start_S[seq_U]) * Q
  q_end_U = cu_q_lens_S1[seq_U + 1]
  kv_len_U = jnp.where(valid_U, kv_lens_S[seq_U], 0)
  num_rows_U = jnp.where(valid_U, jnp.minimum(q_end_U - first_tok_U, Q), 0)
  pos0_U = jnp.where(valid_U, kv_len_U - q_end_U + first_tok_U, 0)
  window_U = jnp.broadcast_to(jnp.reshape(window, ()), (U,))
  meta_U4 = jnp.stack([seq_U, pos0_U, num_rows_U, window_U], axis=1).astype(i32)

  tok_UQ = jnp.clip(first_tok_U[:, None] + jnp.arange(Q, dtype=i32), 0, T - 1)
  q_TKGH = jnp.pad(q_TNH.reshape(T, K, G, H), ((0, 0), (0, 0), (0, Gp - G), (0, 0)))
  q_UKWH = q_TKGH[tok_UQ].transpose(0, 2, 1, 3, 4).reshape(U, K, W, H)
  M_pad = -(-M // pages_per_block) * pages_per_block
  pages_SM = jnp.pad(page_indices_SM, ((0, 0), (0, M_pad - M)))

  kernel = functools.partial(_kernel, sm_scale=sm_scale, soft_cap=soft_cap, group_pad=Gp, pages_per_block=pages_per_block)
  page_spec = pl.BlockSpec((P, None, C, H), lambda u, h: (0, h, 0, 0))
  scales = () if k_scales_PKC is None else (k_scales_PKC, v_scales_PKC)
  o_UKWH = pl.pallas_call(
      kernel,
      grid=(U, K),
      in_specs=[
          pl.BlockSpec((None, 4), lambda u, h: (u, 0)),
          pl.BlockSpec((S, M_pad), lambda u, h: (0, 0)),
          pl.BlockSpec((None, None, W, H), lambda u, h: (u, h, 0, 0)),
          page_spec,
          page_spec,
      ] + [pl.BlockSpec((P, None, C), lambda u, h: (0, h, 0))] * len(scales),
      out_specs=pl.BlockSpec((None, None, W, H), lambda u, h: (u, h, 0, 0)),
      out_shape=jax.ShapeDtypeStruct((U, K, W, H), q_TNH.dtype),
      compiler_params=require_triton().CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="ragged_paged_attention_gpu",
  )(meta_U4, pages_SM, q_UKWH, k_PKCH, v_PKCH, *scales)

  # Back to tokens: token t of sequence i is row (t - cu_q_lens[i]) % Q of unit unit_start[i] + (t - cu[i]) // Q.
  t_T = jnp.arange(T, dtype=i32)
  seq_T = jnp.minimum(jnp.sum(active_S & (cu_q_lens_S1[1:] <= t_T[:, None]), axis=1, dtype=i32), S - 1)
  real_T = t_T < cu_q_lens_S1[num_seqs]
  r_T = t_T - cu_q_lens_S1[seq_T]
  unit_T = jnp.clip(unit_start_S[seq_T] + r_T // Q, 0, U - 1)
  o_TKGH = o_UKWH.reshape(U, K, Q, Gp, H)[unit_T, :, jnp.clip(r_T % Q, 0, Q - 1)]
  o_TNH = o_TKGH[:, :, :G].reshape(T, N, H)
  return jnp.where(real_T[:, None, None], o_TNH, jnp.zeros_like(o_TNH))
