"""The engine: one jit-compiled mixed ragged step over a paged KV cache, behind JetStream's prefill / insert / generate.

    engine = Engine(model, EngineConfig(max_model_len=2048, max_num_seqs=32))
    state = engine.init_state()
    batch = engine.build(rows)                     # decode tokens + prefill chunks (`serving.scheduler` picks them)
    state, result = engine.step(state, batch)      # asynchronous: read `result` one step later

The step. Every call runs one ragged batch of new tokens through the model once: one token for every decoding
sequence (its last sampled token, read from the device state, so the host never waits for it) and chunks of the
prompts being prefilled (a whole short prompt, or the next `max_num_batched_tokens`-bounded piece of a long one, maybe
after a prefix the cache already holds). Each token's K/V go into its sequence's pages and `ragged_paged_attention`
reads every sequence's pages (`layers.paged.PagedKVCache`). Only the last row of each sequence reaches the LM head
(every row does for a sequence that asked for its prompt's logprobs, in a third program run only then); a sequence
whose chunk ends at its last known token samples its next token, which lands in `state.tokens[slot]` for the next
step and in the result for the host. The JetStream names map onto it: `prefill` is a chunk in a step,
`insert` is the host seating a sequence in a slot (no device work), `generate` is a step's decode rows.

A step is two jitted programs dispatched back to back (no host sync between them): `forward` (the model, compiled
per token bucket T) and `pick` (LM head and sampler over the S = min(T, max_num_seqs) last rows, compiled per S), so
the sampler's many branches compile a few times rather than once per T. `pick` is two programs per S, chosen by the
host from the rows' settings: a step whose sampling rows are all greedy with nothing to apply runs the argmax alone
(no conditional: XLA:GPU reads each one's predicate back to the host), any other the sampler under a bitmask of the
tokens each row may take (structured outputs: the scheduler computes the masks while the device runs `forward`; all
ones, kept on the device, where nothing is constrained). Sampling settings arrive per step as
[S] rows, so a new request never recompiles; the only per-slot device state is the last sampled
token and the penalties' token history, which a step touches only when a sequence in it uses penalties. The state is
donated: the KV pages are updated in place.

Data-parallel replicas. On a mesh with a `data` axis of size D, the engine is D replicas of everything above, each on
its own devices: replica r owns slots [r * Z, (r + 1) * Z) of the state (Z = max_num_seqs each), the r-th block of
L * P pages of the pools (P = `num_pages` a layer; page and slot ids in a row are the replica's own) and its own
token budget. A step's batch is the D replicas' batches concatenated on their leading axis (each padded to the same
bucket T, S), and `forward` / `pick` / `prompt_logprobs` run every replica's block in a `shard_map` that is manual over
`data` only (the model's own axes stay automatic), so a replica reads and writes only its pages and slots and D
replicas step D times the sequences. One replica (no `data` axis) runs the same per-replica code on the whole arrays.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxllm.layers.llama import Llama
from jaxllm.layers.paged import PagedKVCache
from jaxllm.pallas_kernels.kv_quant import QuantizedPages, kv_cache_dtype
from jaxllm.sampling import SamplingArrays, TokenHistory, apply_if, argmax, greedy, sample
from jaxllm.serving.config import EngineConfig, bucket, cdiv
from jaxllm.serving.kv_cache import size_kv_cache
from jaxllm.sharding.distributed import host_value
from jaxllm.sharding.rules import BATCH_AXIS

SCRATCH_PAGE = 0  # padding rows write here (each replica's own page 0); the allocator never hands it out
REPLICA = P(BATCH_AXIS)  # an array concatenated over the replicas on its leading axis: each gets its block


@struct.dataclass
class EngineState:
  """What persists across steps (Z = max_num_seqs slots, V = vocab; D replicas, each with a block of every array)."""

  k: jax.Array | QuantizedPages  # [D * L * P, K, C, H] each replica's pool of KV pages (`layers.paged`; an int8 / fp8
  v: jax.Array | QuantizedPages  # cache: values and [D * L * P, K, C] scales)
  tokens: jax.Array  # [D * Z] int32: each slot's last sampled token (fed by its next decode row)
  history: TokenHistory  # [D * Z, V]: what the penalties read; kept only for slots whose request uses penalties


STATE_SPECS = EngineState(k=REPLICA, v=REPLICA, tokens=REPLICA, history=REPLICA)


@struct.dataclass
class SeqBatch:
  """A step's per-sequence inputs (S rows per replica; rows >= num_seqs are padding; every field is the D replicas'
  blocks concatenated)."""

  num_seqs: jax.Array  # int32 [1] per replica
  kv_lens_S: jax.Array  # int32 tokens cached after this step (the position of the token it samples)
  slot_S: jax.Array  # int32
  sample_S: jax.Array  # bool: the chunk ends at the sequence's last token, sample the next one
  reset_S: jax.Array  # bool: first step of this admission (its slot's history starts empty)
  sampling: SamplingArrays  # [S]


@struct.dataclass
class StepBatch:
  """One step's ragged batch (host-built numpy; T rows, S sequences, M pages per sequence, per replica: every field
  is the D replicas' blocks concatenated on its leading axis)."""

  tokens_T: jax.Array  # int32 token ids known on the host (ignored where use_last_T)
  use_last_T: jax.Array  # bool: feed state.tokens[slot_T] (the token the previous step sampled)
  positions_T: jax.Array  # int32
  slot_T: jax.Array  # int32 slot of the row's sequence (0 for padding)
  page_T: jax.Array  # int32 page the row's K/V go to (SCRATCH_PAGE for padding)
  offset_T: jax.Array  # int32 offset in that page
  history_T: jax.Array  # int8: 1 = prompt token (-> in_prompt), 2 = replayed output token (-> output_counts), 0 = other
  page_indices_SM: jax.Array  # int32
  cu_q_lens_S1: jax.Array  # int32 [S + 1]
  seqs: SeqBatch


