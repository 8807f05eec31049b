"""Prefill flash attention as a Pallas GPU kernel (Triton lowering).

Grid (T / block_q, B * N): one program computes block_q query rows of one query head n of one batch row b. Its
BlockSpecs hand it

  q, o  [block_q, H]   the rows of head n
  k, v  [S, H]         the whole key / value sequence of KV head n // G (G = N // K; no copy, just a pointer)
  length  []           lengths_B[b]

and the program walks the key blocks with lax.fori_loop, keeping the online-softmax state (running max m, running sum l,
unnormalised output acc) in f32 registers. GQA costs nothing extra in memory: the G programs of one KV head read the
same k / v, which L2 serves after the first of them.

The loop has three parts so the common case carries no masks:
  [n_start, n_lo)  key blocks that straddle the sliding window's start for some row: logits masked, values before
                   every row's window zeroed;
  [n_lo, n_full)   key blocks every row of the query block may see in full (below the diagonal, before the length,
                   inside the window);
  [n_full, n_end)  key blocks that straddle the causal diagonal or the length: logits masked, values past the length
                   zeroed (so NaN or garbage there cannot leak in).
Key blocks before n_start (outside every row's window) and after n_end (above the diagonal / past the length) are
never loaded. The window is a runtime scalar (one per layer under a layer scan); no window is NO_WINDOW. A query block entirely past the length
runs no iterations and stores zeros; padding rows (t >= length) inside a real block are stored as zeros.

The caller (the dispatch in __init__.py) pads T to a multiple of block_q, S to a multiple of block_kv and H to a power
of two >= 16, and clips lengths to [0, S]; this module assumes that. For f32 inputs the matmuls ask for IEEE f32
(Triton would otherwise use TF32); bf16 inputs use the tensor cores' bf16 x bf16 -> f32.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxllm.pallas_kernels.backend import require_triton

MASK_VALUE = -1e30  # finite: exp(MASK_VALUE - m) underflows to 0 and never makes inf - inf = NaN


def _kernel(
  lengths_ref,  # int32 [] (this program's batch row)
  window_ref,  # int32 [] the sliding window
  q_ref,  # [block_q, H]
  k_ref,  # [S, H]
  v_ref,  # [S, H]
  o_ref,  # [block_q, H]
  *,
  block_q: int,
  block_kv: int,
  causal: bool,
  sm_scale: float,
  soft_cap: float | None,
  precision,
):
  """One program (i, b * N + n). Shape letters: Q block_q rows, V block_kv keys, H head dim."""
  i = pl.program_id(0)
  length = lengths_ref[...]
  window = window_ref[...]
  q_start = i * block_q
  q_QH = q_ref[...]
  H = q_QH.shape[-1]
  row_Q = q_start + jnp.arange(block_q, dtype=jnp.int32)

  # Keys s < see_limit are needed by some row of this block; keys s < full_limit are visible to every row.
  if causal:
    see_limit = jnp.minimum(length, q_start + block_q)
    full_limit = jnp.minimum(length, q_start + 1)
  else:
    see_limit = length
    full_limit = length
  n_end = jnp.where(q_start < length, lax.div(see_limit + block_kv - 1, block_kv), 0)
  n_full = jnp.minimum(lax.div(full_limit, block_kv), n_end)
  # Keys s > q_start - window are in the first row's window, keys s > q_start + block_q - 1 - window in every row's.
  if causal:
    n_start = jnp.minimum(lax.div(jnp.maximum(q_start - window + 1, 0), block_kv), n_full)
    n_lo = jnp.clip(lax.div(jnp.maximum(q_start + block_q - window, 0) + block_kv - 1, block_kv), n_start, n_full)
  else:
    n_start = n_lo = jnp.int32(0)

  def body(j, carry, *, masked: bool):
    acc_QH, m_Q, l_Q = carry
    kv_start = pl.multiple_of(j * block_kv, block_kv)
    k_VH = k_ref[pl.ds(kv_start, block_kv), :]
    v_VH = v_ref[pl.ds(kv_start, block_kv), :]
    s_QV = lax.dot_general(
      q_QH, k_VH, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    s_QV = s_QV * sm_scale
    if soft_cap is not None:
      s_QV = soft_cap * jnp.tanh(s_QV / soft_cap)
    if masked:
      key_V = kv_start + jnp.arange(block_kv, dtype=jnp.int32)
      key_real_V = key_V < length
      if causal:  # keys before every row's window are zeroed too
        key_real_V = key_real_V & (key_V > q_start - window)
      v_VH = jnp.where(key_real_V[:, None], v_VH, jnp.zeros_like(v_VH))
      visible_QV = key_real_V[None, :]
      if causal:
        behind_QV = row_Q[:, None] - key_V[None, :]
        visible_QV = visible_QV & (behind_QV >= 0) & (behind_QV < window)
      s_QV = jnp.where(visible_QV, s_QV, MASK_VALUE)
    m_next_Q = jnp.maximum(m_Q, jnp.max(s_QV, axis=1))
    alpha_Q = jnp.exp(m_Q - m_next_Q)
    p_QV = jnp.exp(s_QV - m_next_Q[:, None])
    l_next_Q = alpha_Q * l_Q + jnp.sum(p_QV, axis=1)
    pv_QH = lax.dot_general(
      p_QV.astype(v_VH.dtype), v_VH, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
    )
    return acc_QH * alpha_Q[:, None] + pv_QH, m_next_Q, l_next_Q

  carry = (
    jnp.zeros((block_q, H), jnp.float32),
    jnp.full((block_q,), MASK_VALUE, jnp.float32),
    jnp.zeros((block_q,), jnp.float32),
  )
  carry = lax.fori_loop(n_start, n_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(n_lo, n_full, functools.partial(body, masked=False), carry)
  acc_QH, _, l_Q = lax.fori_loop(n_full, n_end, functools.partial(body, masked=True), carry)
  o_QH = acc_QH / jnp.where(l_Q > 0, l_Q, 1.0)[:, None]  # l == 0 only when no iteration ran (acc == 0)
  o_ref[...] = jnp.where((row_Q < length)[:, None], o_QH, 0.0).astype(o_ref.dtype)


def flash_attention_gpu(
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
  num_warps: int | None = None,
  num_stages: int = 2,
) -> jax.Array:
  """Runs the kernel on inputs the dispatch has already validated and padded.

  Args:
    q_BTNH: [B, T, N, H] f32 / bf16, T % block_q == 0, H a power of two >= 16.
    k_BSKH, v_BSKH: [B, S, K, H] same dtype, S % block_kv == 0, N % K == 0.
    lengths_B: int32 [B], values in [0, S].
    sm_scale, causal, soft_cap: as in flash_attention.
    window: int32 scalar, the sliding window (NO_WINDOW for none).
    block_q, block_kv: powers of two >= 16 (Triton's dot needs 16 on each side).
    interpret: run pallas_call's generic interpreter (CPU) instead of Triton.
    num_warps, num_stages: Triton launch parameters (num_warps None: 4 for H <= 64, else 8).
  Returns:
    [B, T, N, H] in q's dtype.
  """
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  precision = lax.Precision.HIGHEST if q_BTNH.dtype == jnp.float32 else None
  kernel = functools.partial(
    _kernel, block_q=block_q, block_kv=block_kv, causal=causal, sm_scale=float(sm_scale), soft_cap=soft_cap,
    precision=precision,
  )
  q_spec = pl.BlockSpec((None, block_q, None, H), lambda i, bn: (bn // N, i, bn % N, 0))
  kv_spec = pl.BlockSpec((None, S, None, H), lambda i, bn: (bn // N, 0, (bn % N) // G, 0))
  return pl.pallas_call(
    kernel,
    grid=(T // block_q, B * N),
    in_specs=[pl.BlockSpec((None,), lambda i, bn: (bn // N,)), pl.BlockSpec((None,), lambda i, bn: (bn // N,)),
              q_spec, kv_spec, kv_spec],
    out_specs=q_spec,
    out_shape=jax.ShapeDtypeStruct(q_BTNH.shape, q_BTNH.dtype),
    compiler_params=require_triton().CompilerParams(num_warps=num_warps or (4 if H <= 64 else 8),
                                                    num_stages=num_stages),
    interpret=interpret,
    name="flash_attention_gpu",
  )(lengths_B.astype(jnp.int32), jnp.broadcast_to(window, (B,)).astype(jnp.int32), q_BTNH, k_BSKH, v_BSKH)
