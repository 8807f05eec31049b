"""The native CPU weight matmul (`jaxllm.pallas_kernels.matmul_cpu`): against float64 numpy for every weight type and
the shapes that reach each of its code paths, a row's result independent of the batch (bitwise), and the model's
layer scan over it equal to the XLA path (stacked weights sliced out)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxllm.config import ModelConfig
from jaxllm.layers import Llama
from jaxllm.layers.ops import quantize_blocks, quantize_int8
from jaxllm.pallas_kernels import matmul_cpu
from tests.pallas_kernels import needs_cpu_kernel

pytestmark = needs_cpu_kernel
L = 3

# (M, K, N): M <= 8 takes 128-column items (3-row x 128-column tiles, then 32 / 16 / single columns), more rows
# 32-column items in 12-row tiles; K past 256 is summed in blocks; M past 240 splits into row blocks.
SHAPES = [(1, 576, 192), (2, 64, 300), (3, 96, 16), (8, 288, 145), (9, 64, 7), (12, 32, 48), (32, 576, 1536),
          (37, 320, 50), (300, 128, 40), (5, 32, 1)]
WEIGHTS = ["float32", "bfloat16", "int8", "q8_0"]
# Q8_0 of weights ~1e-5: float16 scales of ~2e-7, below float16's normal range (subnormals, converted exactly)
TINY = "q8_0-subnormal-scales"
_matmul = jax.jit(matmul_cpu.matmul)
_transposed = jax.jit(matmul_cpu.matmul_transposed)


def make_weights(rng, kind, K, N):
  """(w [L, K, N], scales or None, the float64 weights it stands for [L, K, N])."""
  w = rng.standard_normal((L, K, N)).astype(np.float32) * (1e-5 if kind == TINY else 1.0)
  if kind == "float32":
    return jnp.asarray(w), None, w.astype(np.float64)
  if kind == "bfloat16":
    wb = jnp.asarray(w, jnp.bfloat16)
    return wb, None, np.asarray(wb.astype(jnp.float32), np.float64)
  if kind == "int8":
    q, s = quantize_int8(w, (1,))
    return jnp.asarray(q), jnp.asarray(s, jnp.float32), q.astype(np.float64) * s[:, None, :]
  q, s = quantize_blocks(w, 1)  # Q8_0: float16 scales per 32 rows of K, each weight q * scale in float32
  if kind == TINY:
    assert 0 < np.abs(s).min() and np.abs(s).max() < 6.1e-5  # every scale subnormal
  values = q.astype(np.float32).reshape(L, K // 32, 32, N) * s.astype(np.float32)[:, :, None, :]
  return jnp.asarray(q), jnp.asarray(s), values.reshape(L, K, N).astype(np.float64)


@pytest.mark.parametrize("kind", WEIGHTS + [TINY])
@pytest.mark.parametrize("M,K,N", SHAPES)
def test_matmul_matches_float64(rng, kind, M, K, N):
  if kind.startswith("q8_0") and K % 32:
    pytest.skip("Q8_0 blocks need K % 32 == 0")
  x = rng.standard_normal((M, K)).astype(np.float32)
  w, scales, exact = make_weights(rng, kind, K, N)
  for layer in range(L):
    y = np.asarray(_matmul(jnp.asarray(x), w, jnp.int32(layer), scales))
    ref = x.astype(np.float64) @ exact[layer]
    bound = np.abs(x).astype(np.float64) @ np.abs(exact[layer])  # float32 sums: error <~ K eps sum |x w|
    np.testing.assert_array_less(np.abs(y - ref), 1e-6 * K ** 0.5 * bound + 1e-30, err_msg=f"layer {layer}")


@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("K,N", [(320, 200), (17, 15), (255, 15), (96, 150)])
def test_a_rows_result_does_not_depend_on_the_batch(rng, kind, K, N):
  """Bitwise: a row alone (128-column tiles), among 5 (the same items) and among 40 (32-column items, 12-row tiles,
  at another place in its tile; int8 weights converted to float32 once for all row tiles), single-column tails
  (N % 16) and last K blocks of any length included."""
  if kind == "q8_0" and K % 32:
    pytest.skip("Q8_0 blocks need K % 32 == 0")
  w, scales, _ = make_weights(rng, kind, K, N)
  x = jnp.asarray(rng.standard_normal((40, K)).astype(np.float32))
  full = np.asarray(_matmul(x, w, jnp.int32(1), scales))
  for rows in ([0], [3], [39], [2, 7, 11, 30, 39], list(range(13))):
    part = np.asarray(_matmul(x[np.array(rows)], w, jnp.int32(1), scales))
    np.testing.assert_array_equal(part, full[rows])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("M,D,V", [(1, 576, 1000), (4, 64, 6), (7, 40, 97), (32, 576, 4099), (70, 16, 200),
                                   (130, 24, 13)])
def test_matmul_transposed_matches_float64(rng, dtype, M, D, V):
  """The tied LM head: x @ e.T over tiles of 1-4 rows x 1-6 table rows, D's tail past its last 16, row blocks."""
  x = rng.standard_normal((M, D)).astype(np.float32)
  e = jnp.asarray(rng.standard_normal((V, D)), dtype)
  exact = np.asarray(e.astype(jnp.float32), np.float64)
  y = np.asarray(_transposed(jnp.asarray(x), e))
  bound = np.abs(x).astype(np.float64) @ np.abs(exact).T
  np.testing.assert_array_less(np.abs(y - x.astype(np.float64) @ exact.T), 1e-6 * D ** 0.5 * bound + 1e-30)