@dataclasses.dataclass
class Row:
  """One sequence's part of a step: tokens for positions [start, start + len(tokens)) of the sequence."""

  slot: int
  start: int  # position of the first token
  tokens: list[int]  # host-known ids; a trailing None is the token the previous step sampled (still on device)
  pages: list[int]  # the sequence's page ids, covering every position < start + len(tokens)
  sampling: SamplingArrays  # [1]
  sample: bool  # draw the next token after the last one
  prompt_len: int = 0  # positions below this are prompt (for the penalties' history)
  replay_end: int = 0  # positions in [prompt_len, replay_end) are earlier outputs being recomputed
  reset: bool = False
  replica: int = 0  # the data-parallel replica whose slot, pages and token budget the row uses


@struct.dataclass
class StepResult:
  """A step's sampled tokens, per sequence S of each replica, concatenated (rows whose sample_S was False hold
  garbage; `row_places` says which row is whose)."""

  tokens: jax.Array  # [S] int32
  logprobs: jax.Array  # [S] float32
  top_ids: jax.Array  # [S, n] int32 (n = num_top_logprobs)
  top_logprobs: jax.Array  # [S, n] float32


def per_replica(fn, mesh, in_specs, out_specs):
  """`fn` run by every data-parallel replica on its own block of each argument and result (`shard_map`, manual over
  `data`; the model's other mesh axes stay automatic). Without replicas (mesh None: no `data` axis), `fn` itself: the
  one replica's blocks are the whole arrays."""
  if mesh is None:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={BATCH_AXIS},
                       check_vma=False)


def _scalar_count(seqs: SeqBatch) -> SeqBatch:
  """A replica's SeqBatch with its num_seqs block [1] as the scalar the kernels take."""
  return seqs.replace(num_seqs=seqs.num_seqs[0])


