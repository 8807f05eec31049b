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
  q_BTKGH = q_BTNH.reshape(B, T, K, N // K, H)
  s_BKGTS = jnp.einsum("BTKGH,BSKH->BKGTS", q_BTKGH, k_BSKH, preferred_element_type=jnp.float32) * sm_scale
  visible_BTS = kv_pos_BS[:, None, :] <= q_pos_BT[:, :, None]
  s_BKGTS = jnp.where(visible_BTS[:, None, None], s_BKGTS, _MASKED)
  p_BKGTS = jax.nn.softmax(s_BKGTS, axis=-1).astype(v_BSKH.dtype)
  o_BTKGH = jnp.einsum("BKGTS,BSKH->BTKGH", p_BKGTS, v_BSKH, preferred_element_type=jnp.float32)
  return o_BTKGH.reshape(B, T, N, H).astype(q_BTNH.dtype)
