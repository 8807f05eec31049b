"""Gated feed-forward: down(act(x @ gate) * (x @ up)); act is silu (SwiGLU, Llama) or GELU (GeGLU, Gemma: tanh
approximation for transformers' "gelu_pytorch_tanh", exact erf for "gelu")."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxllm.layers.ops import dense

_init = nnx.initializers.normal(0.02)
_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nnx.Module):

  def __init__(self, d_model: int, d_ff: int, *, activation: str = "silu", dtype=jnp.float32, rngs: nnx.Rngs):
    self.activation = activation
    self.w_gate_DF = nnx.Param(_init(rngs.params(), (d_model, d_ff), dtype), out_sharding=("embed", "mlp"))
    self.w_up_DF = nnx.Param(_init(rngs.params(), (d_model, d_ff), dtype), out_sharding=("embed", "mlp"))
    self.w_down_FD = nnx.Param(_init(rngs.params(), (d_ff, d_model), dtype), out_sharding=("mlp", "embed"))

  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    gate = dense("BTD,DF->BTF", x_BTD, self.w_gate_DF[...])
    up = dense("BTD,DF->BTF", x_BTD, self.w_up_DF[...])
    return dense("BTF,FD->BTD", _ACTIVATIONS[self.activation](gate) * up, self.w_down_FD[...])