def forward(graphdef, params, state: EngineState, batch: StepBatch, *, attention_impl: str | None, mesh=None):
  """The model over one ragged batch: K/V into the pages, the penalties' history fed the step's prompt and replayed
  tokens (only when a sequence in it uses penalties). Returns the state, the hidden state of each sequence's last
  row [S, D] (for `pick`) and of every row [T, D] (for `prompt_logprobs`; dropped unread by steps that score no
  prompt), per replica. Compiled per T; the state's pages and history are donated."""
  one = lambda p, st, b: _forward_replica(graphdef, p, st, b, attention_impl)  # noqa: E731
  return per_replica(one, mesh, (P(), STATE_SPECS, REPLICA), (STATE_SPECS, REPLICA, REPLICA))(params, state, batch)


def _forward_replica(graphdef, params, state: EngineState, batch: StepBatch, attention_impl):
  model = nnx.merge(graphdef, params)
  b = batch.replace(seqs=_scalar_count(batch.seqs))
  q = b.seqs
  Z = state.tokens.shape[0]
  valid_S = jnp.arange(q.slot_S.shape[0]) < q.num_seqs
  tokens_T = jnp.where(b.use_last_T, state.tokens[b.slot_T], b.tokens_T)
  cache = PagedKVCache(k=state.k, v=state.v, slot_page_T=b.page_T, slot_offset_T=b.offset_T, kv_lens=q.kv_lens_S,
                       page_indices=b.page_indices_SM, cu_q_lens=b.cu_q_lens_S1, num_seqs=q.num_seqs,
                       num_layers=model.config.num_layers)
  h_1TD, cache = model(tokens_T[None], b.positions_T[None], cache, attention_impl)
  h_TD = h_1TD[0]
  h_SD = h_TD[jnp.maximum(b.cu_q_lens_S1[1:] - 1, 0)]

  def record_inputs(history: TokenHistory) -> TokenHistory:
    """Prompt tokens into in_prompt, replayed outputs into output_counts (after emptying newly seated slots)."""
    V = history.in_prompt.shape[1]
    reset = jnp.where(q.reset_S & valid_S, q.slot_S, Z)
    counts = history.output_counts.at[reset].set(0, mode="drop")
    in_prompt = history.in_prompt.at[reset].set(False, mode="drop")
    in_prompt = in_prompt.at[b.slot_T, jnp.where(b.history_T == 1, tokens_T, V)].set(True, mode="drop")
    counts = counts.at[b.slot_T, jnp.where(b.history_T == 2, tokens_T, V)].add(1, mode="drop")
    return TokenHistory(output_counts=counts, in_prompt=in_prompt)

  # On GPU recorded for every sequence (apply_if): rows without penalties never read it, and a seated slot starts empty.
  history = apply_if(jnp.any(q.sampling.uses_penalties() & valid_S), record_inputs, state.history)
  return state.replace(k=cache.k, v=cache.v, history=history), h_SD, h_TD


def pick(graphdef, params, state: EngineState, h_SD, batch: SeqBatch, bitmask_SW=None, *, num_top: int, mesh=None):
  """LM head and sampler over the step's S last rows (per replica): each sequence whose chunk ends at its last token
  draws its next token into state.tokens[slot] (and the history, if it uses penalties). Two programs per S:
  `bitmask_SW=None` when every sampling row is `SamplingArrays.bare` (greedy, nothing to apply): the argmax, no
  conditional and no sampler; else the sampler, with token v of row s allowed only where bit v % 32 of word v // 32
  of `bitmask_SW` ([S, ceil(V / 32)] int32) is set (structured outputs; all ones where nothing is constrained): it
  and the logprobs it reports (as vLLM's) see the constrained distribution. Tokens and history are donated."""
  one = lambda p, st, h, b, m: _pick_replica(graphdef, p, st, h, b, m, num_top)  # noqa: E731
  return per_replica(one, mesh, (P(), STATE_SPECS, REPLICA, REPLICA, REPLICA), (STATE_SPECS, REPLICA))(
      params, state, h_SD, batch, bitmask_SW)


