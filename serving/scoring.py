"""Scoring: log-likelihoods of token sequences by full forward passes (no KV cache, no sampling).

One path serves `LLM.score` (a notebook's few pairs) and `jaxllm score` (millions of records, `score_job`):

    item (context + continuation tokens, or a whole text)  ─► windows (rows of at most max_model_len tokens)
      ─► length buckets (rows grouped by padded length, R x T within a token budget)  ─► engine.score_tokens
      ─► each item's target logprobs, in order, summed in float64

Semantics:
- **Continuation** (lm-eval-harness `loglikelihood`): `encode_pair` splits the tokens of context + continuation as
  the harness does (trailing spaces of the context move to the continuation; the pair is encoded whole and the
  context's tokens are cut off the front). An empty context is the model's BOS (or EOS) token. A sequence longer than
  max_model_len loses context from the left; the continuation itself must fit (at most max_model_len - 1 tokens).
  `is_greedy`: every continuation token is the argmax given its prefix.
- **Whole text** (perplexity): every token after the first is a target. A text longer than max_model_len is scored
  with HF's sliding-window recipe ("Perplexity of fixed-length models"): windows of max_model_len tokens start every
  `stride` tokens; each window scores only the tokens the previous window did not reach, with the rest of the window
  as context. So every token is scored exactly once, with at least max_model_len - stride tokens of context once
  past the first window. stride = max_model_len is disjoint chunks (each chunk's first token has no context and is
  not scored, as in HF's recipe; `num_tokens` counts what was); a smaller stride is slower and closer to the model's
  full-context likelihood. Perplexity is exp(-sum / number of scored tokens); HF's recipe weights each
  window's mean loss by one token less than it scored, which differs from this in the third or fourth digit.

Multi-process (`jax.distributed`, a mesh over every process's devices): every process calls `Scorer.submit` with its
own items; the processes run each other's batches in lockstep (each batch's tokens are broadcast from its owner),
and each gets back its own results. A batch's shape depends only on its owner's items, so a process's results do
not depend on what the others are scoring.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

from jaxllm.sharding.distributed import host_value


@dataclasses.dataclass(frozen=True)
class Item:
  """One sequence to score: tokens[first_target:] are the targets (first_target >= 1)."""
  tokens: np.ndarray  # int32 [n]
  first_target: int


@dataclasses.dataclass(frozen=True)
class Window:
  start: int  # tokens[start:end] is the row
  end: int
  first: int  # targets are positions [first, end) of the item; first > start


@dataclasses.dataclass
class ItemScore:
  logprobs: np.ndarray  # float32 [number of targets], in order
  greedy: np.ndarray  # bool, same shape
  top_ids: np.ndarray | None = None  # int32 [number of targets, num_top]: the likeliest tokens (Scorer num_top > 0)
  top_logprobs: np.ndarray | None = None  # float32, same shape

  @property
  def sum_logprob(self) -> float:
    return float(np.sum(self.logprobs, dtype=np.float64))

  @property
  def is_greedy(self) -> bool:
    return bool(np.all(self.greedy))

  @property
  def perplexity(self) -> float:
    return math.exp(-self.sum_logprob / len(self.logprobs))


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """(context ids, continuation ids) as lm-eval-harness splits them: the continuation's ids are those of the whole
  string after the context's, so a token that spans the boundary is not split differently than in running text."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
  if not context:
    prefix = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    if prefix is None:
      raise ValueError("the context is empty and the tokenizer has no BOS or EOS token to stand for it.")
    return [prefix], tokenizer.encode(continuation, add_bos=False)
  whole = tokenizer.encode(context + continuation)
  ctx = tokenizer.encode(context)
  return ctx, whole[len(ctx):]


def pair_item(context: Sequence[int], continuation: Sequence[int]) -> Item:
  if not len(context) or not len(continuation):
    raise ValueError("context and continuation must both have at least one token.")
  return Item(np.asarray(list(context) + list(continuation), np.int32), len(context))


def text_item(tokens: Sequence[int]) -> Item:
  if len(tokens) < 2:
    raise ValueError(f"the text has {len(tokens)} token(s); scoring needs at least 2 (the first is context only).")
  return Item(np.asarray(tokens, np.int32), 1)


