"""Ragged paged attention (vLLM-TPU formulation): one call serves a mixed batch of prefill chunks and decodes.

`ragged_paged_attention(...)` is the single dispatch. It validates the arguments, then runs one of
  "xla"  xla.py         plain XLA ops, flash-decoding style: (sequence, query block, KV block) items folded by a
                        loop whose trip count follows the keys actually read; any backend without a kernel,
  "tpu"  kernel_tpu.py  Mosaic kernel: scalar-prefetched metadata, double-buffered page DMAs HBM -> VMEM,
  "gpu"  kernel_gpu.py  Triton kernel: one program per (query unit, KV head), page gathers, online softmax,
  "cpu"  kernel_cpu.py  native XLA FFI kernel (kernel_cpu.cc, built on first use): pages read in place on XLA's
                        thread pool; CPU default where it builds ("xla" where no C++ compiler is found).

Data layout (shape letters: T tokens, N query heads, K KV heads, H head dim, P pages, C page size, S sequence slots,
M max pages per sequence):
  queries  q [T, N, H]: every sequence's new tokens concatenated; rows past cu_q_lens[num_seqs] are bucket padding.
  cache    k_pages, v_pages [P, K, C, H] ("HND" pages: head-major inside a page). A page is one contiguous block, and
           one KV head of it is a contiguous [C, H] slab: the TPU kernel loads a head's keys with plain tile-aligned
           loads (the token-major [P, C, K, H] layout interleaves heads in sublanes, which Mosaic can only pull apart
           with strided loads for 32-bit types and H == 128) and the GPU kernel's page gathers read contiguous
           C * H runs. To write one new token: k_pages.at[page, :, slot].set(k_KH). A quantized cache (int8 or
           float8_e4m3fn pages) carries k_scales, v_scales [P, K, C] float32 beside them, one per token and head.
  metadata kv_lens [S], page_indices [S, M], cu_q_lens [S + 1], num_seqs (scalar), all int32.
Semantics: query row r of sequence i (q_len = cu_q_lens[i+1] - cu_q_lens[i]) sits at position kv_len - q_len + r
and attends to the sequence's cached positions <= its own (the new tokens' K/V are already in the pages) and, with a
sliding window W, > its own - W. Every implementation skips whole KV blocks (and never copies pages) that lie before the
window of all of a query block's rows, so a sliding-window layer reads O(W) keys per row however long the sequence,
and the page-table entries before the window are never dereferenced. Optional logit soft-capping (Gemma 2).

reference.py holds `ragged_paged_attention_reference`, the plain-jnp oracle (cost S * T * L) that all three
implementations are tested against; it is not a serving path.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.pallas_kernels.backend import default_implementation
from jaxllm.pallas_kernels.kv_quant import QUANTIZED_DTYPES, SCALE_DTYPE, is_quantized
from jaxllm.pallas_kernels.ragged_paged_attention import kernel_cpu
from jaxllm.pallas_kernels.ragged_paged_attention.kernel_gpu import ragged_paged_attention_gpu
from jaxllm.pallas_kernels.ragged_paged_attention.kernel_tpu import ragged_paged_attention_tpu
from jaxllm.pallas_kernels.ragged_paged_attention.xla import num_work_items, ragged_paged_attention_xla
from jaxllm.pallas_kernels.reference import check_soft_cap, check_window, window_or_none

IMPLEMENTATIONS = ("xla", "tpu", "gpu", "cpu")
BLOCK_SIZES = {
    "cpu": (),
    "xla": ("block_q", "pages_per_block", "items_per_step"),
    "tpu": ("block_q", "pages_per_block"),
    "gpu": ("block_q", "pages_per_block", "num_warps", "num_stages"),
}
_FLOAT_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))

_xla_jit = jax.jit(ragged_paged_attention_xla,
                   static_argnames=("sm_scale", "soft_cap", "block_q", "pages_per_block", "items_per_step"))
_cpu_jit = jax.jit(kernel_cpu.ragged_paged_attention_cpu, static_argnames=("sm_scale", "soft_cap"))


def ragged_paged_attention(
    q_TNH: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    kv_lens: jax.Array,
    page_indices: jax.Array,
    cu_q_lens: jax.Array,
    num_seqs: jax.Array,
    *,
    k_scales: jax.Array | None = None,
    v_scales: jax.Array | None = None,
    sm_scale: float | None = None,
    window=None,
    soft_cap: float | None = None,
    implementation: str | None = None,
    interpret: bool = False,
    **block_sizes,
) -> jax.Array:
  """Causal GQA attention of a ragged batch of new tokens over a paged KV cache.

  Args:
    q_TNH: [T, N, H] float32 or bfloat16. The new tokens of all sequences, concatenated in sequence order:
      sequence i's rows are cu_q_lens[i]:cu_q_lens[i+1]. T may be a padded bucket; rows past cu_q_lens[num_seqs]
      are ignored and come back as 0.
    k_pages: [P, K, C, H], q's dtype, or int8 / float8_e4m3fn with k_scales (a quantized cache, see
      `jaxllm.pallas_kernels.kv_quant`). Paged keys: P pages of C tokens, K KV heads (N must be a multiple of K; query
      head n reads KV head n // (N // K), K/V are never repeated). Already holds this step's new tokens.
    v_pages: [P, K, C, H], paged values, same layout and dtype as k_pages.
    kv_lens: [S] int32. Context length of each sequence slot INCLUDING this step's new tokens.
    page_indices: [S, M] int32. Page ids of each sequence in order; sequence i reads only entries
      [0, cdiv(kv_lens[i], C)), later entries are never dereferenced (they may hold anything).
    cu_q_lens: [S + 1] int32. Cumulative query lengths, cu_q_lens[0] == 0, non-decreasing up to num_seqs.
    num_seqs: int32 scalar (or [1]) array: slots >= num_seqs are padding and ignored. Decode (q_len = 1) and prefill
      chunks (q_len > 1) may be mixed freely; each needs q_len <= kv_len.
    k_scales, v_scales: [P, K, C] float32 for quantized pages (key c of page p, head h is k_pages[p, h, c] *
      k_scales[p, h, c]; each implementation dequantizes the pages it reads), None for float pages.
    sm_scale: softmax scale; default H ** -0.5.
    window: None (no limit) or the sliding window: an int >= 1, or an int32 scalar array that may be traced (a layer
      scan carries one per layer). A row sees the keys at positions (its own - window, its own]; page-table entries
      wholly before every row's window are never dereferenced.
    soft_cap: None or a positive python float: logits become soft_cap * tanh(logits / soft_cap).
    implementation: None picks "tpu" on a TPU backend, "gpu" on a CUDA backend, "cpu" on CPU (where the native
      kernel builds) and "xla" otherwise; or one of
      IMPLEMENTATIONS.
    interpret: run the Pallas kernel ("tpu" or "gpu") in interpret mode, e.g. on CPU (the TPU kernel uses the TPU
      interpreter, which simulates DMAs/semaphores and raises on out-of-bounds reads).
    **block_sizes: tuning, see BLOCK_SIZES: block_q (query tokens per XLA pair / TPU grid step / GPU program),
      pages_per_block (pages per KV step), items_per_step (XLA: KV items per loop iteration), num_warps /
      num_stages (GPU). Defaults are picked from the shapes (`xla_block_sizes` for "xla").

  Returns:
    [T, N, H] in q's dtype (softmax and accumulation in float32).

  Raises:
    ValueError on mismatched shapes/dtypes, an unknown implementation or block size, and, when the metadata is
    concrete (not traced), on page ids outside [0, P), kv_len beyond M * C, q_len > kv_len, or cu_q_lens not starting
    at 0 / decreasing / past T.
  """
  impl = implementation or _best_implementation(q_TNH, k_pages)
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"ragged_paged_attention implementation={impl!r} is not available; choose one of "
                     f"{IMPLEMENTATIONS}.")
  if interpret and impl in ("xla", "cpu"):
    raise ValueError("interpret=True runs a Pallas kernel interpreted; pass implementation='tpu' or 'gpu'.")
  unknown = sorted(set(block_sizes) - set(BLOCK_SIZES[impl]))
  if unknown:
    raise ValueError(f"block sizes {unknown} are not understood by implementation={impl!r}; it takes "
                     f"{BLOCK_SIZES[impl]}.")
  kv_lens, page_indices, cu_q_lens, num_seqs = _validate(q_TNH, k_pages, v_pages, kv_lens, page_indices, cu_q_lens,
                                                         num_seqs)
  _validate_scales(k_pages, k_scales, v_scales)
  sm_scale = float(q_TNH.shape[-1] ** -0.5 if sm_scale is None else sm_scale)
  window = window_or_none(check_window(window))
  soft_cap = check_soft_cap(soft_cap)
  args = (q_TNH, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs, window, k_scales, v_scales)
  if impl == "xla":
    return _xla_jit(*args, sm_scale=sm_scale, soft_cap=soft_cap,
                    **xla_block_sizes(q_TNH.shape[0], page_indices.shape[0], k_pages.shape[2], **block_sizes))
  if impl == "cpu":
    return _cpu_jit(*args, sm_scale=sm_scale, soft_cap=soft_cap)
  if impl == "tpu":
    _check_tpu_tiling(q_TNH, k_pages, block_sizes)
    return ragged_paged_attention_tpu(*args, sm_scale=sm_scale, soft_cap=soft_cap, interpret=interpret,
                                      **block_sizes)
  _check_gpu_tiling(q_TNH, k_pages, block_sizes)
  return ragged_paged_attention_gpu(*args, sm_scale=sm_scale, soft_cap=soft_cap, interpret=interpret, **block_sizes)


def _concrete(x):
  """x as a numpy array, or None while it is traced (under jit the value checks are skipped)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _validate(q, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs):
  """Shape/dtype checks always; value checks when the metadata is concrete. Returns the metadata as int32."""
  if q.ndim != 3:
    raise ValueError(f"q must be [T, N, H]; got shape {q.shape}.")
  if k_pages.ndim != 4:
    raise ValueError(f"k_pages must be [P, K, page_size, H]; got shape {k_pages.shape}.")
  if v_pages.shape != k_pages.shape:
    raise ValueError(f"v_pages shape {v_pages.shape} must equal k_pages shape {k_pages.shape}.")
  T, N, H = q.shape
  P, K, C, Hk = k_pages.shape
  if k_pages.dtype != v_pages.dtype or not (q.dtype == k_pages.dtype or is_quantized(k_pages.dtype)):
    raise ValueError(f"k_pages and v_pages must share q's dtype, or both be a quantized dtype "
                     f"{[str(d) for d in QUANTIZED_DTYPES]}; got {q.dtype}, {k_pages.dtype}, {v_pages.dtype}.")
  if q.dtype not in _FLOAT_DTYPES:
    raise ValueError(f"dtype {q.dtype} is not supported; use float32 or bfloat16.")
  if Hk != H:
    raise ValueError(f"head dim of q (H={H}) must equal the head dim of k_pages/v_pages (H={Hk}).")
  if N % K:
    raise ValueError(f"query heads (N={N}) must be a multiple of KV heads (K={K}).")
  if min(T, N, H, P, K, C) == 0:
    raise ValueError(f"empty dimension in q {q.shape} or k_pages {k_pages.shape}.")
  if page_indices.ndim != 2 or page_indices.shape[1] == 0:
    raise ValueError(f"page_indices must be [S, max_pages] with max_pages >= 1; got shape {page_indices.shape}.")
  S, M = page_indices.shape
  if kv_lens.shape != (S,):
    raise ValueError(f"kv_lens shape {kv_lens.shape} must be (S,) = ({S},), S = page_indices.shape[0].")
  if cu_q_lens.shape != (S + 1,):
    raise ValueError(f"cu_q_lens shape {cu_q_lens.shape} must be (S + 1,) = ({S + 1},), S = page_indices.shape[0].")
  if np.size(num_seqs) != 1 or np.ndim(num_seqs) > 1:
    raise ValueError(f"num_seqs must be a scalar (or shape (1,)) array; got shape {np.shape(num_seqs)}.")
  for name, x in (("kv_lens", kv_lens), ("page_indices", page_indices), ("cu_q_lens", cu_q_lens),
                  ("num_seqs", num_seqs)):
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
      raise ValueError(f"{name} must be an integer (int32) array; got dtype {jnp.result_type(x)}.")

  values = [_concrete(x) for x in (kv_lens, page_indices, cu_q_lens, num_seqs)]
  if all(v is not None for v in values):
    kv_np, pages_np, cu_np, ns_np = values
    ns = int(ns_np.reshape(()))
    if not 0 <= ns <= S:
      raise ValueError(f"num_seqs={ns} must be in [0, S={S}].")
    if cu_np[0] != 0:
      raise ValueError(f"cu_q_lens must start at 0; got cu_q_lens[0]={cu_np[0]}.")
    q_lens = np.diff(cu_np[:ns + 1].astype(np.int64))
    if (q_lens < 0).any():
      i = int(np.argmax(q_lens < 0))
      raise ValueError(f"cu_q_lens must be non-decreasing; cu_q_lens[{i}]={cu_np[i]} > cu_q_lens[{i + 1}]="
                       f"{cu_np[i + 1]}.")
    if cu_np[ns] > T:
      raise ValueError(f"cu_q_lens[num_seqs]={cu_np[ns]} query rows do not fit in q's T={T}.")
    for i in range(ns):
      kv_len, q_len = int(kv_np[i]), int(q_lens[i])
      if not 0 <= kv_len <= M * C:
        raise ValueError(f"kv_lens[{i}]={kv_len} must be in [0, max_pages * page_size = {M} * {C} = {M * C}].")
      if q_len > kv_len:
        raise ValueError(f"sequence {i}: q_len={q_len} > kv_len={kv_len} (kv_len counts the new tokens too).")
      used = pages_np[i, :-(-kv_len // C)]
      bad = (used < 0) | (used >= P)
      if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"page_indices[{i}, {j}]={used[j]} is outside [0, P={P}) (sequence {i} uses its first "
                         f"{len(used)} entries).")
  as_i32 = lambda x: jnp.asarray(x, jnp.int32)
  return as_i32(kv_lens), as_i32(page_indices), as_i32(cu_q_lens), jnp.reshape(as_i32(num_seqs), ())


def _validate_scales(k_pages, k_scales, v_scales):
  if not is_quantized(k_pages.dtype):
    if k_scales is not None or v_scales is not None:
      raise ValueError(f"k_scales / v_scales go with quantized pages; k_pages are {k_pages.dtype}.")
    return
  want = k_pages.shape[:3]
  for name, s in (("k_scales", k_scales), ("v_scales", v_scales)):
    if s is None:
      raise ValueError(f"{k_pages.dtype} pages need {name} [P, K, C] = {list(want)} float32.")
    if s.shape != want or s.dtype != SCALE_DTYPE:
      raise ValueError(f"{name} must be [P, K, C] = {list(want)} {SCALE_DTYPE}; got {list(s.shape)} {s.dtype}.")


def xla_block_sizes(T: int, S: int, C: int, **given) -> dict[str, int]:
  """Block sizes for "xla": the caller's, else
    block_q         1 when T <= S (a decode-shaped bucket: one row per pair, nothing wasted), else T // 8 clipped to
                    [8, 64] (a prefill chunk's keys are gathered once per block_q rows);
    pages_per_block enough pages for 64 keys: a decode row at context L reads cdiv(L, 64) items;
    items_per_step  the number of pairs W (at least 8): about one KV block per pair per iteration."""
  sizes = {"block_q": given.get("block_q", 1 if T <= S else min(max(T // 8, 8), 64))}
  sizes["pages_per_block"] = given.get("pages_per_block", max(1, 64 // C))
  for name in ("block_q", "pages_per_block", "items_per_step"):
    if name == "items_per_step":
      sizes[name] = given.get(name, max(8, num_work_items(T, S, sizes["block_q"])))
    if not _positive_int(sizes[name]):
      raise ValueError(f"implementation='xla' needs {name}={sizes[name]!r} to be a positive int.")
  return {name: int(x) for name, x in sizes.items()}


def _positive_int(x) -> bool:
  return not isinstance(x, bool) and isinstance(x, (int, np.integer)) and x > 0


def _check_tpu_tiling(q, k_pages, block_sizes):
  align = 8 if q.dtype.itemsize == 4 else 16  # sublanes per tile
  C = k_pages.shape[2]
  page_align = 32 // k_pages.dtype.itemsize  # a page's [C, H] slab: 8 sublanes of 32-bit, 16 of 16-bit, 32 of 8-bit
  if C % page_align:
    raise ValueError(f"implementation='tpu' needs page_size (C={C}) to be a multiple of {page_align} for "
                     f"{k_pages.dtype} pages.")
  block_q = block_sizes.get("block_q")
  if block_q is not None and (block_q <= 0 or block_q % align):
    raise ValueError(f"implementation='tpu' needs block_q={block_q} to be a positive multiple of {align} for "
                     f"{q.dtype}.")
  ppb = block_sizes.get("pages_per_block")
  if ppb is not None and ppb <= 0:
    raise ValueError(f"pages_per_block={ppb} must be positive.")


def _best_implementation(q, k_pages) -> str:
  """The backend's kernel, except on a GPU where Triton's power-of-two blocks cannot hold this head dim or page size
  (e.g. Phi-3's head_dim 96): there the XLA path, which takes any shape."""
  impl = default_implementation()
  if impl == "gpu" and _gpu_shape_error(q.shape[2], k_pages.shape[2]):
    return "xla"
  if impl == "xla" and jax.default_backend() == "cpu" and kernel_cpu.library() is not None:
    return "cpu"
  return impl


def _gpu_shape_error(H: int, C: int) -> str | None:
  if not (_pow2(C) and _pow2(H) and H >= 16):
    return (f"implementation='gpu' needs page_size (C={C}) and head dim (H={H} >= 16) to be powers of two (Triton "
            "block shapes); implementation=None picks the XLA path for such shapes.")
  return None


def _pow2(x: int) -> bool:
  return x > 0 and x & (x - 1) == 0


def _check_gpu_tiling(q, k_pages, block_sizes):
  pow2 = _pow2
  H, C = q.shape[2], k_pages.shape[2]
  if error := _gpu_shape_error(H, C):
    raise ValueError(error)
  for name in ("block_q", "pages_per_block"):
    x = block_sizes.get(name)
    if x is not None and not pow2(x):
      raise ValueError(f"implementation='gpu' needs {name}={x} to be a power of two.")
  block_q = block_sizes.get("block_q")
  group_pad = 1 << (q.shape[1] // k_pages.shape[1] - 1).bit_length()
  if block_q is not None and block_q * group_pad < 16:
    raise ValueError(f"implementation='gpu' needs block_q * next_pow2(N // K) = {block_q} * {group_pad} >= 16 "
                     "(tl.dot minimum).")
  ppb = block_sizes.get("pages_per_block")
  if ppb is not None and ppb * C < 16:
    raise ValueError(f"implementation='gpu' needs pages_per_block * page_size = {ppb * C} >= 16 (tl.dot minimum).")