def _pick_replica(graphdef, params, state: EngineState, h_SD, batch: SeqBatch, bitmask_SW, num_top: int):
  model = nnx.merge(graphdef, params)
  b = _scalar_count(batch)
  Z = state.tokens.shape[0]
  S = b.slot_S.shape[0]
  valid_S = jnp.arange(S) < b.num_seqs
  logits_SV = model.logits(h_SD[None])[0].astype(jnp.float32)
  if bitmask_SW is None:
    drawn = greedy(logits_SV, num_top)
  else:
    V = logits_SV.shape[-1]
    bits_SW32 = (bitmask_SW[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    logits_SV = jnp.where(bits_SW32.reshape(S, -1)[:, :V] != 0, logits_SV, -jnp.inf)
    drawn = sample(logits_SV, b.sampling, b.kv_lens_S, state.history, history_rows_B=b.slot_S, num_top=num_top)
  tok_S, lp_S, top_ids, top_lp = drawn if num_top else (*drawn, jnp.zeros((S, 0), jnp.int32),
                                                         jnp.zeros((S, 0), jnp.float32))
  into = jnp.where(b.sample_S & valid_S, b.slot_S, Z)
  history = state.history  # the argmax program's sampling rows use no penalties: nothing to count
  if bitmask_SW is not None:
    history = apply_if(jnp.any(b.sampling.uses_penalties() & valid_S),
                       lambda h: h.replace(output_counts=h.output_counts.at[into, tok_S].add(1, mode="drop")), history)
  state = state.replace(tokens=state.tokens.at[into].set(tok_S, mode="drop"), history=history)
  return state, StepResult(tokens=tok_S, logprobs=lp_S, top_ids=top_ids, top_logprobs=top_lp)


PROMPT_BLOCK = 256  # rows whose [rows, V] float32 logits prompt_logprobs holds at once


def prompt_logprobs(graphdef, params, h_TD, targets_T, *, num_top: int, mesh=None):
  """Every row's log-softmax read at a target: row t's hidden state predicts the token after it, so `targets_T[t]`
  is the prompt token at the row's position + 1 (-1 where nothing is asked; its values are garbage). Returns the
  targets' logprobs [T] and ranks [T] (1 + the tokens more likely), and the num_top likeliest tokens [T, num_top]
  with their logprobs (per replica). The logits are made PROMPT_BLOCK rows at a time, so a long step's [T, V]
  float32 logits never exist whole. Compiled per T; steps whose sequences score no prompt never call it."""
  one = lambda p, h, t: _prompt_logprobs_replica(graphdef, p, h, t, num_top)  # noqa: E731
  return per_replica(one, mesh, (P(), REPLICA, REPLICA), REPLICA)(params, h_TD, targets_T)


def _prompt_logprobs_replica(graphdef, params, h_TD, targets_T, num_top: int):
  model = nnx.merge(graphdef, params)
  T, D = h_TD.shape
  B = min(T, PROMPT_BLOCK)
  pad = -T % B

  def block(args):
    h_BD, tgt_B = args
    lp_BV = jax.nn.log_softmax(model.logits(h_BD[None])[0].astype(jnp.float32), axis=-1)
    chosen_B = jnp.take_along_axis(lp_BV, jnp.maximum(tgt_B, 0)[:, None], axis=-1)[:, 0]
    rank_B = 1 + jnp.sum(lp_BV > chosen_B[:, None], axis=-1, dtype=jnp.int32)
    top_lp, top_ids = jax.lax.top_k(lp_BV, num_top) if num_top else (jnp.zeros((B, 0)), jnp.zeros((B, 0), jnp.int32))
    return chosen_B, rank_B, top_ids.astype(jnp.int32), top_lp.astype(jnp.float32)

  h = jnp.pad(h_TD, ((0, pad), (0, 0))).reshape(-1, B, D)
  tgt = jnp.pad(targets_T, (0, pad), constant_values=-1).reshape(-1, B)
  out = jax.lax.map(block, (h, tgt))
  return jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:])[:T], out)


