"""Weight matmul for CPU: matmul_cpu.cc, a native XLA FFI kernel that reads a layer's slice of the stacked weights in
place, built on first use (see `jaxllm.pallas_kernels.native`).

    y_MN = matmul(x_MK, w_LKN, layer, scales)     # x [M, K] @ w[layer] [K, N], float32 out
    y_MV = matmul_transposed(x_MD, e_VD)          # x [M, D] @ e.T: the tied LM head over the embedding table

In the model's layer scan XLA:CPU copies each layer's slice of a stacked [L, ...] weight out before its GEMM (a
dynamic slice feeding a dot is materialized): a decode step wrote a copy of all its weights and then read it. With
the layer index as an operand the kernel reads the weights once, where they lie, and at a decode step's few rows
its register tiles run near the machine's peak (see the source's header). `jaxllm.layers.ops.dense` calls it for a
`LayerSlice` on CPU, and `Llama.logits` for the LM head (`matmul_transposed` where it is the embedding table).

Weights: float32 / bfloat16, or int8 with float scales per output column ([L, N]) or float16 scales per block of 32
rows of K ([L, K / 32, N], Q8_0). x float32; the sums are float32.
"""

import ctypes
import pathlib

import jax
import jax.numpy as jnp

from jaxllm.pallas_kernels import native

SOURCE = pathlib.Path(__file__).with_name("matmul_cpu.cc")
TARGET = "jaxllm_matmul_cpu"
TRANSPOSED_TARGET = "jaxllm_matmul_transposed_cpu"
WEIGHT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.int8))
Q8_BLOCK = 32


def library() -> ctypes.CDLL | None:
  """The built kernel, registered with XLA as the CPU custom call `TARGET`; None (logged once) where it cannot be
  built here."""
  return native.load(SOURCE, "matmul_cpu", ((TARGET, "JaxllmMatmulCpu"),
                                            (TRANSPOSED_TARGET, "JaxllmMatmulTransposedCpu")), "the weight matmuls")


def matmul(x_MK: jax.Array, w_LKN: jax.Array, layer, scales: jax.Array | None = None) -> jax.Array:
  """x [M, K] float32 @ w[layer] ([L, K, N]) as float32 [M, N]. int8 weights take `scales`: float32 [L, N] per
  output column (applied to the sums) or float16 [L, K / 32, N] per block of 32 rows (applied to each weight)."""
  M, K = x_MK.shape
  L, K_w, N = w_LKN.shape
  if K_w != K or x_MK.dtype != jnp.float32 or jnp.dtype(w_LKN.dtype) not in WEIGHT_DTYPES:
    raise ValueError(f"matmul (cpu): x float32 [M, K] and w [L, K, N] in {WEIGHT_DTYPES}; got x {x_MK.dtype}"
                     f"{list(x_MK.shape)}, w {w_LKN.dtype}{list(w_LKN.shape)}.")
  if (scales is None) != (w_LKN.dtype != jnp.int8):
    raise ValueError("matmul (cpu): int8 weights take scales, float weights none.")
  if scales is None:
    kind, scales = 0, jnp.zeros((1,), jnp.float32)
  elif scales.shape == (L, N) and scales.dtype == jnp.float32:
    kind = 1
  elif scales.shape == (L, K // Q8_BLOCK, N) and K % Q8_BLOCK == 0 and scales.dtype == jnp.float16:
    kind = 2
  else:
    raise ValueError(f"matmul (cpu): scales must be float32 [L, N] or float16 [L, K / {Q8_BLOCK}, N]; got "
                     f"{scales.dtype}{list(scales.shape)}.")
  _require()
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((M, N), jnp.float32))
  return call(x_MK, w_LKN, scales, jnp.reshape(layer, ()).astype(jnp.int32), scale_kind=kind)


def matmul_transposed(x_MD: jax.Array, e_VD: jax.Array) -> jax.Array:
  """x [M, D] float32 @ e.T (e [V, D] float32 / bfloat16, read row by row in place) as float32 [M, V]."""
  (M, D), (V, D_e) = x_MD.shape, e_VD.shape
  if D_e != D or x_MD.dtype != jnp.float32 or e_VD.dtype not in (jnp.float32, jnp.bfloat16):
    raise ValueError(f"matmul_transposed (cpu): x float32 [M, D] and e float32 / bfloat16 [V, D]; got x "
                     f"{x_MD.dtype}{list(x_MD.shape)}, e {e_VD.dtype}{list(e_VD.shape)}.")
  _require()
  return jax.ffi.ffi_call(TRANSPOSED_TARGET, jax.ShapeDtypeStruct((M, V), jnp.float32))(x_MD, e_VD)


def _require():
  native.require(library(), "matmul (cpu)", "with native_matmul=None, Llama falls back to XLA's dots")
