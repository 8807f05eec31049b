"""Plain-jnp attention: the oracle every attention kernel is tested against.

Causality is expressed by positions, not by array indices: query row (b, t) at position q_pos[b, t] may attend to key
(b, s) iff kv_pos[b, s] <= q_pos[b, t]. That single rule covers a prompt attending to itself (kv_pos = q_pos), decode
over a contiguous cache (kv_pos = arange(S)), and right-padded batches (pads sit at later positions, so no real row sees
them). GQA is computed without repeating K/V: query heads are grouped onto their KV head (N = K * G).
"""

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a row can never become NaN through exp(-inf - -inf)


def attention_reference(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    q_pos_BT: jax.Array,
    kv_pos_BS: jax.Array,
    *,
    sm_scale: float,
) -> jax.Array:
  """softmax(q k^T * sm_scale + causal mask) v, softmax in float32; returns [B, T, N, H] in q's dtype."""
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  # Fold the query rows of one KV head into Q = G * T rows: [B, K, Q, H] contracts against [B, S, K, H] directly.
  q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  s_BKQS = jnp.einsum("BKQH,BSKH->BKQS", q_BKQH, k_BSKH, preferred_element_type=jnp.float32) * sm_scale
  visible_BTS = kv_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
  visible_B1QS = jnp.broadcast_to(visible_BTS[:, None], (B, G, T, visible_BTS.shape[-1])).reshape(B, 1, G * T, -1)
  s_BKQS = jnp.where(visible_B1QS, s_BKQS, _MASKED)
  p_BKQS = jax.nn.softmax(s_BKQS, axis=-1).astype(v_BSKH.dtype)
  o_BKQH = jnp.einsum("BKQS,BSKH->BKQH", p_BKQS, v_BSKH, preferred_element_type=jnp.float32)
  return o_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)