def full_logits(graphdef, params, tokens_RT, *, attention_impl: str | None):
  """Full forward over rows from position 0, no pages: float32 logits [R, T, V]."""
  model = nnx.merge(graphdef, params)
  R, T = tokens_RT.shape
  positions_RT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (R, T))
  return model.logits(model(tokens_RT, positions_RT, None, attention_impl)[0]).astype(jnp.float32)


def score(graphdef, params, tokens_RT, *, attention_impl: str | None, num_top: int = 0):
  """log p(token t+1 | tokens <= t) over padded rows [R, T - 1], and whether each was the argmax; with num_top, also
  the num_top most likely tokens at each position and their logprobs ([R, T - 1, num_top] each)."""
  logprobs_RTV = jax.nn.log_softmax(full_logits(graphdef, params, tokens_RT, attention_impl=attention_impl)[:, :-1],
                                    axis=-1)
  target_RT = tokens_RT[:, 1:]
  chosen_RT = jnp.take_along_axis(logprobs_RTV, target_RT[..., None], axis=-1)[..., 0]
  greedy_RT = argmax(logprobs_RTV) == target_RT
  if not num_top:
    return chosen_RT, greedy_RT
  top_lp, top_ids = jax.lax.top_k(logprobs_RTV, num_top)
  return chosen_RT, greedy_RT, top_ids.astype(jnp.int32), top_lp


_forward = jax.jit(forward, static_argnums=0, static_argnames=("attention_impl", "mesh"), donate_argnums=2)
_pick = jax.jit(pick, static_argnums=0, static_argnames=("num_top", "mesh"), donate_argnums=2)
_prompt_logprobs = jax.jit(prompt_logprobs, static_argnums=0, static_argnames=("num_top", "mesh"))
_score = jax.jit(score, static_argnums=0, static_argnames=("attention_impl", "num_top"))
_logits = jax.jit(full_logits, static_argnums=0, static_argnames="attention_impl")


