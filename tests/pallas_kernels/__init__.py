"""On a CUDA backend the GPU kernels run compiled (Triton) against the same references and tolerances as the
interpreted runs on CPU: `JAX_PLATFORMS=cuda pytest tests/pallas_kernels tests/test_paged_model.py -k gpu`."""

import jax


def interpret(impl: str) -> bool:
  """Whether the Pallas kernel `impl` ("tpu" / "gpu") runs interpreted here: always, except "gpu" on a GPU; "xla" and
  the native "cpu" kernel never are."""
  return impl in ("tpu", "gpu") and not (impl == "gpu" and jax.default_backend() == "gpu")
