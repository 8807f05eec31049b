"""Prefill flash attention: one dispatch over a Mosaic (TPU) kernel, a Triton (GPU) kernel and the jnp reference.

  flash_attention(q_BTNH, k_BSKH, v_BSKH, lengths_B) -> o_BTNH

Data flow: validate shapes / dtypes / options -> pick the implementation (backend or `implementation=`) -> "xla" calls
reference.flash_attention_reference directly; "tpu" / "gpu" clip lengths to [0, S], pad T up to a multiple of block_q
and S up to a multiple of block_kv with zeros (the GPU path also pads H to a power of two >= 16), run kernel_tpu /
kernel_gpu, and slice the output back to [B, T, N, H]. Padded keys sit at s >= S >= length, so they are masked like
any other key past the length; padded query rows are sliced off.

Files:
  reference.py   the definition (plain jnp, f32), also the "xla" implementation.
  kernel_tpu.py  Mosaic kernel: grid (B, K, q blocks, kv blocks), VMEM m / l / acc scratch, blocks past the diagonal or
                 the length neither computed nor fetched.
  kernel_gpu.py  Triton kernel: grid (q blocks, B * N), fori_loop over the kv blocks up to the diagonal / length.
"""

import math

import jax
import jax.numpy as jnp

from jaxllm.pallas_kernels.backend import default_implementation
from jaxllm.pallas_kernels.flash_attention.kernel_gpu import flash_attention_gpu
from jaxllm.pallas_kernels.flash_attention.kernel_tpu import flash_attention_tpu
from jaxllm.pallas_kernels.flash_attention.reference import flash_attention_reference
from jaxllm.pallas_kernels.reference import check_soft_cap, check_window, window_or_none

__all__ = ["IMPLEMENTATIONS", "default_block_sizes", "flash_attention", "flash_attention_reference"]

IMPLEMENTATIONS = ("tpu", "gpu", "xla")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def _next_pow2(x: int) -> int:
  return 1 << max(x - 1, 0).bit_length()


def _pad_axes(x_BLXH: jax.Array, L: int, H: int) -> jax.Array:
  """Zero-pads axis 1 up to L and axis 3 up to H (no copy when nothing to pad)."""
  if x_BLXH.shape[1] == L and x_BLXH.shape[3] == H:
    return x_BLXH
  return jnp.pad(x_BLXH, ((0, 0), (0, L - x_BLXH.shape[1]), (0, 0), (0, H - x_BLXH.shape[3])))


def default_block_sizes(implementation: str, T: int, S: int, G: int) -> tuple[int, int]:
  """(block_q, block_kv) used when the caller passes None; never larger than the (rounded-up) sequence.

  TPU: block_q 256 (128 when G > 4, since G heads share the VMEM of one step), block_kv 512; rounded to multiples of 16
  (rows) and 128 (keys: the lane dimension of the logits). GPU: 64 x 64, the Triton-friendly size for H up to 256 with
  f32 or bf16; powers of two >= 16.
  """
  if implementation == "tpu":
    return min(256 if G <= 4 else 128, _round_up(T, 16)), min(512, _round_up(S, 128))
  if implementation == "gpu":
    return min(64, max(16, _next_pow2(T))), min(64, max(16, _next_pow2(S)))
  raise ValueError(f"block sizes are defined for implementation 'tpu' or 'gpu', got {implementation!r}.")


def _check_block(name: str, value: int, implementation: str) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if implementation == "tpu" and value % 8:
    raise ValueError(f"{name}={value} must be a multiple of 8 for the TPU kernel (128 or more for speed).")
  if implementation == "gpu" and (value < 16 or value & (value - 1)):
    raise ValueError(f"{name}={value} must be a power of two >= 16 for the GPU (Triton) kernel.")


def _pick_implementation(implementation: str | None) -> str:
  if implementation is None:
    return default_implementation()
  if implementation == "cpu":  # the native CPU kernel is ragged paged attention's; a prompt's own attention is XLA's
    return "xla"
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"unknown flash_attention implementation={implementation!r}; choose one of {IMPLEMENTATIONS} or None."
    )
  return implementation


