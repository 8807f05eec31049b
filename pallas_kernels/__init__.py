"""Attention kernels, each behind one dispatch that picks the TPU kernel, the GPU kernel or the jnp reference.

  flash_attention(q_BTNH, k_BSKH, v_BSKH, lengths_B)                 prefill: a prompt attending to itself
  ragged_paged_attention(q_TNH, k_pages, v_pages, kv_lens, page_indices, cu_q_lens, num_seqs)
                                                                      decode and mixed prefill chunks over paged KV
  attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS)             causal-by-position reference (the tests' oracle)

The model names an implementation with one string, `AttentionImpl`: None (best for the backend), "xla", "cpu" (the
native CPU kernel of ragged paged attention; flash attention has none and runs "xla" for it), "tpu", "gpu",
or "tpu-interpret" / "gpu-interpret" to run the Pallas kernels interpreted on CPU (tests).
"""

import jax

from jaxllm.pallas_kernels.flash_attention import flash_attention
from jaxllm.pallas_kernels.ragged_paged_attention import ragged_paged_attention
from jaxllm.pallas_kernels.reference import attention_reference

__all__ = ["attention", "flash_attention", "ragged_paged_attention", "attention_reference", "split_impl"]

IMPLS = (None, "xla", "cpu", "tpu", "gpu", "tpu-interpret", "gpu-interpret")


def split_impl(impl: str | None) -> tuple[str | None, bool]:
  """"gpu-interpret" -> ("gpu", True); validates the name."""
  if impl not in IMPLS:
    raise ValueError(f"attention implementation={impl!r} is not available; choose one of {IMPLS}.")
  if impl is not None and impl.endswith("-interpret"):
    return impl[:-len("-interpret")], True
  return impl, False


def attention(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, *, sm_scale: float, window=None, soft_cap=None):
  """Causal GQA attention by positions: key s is visible to query t iff kv_pos[s] <= q_pos[t] (and, with a sliding
  window, q_pos[t] - kv_pos[s] < window; soft_cap: Gemma 2's logit soft-capping).

  Args:
    q_BTNH: queries [B, T, N, H], float32 or bfloat16.
    k_BSKH, v_BSKH: keys/values [B, S, K, H], same dtype; N must be a multiple of K.
    q_pos_BT: int32 [B, T] absolute position of each query row.
    kv_pos_BS: int32 [B, S] (or [1, S]) absolute position of each key.
    sm_scale: softmax scale, usually H ** -0.5.
  Returns:
    [B, T, N, H] in q's dtype.
  """
  if q_BTNH.shape[2] % k_BSKH.shape[2]:
    raise ValueError(f"query heads ({q_BTNH.shape[2]}) must be a multiple of KV heads ({k_BSKH.shape[2]}).")
  kv_pos_BS = jax.numpy.broadcast_to(kv_pos_BS, k_BSKH.shape[:2])
  return attention_reference(q_BTNH, k_BSKH, v_BSKH, q_pos_BT, kv_pos_BS, sm_scale=sm_scale, window=window,
                             soft_cap=soft_cap)
