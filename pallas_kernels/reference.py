"""Plain-jnp attention: the oracle every attention kernel is tested against.

Causality is expressed by positions, not by array indices: query row (b, t) at position q_pos[b, t] may attend to key
(b, s) iff kv_pos[b, s] <= q_pos[b, t], and, with a sliding window W, q_pos[b, t] - kv_pos[b, s] < W (a row sees
itself and the W - 1 keys before it; transformers' Mistral / Gemma convention). That single rule covers a prompt
attending to itself (kv_pos = q_pos), decode over a contiguous cache (kv_pos = arange(S)), and right-padded batches
(pads sit at later positions, so no real row sees them). GQA is computed without repeating K/V: query heads are grouped
onto their KV head (N = K * G).

Logit soft-capping (Gemma 2): logits = cap * tanh(logits / cap) after the scale, before the mask.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import NO_WINDOW  # a window no position difference reaches: what window=None means in the kernels

_MASKED = -1e30  # finite, so a row can never become NaN through exp(-inf - -inf)


def window_or_none(window):
  """window as an int32 scalar (NO_WINDOW for None). May be traced: a layer scan carries one window per layer."""
  return jnp.asarray(NO_WINDOW if window is None else window, jnp.int32).reshape(())


def check_window(window):
  """Validates a sliding window (None, an int >= 1 or an integer scalar array, possibly traced) and returns it."""
  if window is None:
    return None
  if isinstance(window, bool):
    raise ValueError(f"window must be None or an int >= 1, got {window!r}.")
  if isinstance(window, (int, np.integer)):
    if window < 1:
      raise ValueError(f"window={window} must be >= 1 (a row always sees itself).")
    return int(window)
  if np.ndim(window) != 0 or not jnp.issubdtype(jnp.result_type(window), jnp.integer):
    raise ValueError(f"window must be None, an int or an integer scalar array; got {window!r}.")
  return window


def check_soft_cap(soft_cap):
  """Validates a logit soft-cap (None or a positive finite python float) and returns it as a float."""
  if soft_cap is None:
    return None
  try:
    cap = float(soft_cap)
  except TypeError as e:
    raise ValueError(f"soft_cap must be a static python float, got {soft_cap!r}.") from e
  if not (math.isfinite(cap) and cap > 0):
    raise ValueError(f"soft_cap={soft_cap!r} must be a positive finite float.")
  return cap


def soft_cap_logits(s, soft_cap: float | None):
  """cap * tanh(s / cap) (Gemma 2's attention logit soft-capping); s unchanged when soft_cap is None."""
  return s if soft_cap is None else soft_cap * jnp.tanh(s / soft_cap)


def attention_reference(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    q_pos_BT: jax.Array,
    kv_pos_BS: jax.Array,
    *,
    sm_scale: float,
    window=None,
    soft_cap: float | None = None,
) -> jax.Array:
  """softmax(cap(q k^T * sm_scale) + causal / window mask) v, softmax in float32; returns [B, T, N, H] in q's dtype.

  window: None, or an int (or traced int32 scalar) >= 1: keys more than window - 1 positions back are masked.
  """
  B, T, N, H = q_BTNH.shape
  K = k_BSKH.shape[2]
  G = N // K
  # Fold the query rows of one KV head into Q = G * T rows: [B, K, Q, H] contracts against [B, S, K, H] directly.
  q_BKQH = q_BTNH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
  hi = jax.lax.Precision.HIGHEST  # the oracle: exact float32 products on every backend (a GPU's default is TF32)
  s_BKQS = jnp.einsum("BKQH,BSKH->BKQS", q_BKQH, k_BSKH, precision=hi, preferred_element_type=jnp.float32) * sm_scale
  s_BKQS = soft_cap_logits(s_BKQS, soft_cap)
  behind_BTS = q_pos_BT[:, :, None] - kv_pos_BS[:, None, :]
  visible_BTS = (behind_BTS >= 0) & (behind_BTS < window_or_none(window))
  visible_B1QS = jnp.broadcast_to(visible_BTS[:, None], (B, G, T, visible_BTS.shape[-1])).reshape(B, 1, G * T, -1)
  s_BKQS = jnp.where(visible_B1QS, s_BKQS, _MASKED)
  p_BKQS = jax.nn.softmax(s_BKQS, axis=-1).astype(v_BSKH.dtype)
  o_BKQH = jnp.einsum("BKQS,BSKH->BKQH", p_BKQS, v_BSKH, precision=hi, preferred_element_type=jnp.float32)
  return o_BKQH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H).astype(q_BTNH.dtype)