def test_matmul_transposed_rows_do_not_depend_on_the_batch(rng):
  x = jnp.asarray(rng.standard_normal((70, 40)).astype(np.float32))
  e = jnp.asarray(rng.standard_normal((301, 40)).astype(np.float32))
  full = np.asarray(_transposed(x, e))
  for rows in ([0], [69], [5, 6, 7, 64, 69]):
    np.testing.assert_array_equal(np.asarray(_transposed(x[np.array(rows)], e)), full[rows])


def test_matmul_refuses_what_it_cannot_read(rng):
  x = jnp.ones((4, 64), jnp.float32)
  w = jnp.ones((L, 64, 32), jnp.float32)
  with pytest.raises(ValueError, match="x float32"):
    matmul_cpu.matmul(x.astype(jnp.bfloat16), w, 0)
  with pytest.raises(ValueError, match="x float32"):
    matmul_cpu.matmul(x, w[:, :32], 0)
  with pytest.raises(ValueError, match="int8 weights take scales"):
    matmul_cpu.matmul(x, w.astype(jnp.int8), 0)
  with pytest.raises(ValueError, match="scales must be"):
    matmul_cpu.matmul(x, w.astype(jnp.int8), 0, jnp.ones((L, 31), jnp.float32))
  with pytest.raises(ValueError, match="e float32"):
    matmul_cpu.matmul_transposed(x, jnp.ones((10, 32), jnp.float32))
  with pytest.raises(Exception, match="layer index out of range"):  # the custom call's own check
    jax.block_until_ready(_matmul(x, w, jnp.int32(L), None))


def _config(**changes):
  return dataclasses.replace(ModelConfig.from_preset("tiny-gqa"), head_dim=32, **changes)  # q8_0: H % 32 == 0


def _native_calls(fn, *args) -> tuple[int, int]:
  """(matmul, matmul_transposed) custom calls in fn's program (the layer scan's body counted once)."""
  text = str(jax.make_jaxpr(fn)(*args))
  return text.count("target_name=jaxllm_matmul_cpu"), text.count("target_name=jaxllm_matmul_transposed_cpu")


@pytest.mark.parametrize("quantization,tied", [(None, False), (None, True), ("int8", True), ("q8_0", False)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_layer_scan_reads_weights_in_place_and_equals_the_xla_path(rng, quantization, tied, dtype):
  """The model's full forward and LM head (tied: the embedding table; untied: lm_head) on the native matmuls, the
  stacked weights read in place (the CPU default), against the same model on XLA's dots, each layer's weights sliced
  out: float32 within float32 rounding; bfloat16 activations round each product's output to bfloat16 on both sides.
  q8_0 under bfloat16 activations keeps the XLA path for the layers (which rounds the dequantized weights to
  bfloat16)."""
  model = Llama(_config(qkv_bias=True, tie_embeddings=tied), dtype=dtype, quantization=quantization,
                rngs=nnx.Rngs(5))
  tokens = jnp.asarray(rng.integers(0, 512, (2, 11)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))

  def forward(flag):
    model.native_matmul = flag
    fn = lambda t, p: model.logits(model(t, p)[0])  # noqa: E731
    return np.asarray(jax.jit(fn)(tokens, positions), np.float32), _native_calls(fn, tokens, positions)

  (native, calls), (xla, none) = forward(None), forward(False)
  layers = dtype == jnp.float32 or quantization != "q8_0"
  assert calls == (7 * layers + (not tied), int(tied)) and none == (0, 0)
  if dtype == jnp.float32:
    np.testing.assert_allclose(native, xla, atol=2e-5, rtol=1e-5)
  else:
    assert np.mean(np.abs(native - xla)) < 0.02 * np.mean(np.abs(xla))