def windows(item: Item, max_len: int, stride: int | None = None) -> list[Window]:
  """The rows that score `item`'s targets once each. stride=None: one row of the last max_len tokens (lm-eval's left
  truncation; every target must fit in it). Otherwise HF's sliding windows over the whole sequence."""
  n = len(item.tokens)
  if n <= max_len:
    return [Window(0, n, item.first_target)]
  if stride is None:
    if n - item.first_target > max_len - 1:
      raise ValueError(f"the continuation has {n - item.first_target} tokens; at most max_model_len - 1 = "
                       f"{max_len - 1} fit with one token of context.")
    return [Window(n - max_len, n, item.first_target)]
  if not 1 <= stride <= max_len:
    raise ValueError(f"stride={stride} must be in [1, max_model_len={max_len}].")
  out, prev_end = [], 0
  for start in range(0, n, stride):
    end = min(start + max_len, n)
    first = max(prev_end, start + 1, item.first_target)
    if first < end:
      out.append(Window(start, end, first))
    prev_end = end
    if end == n:
      break
  return out


def batch_plan(lengths: Sequence[int], length_buckets: Sequence[int], max_batch_size: int, max_batch_tokens: int,
               sort_by_length: bool = True) -> list[tuple[int, int, list[int]]]:
  """Rows (by length) -> [(R, T, row indices)] of padded batches. With sort_by_length, rows are grouped by their
  length bucket T and each group is cut into batches of R = the largest power of two with R x T within
  max_batch_tokens (and R <= max_batch_size); a group's remainder goes in batches of R/8, R/64, ..., 1 rows, so no
  batch has a padding row and each bucket has at most a few batch shapes to compile. Without it, consecutive rows batch as they come (the padding a naive loader pays)."""
  def bucket(n):
    return next(t for t in length_buckets if t >= n)

  def rows_for(T):
    r = 1
    while r * 2 <= max_batch_size and r * 2 * T <= max_batch_tokens:
      r *= 2
    return r

  if not sort_by_length:
    out, idx, T = [], [], 0
    for i, n in enumerate(list(lengths) + [None]):
      grown = bucket(max(T, n)) if n is not None else 0
      if idx and (n is None or len(idx) == max_batch_size or (len(idx) + 1) * grown > max_batch_tokens):
        out.append((1 << (len(idx) - 1).bit_length(), T, idx))
        idx, T = [], 0
      if n is not None:
        idx.append(i)
        T = bucket(max(T, n))
    return out
  groups: dict[int, list[int]] = {}
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    groups.setdefault(bucket(lengths[i]), []).append(i)
  out = []
  for T in sorted(groups, reverse=True):
    idx, R = groups[T], rows_for(T)
    # Batch sizes R, R/8, R/64, ..., 1: a group's remainder is cut into those (36 rows at R = 64: 4 x 8 + 4 x 1), so
    # no batch has a padding row, and each length bucket compiles at most a few programs.
    levels = sorted({R >> (3 * k) for k in range(8) if R >> (3 * k)} | {1}, reverse=True)
    for r in levels:
      while len(idx) >= r:
        out.append((r, T, idx[:r]))
        idx = idx[r:]
  return out


@dataclasses.dataclass
class Stats:
  rows: int = 0
  batches: int = 0
  tokens: int = 0  # real tokens fed
  padded_tokens: int = 0  # R x T summed over batches
  scored_tokens: int = 0  # targets

  @property
  def padding_fraction(self) -> float:
    return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0


class Pending:
  """Results of one `Scorer.submit`, read back on `result()` (the device works on them meanwhile)."""

  def __init__(self, plan, item_windows, outputs):
    self._plan, self._windows, self._outputs = plan, item_windows, outputs

  def result(self) -> list[ItemScore]:
    row_out: dict[int, tuple[np.ndarray, ...]] = {}  # row -> (chosen, greedy[, top_ids, top_logprobs])
    for (_, _, idx), out in zip(self._plan, self._outputs):
      arrays = [host_value(x) for x in out]
      for b, r in enumerate(idx):
        row_out[r] = tuple(a[b] for a in arrays)
    scores, r = [], 0
    for wins in self._windows:
      parts = []
      for w in wins:
        parts.append([a[w.first - w.start - 1:w.end - w.start - 1] for a in row_out[r]])
        r += 1
      scores.append(ItemScore(*(np.concatenate(column) for column in zip(*parts))))
    return scores