class Engine:
  """Holds the model's params and the compiled step; the state lives outside (donated through every call)."""

  def __init__(self, model: Llama, config: EngineConfig):
    self.config = config = config.resolve(model.config.max_position_embeddings)
    self.model_config = model.config
    self.dtype = model.dtype
    self.activation_sharding = sharding = model.activation_sharding
    # The mesh the replicas split (None without a `data` axis: one replica, nothing to split).
    self.mesh = sharding.mesh if sharding is not None and BATCH_AXIS in sharding.mesh.shape else None
    self.num_replicas = self.mesh.shape[BATCH_AXIS] if self.mesh is not None else 1
    self.graphdef, self.params = nnx.split(model)
    self.kv_dtype = kv_cache_dtype(config.kv_cache_dtype, model.dtype)
    self.num_pages = size_kv_cache(config, model.config, self.kv_dtype, self.activation_sharding)  # per replica
    self.token_buckets = config.token_buckets
    self._static = dict(attention_impl=config.attention_impl)
    self._allow_all_cache: dict[int, jax.Array] = {}

  # ------------------------------------------------------------------ state
  def init_state(self) -> EngineState:
    c, mc, D = self.config, self.model_config, self.num_replicas
    Z, V = c.max_num_seqs, mc.vocab_size

    def zeros():
      k, v = PagedKVCache.zero_pages(mc, D * self.num_pages, c.page_size, self.kv_dtype)
      return EngineState(k=k, v=v, tokens=jnp.zeros((D * Z,), jnp.int32),
                         history=TokenHistory(output_counts=jnp.zeros((D * Z, V), jnp.int32),
                                              in_prompt=jnp.zeros((D * Z, V), bool)))

    sharding = None
    if self.activation_sharding is not None:  # pages, slots over the replicas; KV heads as the K/V projections
      named = lambda axes: lambda x: self.activation_sharding.named(axes[:x.ndim], x.shape)  # noqa: E731
      pages, slots = named(("batch", "kv_heads", None, "head_dim")), named(("batch", None))
      shapes = jax.eval_shape(zeros)
      sharding = EngineState(k=jax.tree.map(pages, shapes.k), v=jax.tree.map(pages, shapes.v),
                             tokens=slots(shapes.tokens), history=jax.tree.map(slots, shapes.history))
    return jax.jit(zeros, out_shardings=sharding)()

  # ------------------------------------------------------------------ the step
  def step_shape(self, num_tokens: int) -> tuple[int, int]:
    """The (T, S) bucket, per replica, a step whose busiest replica has `num_tokens` rows runs with."""
    T = bucket(max(num_tokens, 1), self.token_buckets)
    return T, min(T, self.config.max_num_seqs)

  def row_places(self, rows: list[Row]) -> tuple[int, int, list[tuple[int, int]]]:
    """(T, S, per row: (its sequence's index in the step's [D * S] per-sequence arrays, its first row in the [D * T]
    token arrays)); every replica's rows keep their order."""
    c, D = self.config, self.num_replicas
    counts, tokens = [0] * D, [0] * D
    for r in rows:
      if not 0 <= r.replica < D:
        raise ValueError(f"row of slot {r.slot} is for replica {r.replica}; the engine has {D}.")
      counts[r.replica] += 1
      tokens[r.replica] += len(r.tokens)
    if max(counts) > c.max_num_seqs or max(tokens) > c.max_num_batched_tokens:
      raise ValueError(f"a step takes at most {c.max_num_seqs} sequences and {c.max_num_batched_tokens} tokens per "
                       f"replica; got {max(counts)} and {max(tokens)}.")
    T, S = self.step_shape(max(tokens))
    seen, used, places = [0] * D, [0] * D, []
    for r in rows:
      places.append((r.replica * S + seen[r.replica], r.replica * T + used[r.replica]))
      seen[r.replica] += 1
      used[r.replica] += len(r.tokens)
    return T, S, places

  def build(self, rows: list[Row], places=None) -> StepBatch:
    """A StepBatch from the step's rows (per replica at most max_num_seqs of them and max_num_batched_tokens
    tokens); `places`: what `row_places(rows)` answered, if the caller has it already."""
    T, S, _ = places or self.row_places(rows)
    per = [[r for r in rows if r.replica == k] for k in range(self.num_replicas)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *[self._build_replica(rs, T, S) for rs in per])

  def _build_replica(self, rows: list[Row], T: int, S: int) -> StepBatch:
    c = self.config
    C, M = c.page_size, c.pages_per_seq
    i32 = lambda n, fill=0: np.full((n,), fill, np.int32)  # noqa: E731
    tokens, positions, slot_T, page_T, offset_T = i32(T), i32(T), i32(T), i32(T, SCRATCH_PAGE), i32(T)
    use_last, hist_T = np.zeros((T,), bool), np.zeros((T,), np.int8)
    kv_lens, cu, slot_S = i32(S), i32(S + 1), i32(S)
    sample_S, reset_S = np.zeros((S,), bool), np.zeros((S,), bool)
    table = np.full((S, M), SCRATCH_PAGE, np.int32)
    t = 0
    for i, r in enumerate(rows):
      n = len(r.tokens)
      pos = np.arange(r.start, r.start + n, dtype=np.int32)
      known = r.tokens if r.tokens[-1] is not None else r.tokens[:-1]
      tokens[t:t + len(known)] = known
      use_last[t + len(known):t + n] = True
      positions[t:t + n] = pos
      slot_T[t:t + n] = r.slot
      pages = np.asarray(r.pages[:cdiv(r.start + n, C)], np.int32)
      page_T[t:t + n], offset_T[t:t + n] = pages[pos // C], pos % C
      hist_T[t:t + n] = np.where(pos < r.prompt_len, 1, np.where(pos < r.replay_end, 2, 0))
      table[i, :len(pages)] = pages
      kv_lens[i], slot_S[i], sample_S[i], reset_S[i] = r.start + n, r.slot, r.sample, r.reset
      t += n
      cu[i + 1] = t
    cu[len(rows) + 1:] = t
    pad = SamplingArrays.create(S - len(rows), temperature=0.0)
    sampling = jax.tree.map(lambda *xs: np.concatenate(xs), *[r.sampling for r in rows], pad)
    seqs = SeqBatch(num_seqs=np.array([len(rows)], np.int32), kv_lens_S=kv_lens, slot_S=slot_S, sample_S=sample_S,
                    reset_S=reset_S, sampling=sampling)
    return StepBatch(tokens_T=tokens, use_last_T=use_last, positions_T=positions, slot_T=slot_T, page_T=page_T,
                     offset_T=offset_T, history_T=hist_T, page_indices_SM=table, cu_q_lens_S1=cu, seqs=seqs)

  def step(self, state: EngineState, batch: StepBatch) -> tuple[EngineState, StepResult]:
    """Dispatches one step (asynchronous; the state is donated)."""
    state, h_SD, _ = self.forward(state, batch)
    return self.pick(state, h_SD, batch.seqs)

  def forward(self, state: EngineState, batch: StepBatch) -> tuple[EngineState, jax.Array, jax.Array]:
    """The step's first half (the model), dispatched: -> (state, the sequences' last hidden rows for `pick`, every
    row's hidden state for `prompt_logprobs`)."""
    return _forward(self.graphdef, self.params, state, batch, mesh=self.mesh, **self._static)

  def prompt_logprobs(self, h_TD: jax.Array, targets_T: np.ndarray):
    """Dispatches the scoring of a step's prompt rows (`prompt_logprobs` above) -> device arrays (logprobs [T], ranks
    [T], top ids [T, n], top logprobs [T, n]; n = num_top_logprobs)."""
    return _prompt_logprobs(self.graphdef, self.params, h_TD, np.asarray(targets_T, np.int32),
                            num_top=self.config.num_top_logprobs, mesh=self.mesh)

  def pick(self, state: EngineState, h_SD: jax.Array, seqs: SeqBatch,
           bitmask_SW: np.ndarray | None = None) -> tuple[EngineState, StepResult]:
    """The step's second half (LM head and sampler), dispatched; `bitmask_SW` constrains rows (structured outputs).
    A caller may run host work between the halves: the device is busy with the model meanwhile. A step whose
    sampling rows are all bare greedy runs the argmax program, any other the sampler (under an all-ones bitmask
    where none constrains it): the host knows which from the rows' settings, so neither program branches on it."""
    if bitmask_SW is None and not seqs.sampling.bare(seqs.kv_lens_S)[seqs.sample_S].all():
      bitmask_SW = self._allow_all(h_SD.shape[0])
    return _pick(self.graphdef, self.params, state, h_SD, seqs, bitmask_SW, num_top=self.config.num_top_logprobs,
                 mesh=self.mesh)

  # JetStream's contract, thin over the step: a prompt (or its next chunk) is prefilled, a sequence is inserted into
  # the decode set by the host (`serving.scheduler` seats it in a slot), and generate is a step of decode rows.
  def prefill(self, state: EngineState, rows: list[Row]) -> tuple[EngineState, StepResult]:
    """Prompt chunks into their pages; a row that ends its prompt samples the first token."""
    return self.step(state, self.build(rows))

  def generate(self, state: EngineState, rows: list[Row]) -> tuple[EngineState, StepResult]:
    """One decode token for every row (`Row.tokens == [None]`: the token the previous step sampled)."""
    return self.step(state, self.build(rows))

  # ------------------------------------------------------------------ scoring (no pages, no state)
  def score_tokens(self, tokens_RT: np.ndarray, num_top: int = 0):
    """Dispatches a full forward over padded token rows [R, T] (one compile per shape; `jaxllm.serving.scoring`
    picks the buckets) -> device arrays (logprob of tokens[:, 1:] given their prefix [R, T-1] float32, and whether
    each was the argmax [R, T-1] bool; with num_top, the top tokens [R, T-1, num_top] int32 and their logprobs).
    Asynchronous: read them with `host_value`."""
    return _score(self.graphdef, self.params, np.asarray(tokens_RT, np.int32), num_top=num_top, **self._static)

  def logits(self, tokens_RT) -> np.ndarray:
    """float32 logits [R, T, V] of a full forward over equal-length, unpadded token rows (a test and notebook aid)."""
    return host_value(_logits(self.graphdef, self.params, np.asarray(tokens_RT, np.int32), **self._static))

  # ------------------------------------------------------------------ compilation
  def warmup(self, state: EngineState | None = None) -> EngineState:
    """Compiles the step for every token bucket (pick twice: the greedy argmax and the sampler; the prompt
    scoring of `prompt_logprobs`, so an echo request never compiles on the engine's thread). Runs on
    `state` (an idle scheduler's: padding rows write only the scratch page) and returns it, so no second KV cache is
    allocated; None makes a scratch state."""
    start, before = time.perf_counter(), self.num_compilations()
    state = self.init_state() if state is None else state
    log = logging.getLogger("jaxllm.engine")
    for k, T in enumerate(self.token_buckets):
      log.info("warmup: bucket %d/%d (%d tokens), %d programs compiled so far, %.1f s", k + 1,
               len(self.token_buckets), T, self.num_compilations() - before, time.perf_counter() - start)
      batch = self._padding_batch(T)
      state, h_SD, h_TD = self.forward(state, batch)
      state, _ = self.pick(state, h_SD, batch.seqs)
      state, _ = self.pick(state, h_SD, batch.seqs, self.full_bitmask(h_SD.shape[0]))
      self.prompt_logprobs(h_TD, np.full((h_TD.shape[0],), -1, np.int32))
    state = jax.block_until_ready(state)
    log.info("warmup: %d programs in %.1f s", self.num_compilations() - before, time.perf_counter() - start)
    return state

  def _allow_all(self, num_rows: int) -> jax.Array:
    """full_bitmask(num_rows) kept on the devices (placed as the step's rows are), made once per S bucket."""
    if num_rows not in self._allow_all_cache:
      mask = self.full_bitmask(num_rows)
      if self.activation_sharding is None:
        self._allow_all_cache[num_rows] = jnp.asarray(mask)
      else:
        where = NamedSharding(self.activation_sharding.mesh, REPLICA if self.mesh is not None else P())
        self._allow_all_cache[num_rows] = jax.make_array_from_callback(mask.shape, where, lambda i: mask[i])
    return self._allow_all_cache[num_rows]

  def full_bitmask(self, num_rows: int) -> np.ndarray:
    """A structured-output bitmask that allows every token ([num_rows, ceil(V / 32)] int32 of all ones)."""
    return np.full((num_rows, cdiv(self.model_config.vocab_size, 32)), -1, np.int32)

  def _padding_batch(self, T: int) -> StepBatch:
    """A step of bucket T with no sequences (every replica's rows padding)."""
    empty = self._build_replica([], T, min(T, self.config.max_num_seqs))
    return jax.tree.map(lambda x: np.concatenate([x] * self.num_replicas), empty)

  @staticmethod
  def num_compilations() -> int:
    """Step programs (forward and pick) compiled so far in this process (engines of the same model and shapes share
    them); flat once warmup has run."""
    return _forward._cache_size() + _pick._cache_size() + _prompt_logprobs._cache_size()
