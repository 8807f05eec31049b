"""Attention kernels behind one dispatch per op.

`attention(...)` is the single function the model calls. Today it runs the plain-jnp reference (XLA) on every backend;
the Pallas flash-attention and ragged-paged-attention kernels plug in behind the same signature, picked by backend and
by the `implementation=` override.
"""

import jax

from jaxllm.pallas_kernels.reference import attention_reference

IMPLEMENTATIONS = ("xla",)


def attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, *, sm_scale: float, implementation: str | None = None):
  """Causal GQA attention by positions.

  Args:
    q_BTNH: queries [B, T, N, H], float32 or bfloat16.
    k_BSKH, v_BSKH: keys/values [B, S, K, H], same dtype; N must be a multiple of K.
    q_pos_BT: int32 [B, T] absolute position of each query row.
    kv_pos_BS: int32 [B, S] (or [1, S]) absolute position of each key; key s is visible to query t iff
      kv_pos[s] <= q_pos[t].
    sm_scale: softmax scale, usually H ** -0.5.
    implementation: None (best for the backend) or one of IMPLEMENTATIONS.
  Returns:
    [B, T, N, H] in q's dtype.
  """
  impl = implementation or "xla"
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention implementation={impl!r} is not available; choose one of {IMPLEMENTATIONS}.")
  if q_BTNH.shape[2] % k_BSKH.shape[2]:
    raise ValueError(f"query heads ({q_BTNH.shape[2]}) must be a multiple of KV heads ({k_BSKH.shape[2]}).")
  kv_pos_BS = jax.numpy.broadcast_to(kv_pos_BS, k_BSKH.shape[:2])
  return attention_reference(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, sm_scale=sm_scale)
