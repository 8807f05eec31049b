"""On a CUDA backend the GPU kernels run compiled (Triton) against the same references and tolerances as the
interpreted runs on CPU: `JAX_PLATFORMS=cuda pytest tests/pallas_kernels tests/test_paged_model.py -k gpu`."""

import jax
import pytest

from jaxllm.pallas_kernels import native

# The native CPU kernel is built with the machine's C++ compiler: where none is found (the XLA path serves instead,
# which its own tests cover) its cases are skipped; where one is found and the build fails, they fail.
needs_cpu_kernel = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler to build the CPU kernel")
CPU = pytest.param("cpu", marks=needs_cpu_kernel)


def interpret(impl: str) -> bool:
  """Whether the Pallas kernel `impl` ("tpu" / "gpu") runs interpreted here: always, except "gpu" on a GPU; "xla" and
  the native "cpu" kernel never are."""
  return impl in ("tpu", "gpu") and not (impl == "gpu" and jax.default_backend() == "gpu")
