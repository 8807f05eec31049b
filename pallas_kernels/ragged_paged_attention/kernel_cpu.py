"""Ragged paged attention for CPU: kernel_cpu.cc, a native XLA FFI kernel, built on first use.

XLA:CPU copies every KV block out of the page pool before a dot can read it (it cannot fuse a gather into a dot), so
the plain-XLA path reads the pool three times a step and runs each KV block as dozens of small thunks. The native
kernel reads each page's [C, H] slab of a KV head in place, once per (sequence, KV head, block of 16 query rows), on
XLA's own intra-op thread pool (see the source's header for the algorithm).

Building: the first call compiles the source with the system C++ compiler into a per-user cache (a few seconds,
once per machine and jaxlib; see `jaxllm.pallas_kernels.native`). Without a compiler, or if the build fails,
`library()` logs why once and returns None, and `implementation=None` on CPU takes the "xla" path.
"""

import ctypes
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.pallas_kernels import native

SOURCE = pathlib.Path(__file__).with_name("kernel_cpu.cc")
TARGET = "jaxllm_ragged_paged_attention_cpu"


def library() -> ctypes.CDLL | None:
  """The built kernel, registered with XLA as the CPU custom call `TARGET`; None (logged once) where it cannot be
  built here."""
  return native.load(SOURCE, "ragged_paged_attention_cpu", ((TARGET, "JaxllmRaggedPagedAttentionCpu"),),
                     "ragged paged attention")


def require_library() -> ctypes.CDLL:
  return native.require(library(), "implementation='cpu'", "use implementation=None or 'xla'")


def ragged_paged_attention_cpu(q_TNH, k_PKCH, v_PKCH, kv_lens_S, page_indices_SM, cu_q_lens_S1, num_seqs, window,
                               k_scales_PKC=None, v_scales_PKC=None, *, sm_scale: float, soft_cap: float | None):
  """Arguments as `ragged_paged_attention_xla` (validated by the dispatch); returns [T, N, H] in q's dtype."""
  require_library()
  if k_scales_PKC is None:  # float pages: the custom call's scale operands are unused one-element arrays
    k_scales_PKC = v_scales_PKC = jnp.zeros((1,), jnp.float32)
  call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q_TNH.shape, q_TNH.dtype))
  return call(q_TNH, k_PKCH, v_PKCH, k_scales_PKC, v_scales_PKC, kv_lens_S, page_indices_SM, cu_q_lens_S1,
              jnp.reshape(num_seqs, ()).astype(jnp.int32), jnp.reshape(window, ()).astype(jnp.int32),
              sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0))
