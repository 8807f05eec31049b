"""RMSNorm: x / rms(x) * weight, computed in float32 and cast back to the activation dtype (as HF Llama does).

plus_one (Gemma): x / rms(x) * (1 + weight), all in float32 and cast once at the end (as HF Gemma does); the
checkpoint's weight is stored as is, so bfloat16 runs round as transformers does."""

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, *, eps: float, dtype=jnp.float32, axis: str = "embed", plus_one: bool = False):
    self.eps = eps
    self.plus_one = plus_one
    self.weight = nnx.Param(jnp.zeros((dim,), dtype) if plus_one else jnp.ones((dim,), dtype), out_sharding=(axis,))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.plus_one:
      return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
    return self.weight[...] * normed.astype(x.dtype)
