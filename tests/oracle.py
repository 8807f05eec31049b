"""The tests' independent generation oracle: batched prefill + chunked decode over a contiguous KV cache.

The library generates only through the paged engine (`jaxllm.serving`); engine tests compare it against this separate
code path, typically with each prompt generated alone (`max_batch_size=1`). Here the cache is contiguous, k/v
[L, B, S, K, H] with the token at position p of row b at [:, b, p] (`KVCache`, plugged into `Llama.__call__` as a
`LayerCache`), and decode attends with the position-causal reference `jaxllm.pallas_kernels.attention`, not ragged
paged attention. The oracle is itself checked: its logits against transformers in test_hf_parity; in test_generate,
cached decode == full forward, and padding or batch company change nothing.

    gen = Generator(model)
    gen.logits(tokens_BT)                                      -> float32 [B, T, V], full forward
    gen.score(rows)                                            -> per row: logprob of each next token, was it the argmax
    gen.generate(prompts, max_new, sampling, stop_fn, max_len) -> per row: new token ids, their logprobs

The jit programs behind them:

    forward_logits(params, tokens_BT, positions_BT)            -> float32 logits [B, T, V]
    prefill(params, tokens_BT, lengths_B, cache, sampling)     -> first token per row, its logprob, cache
    decode(params, cache, tokens_B, positions_B, sampling, n)  -> n more tokens per row (lax.scan), cache
    score(params, tokens_BT)                                   -> logprob of each next token, whether it is the argmax

Prompts are right-padded to a length bucket; pads sit at later positions than every real token, so they never reach a
real row's attention (see `jaxllm.pallas_kernels.reference`). Shapes are bucketed (batch to a power of two, prompt and
cache lengths to multiples of 64/128) so a test compiles a handful of programs. The cache is donated: decode updates
it in place. The host loop dispatches chunk i+1 before it reads chunk i's tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxllm import pallas_kernels
from jaxllm.config import ModelConfig
from jaxllm.layers.llama import Llama
from jaxllm.sampling import SamplingArrays, sample
from jaxllm.sharding.distributed import host_value


@struct.dataclass
class KVCache:
  """Contiguous KV cache. k, v: [L, B, S, K, H] in the model dtype; rides through the layer scan as carry."""

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, config: ModelConfig, batch: int, length: int, dtype) -> "KVCache":
    shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  def view(self, k, v, layer, attention_impl, sharding=None):
    del attention_impl, sharding  # the oracle's attention is the position-causal reference, partitioned by XLA
    return StackedCacheView(k, v, layer)


class StackedCacheView:
  """One layer's view of a KVCache inside the layer scan: writes the new K/V rows, attends over the layer's cache.

  The token at position p of row b is stored at [layer, b, p]; keys are visible by position (kv_pos <= q_pos), so
  slots not yet written (after the row's current position) are never read into a real row's output.
  """

  def __init__(self, k_LBSKH, v_LBSKH, layer):
    self.k, self.v, self.layer = k_LBSKH, v_LBSKH, layer

  def attend(self, q_BTNH, k_BTKH, v_BTKH, positions_BT, sm_scale, window, soft_cap):
    B, S = self.k.shape[1:3]
    rows_B1 = jnp.arange(B)[:, None]
    self.k = self.k.at[self.layer, rows_B1, positions_BT].set(k_BTKH, mode="drop")
    self.v = self.v.at[self.layer, rows_B1, positions_BT].set(v_BTKH, mode="drop")
    kv_pos_1S = jnp.arange(S, dtype=positions_BT.dtype)[None]
    return pallas_kernels.attention(q_BTNH, self.k[self.layer], self.v[self.layer], positions_BT, kv_pos_1S,
                                    sm_scale=sm_scale, window=window, soft_cap=soft_cap)


def bucket(n: int, multiple: int, cap: int | None = None) -> int:
  """Rounds n up to a multiple (or, below `multiple`, to a power of two >= 8), capped at `cap`."""
  out = max(8, 1 << (n - 1).bit_length()) if n < multiple else -(-n // multiple) * multiple
  return min(out, cap) if cap else out


def batch_bucket(n: int) -> int:
  return 1 << (n - 1).bit_length()


class Generator:
  """Holds the model's graph and params and the compiled prefill/decode/score programs.

  The jit programs are closures built per Generator (not methods jitted with a static `self`), so dropping the
  Generator frees its params and compiled programs.
  """

  def __init__(self, model: Llama, max_batch_size: int | None = None, mesh=None):
    self.config = model.config
    self.mesh = mesh
    self.dtype = model.dtype
    self.max_batch_size = max_batch_size
    self.activation_sharding = model.activation_sharding
    graphdef, self.params = nnx.split(model)

    def prefill(params, tokens_BT, lengths_B, cache, sampling: SamplingArrays):
      model = nnx.merge(graphdef, params)
      B, T = tokens_BT.shape
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      h_BTD, cache = model(tokens_BT, positions_BT, cache)
      last_B1D = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)
      tokens_B, logprobs_B = sample(model.logits(last_B1D)[:, 0], sampling, lengths_B)
      return tokens_B, logprobs_B, cache

    def decode(params, cache, tokens_B, positions_B, sampling: SamplingArrays, n_steps: int):
      model = nnx.merge(graphdef, params)

      def step(carry, _):
        cache, tokens_B, positions_B = carry
        h_B1D, cache = model(tokens_B[:, None], positions_B[:, None], cache)
        next_B, logprob_B = sample(model.logits(h_B1D)[:, 0], sampling, positions_B + 1)
        return (cache, next_B, positions_B + 1), (next_B, logprob_B)

      (cache, _, _), (tokens_NB, logprobs_NB) = jax.lax.scan(step, (cache, tokens_B, positions_B), None,
                                                             length=n_steps)
      return cache, tokens_NB.T, logprobs_NB.T

    def score(params, tokens_BT):
      model = nnx.merge(graphdef, params)
      B, T = tokens_BT.shape
      positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
      h_BTD, _ = model(tokens_BT, positions_BT)
      logprobs_BTV = jax.nn.log_softmax(model.logits(h_BTD[:, :-1]), axis=-1)
      target_BT = tokens_BT[:, 1:]
      chosen = jnp.take_along_axis(logprobs_BTV, target_BT[..., None], axis=-1)[..., 0]
      return chosen, jnp.argmax(logprobs_BTV, axis=-1) == target_BT

    def forward_logits(params, tokens_BT, positions_BT):
      model = nnx.merge(graphdef, params)
      return model.logits(model(tokens_BT, positions_BT)[0])

    self._prefill = jax.jit(prefill, donate_argnums=3)
    self._decode = jax.jit(decode, static_argnums=5, donate_argnums=1)
    self._score = jax.jit(score)
    self._forward_logits = jax.jit(forward_logits)

  def _place(self, tree):
    """With a mesh that has a `data` axis, split every array's leading (batch) axis over it (data-parallel)."""
    if self.mesh is None or "data" not in self.mesh.shape:
      return tree
    from jax.sharding import NamedSharding, PartitionSpec

    d = self.mesh.shape["data"]

    def put(x):
      if getattr(x, "ndim", 0) < 1 or x.shape[0] % d:
        return x
      return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec("data")))

    return jax.tree.map(put, tree)

  def _new_cache(self, B: int, S: int) -> KVCache:
    """Zeros [L, B, S, K, H], created on the devices that hold them: batch over `data`, KV heads over the head axis."""
    shape = (self.config.num_layers, B, S, self.config.num_kv_heads, self.config.head_dim)
    if self.activation_sharding is None:
      return KVCache.zeros(self.config, B, S, self.dtype)
    sharding = self.activation_sharding.named(("layers", "batch", "length", "kv_heads", "head_dim"), shape)
    zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)
    return KVCache(k=zeros(), v=zeros())

  def _batch(self, n: int) -> int:
    B = batch_bucket(n)
    return min(B, max(n, self.max_batch_size)) if self.max_batch_size else B

  # ------------------------------------------------------------------ host API
  def logits(self, tokens_BT: np.ndarray) -> np.ndarray:
    """Full-forward float32 logits [B, T, V] for (unpadded, equal-length) token rows."""
    tokens_BT = np.asarray(tokens_BT, np.int32)
    positions_BT = np.broadcast_to(np.arange(tokens_BT.shape[1], dtype=np.int32), tokens_BT.shape)
    return host_value(self._forward_logits(self.params, *self._place((tokens_BT, positions_BT))))

  def score(self, rows: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For each token row, logprob of tokens[1:] given their prefixes and whether each was the argmax."""
    T = bucket(max(len(r) for r in rows), 64, None)
    tokens = np.zeros((self._batch(len(rows)), T), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
    chosen, greedy = map(host_value, self._score(self.params, self._place(tokens)))
    return ([chosen[i, :len(r) - 1] for i, r in enumerate(rows)], [greedy[i, :len(r) - 1] for i, r in enumerate(rows)])

  def generate(self, prompts: list[list[int]], max_new: list[int], sampling: SamplingArrays, stop_fn,
               max_len: int, chunk: int = 8):
    """Generates for every prompt until `stop_fn(row, new_token_ids) -> bool` says it is done or `max_new[row]` is hit.

    `stop_fn` is called on the host for every new token with all tokens generated so far for that row (the generator
    applies no EOS rule itself). Each prompt must satisfy len(prompt) + max_new <= max_len. Returns (token ids,
    logprobs) per row.
    """
    n = len(prompts)
    too_long = [i for i, (p, m) in enumerate(zip(prompts, max_new)) if len(p) + m > max_len or m < 1]
    if too_long:
      raise ValueError(f"rows {too_long}: need 1 <= max_new and len(prompt) + max_new <= max_len ({max_len}).")
    B = self._batch(n)
    T = bucket(max(len(p) for p in prompts), 64, max_len)
    # Every row's last token fits: len + max_new <= S. Rows past their budget may run on; their writes are dropped.
    S = bucket(max(len(p) + m for p, m in zip(prompts, max_new)), 128, max_len)
    tokens = np.zeros((B, T), np.int32)
    lengths = np.ones((B,), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      lengths[i] = len(p)
    pad = B - n
    sampling = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], pad, axis=0)]) if pad else a, sampling)
    cache = self._new_cache(B, S)
    tokens, lengths, sampling = self._place((tokens, lengths, sampling))
    first, first_lp, cache = self._prefill(self.params, tokens, lengths, cache, sampling)

    out_tokens = [[] for _ in range(n)]
    out_lps = [[] for _ in range(n)]
    active = [True] * n

    def absorb(tok_BN, lp_BN):
      for i in range(n):
        if not active[i]:
          continue
        for t, lp in zip(tok_BN[i], lp_BN[i]):
          out_tokens[i].append(int(t))
          out_lps[i].append(float(lp))
          if stop_fn(i, out_tokens[i]) or len(out_tokens[i]) >= max_new[i]:
            active[i] = False
            break

    positions = lengths.copy()  # position of the token fed next = prompt length + tokens generated so far - 1
    pending = (first[:, None], first_lp[:, None])
    last = first
    while True:
      # Steps still wanted by rows not known to be finished (`pending` is not read yet, so it counts as generated).
      need = max((max_new[i] - int(positions[i] - lengths[i] + 1) for i in range(n) if active[i]), default=0)
      n_steps = min(chunk, need)
      nxt = None
      if n_steps > 0:
        # Dispatch the next chunk before reading the previous one: the device runs while the host does bookkeeping.
        cache, tok_BN, lp_BN = self._decode(self.params, cache, last, positions, sampling, chunk)
        positions = positions + n_steps
        last = tok_BN[:, chunk - 1]  # a partial chunk is always the last one, so its tail is never fed back
        nxt = (tok_BN[:, :n_steps], lp_BN[:, :n_steps])
      absorb(*map(host_value, pending))
      if not any(active) or nxt is None:
        break
      pending = nxt
    return out_tokens, out_lps
