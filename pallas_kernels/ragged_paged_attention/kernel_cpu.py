"""Ragged paged attention for CPU: kernel_cpu.cc, a native XLA FFI kernel, built on first use.

XLA:CPU copies every KV block out of the page pool before a dot can read it (it cannot fuse a gather into a dot), so
the plain-XLA path reads the pool three times a step and runs each KV block as dozens of small thunks. The native
kernel reads each page's [C, H] slab of a KV head in place, once per (sequence, KV head, block of 16 query rows), on
XLA's own intra-op thread pool (see the source's header for the algorithm).

Building: the first call compiles the source with the system C++ compiler (`$CXX`, else g++ / c++ / clang++) against
this jaxlib's FFI headers (`jax.ffi.include_dir()`), for this machine's instruction set (`-march=native`), into
`$JAXLLM_KERNEL_CACHE` (default ~/.cache/jaxllm/kernels, or a per-user temporary folder where home is read-only; a few
seconds, once per machine and jaxlib: the file name
holds a hash of the source, the headers' jaxlib version, the compiler and the CPU's flags). Without a compiler, or if
the build fails, `library()` logs why once and returns None, and `implementation=None` on CPU takes the "xla" path.
"""

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shlex
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

log = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).with_name("kernel_cpu.cc")
TARGET = "jaxllm_ragged_paged_attention_cpu"
COMPILE_TIMEOUT_S = 300
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno",
         "-ffp-contract=fast")


def cache_dirs() -> list[pathlib.Path]:
  """Where builds are kept: $JAXLLM_KERNEL_CACHE, else ~/.cache/jaxllm/kernels and, where that cannot be written (a
  read-only home in a container), a per-user folder in the temporary directory."""
  if os.environ.get("JAXLLM_KERNEL_CACHE"):
    return [pathlib.Path(os.environ["JAXLLM_KERNEL_CACHE"])]
  user = os.getuid() if hasattr(os, "getuid") else "user"
  return [pathlib.Path.home() / ".cache" / "jaxllm" / "kernels",
          pathlib.Path(tempfile.gettempdir()) / f"jaxllm-kernels-{user}"]


def _compiler() -> list[str] | None:
  """The C++ compiler's command: $CXX (which may carry arguments, e.g. "ccache g++"), else g++ / c++ / clang++."""
  cxx = shlex.split(os.environ.get("CXX") or "")
  if cxx and shutil.which(cxx[0]):
    return [shutil.which(cxx[0]), *cxx[1:]]
  for name in ("g++", "c++", "clang++"):
    if shutil.which(name):
      return [shutil.which(name)]
  return None


def _cpu_flags() -> str:
  """The CPU's feature flags (what -march=native compiles for), so a cache shared between machines keeps one build
  per instruction set."""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith(("flags", "Features")):
        return line
  except OSError:
    pass
  return platform.processor()


def _digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _build(compiler: list[str]) -> pathlib.Path:
  """The built library's path in the first cache folder that can hold it (built there first unless it is)."""
  source = SOURCE.read_bytes()
  version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, check=True,
                           timeout=COMPILE_TIMEOUT_S).stdout
  key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in (
      source, version, " ".join(compiler), jaxlib.__version__, jax.ffi.include_dir(), " ".join(FLAGS), _cpu_flags(),
      platform.machine()))).hexdigest()[:16]
  errors = []
  for folder in cache_dirs():
    try:
      return _build_into(folder / f"ragged_paged_attention_cpu-{key}.so", compiler)
    except OSError as e:  # the folder cannot be written: the next one
      errors.append(f"{folder}: {e}")
  raise OSError("; ".join(errors))


def _build_into(path: pathlib.Path, compiler: list[str]) -> pathlib.Path:
  """`path`, built first unless a complete build is there: each build is written to its own temporary file, flushed
  to disk, made readable to all (a shared cache), renamed into place and followed by a sidecar holding its sha256,
  which a later process checks before it loads the file (a truncated library would crash the process that maps it)."""
  sidecar = path.with_suffix(".sha256")
  try:
    if sidecar.read_text().strip() == _digest(path):
      return path
  except OSError:
    pass
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=path.parent)  # concurrent builders each write their own file
  os.close(fd)
  try:
    cmd = [*compiler, *FLAGS, "-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    if result.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o755 & ~umask)
    digest = _digest(pathlib.Path(tmp))
    os.replace(tmp, path)
    fd, tmp_sidecar = tempfile.mkstemp(suffix=".sha256.tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
      f.write(digest)
    os.chmod(tmp_sidecar, 0o644 & ~umask)
    os.replace(tmp_sidecar, sidecar)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


@functools.cache
def library() -> ctypes.CDLL | None:
  """The built kernel, registered with XLA as the CPU custom call `TARGET`; None (logged once) where it cannot be
  built here."""
  compiler = _compiler()
  if compiler is None:
    log.warning("no C++ compiler found ($CXX, g++, c++, clang++): ragged paged attention on CPU takes the XLA path.")
    return None
  try:
    lib = ctypes.CDLL(str(_build(compiler)))
    handler = lib.JaxllmRaggedPagedAttentionCpu
  except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
    log.warning("the CPU attention kernel could not be built (%s): ragged paged attention on CPU takes the XLA "
                "path.", e)
    return None
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")
  return lib


def require_library() -> ctypes.CDLL:
  lib = library()
  if lib is None:
    raise ValueError("implementation='cpu' needs the native CPU kernel, which could not be built here (see the "
                     "logged reason); use implementation=None or 'xla'.")
  return lib


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
