"""Shared numerics: every weight matmul accumulates in float32 and returns the activation dtype.

TPU/GPU matrix units do that for a plain bfloat16 dot; on CPU `dense` asks for it explicitly (a float32 result, then
rounded), since XLA:CPU's own bfloat16 dot rounds differently, so CPU runs of a bfloat16 model see the accelerators'
numerics. On an accelerator the dot stays plain (`_dot`), quantized weights' too: asking XLA:GPU for a float32 result
made it upcast both operands of a one-row GEMM to float32, and with the layer loop unrolled it hoisted that convert
over the whole stacked weights, a float32 copy of every weight per step (measured on an H200 for bfloat16 weights,
benchmarks/RESULTS.md; int8 weights showed the same float32 copy of the int8 stack).

Weight-only quantization keeps a matrix as int8 values q beside float scales (symmetric: w ~= q * scale, q in
[-127, 127], scale = max |w| / 127 over what it covers), in one of two layouts (`quantization=`):
  "int8"  a scale per output channel (over all the contraction axes): the scale array has the output axes only, e.g.
          wq [D, N, H] -> scale [N, H]. `dense` feeds q to the dot converted to the activation dtype and multiplies the
          f32 accumulator by the scales of its output channels (exact algebra: the scale does not vary along the
          contracted axes).
  "q8_0"  a scale per block of 32 consecutive entries of the innermost contraction axis, stored as float16 (llama.cpp's
          Q8_0: 8.5 bits per weight): the scale array has the weight's rank with that axis divided by 32, e.g.
          wq [D, N, H] -> [D / 32, N, H], wo [N, H, D] -> [N, H / 32, D]. `dense` dequantizes q * scale in float32
          into the dot's operand. A GGUF Q8_0 tensor loads bit-exactly: requantizing its dequantized blocks gives back
          its own values and float16 scales (`quantize_blocks`' rounding is llama.cpp's).
A scale array's rank says its layout; both keep their contraction axes' logical names, so they shard with the weight.

A decoder layer's weights and scales are `DenseWeight`s: read only through `dense`. In the CPU layer scan (`Llama`)
they reach it as `LayerSlice`s of the stacked [L, ...] arrays, which the native CPU matmul
(`jaxllm.pallas_kernels.matmul_cpu`) reads in place; anything it does not take is sliced out and runs as below.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.pallas_kernels import matmul_cpu

QUANTIZATIONS = (None, "int8", "q8_0")
BLOCK = 32  # q8_0: entries of the innermost contraction axis per scale
_init = nnx.initializers.normal(0.02)


class DenseWeight(nnx.Param):
  """A decoder layer's weight matrix or its scales: read only by `dense` (so the layer scan may hand it over as a
  `LayerSlice`)."""


class LayerSlice:
  """Layer `index` of a stacked [L, ...] array, not sliced out: `dense` gives the native CPU matmul the whole stack
  and the index (it reads w + index * K * N in place); `slice()` is the plain XLA slice for everything else.
  `param[...]` returns it unchanged."""

  def __init__(self, stack: jax.Array, index: jax.Array):
    self.stack, self.index = stack, index
    self.shape, self.dtype, self.ndim = stack.shape[1:], stack.dtype, stack.ndim - 1

  def __getitem__(self, key):
    if key is not Ellipsis:
      raise TypeError(f"a LayerSlice is read whole ([...]), not at {key!r}")
    return self

  def slice(self) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(self.stack, self.index, keepdims=False)


def dense(spec: str, x: jax.Array, w, scale=None) -> jax.Array:
  """einsum(spec, x, w) accumulated in f32, returned in x's dtype. A quantized w (int8) comes with its scales: per
  output channel (fewer dims than w, broadcast over the trailing output dims of the result) or per block (w's rank).
  w and scale may be `LayerSlice`s (the CPU layer scan): the native matmul reads them in place where it can."""
  if isinstance(w, LayerSlice):
    y = _dense_in_place(spec, x, w, scale)
    if y is not None:
      return y
    w, scale = w.slice(), None if scale is None else scale.slice()
  if scale is None:
    return _dot(spec, x, w).astype(x.dtype)
  if scale.ndim == w.ndim:
    return _dot(spec, x, dequantize_blocks(w, scale, x.dtype)).astype(x.dtype)
  y = _dot(spec, x, w.astype(x.dtype)).astype(jnp.float32)
  return (y * scale.astype(jnp.float32)).astype(x.dtype)


def _dense_in_place(spec: str, x: jax.Array, w: LayerSlice, scale: LayerSlice | None) -> jax.Array | None:
  """`dense` through the native CPU matmul on the stacked weights, or None where it does not apply: a spec that is
  not x's trailing axes contracted with w's leading ones in order, an activation dtype other than float32 / bfloat16,
  or Q8_0 blocks under bfloat16 activations (the XLA path rounds their dequantized values to bfloat16)."""
  operands, out = spec.split("->")
  xs, ws = operands.split(",")
  c = len([a for a in xs if a in ws])
  if not c or xs[len(xs) - c:] != ws[:c] or out != xs[:len(xs) - c] + ws[c:]:
    return None
  blocks = scale is not None and scale.ndim == w.ndim
  if x.dtype not in (jnp.float32, jnp.bfloat16) or (blocks and x.dtype != jnp.float32):
    return None
  if jnp.dtype(w.dtype) not in matmul_cpu.WEIGHT_DTYPES or matmul_cpu.library() is None:
    return None
  L = w.stack.shape[0]
  K, N = int(np.prod(w.shape[:c])), int(np.prod(w.shape[c:]))
  if scale is None:
    scales = None
  elif blocks:
    if scale.dtype != jnp.float16:
      return None
    scales = scale.stack.reshape(L, K // BLOCK, N)
  else:
    scales = scale.stack.reshape(L, N).astype(jnp.float32)
  y = matmul_cpu.matmul(x.reshape(-1, K).astype(jnp.float32), w.stack.reshape(L, K, N), w.index, scales)
  return y.reshape(*x.shape[:len(xs) - c], *w.shape[c:]).astype(x.dtype)


def _dot(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
  """einsum(spec, x, w) as one `lax.dot_general` whose contracted axes are listed in x's order, with float32
  accumulation: asked for explicitly on CPU (a float32 result), the matrix units' own on an accelerator (a plain dot,
  in the operands' dtype; see the module's docstring). `jnp.einsum` orders the contracted axes its own way ("BTNH,NHD"
  as (H, N)), and XLA:CPU then transposes the whole [N, H, D] weight before every dot. The specs are the layers' own:
  no batch axes, output = x's free axes then w's, in order."""
  operands, out = spec.split("->")
  xs, ws = operands.split(",")
  contracted = [a for a in xs if a in ws]
  if [a for a in xs + ws if a not in contracted] != list(out):
    raise ValueError(f"dense: {spec!r} must name x's free axes, then w's, as its output (no batch axes).")
  dims = ((tuple(xs.index(a) for a in contracted), tuple(ws.index(a) for a in contracted)), ((), ()))
  f32 = jnp.float32 if jax.default_backend() == "cpu" else None
  return jax.lax.dot_general(x, w, dims, preferred_element_type=f32)


def _block_axis(w_shape, scale_shape) -> int:
  (axis,) = [i for i, (a, b) in enumerate(zip(w_shape, scale_shape)) if a != b]
  return axis


def quantize_blocks(w, axis: int):
  """(q int8, scale float16) with a scale per BLOCK consecutive entries along `axis` (numpy in, numpy out; jax
  likewise): scale = max |w| / 127 rounded to float16, q = round(w / that scale) in [-127, 127] (an all-zero block
  gets scale 0). Requantizing dequantized Q8_0 blocks gives back their values and scales exactly."""
  xp = np if isinstance(w, np.ndarray) else jnp
  n = w.shape[axis]
  if n % BLOCK:
    raise ValueError(f"q8_0 quantizes blocks of {BLOCK} along a contraction axis of size {n}, not a multiple of "
                     f"{BLOCK}; use quantization='int8'.")
  blocks = w.astype(xp.float32).reshape(*w.shape[:axis], n // BLOCK, BLOCK, *w.shape[axis + 1:])
  scale = (xp.max(xp.abs(blocks), axis=axis + 1, keepdims=True) / 127.0).astype(xp.float16)
  s32 = scale.astype(xp.float32)
  q = xp.clip(xp.round(blocks / xp.where(s32 > 0, s32, 1.0)), -127, 127).astype(xp.int8)
  return q.reshape(w.shape), xp.squeeze(scale, axis=axis + 1)


def dequantize_blocks(q, scale, dtype):
  """q [..., n, ...] int8 * scale [..., n / BLOCK, ...] (each scale over its block of the axis where the shapes
  differ), in float32, returned in dtype."""
  axis = _block_axis(q.shape, scale.shape)
  blocks = q.astype(jnp.float32).reshape(*q.shape[:axis], scale.shape[axis], -1, *q.shape[axis + 1:])
  return (blocks * jnp.expand_dims(scale.astype(jnp.float32), axis + 1)).reshape(q.shape).astype(dtype)


def quantize_int8(w, reduce_axes: tuple[int, ...]):
  """(q int8, scale) of a float array, scale over the axes not in `reduce_axes` (numpy in, numpy out; jax likewise).
  An all-zero channel gets scale 1 (q = 0)."""
  xp = np if isinstance(w, np.ndarray) else jnp
  w32 = w.astype(xp.float32)
  amax = xp.max(xp.abs(w32), axis=reduce_axes, keepdims=True)
  scale = xp.where(amax > 0, amax / 127.0, 1.0)
  q = xp.clip(xp.round(w32 / scale), -127, 127).astype(xp.int8)
  return q, xp.squeeze(scale, axis=reduce_axes)


def check_quantization(quantization):
  if quantization not in QUANTIZATIONS:
    raise ValueError(f"quantization={quantization!r} is not supported; choose one of {QUANTIZATIONS}.")
  return quantization


def quantize(w, quantization: str, reduce_axes: tuple[int, ...], dtype):
  """(q, scale) of a float weight in the layout `quantization` names; reduce_axes: its contraction axes (the
  innermost one holds q8_0's blocks). Per-channel scales are kept in the model's `dtype`."""
  if quantization == "q8_0":
    return quantize_blocks(w, max(reduce_axes))
  q, scale = quantize_int8(w, reduce_axes)
  return q, scale.astype(dtype)


def weight(key, shape: tuple[int, ...], axes: tuple[str, ...], dtype, quantization, *, reduce_axes: tuple[int, ...],
           param=DenseWeight):
  """A weight Param (random init) and its scale Param (None unless quantized), with the logical axes the layout
  gives it: a per-channel scale has the dims not in `reduce_axes` (the contraction dims), a block scale all of w's.
  `param`: the Param type (a `DenseWeight` unless something besides `dense` reads it, as the embedding)."""
  w = _init(key, shape, dtype)
  if quantization is None:
    return param(w, out_sharding=axes), None
  q, scale = quantize(w, quantization, reduce_axes, dtype)
  scale_axes = axes if quantization == "q8_0" else tuple(a for i, a in enumerate(axes) if i not in reduce_axes)
  return param(q, out_sharding=axes), param(scale, out_sharding=scale_axes)


def value(p):
  """A Param's array, or None for an absent (None) one."""
  return None if p is None else p[...]
