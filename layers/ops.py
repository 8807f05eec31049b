"""Shared numerics: every weight matmul accumulates in float32 and returns the activation dtype.

This states on every backend what TPU/GPU matrix units do anyway (bf16 inputs, f32 accumulation), so CPU runs of a
bfloat16 model see the same numerics as accelerator runs.
"""

import jax
import jax.numpy as jnp


def dense(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)
