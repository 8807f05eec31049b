"""Native CPU kernels: C++ sources built on first use into shared libraries that XLA calls as FFI custom calls.

XLA:CPU runs what it cannot fuse as separate thunks over materialized buffers: a gather feeding a dot (paged
attention's KV blocks) or a slice of a stacked weight feeding a GEMM (the layer scan's weights) is copied out first.
The kernels built here read those operands where they lie: `ragged_paged_attention/kernel_cpu.cc` (KV pages) and
`matmul_cpu.cc` (a layer's slice of the stacked weights).

Building: the first `load` of a source compiles it with the system C++ compiler (`$CXX`, else g++ / c++ / clang++)
against this jaxlib's FFI headers (`jax.ffi.include_dir()`), for this machine's instruction set (`-march=native`),
into `$JAXLLM_KERNEL_CACHE` (default ~/.cache/jaxllm/kernels, or a per-user temporary folder where home is read-only;
a few seconds, once per machine and jaxlib: the file name holds a hash of the source, the headers' jaxlib version, the
compiler and the CPU's flags). Without a compiler, or if the build fails, `load` logs why once and returns None, and
the callers take their XLA path.
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
import jaxlib

log = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 300
HEADERS = pathlib.Path(__file__).parent  # native_cpu.h, shared by the kernels: hashed with each source
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


def compiler() -> list[str] | None:
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


def digest(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def build(source: pathlib.Path, name: str, cxx: list[str]) -> pathlib.Path:
  """The built library of `source` (named `name`-<key>.so) in the first cache folder that can hold it, built there
  first unless it is."""
  version = subprocess.run([*cxx, "--version"], capture_output=True, text=True, check=True,
                           timeout=COMPILE_TIMEOUT_S).stdout
  key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in (
      source.read_bytes(), *(h.read_bytes() for h in sorted(HEADERS.glob("*.h"))),
      version, " ".join(cxx), jaxlib.__version__, jax.ffi.include_dir(), " ".join(FLAGS),
      _cpu_flags(), platform.machine()))).hexdigest()[:16]
  errors = []
  for folder in cache_dirs():
    try:
      return _build_into(folder / f"{name}-{key}.so", source, cxx)
    except OSError as e:  # the folder cannot be written: the next one
      errors.append(f"{folder}: {e}")
  raise OSError("; ".join(errors))


def _build_into(path: pathlib.Path, source: pathlib.Path, cxx: list[str]) -> pathlib.Path:
  """`path`, built first unless a complete build is there: each build is written to its own temporary file, flushed
  to disk, made readable to all (a shared cache), renamed into place and followed by a sidecar holding its sha256,
  which a later process checks before it loads the file (a truncated library would crash the process that maps it)."""
  sidecar = path.with_suffix(".sha256")
  try:
    if sidecar.read_text().strip() == digest(path):
      return path
  except OSError:
    pass
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=path.parent)  # concurrent builders each write their own file
  os.close(fd)
  try:
    cmd = [*cxx, *FLAGS, "-I", str(HEADERS), "-I", jax.ffi.include_dir(), str(source), "-o", tmp]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
    if result.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-4000:]}")
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o755 & ~umask)
    sha = digest(pathlib.Path(tmp))
    os.replace(tmp, path)
    fd, tmp_sidecar = tempfile.mkstemp(suffix=".sha256.tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
      f.write(sha)
    os.chmod(tmp_sidecar, 0o644 & ~umask)
    os.replace(tmp_sidecar, sidecar)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return path


@functools.cache
def load(source: pathlib.Path, name: str, targets: tuple[tuple[str, str], ...], what: str) -> ctypes.CDLL | None:
  """The library built from `source`, each (custom-call target, handler symbol) of `targets` registered with XLA on
  CPU; None (logged once, naming `what` takes the XLA path) where it cannot be built here."""
  cxx = compiler()
  if cxx is None:
    log.warning("no C++ compiler found ($CXX, g++, c++, clang++): %s on CPU takes the XLA path.", what)
    return None
  try:
    lib = ctypes.CDLL(str(build(source, name, cxx)))
    handlers = [(target, getattr(lib, symbol)) for target, symbol in targets]
  except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
    log.warning("the native CPU kernel for %s could not be built (%s): it takes the XLA path.", what, e)
    return None
  for target, handler in handlers:
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
  return lib


def require(lib: ctypes.CDLL | None, who: str, instead: str) -> ctypes.CDLL:
  """`lib`, or a ValueError saying that `who` needs the native kernel, which `load` could not build (its logged
  reason), and what to use `instead`."""
  if lib is None:
    raise ValueError(f"{who} needs the native CPU kernel, which could not be built here (see the logged reason); "
                     f"{instead}.")
  return lib