def flash_attention(
  q_BTNH: jax.Array,
  k_BSKH: jax.Array,
  v_BSKH: jax.Array,
  lengths_B: jax.Array | None = None,
  *,
  sm_scale: float | None = None,
  causal: bool = True,
  implementation: str | None = None,
  interpret: bool = False,
  block_q: int | None = None,
  block_kv: int | None = None,
  window=None,
  soft_cap: float | None = None,
) -> jax.Array:
  """Prefill (prompt) attention with GQA, per-row lengths and causal masking; softmax and accumulation in float32.

  Query row t of batch row b attends to key s iff s < lengths_B[b] and (s <= t when causal) and (t - s < window when a
  sliding window is given). The kernels skip key blocks wholly outside every row's window. Rows t >= lengths_B[b]
  are padding: their output is zeros, and nothing stored in k / v at s >= lengths_B[b] (NaN included) can reach a real
  row. Query head n uses KV head n // (N // K), HF's repeat_kv order; K / V are never repeated in memory.

  Args:
    q_BTNH: queries [B, T, N, H], float32 or bfloat16.
    k_BSKH: keys [B, S, K, H], q's dtype; N % K == 0. causal requires S == T (a prompt attending to itself);
      causal=False allows S >= T.
    v_BSKH: values [B, S, K, H], same shape and dtype as k_BSKH.
    lengths_B: integer [B], real tokens per batch row (right padding); values are clipped to [0, S]. None: all S.
    sm_scale: python float multiplying the logits; None means H ** -0.5.
    causal: python bool; mask keys s > t.
    implementation: None picks "tpu" on the TPU backend, "gpu" on the GPU (CUDA) backend, "xla" elsewhere; or one of
      "tpu" (Mosaic Pallas kernel), "gpu" (Triton Pallas kernel), "xla" (the jnp reference).
    interpret: run the chosen Pallas kernel in interpret mode on CPU (the "tpu" kernel under
      pltpu.force_tpu_interpret_mode()); ignored for "xla".
    block_q: query rows per kernel step; None picks default_block_sizes(). TPU: a multiple of 8; GPU: a power of
      two >= 16.
    block_kv: keys per kernel step; None picks default_block_sizes(). Same constraints as block_q.
    window: None (no limit), or the sliding window: an int >= 1 or a traced int32 scalar (a layer scan carries one
      per layer, e.g. Gemma's local / global layers); needs causal.
    soft_cap: None, or a positive python float: logits become soft_cap * tanh(logits / soft_cap) (Gemma 2).
  Returns:
    o_BTNH: [B, T, N, H] in q's dtype.
  Raises:
    ValueError: bad ranks / shapes / dtypes, N % K != 0, causal with S != T, S < T, lengths of the wrong shape or
      dtype, an unknown implementation, or block sizes the chosen kernel cannot use.
  """
  for name, x in (("q_BTNH", q_BTNH), ("k_BSKH", k_BSKH), ("v_BSKH", v_BSKH)):
    if getattr(x, "ndim", None) != 4:
      raise ValueError(f"{name} must be a rank-4 array, got shape {getattr(x, 'shape', type(x))}.")
  B, T, N, H = q_BTNH.shape
  S, K = k_BSKH.shape[1], k_BSKH.shape[2]
  if k_BSKH.shape != v_BSKH.shape:
    raise ValueError(f"k_BSKH and v_BSKH must have the same shape, got {k_BSKH.shape} and {v_BSKH.shape}.")
  if k_BSKH.shape[0] != B or k_BSKH.shape[3] != H:
    raise ValueError(
      f"k/v [B, S, K, H] = {k_BSKH.shape} must match q [B, T, N, H] = {q_BTNH.shape} in B and H."
    )
  if min(B, T, N, H, S, K) == 0:
    raise ValueError(f"empty dimension: q shape {q_BTNH.shape}, k/v shape {k_BSKH.shape}.")
  if N % K:
    raise ValueError(f"query heads N={N} must be a multiple of KV heads K={K}.")
  dtypes = (q_BTNH.dtype, k_BSKH.dtype, v_BSKH.dtype)
  if len(set(dtypes)) != 1:
    raise ValueError(f"q, k, v must share one dtype, got {dtypes[0]}, {dtypes[1]}, {dtypes[2]}.")
  if q_BTNH.dtype not in _DTYPES:
    raise ValueError(f"dtype {q_BTNH.dtype} is not supported; use float32 or bfloat16.")
  if causal and S != T:
    raise ValueError(f"causal attention needs S == T (a prompt attending to itself), got T={T}, S={S}.")
  if S < T:
    raise ValueError(f"need S >= T, got T={T}, S={S}.")
  if lengths_B is not None:
    if getattr(lengths_B, "shape", None) != (B,):
      raise ValueError(f"lengths_B must have shape ({B},), got {getattr(lengths_B, 'shape', type(lengths_B))}.")
    if not jnp.issubdtype(lengths_B.dtype, jnp.integer):
      raise ValueError(f"lengths_B must be an integer array, got dtype {lengths_B.dtype}.")
  if sm_scale is None:
    sm_scale = H**-0.5
  try:
    sm_scale = float(sm_scale)
  except TypeError as e:  # a traced value: the scale is baked into the kernel
    raise ValueError(f"sm_scale must be a static python float, got {sm_scale!r}.") from e
  if not math.isfinite(sm_scale):
    raise ValueError(f"sm_scale must be finite, got {sm_scale!r}.")

  if window is not None and not causal:
    raise ValueError("a sliding window needs causal=True.")
  window = check_window(window)
  soft_cap = check_soft_cap(soft_cap)

  impl = _pick_implementation(implementation)
  if impl == "xla":
    return flash_attention_reference(q_BTNH, k_BSKH, v_BSKH, lengths_B, sm_scale=sm_scale, causal=causal,
                                     window=window, soft_cap=soft_cap)

  default_q, default_kv = default_block_sizes(impl, T, S, N // K)
  block_q = default_q if block_q is None else block_q
  block_kv = default_kv if block_kv is None else block_kv
  _check_block("block_q", block_q, impl)
  _check_block("block_kv", block_kv, impl)

  if lengths_B is None:
    lengths_B = jnp.full((B,), S, jnp.int32)
  lengths_B = jnp.clip(lengths_B, 0, S).astype(jnp.int32)
  T_pad, S_pad = _round_up(T, block_q), _round_up(S, block_kv)
  H_pad = max(16, _next_pow2(H)) if impl == "gpu" else H  # Triton: power-of-two tiles, dot K >= 16
  q_BTNH = _pad_axes(q_BTNH, T_pad, H_pad)
  k_BSKH = _pad_axes(k_BSKH, S_pad, H_pad)
  v_BSKH = _pad_axes(v_BSKH, S_pad, H_pad)

  kernel = flash_attention_tpu if impl == "tpu" else flash_attention_gpu
  o_BTNH = kernel(
    q_BTNH, k_BSKH, v_BSKH, lengths_B, sm_scale=float(sm_scale), causal=bool(causal), block_q=block_q,
    block_kv=block_kv, interpret=interpret, window=window_or_none(window), soft_cap=soft_cap,
  )
  return o_BTNH[:, :T, :, :H]
