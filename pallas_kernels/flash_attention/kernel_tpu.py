"""Prefill flash attention as a Mosaic (TPU) Pallas kernel.

Grid (B, K, T / block_q, S / block_kv); the last axis is the sequential ("arbitrary") reduction over key blocks, the
first three are independent ("parallel", split across TensorCores on megacore chips). One grid step holds, in VMEM:

  q   [block_q, G * H] (or [G, block_q, H])  all G query heads that share KV head k, for block_q query rows
  k,v [block_kv, H]                          one block of keys / values of KV head k, fetched once for all G heads
  m,l [G, block_q, 128] f32 scratch          running max / running sum of the online softmax, replicated over lanes
  acc [G, block_q, H] f32 scratch            running (unnormalised) output

so GQA never repeats K/V: a KV block is DMA'd once per (query block, KV head) and reused by the G heads in a static
loop of G [block_q, H] x [H, block_kv] matmuls. Per step and head: logits = q k^T * sm_scale in f32, mask (only on
blocks that straddle the causal diagonal or the row's length), online-softmax update of m / l / acc; on the last key
block the output is acc / l, with padding rows (t >= length) written as zeros.

Skipping: the row lengths and the sliding window are scalar-prefetched into SMEM, so the index_maps can see them. A key
block that lies entirely above the causal diagonal, past the length or before the window of every row of the query
block is not computed (pl.when) and not fetched: its index_map returns the nearest needed block index (clamped), and
the pipeline does not re-issue a DMA for an unchanged block. Query blocks entirely past the length skip all compute,
and their q / k / v index_maps also stay on the last useful block. The window is a runtime scalar (a layer scan
carries one per layer); "no window" is NO_WINDOW, a distance no position reaches.

Layouts (chosen from H, no transposes for the common H % 128 == 0):
  heads_in_lanes  (H % 128 == 0): q / o viewed as [B, T, N * H], k / v as [B, S, K * H]; KV head k's query heads are
                  the lane range [k * G * H, (k + 1) * G * H) and its keys the lane range [k * H, (k + 1) * H).
  head_major      (otherwise):    q / o transposed to [B, N, T, H] and k / v to [B, K, S, H] (one XLA transpose each),
                  because Mosaic blocks need their last dim to be a multiple of 128 or the full array dim.

The caller (the dispatch in __init__.py) pads T to a multiple of block_q and S to a multiple of block_kv and clips
lengths to [0, S]; this module assumes that.
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

MASK_VALUE = -1e30  # finite: exp(MASK_VALUE - m) underflows to 0 and never makes inf - inf = NaN
_LANES = 128  # m / l scratch are replicated over one vreg's lanes


def _last_q_block(length, block_q):
  """Last query block holding a real row (0 when length == 0)."""
  return jnp.maximum(lax.div(length + block_q - 1, block_q) - 1, 0)


def _last_kv_block(length, q_block, *, block_q, block_kv, causal):
  """Last key block that query block `q_block` needs: the diagonal (if causal) or the length, whichever comes first."""
  last = lax.div(length + block_kv - 1, block_kv) - 1
  if causal:
    last = jnp.minimum(last, lax.div((q_block + 1) * block_q - 1, block_kv))
  return jnp.maximum(last, 0)


def q_block_index(i, length, *, block_q):
  """Query block fetched at grid step (.., i, ..): i itself, or the last real block for all-padding blocks."""
  return jnp.minimum(i, _last_q_block(length, block_q))


def _first_kv_block(q_block, window, *, block_q, block_kv):
  """First key block that query block `q_block` needs: the one holding its first row's oldest key in the window."""
  return lax.div(jnp.maximum(q_block * block_q - window + 1, 0), block_kv)


def kv_block_index(i, j, length, window, *, block_q, block_kv, causal):
  """Key / value block fetched at grid step (.., i, j).

  j while j is needed; before the first needed block (the window) the index is that block, and past the last one (or
  in an all-padding query block) it stays on the block already in VMEM, so consecutive steps name the same block and
  the pipeline issues no DMA for them.
  """
  last_q = _last_q_block(length, block_q)
  q_block = jnp.minimum(i, last_q)
  last_kv = _last_kv_block(length, q_block, block_q=block_q, block_kv=block_kv, causal=causal)
  first_kv = jnp.minimum(_first_kv_block(q_block, window, block_q=block_q, block_kv=block_kv), last_kv)
  return jnp.where(i > last_q, last_kv, jnp.clip(j, first_kv, last_kv))


