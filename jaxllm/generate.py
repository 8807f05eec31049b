"""The first generation path: batched prefill + chunked decode over a contiguous KV cache, all jit-compiled.

    prefill(params, tokens_BT, lengths_B, cache, sampling)     -> first token per row, its logprob, cache
    decode(params, cache, tokens_B, positions_B, sampling, n)  -> n more tokens per row (lax.scan), cache
    score(params, tokens_BT)                                   -> logprob of each next token and whether it is the argmax

Prompts are right-padded to a length bucket; pads sit at later positions than every real token, so they never reach a
real row's attention (see `jaxllm.pallas_kernels.reference`). Shapes are bucketed (batch to a power of two, prompt and
cache lengths to multiples of 64/128) so a session compiles a handful of programs. The cache is donated: decode updates
it in place. The host loop dispatches chunk i+1 before it reads chunk i's tokens, so device work and host bookkeeping
overlap. The paged engine in `jaxllm.serving` replaces this path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxllm.layers.llama import KVCache, Llama
from jaxllm.sampling import SamplingArrays, sample


def bucket(n: int, multiple: int, cap: int | None = None) -> int:
  """Rounds n up to a multiple (or, below `multiple`, to a power of two >= 8), capped at `cap`."""
  out = max(8, 1 << (n - 1).bit_length()) if n < multiple else -(-n // multiple) * multiple
  return min(out, cap) if cap else out


def batch_bucket(n: int) -> int:
  return 1 << (n - 1).bit_length()


class Generator:
  """Holds the model's graph and params and the compiled prefill/decode/score programs."""

  def __init__(self, model: Llama):
    self.config = model.config
    self.dtype = model.dtype
    self.graphdef, self.params = nnx.split(model)

  # ------------------------------------------------------------------ jit programs
  @functools.partial(jax.jit, static_argnums=0, donate_argnums=4)
  def _prefill(self, params, tokens_BT, lengths_B, cache, sampling: SamplingArrays):
    model = nnx.merge(self.graphdef, params)
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h_BTD, cache = model(tokens_BT, positions_BT, cache)
    last_B1D = jnp.take_along_axis(h_BTD, (lengths_B - 1)[:, None, None], axis=1)
    logits_BV = model.logits(last_B1D)[:, 0]
    tokens_B, logprobs_B = sample(logits_BV, sampling, lengths_B)
    return tokens_B, logprobs_B, cache

  @functools.partial(jax.jit, static_argnums=(0, 6), donate_argnums=2)
  def _decode(self, params, cache, tokens_B, positions_B, sampling: SamplingArrays, n_steps: int):
    model = nnx.merge(self.graphdef, params)

    def step(carry, _):
      cache, tokens_B, positions_B = carry
      h_B1D, cache = model(tokens_B[:, None], positions_B[:, None], cache)
      next_B, logprob_B = sample(model.logits(h_B1D)[:, 0], sampling, positions_B + 1)
      return (cache, next_B, positions_B + 1), (next_B, logprob_B)

    (cache, _, _), (tokens_NB, logprobs_NB) = jax.lax.scan(step, (cache, tokens_B, positions_B), None, length=n_steps)
    return cache, tokens_NB.T, logprobs_NB.T

  @functools.partial(jax.jit, static_argnums=0)
  def _score(self, params, tokens_BT):
    model = nnx.merge(self.graphdef, params)
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    h_BTD, _ = model(tokens_BT, positions_BT)
    logprobs_BTV = jax.nn.log_softmax(model.logits(h_BTD[:, :-1]), axis=-1)
    target_BT = tokens_BT[:, 1:]
    chosen = jnp.take_along_axis(logprobs_BTV, target_BT[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logprobs_BTV, axis=-1) == target_BT
    return chosen, greedy

  @functools.partial(jax.jit, static_argnums=0)
  def _forward_logits(self, params, tokens_BT, positions_BT):
    model = nnx.merge(self.graphdef, params)
    h_BTD, _ = model(tokens_BT, positions_BT)
    return model.logits(h_BTD)

  # ------------------------------------------------------------------ host API
  def logits(self, tokens_BT: np.ndarray) -> np.ndarray:
    """Full-forward float32 logits [B, T, V] for (unpadded, equal-length) token rows."""
    tokens_BT = np.asarray(tokens_BT, np.int32)
    positions_BT = np.broadcast_to(np.arange(tokens_BT.shape[1], dtype=np.int32), tokens_BT.shape)
    return np.asarray(self._forward_logits(self.params, tokens_BT, positions_BT))

  def score(self, rows: list[list[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """For each token row, logprob of tokens[1:] given their prefixes and whether each was the argmax."""
    T = bucket(max(len(r) for r in rows), 64, None)
    B = batch_bucket(len(rows))
    tokens = np.zeros((B, T), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)] = r
    chosen, greedy = jax.device_get(self._score(self.params, tokens))
    return ([chosen[i, :len(r) - 1] for i, r in enumerate(rows)], [greedy[i, :len(r) - 1] for i, r in enumerate(rows)])

  def generate(self, prompts: list[list[int]], max_new: list[int], sampling: SamplingArrays, stop_fn,
               max_len: int, chunk: int = 8):
    """Generates for every prompt until `stop_fn(row, new_token_ids) -> bool` says it is done or `max_new[row]` is hit.

    `stop_fn` is called on the host after each chunk with all tokens generated so far for that row (the generator
    applies no EOS rule itself). Returns (token ids, logprobs) per row.
    """
    n = len(prompts)
    B = batch_bucket(n)
    T = bucket(max(len(p) for p in prompts), 64, max_len)
    S = bucket(max(len(p) + m for p, m in zip(prompts, max_new)), 128, max_len)
    tokens = np.zeros((B, T), np.int32)
    lengths = np.ones((B,), np.int32)
    for i, p in enumerate(prompts):
      tokens[i, :len(p)] = p
      lengths[i] = len(p)
    pad = B - n
    sampling = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], pad)]) if pad else a, sampling)
    cache = KVCache.zeros(self.config, B, S, self.dtype)
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
          if len(out_tokens[i]) >= max_new[i] or stop_fn(i, out_tokens[i]):
            active[i] = False
            break

    steps_left = max(max_new) - 1
    positions = lengths.copy()  # position of the token being fed next
    pending = (first[:, None], first_lp[:, None])
    last = first
    while True:
      # Dispatch the next chunk before reading the previous one: the device runs while the host does bookkeeping.
      nxt = None
      n_steps = min(chunk, steps_left, int(S - positions.max()))
      if n_steps > 0:
        cache, tok_BN, lp_BN = self._decode(self.params, cache, last, positions, sampling, chunk)
        positions = positions + n_steps
        steps_left -= n_steps
        last = tok_BN[:, chunk - 1]  # a partial chunk is always the last one, so its tail is never fed back
        nxt = (tok_BN[:, :n_steps], lp_BN[:, :n_steps])
      absorb(*jax.device_get(pending))
      if not any(active) or nxt is None:
        break
      pending = nxt
    return out_tokens, out_lps
