"""RMSNorm: x / rms(x) * weight, computed in float32 and cast back to the activation dtype (as HF Llama does)."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, axis: str = "embed"):
    self.eps = eps
    self.weight = nnx.Param(jnp.ones((dim,), dtype), out_sharding=(axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * normed.astype(x.dtype)
