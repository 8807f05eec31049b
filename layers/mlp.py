"""Gated feed-forward: down(act(x @ gate) * (x @ up)); act is silu (SwiGLU, Llama) or GELU (GeGLU, Gemma: tanh
approximation for transformers' "gelu_pytorch_tanh", exact erf for "gelu")."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.ops import dense, value, weight

_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nnx.Module):

  def __init__(self, d_model: int, d_ff: int, *, activation: str = "silu", quantization: str | None = None,
               dtype=jnp.float32, rngs: nnx.Rngs):
    D, F = d_model, d_ff
    self.activation = activation
    self.w_gate_DF, self.w_gate_scale = weight(rngs.params(), (D, F), ("embed", "mlp"), dtype, quantization,
                                                 reduce_axes=(0,))
    self.w_up_DF, self.w_up_scale = weight(rngs.params(), (D, F), ("embed", "mlp"), dtype, quantization,
                                             reduce_axes=(0,))
    self.w_down_FD, self.w_down_scale = weight(rngs.params(), (F, D), ("mlp", "embed"), dtype, quantization,
                                                 reduce_axes=(0,))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    gate = dense("BTD,DF->BTF", x_BTD, self.w_gate_DF[...], value(self.w_gate_scale))
    up = dense("BTD,DF->BTF", x_BTD, self.w_up_DF[...], value(self.w_up_scale))
    return dense("BTF,FD->BTD", _ACTIVATIONS[self.activation](gate) * up, self.w_down_FD[...],
                 value(self.w_down_scale))