class Scorer:
  """Scores Items on an engine in length-bucketed batches.

  max_batch_size / max_batch_tokens: rows per call and padded tokens (R x T) per call; the forward's float32 logits
  take max_batch_tokens x vocab x 4 bytes. max_length: tokens per row, the sliding window (default and at most the
  engine's max_model_len). sort_by_length=False batches rows in arrival order (for measuring padding)."""

  def __init__(self, engine, *, max_batch_size: int = 64, max_batch_tokens: int = 4096,
               sort_by_length: bool = True, max_length: int | None = None, num_top: int = 0):
    if max_batch_size < 1 or max_batch_tokens < 1:
      raise ValueError(f"max_batch_size={max_batch_size} and max_batch_tokens={max_batch_tokens} must be positive.")
    limit = engine.config.max_model_len
    if max_length is not None and not (isinstance(max_length, int) and 2 <= max_length <= limit):
      raise ValueError(f"max_length={max_length!r} must be an integer in [2, max_model_len={limit}].")
    self.engine = engine
    self.max_len = max_length or limit
    self.max_batch_size, self.max_batch_tokens = max_batch_size, max_batch_tokens
    self.sort_by_length = sort_by_length
    self.num_top = num_top  # also return the num_top likeliest tokens at each scored position
    self.stats = Stats()
    # Padded row lengths: 8, 12, 16, 24, 32, 48, ... (a power of two and 1.5x it), then max_length. A row pads by
    # at most a third, a fifth on average; each (R, T) compiles once.
    self.length_buckets = tuple(sorted({t for k in range(3, 31) for t in (1 << k, 3 << (k - 1))
                                        if t < self.max_len} | {self.max_len}))

  def windows(self, item: Item, stride: int | None) -> list[Window]:
    return windows(item, self.max_len, stride)

  def submit(self, items: Sequence[Item], item_windows: Sequence[Sequence[Window]]) -> Pending:
    """Dispatches every row of `items` (windows from `self.windows`) and returns without waiting. In a
    multi-process run this is collective: every process calls it, each with its own items (possibly none)."""
    rows = [it.tokens[w.start:w.end] for it, wins in zip(items, item_windows) for w in wins]
    plan = batch_plan([len(r) for r in rows], self.length_buckets, self.max_batch_size, self.max_batch_tokens,
                      self.sort_by_length)
    batches = []
    for R, T, idx in plan:
      tokens = np.zeros((R, T), np.int32)
      for b, r in enumerate(idx):
        tokens[b, :len(rows[r])] = rows[r]
      batches.append(tokens)
      self.stats.batches += 1
      self.stats.padded_tokens += R * T
    self.stats.rows += len(rows)
    self.stats.tokens += sum(len(r) for r in rows)
    self.stats.scored_tokens += sum(w.end - w.first for wins in item_windows for w in wins)
    import jax

    if jax.process_count() == 1:
      outputs = [self.engine.score_tokens(t, self.num_top) for t in batches]
    else:
      outputs = _lockstep(self.engine, batches, self.num_top)
    return Pending(plan, [list(w) for w in item_windows], outputs)

  def score(self, items: Sequence[Item], stride: int | None = None) -> list[ItemScore]:
    return self.submit(items, [self.windows(it, stride) for it in items]).result()


def _lockstep(engine, batches: list[np.ndarray], num_top: int) -> list[tuple[np.ndarray, ...]]:
  """Every process runs every process's batches, in process order, one round per batch index; returns this
  process's results (already on the host)."""
  import jax
  from jax.experimental import multihost_utils

  me, out, i = jax.process_index(), [], 0
  while True:
    shape = np.array(batches[i].shape if i < len(batches) else (0, 0), np.int32)
    shapes = np.asarray(multihost_utils.process_allgather(shape)).reshape(-1, 2)
    if not shapes.any():
      return out
    for p, (R, T) in enumerate(shapes):
      if R == 0:
        continue
      tokens = batches[i] if p == me else np.zeros((R, T), np.int32)
      tokens = np.asarray(multihost_utils.broadcast_one_to_all(tokens, is_source=p == me))
      arrays = tuple(host_value(x) for x in engine.score_tokens(tokens, num_top))
      if p == me:
        out.append(arrays)
    i += 1
