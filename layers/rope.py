"""Rotary position embedding, in the *split-halves* layout HF's Llama uses.

A head vector h of width H is rotated pairwise as (h[i], h[i + H/2]) for i < H/2 — not the interleaved
(h[2i], h[2i+1]) pairs of Meta's original code and of GGUF files. Checkpoint readers convert interleaved
weights to this layout (see `jaxllm.checkpoint.gguf`); nothing else in the model knows about layouts.

Frequencies come from `jaxllm.config.ModelConfig.layer_inv_freq` (one row per layer, carried through the layer scan:
Gemma 3's local layers have their own base), which applies Llama-3 (or linear) scaling.
Angles and sin/cos are computed in float32; the rotation is applied in float32 and cast back.
"""

import jax
import jax.numpy as jnp
import numpy as np


def apply_rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq: np.ndarray | jax.Array) -> jax.Array:
  """Rotates x [B, T, N, H] by angle positions[b, t] * inv_freq, pairing dim i with i + H/2."""
  angles_BTh = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
  cos = jnp.cos(angles_BTh)[:, :, None, :]
  sin = jnp.sin(angles_BTh)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)
