"""Which attention implementation a backend runs by default: the one resolver every kernel dispatch uses."""

import jax


def default_implementation() -> str:
  """"tpu" on a TPU backend, "gpu" on a CUDA backend, "xla" (plain jnp) anywhere else."""
  return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu"}.get(jax.default_backend(), "xla")
