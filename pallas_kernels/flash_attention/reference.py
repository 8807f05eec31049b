"""Prefill attention in plain jnp: the definition the flash-attention kernels are tested against.

One batch row b holds a prompt of lengths_B[b] real tokens followed by padding. Query row t attends to key s iff

  s < lengths_B[b]            (the key is a real token)
  and s <= t                  (causal; dropped when causal=False)
  and t - s < window          (sliding window, causal only; window=None: no limit)

and a query row t >= lengths_B[b] is padding: its output is defined as zeros. Keys past the length are never read into
the result (their values are replaced by zeros before the second contraction), so whatever sits in the padded part of
k/v, NaN included, cannot reach a real row.

GQA without repeating K/V: the N query heads are viewed as [K, G] (G = N // K), query head n = k * G + g uses KV head
k = n // G, the order of HF's repeat_kv. Both contractions run in float32 at HIGHEST precision whatever the input dtype;
the result is cast to q's dtype once at the end.

Data flow: q [B, T, N, H] -> [B, T, K, G, H]; logits [B, K, G, T, S] in f32; mask; softmax over S; weights x values
-> [B, T, K, G, H] -> [B, T, N, H]. With soft_cap the logits become cap * tanh(logits / cap) before the mask.
"""

import jax
import jax.numpy as jnp

from jaxllm.pallas_kernels.reference import soft_cap_logits, window_or_none


def flash_attention_reference(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  lengths_B: jax.Array | None = None,
  *,
  sm_scale: float | None = None,
  causal: bool = True,
  window=None,
  soft_cap: float | None = None,
) -> jax.Array:
  """softmax(cap(q k^T * sm_scale) + mask) v with padding rows zeroed; float32 math, result in q's dtype.

  Args:
    q_BTNH: queries [B, T, N, H].
    k_BSKH, v_BSKH: keys / values [B, S, K, H]; N % K == 0.
    lengths_B: int [B] number of real tokens per row (clipped to [0, S]); None means all S.
    sm_scale: logit scale; None means H ** -0.5.
    causal: mask keys after the query's own index (T == S for a prompt attending to itself).
    window: None or int (or traced int32 scalar) >= 1: with causal, also mask keys s <= t - window.
    soft_cap: None or float: logit soft-capping.
  Returns:
    [B, T, N, H] in q's dtype; rows t >= lengths_B[b] are zeros.
  """
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  G = N // K
  if sm_scale is None:
    sm_scale = H**-0.5
  if lengths_B is None:
    lengths_B = jnp.full((B,), S, jnp.int32)
  lengths_B = jnp.clip(lengths_B.astype(jnp.int32), 0, S)
  hi = jax.lax.Precision.HIGHEST

  t_T = jnp.arange(T, dtype=jnp.int32)
  s_S = jnp.arange(S, dtype=jnp.int32)
  key_real_BS = s_S[None, :] < lengths_B[:, None]
  visible_BTS = jnp.broadcast_to(key_real_BS[:, None, :], (B, T, S))
  if causal:
    behind_TS = t_T[:, None] - s_S[None, :]
    visible_BTS = visible_BTS & ((behind_TS >= 0) & (behind_TS < window_or_none(window)))[None]
  row_real_BT = t_T[None, :] < lengths_B[:, None]

  q_BTKGH = q_BTNH.astype(jnp.float32).reshape(B, T, K, G, H)
  k_BSKH = k_BSKH.astype(jnp.float32)
  v_BSKH = jnp.where(key_real_BS[:, :, None, None], v_BSKH.astype(jnp.float32), 0.0)

  logits_BKGTS = soft_cap_logits(jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, precision=hi) * sm_scale, soft_cap)
  logits_BKGTS = jnp.where(visible_BTS[:, None, None], logits_BKGTS, -jnp.inf)
  m_BKGT1 = jnp.max(logits_BKGTS, axis=-1, keepdims=True)
  m_BKGT1 = jnp.where(jnp.isfinite(m_BKGT1), m_BKGT1, 0.0)  # a row with no visible key (length 0)
  p_BKGTS = jnp.exp(logits_BKGTS - m_BKGT1)  # exp(-inf) = 0 for masked keys
  l_BKGT = jnp.sum(p_BKGTS, axis=-1)
  o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS, v_BSKH, precision=hi)
  l_BTKG = l_BKGT.transpose(0, 3, 1, 2)
  o_BTKGH = o_BTKGH / jnp.where(l_BTKG > 0, l_BTKG, 1.0)[..., None]
  o_BTKGH = jnp.where(row_real_BT[:, :, None, None, None], o_BTKGH, 0.0)
  return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
