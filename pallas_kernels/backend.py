"""Which attention implementation a backend runs by default: the one resolver every kernel dispatch uses."""

import functools
import logging

import jax

log = logging.getLogger(__name__)


def default_implementation() -> str:
  """"tpu" on a TPU backend, "gpu" on a CUDA backend (while this jax still has Pallas' Triton lowering), "xla"
  (plain jnp) anywhere else."""
  impl = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu"}.get(jax.default_backend(), "xla")
  if impl == "gpu" and triton() is None:
    return "xla"
  return impl


@functools.cache
def triton():
  """`jax.experimental.pallas.triton`, or None where this jax has none. The GPU kernels are written for Pallas'
  Triton lowering, which jax 0.11 deprecates; a jax without it keeps the package importable and serves GPUs through
  the "xla" path (logged once), instead of failing at `import jaxllm`."""
  try:
    from jax.experimental.pallas import triton as plgpu
  except ImportError as e:
    log.warning("this jax (%s) has no Pallas Triton lowering (%s): attention on a GPU takes the XLA path.",
                jax.__version__, e)
    return None
  return plgpu


def require_triton():
  """The Triton module, or a ValueError saying why implementation='gpu' cannot run here."""
  plgpu = triton()
  if plgpu is None:
    raise ValueError(f"implementation='gpu' needs Pallas' Triton lowering, which jax {jax.__version__} does not "
                     "have; use implementation=None (the XLA path on a GPU) or a jax that has it (<= 0.11).")
  return plgpu