def _kernel(
  lengths_ref,  # SMEM int32 [B] (scalar prefetch)
  window_ref,  # SMEM int32 [1] (scalar prefetch)
  q_ref,  # [block_q, G * H] or [G, block_q, H]
  k_ref,  # [block_kv, H]
  v_ref,  # [block_kv, H]
  o_ref,  # like q_ref
  m_ref,  # f32 [G, block_q, 128]
  l_ref,  # f32 [G, block_q, 128]
  acc_ref,  # f32 [G, block_q, H]
  *,
  G: int,
  H: int,
  block_q: int,
  block_kv: int,
  causal: bool,
  sm_scale: float,
  soft_cap: float | None,
  heads_in_lanes: bool,
  precision,
):
  """One grid step (b, kv head, i, j). Shape letters: Q block_q rows, V block_kv keys, H head dim, L the 128 lanes."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  length = lengths_ref[b]
  window = window_ref[0]
  q_start = i * block_q
  kv_start = j * block_kv

  def load_q(g):
    return q_ref[:, g * H : (g + 1) * H] if heads_in_lanes else q_ref[g]

  def store_o(g, o_QH):
    if heads_in_lanes:
      o_ref[:, g * H : (g + 1) * H] = o_QH
    else:
      o_ref[g] = o_QH

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def step(masked: bool):
    k_VH = k_ref[...]
    v_VH = v_ref[...]
    if masked:
      # Keys past the length may hold anything (NaN included): zero their values so 0 * NaN never reaches acc.
      # Keys before every row's window are zeroed too.
      key_VH = kv_start + lax.broadcasted_iota(jnp.int32, v_VH.shape, 0)
      v_VH = jnp.where((key_VH < length) & (key_VH > q_start - window), v_VH, jnp.zeros_like(v_VH))
      key_QV = kv_start + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1)
      visible_QV = key_QV < length
      if causal:
        behind_QV = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0) - key_QV
        visible_QV = visible_QV & (behind_QV >= 0) & (behind_QV < window)
    for g in range(G):  # static: the G query heads of this KV head reuse the k / v block already in VMEM
      q_QH = load_q(g)
      s_QV = lax.dot_general(
        q_QH, k_VH, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
      )
      s_QV = s_QV * sm_scale
      if soft_cap is not None:
        s_QV = soft_cap * jnp.tanh(s_QV / soft_cap)
      if masked:
        s_QV = jnp.where(visible_QV, s_QV, MASK_VALUE)
      m_prev_QL = m_ref[g]
      l_prev_QL = l_ref[g]
      m_next_QL = jnp.maximum(m_prev_QL, jnp.max(s_QV, axis=1, keepdims=True))
      alpha_QL = jnp.exp(m_prev_QL - m_next_QL)
      p_QV = jnp.exp(s_QV - m_next_QL[:, :1])
      l_ref[g] = alpha_QL * l_prev_QL + jnp.sum(p_QV, axis=1, keepdims=True)
      m_ref[g] = m_next_QL
      pv_QH = lax.dot_general(
        p_QV.astype(v_VH.dtype), v_VH, (((1,), (0,)), ((), ())), precision=precision,
        preferred_element_type=jnp.float32,
      )
      acc_ref[g] = acc_ref[g] * alpha_QL[:, :1] + pv_QH

  q_real = q_start < length
  kv_needed = kv_start < length
  needs_mask = kv_start + block_kv > length
  if causal:
    # Needed: the block reaches the first row's window and starts at or before the last row. Masked: it crosses the
    # diagonal, or begins before the last row's window.
    kv_needed = kv_needed & (kv_start <= q_start + block_q - 1) & (kv_start + block_kv - 1 > q_start - window)
    needs_mask = needs_mask | (kv_start + block_kv - 1 > q_start) | (kv_start <= q_start + block_q - 1 - window)
  run = q_real & kv_needed

  @pl.when(run & needs_mask)
  def _masked_step():
    step(masked=True)

  @pl.when(run & jnp.logical_not(needs_mask))
  def _full_step():
    step(masked=False)

  @pl.when(j == pl.num_programs(3) - 1)
  def _finalize():
    row_QH = q_start + lax.broadcasted_iota(jnp.int32, (block_q, H), 0)
    row_real_QH = row_QH < length
    for g in range(G):
      l_Q1 = l_ref[g][:, :1]
      o_QH = acc_ref[g] / jnp.where(l_Q1 > 0, l_Q1, 1.0)  # l == 0 only for skipped (all-padding) blocks: acc == 0
      store_o(g, jnp.where(row_real_QH, o_QH, 0.0).astype(o_ref.dtype))


def flash_attention_tpu(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  lengths_B: jax.Array,
  *,
  sm_scale: float,
  causal: bool,
  block_q: int,
  block_kv: int,
  window: jax.Array,
  soft_cap: float | None = None,
  interpret: bool = False,
) -> jax.Array:
  """Runs the kernel on inputs the dispatch has already validated and padded.

  Args:
    q_BTNH: [B, T, N, H] f32 / bf16, T % block_q == 0.
    k_BSKH, v_BSKH: [B, S, K, H] same dtype, S % block_kv == 0, N % K == 0.
    lengths_B: int32 [B], values in [0, S].
    sm_scale, causal, soft_cap: as in flash_attention.
    block_q, block_kv: rows / keys per grid step (multiples of 8; 128+ for speed).
    window: int32 scalar, the sliding window (NO_WINDOW for none).
    interpret: run under pltpu.force_tpu_interpret_mode() (CPU simulation of the TPU).
  Returns:
    [B, T, N, H] in q's dtype.
  """
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  nq, nk = T // block_q, S // block_kv
  heads_in_lanes = H % 128 == 0
  precision = lax.Precision.HIGHEST if q_BTNH.dtype == jnp.float32 else None

  def q_block(b, i, lengths_ref):
    return q_block_index(i, lengths_ref[b], block_q=block_q)

  def kv_block(b, i, j, lengths_ref, window_ref):
    return kv_block_index(i, j, lengths_ref[b], window_ref[0], block_q=block_q, block_kv=block_kv, causal=causal)

  if heads_in_lanes:
    q_in, k_in, v_in = q_BTNH.reshape(B, T, N * H), k_BSKH.reshape(B, S, K * H), v_BSKH.reshape(B, S, K * H)
    q_spec = pl.BlockSpec((None, block_q, G * H), lambda b, kh, i, j, lens, win: (b, q_block(b, i, lens), kh))
    kv_spec = pl.BlockSpec((None, block_kv, H), lambda b, kh, i, j, *refs: (b, kv_block(b, i, j, *refs), kh))
    o_spec = pl.BlockSpec((None, block_q, G * H), lambda b, kh, i, j, *refs: (b, i, kh))
    o_shape = jax.ShapeDtypeStruct((B, T, N * H), q_BTNH.dtype)
  else:
    q_in = q_BTNH.transpose(0, 2, 1, 3)  # [B, N, T, H]
    k_in, v_in = k_BSKH.transpose(0, 2, 1, 3), v_BSKH.transpose(0, 2, 1, 3)  # [B, K, S, H]
    q_spec = pl.BlockSpec((None, G, block_q, H), lambda b, kh, i, j, lens, win: (b, kh, q_block(b, i, lens), 0))
    kv_spec = pl.BlockSpec((None, None, block_kv, H), lambda b, kh, i, j, *refs: (b, kh, kv_block(b, i, j, *refs), 0))
    o_spec = pl.BlockSpec((None, G, block_q, H), lambda b, kh, i, j, *refs: (b, kh, i, 0))
    o_shape = jax.ShapeDtypeStruct((B, N, T, H), q_BTNH.dtype)

  kernel = functools.partial(
    _kernel, G=G, H=H, block_q=block_q, block_kv=block_kv, causal=causal, sm_scale=float(sm_scale),
    soft_cap=soft_cap, heads_in_lanes=heads_in_lanes, precision=precision,
  )
  # pallas_call reads the interpret-mode context when it is built, so build it inside.
  with pltpu.force_tpu_interpret_mode() if interpret else contextlib.nullcontext():
    call = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(B, K, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec],
        out_specs=o_spec,
        scratch_shapes=[
          pltpu.VMEM((G, block_q, _LANES), jnp.float32),
          pltpu.VMEM((G, block_q, _LANES), jnp.float32),
          pltpu.VMEM((G, block_q, H), jnp.float32),
        ],
      ),
      out_shape=o_shape,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
      name="flash_attention_tpu",
    )
    o = call(lengths_B.astype(jnp.int32), jnp.reshape(window, (1,)).astype(jnp.int32), q_in, k_in, v_in)
  if heads_in_lanes:
    return o.reshape(B, T, N, H)
  return o.transpose(0, 2, 1, 3)
