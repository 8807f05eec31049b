"""The engine: jit-compiled prefill / insert / generate over a paged KV cache (JetStream's contract, paged underneath).

    engine = Engine(model, EngineConfig(num_slots=32, page_size=16, max_model_len=2048))
    state = engine.init_state()
    state, prefix = engine.prefill(state, prompts, page_rows, sampling)   # KV into the prompts' pages, first tokens
    state = engine.insert(state, prefix, slots)                           # slots take the prefixes
    state, result = engine.generate(state)                                # decode_steps steps for every slot
    state = engine.release(state, slots)                                  # slots idle again

Data flow. `prefill` runs whole prompts as a padded [R, T] batch (R and T from fixed buckets) through flash attention
and writes their K/V into the pages the host allocator gave them (`layers.paged.PagedPrefill`); it samples each
prompt's first token. `insert` copies R prefixes into slot rows of the decode state (page-table row, position, last
token, sampling settings, token history) with a scatter that drops rows whose slot is -1. `generate` runs
`decode_steps` steps in one `lax.scan`: the slots' last tokens form the ragged token axis (q_len = 1 each) of
`layers.paged.PagedKVCache`, so ragged paged attention reads each slot's own pages; idle slots read and write only the
scratch page. A generate call is compiled per (slot bucket, page bucket): it computes only slots [0, num_slots)
(the requests sit in the lowest slots) and gathers only the first `num_pages` entries of their page tables, as many
as the longest running sequence needs, both rounded up to a power of two; so a lone request does not pay for
num_slots rows, nor short sequences for max_model_len. `fork` seats a further sample of a just-prefilled prompt in
a slot over the prompt's shared pages (n > 1 without a second prefill). Every function is jitted once per shape bucket with the state donated (updated in place), and sampling
settings live in the state as per-slot arrays, so no request ever recompiles anything.

The host (`serving.scheduler`) owns page ids and must have allocated pages for every position a step writes; a slot
that runs past its pages (a finished request still in flight) writes to the scratch page.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from jaxllm.layers.llama import Llama
from jaxllm.layers.paged import PagedKVCache, PagedPrefill
from jaxllm.sampling import MAX_LOGPROBS, SamplingArrays, TokenHistory, sample
from jaxllm.sharding.distributed import host_value


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
  max_model_len: int  # prompt + generated tokens per sequence
  num_slots: int = 32  # sequences decoded together
  page_size: int = 16
  # KV pages (one is scratch). None: `kv_cache_memory_fraction` of the device memory left free once the weights are
  # placed, capped at what every slot needs at max_model_len (see `size_kv_cache`).
  num_pages: int | None = None
  kv_cache_memory_fraction: float | None = None  # None: 0.9 on GPU/TPU; on CPU min(4 GiB, 0.5 of free RAM)
  max_prefill_batch: int = 8  # prompts per prefill call (rounded down to a power of two)
  # Padded tokens (R x T of the bucket) one prefill call may take: a long prompt is not batched with prompts that
  # would be padded to its length (vLLM's max_num_batched_tokens). A single prompt always fits.
  max_prefill_tokens: int = 2048
  min_prefill_len: int = 16  # smallest prompt bucket; buckets double up to max_model_len
  decode_steps: int = 1  # decode steps per generate call
  num_top_logprobs: int = 0  # top-n logprobs computed per token (0: off; at most MAX_LOGPROBS)
  attention_impl: str | None = None  # see jaxllm.pallas_kernels.split_impl

  def __post_init__(self):
    def positive(name):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f"EngineConfig.{name}={getattr(self, name)!r} must be a positive integer.")

    for name in ("max_model_len", "num_slots", "page_size", "max_prefill_batch", "max_prefill_tokens",
                 "min_prefill_len", "decode_steps"):
      positive(name)
    if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
      raise ValueError(f"EngineConfig.num_pages={self.num_pages!r} must be an integer >= 2 (one is scratch).")
    f = self.kv_cache_memory_fraction
    if f is not None and (not isinstance(f, (int, float)) or not 0 < f <= 1):
      raise ValueError(f"EngineConfig.kv_cache_memory_fraction={f!r} must be in (0, 1].")
    if not 0 <= self.num_top_logprobs <= MAX_LOGPROBS:
      raise ValueError(f"EngineConfig.num_top_logprobs={self.num_top_logprobs} must be in [0, {MAX_LOGPROBS}].")

  @property
  def pages_per_seq(self) -> int:
    return -(-self.max_model_len // self.page_size)

  @property
  def pages_wanted(self) -> int:
    """Pages for every slot at max_model_len plus the scratch page: more would never be used."""
    return self.num_slots * self.pages_per_seq + 1

  @property
  def prefill_lengths(self) -> tuple[int, ...]:
    return _doublings(self.min_prefill_len, self.max_model_len)

  @property
  def decode_page_buckets(self) -> tuple[int, ...]:
    """Pages per slot that a decode step attends over: powers of two from the smallest prompt bucket's, up to
    pages_per_seq. A step reads only as many pages as its longest slot needs, rounded up to a bucket, not
    max_model_len's worth for every slot."""
    return _doublings(-(-self.min_prefill_len // self.page_size), self.pages_per_seq)

  @property
  def decode_slot_buckets(self) -> tuple[int, ...]:
    """Slots a decode step computes: powers of two up to num_slots. The scheduler seats requests in the lowest free
    slot, so a step with few requests runs a small batch instead of all num_slots rows."""
    return _doublings(1, self.num_slots)

  @property
  def prefill_batches(self) -> tuple[int, ...]:
    out, n = [], 1
    while n <= self.max_prefill_batch:
      out.append(n)
      n *= 2
    return tuple(out)


def _doublings(first: int, last: int) -> tuple[int, ...]:
  """first, 2 * first, 4 * first, ... while below `last`, then `last` itself: a bucket ladder."""
  out, n = [], first
  while n < last:
    out.append(n)
    n *= 2
  return tuple(out) + (last,)


@struct.dataclass
class DecodeState:
  """Everything `generate` reads and writes, per slot S (M = pages per sequence, V = vocab)."""

  k: jax.Array  # [L, P, K, C, H] KV pages
  v: jax.Array  # [L, P, K, C, H]
  page_table: jax.Array  # [S, M] int32; 0 (scratch) past a slot's pages
  positions: jax.Array  # [S] int32: position of `tokens` (the cache holds positions < this)
  tokens: jax.Array  # [S] int32: last sampled token, fed next
  active: jax.Array  # [S] bool
  sampling: SamplingArrays  # [S] rows
  history: TokenHistory  # [S, V]


@struct.dataclass
class Prefix:
  """What prefill hands to insert, per prompt R."""

  page_rows: jax.Array  # [R, M] int32
  lengths: jax.Array  # [R] int32: tokens prefilled (position of the first sampled token)
  tokens: jax.Array  # [R] int32 first sampled token
  logprobs: jax.Array  # [R] float32
  top_ids: jax.Array  # [R, n] int32 (n = num_top_logprobs, may be 0)
  top_logprobs: jax.Array  # [R, n] float32
  sampling: SamplingArrays  # [R]
  history: TokenHistory  # [R, V], the first token already counted


@struct.dataclass
class ResultTokens:
  """generate's output, per slot S and step N."""

  tokens: jax.Array  # [S, N] int32
  logprobs: jax.Array  # [S, N] float32
  top_ids: jax.Array  # [S, N, n] int32
  top_logprobs: jax.Array  # [S, N, n] float32


class Engine:
  """Holds the model's params and the compiled programs; the state lives outside (donated through every call)."""

  def __init__(self, model: Llama, config: EngineConfig):
    self.config = config
    self.model_config = model.config
    self.dtype = model.dtype
    self.activation_sharding = model.activation_sharding
    graphdef, self.params = nnx.split(model)
    c, mc = config, model.config
    self.num_pages = size_kv_cache(config, model.config, model.dtype, self.activation_sharding)
    n_top = c.num_top_logprobs

    def pick(logits_BV, sampling, positions_B, history):
      if n_top:
        return sample(logits_BV, sampling, positions_B, history, num_top=n_top)
      tok, lp = sample(logits_BV, sampling, positions_B, history)
      B = tok.shape[0]
      return tok, lp, jnp.zeros((B, 0), jnp.int32), jnp.zeros((B, 0), jnp.float32)

    def prefill(params, state: DecodeState, tokens_RT, lengths_R, prompt_lens_R, page_rows_RM,
                sampling: SamplingArrays):
      """Prompts (or a preempted request's prompt + output so far: tokens at or past prompt_lens_R count as output
      for the penalties) -> KV pages and first tokens."""
      model = nnx.merge(graphdef, params)
      R, T = tokens_RT.shape
      positions_RT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (R, T))
      cache = PagedPrefill(k=state.k, v=state.v, page_rows_BM=page_rows_RM, lengths_B=lengths_R)
      h_RTD, cache = model(tokens_RT, positions_RT, cache, c.attention_impl)
      last_R1D = jnp.take_along_axis(h_RTD, (lengths_R - 1)[:, None, None], axis=1)
      real_RT = positions_RT < lengths_R[:, None]
      rows_RT = jnp.broadcast_to(jnp.arange(R)[:, None], (R, T))
      V = mc.vocab_size
      in_prompt = jnp.zeros((R, V), bool).at[rows_RT, jnp.where(positions_RT < prompt_lens_R[:, None], tokens_RT, V)
                                             ].set(True, mode="drop")
      is_output = real_RT & (positions_RT >= prompt_lens_R[:, None])
      counts = jnp.zeros((R, V), jnp.int32).at[rows_RT, jnp.where(is_output, tokens_RT, V)].add(1, mode="drop")
      history = TokenHistory(output_counts=counts, in_prompt=in_prompt)
      tok, lp, top_ids, top_lp = pick(model.logits(last_R1D)[:, 0], sampling, lengths_R, history)
      history = history.replace(output_counts=counts.at[jnp.arange(R), tok].add(1))
      prefix = Prefix(page_rows=page_rows_RM, lengths=lengths_R, tokens=tok, logprobs=lp, top_ids=top_ids,
                      top_logprobs=top_lp, sampling=sampling, history=history)
      return state.replace(k=cache.k, v=cache.v), prefix

    def insert(state: DecodeState, prefix: Prefix, slots_R):
      S = state.positions.shape[0]
      at = jnp.where(slots_R >= 0, slots_R, S)  # -1: padding prefix, dropped

      def put(dst, src):
        return dst.at[at].set(src, mode="drop")

      return state.replace(
          page_table=put(state.page_table, prefix.page_rows), positions=put(state.positions, prefix.lengths),
          tokens=put(state.tokens, prefix.tokens), active=put(state.active, jnp.ones_like(slots_R, bool)),
          sampling=jax.tree.map(put, state.sampling, prefix.sampling),
          history=jax.tree.map(put, state.history, prefix.history))

    def release(state: DecodeState, slots_mask_S):
      return state.replace(active=state.active & ~slots_mask_S,
                           page_table=jnp.where(slots_mask_S[:, None], 0, state.page_table))

    def generate(params, full: DecodeState, num_pages: int, num_slots: int):
      """decode_steps steps of slots [0, num_slots) (the bucket holding every occupied slot) over the first num_pages
      pages of each; the other slots are not computed at all."""
      model = nnx.merge(graphdef, params)
      S, C, M = num_slots, c.page_size, num_pages
      head = lambda x: x[:S]  # noqa: E731
      state = full.replace(page_table=full.page_table[:S, :M], positions=head(full.positions),
                           tokens=head(full.tokens), active=head(full.active),
                           sampling=jax.tree.map(head, full.sampling), history=jax.tree.map(head, full.history))

      def step(state: DecodeState, _):
        pos_S = state.positions
        page_S = jnp.take_along_axis(state.page_table, jnp.minimum(pos_S // C, M - 1)[:, None], axis=1)[:, 0]
        in_range = state.active & (pos_S < M * C)  # else (a stale slot past the bucket): scratch page only
        cache = PagedKVCache(
            k=state.k, v=state.v, slot_page_T=jnp.where(in_range, page_S, 0), slot_offset_T=pos_S % C,
            kv_lens=jnp.where(in_range, pos_S + 1, 1),
            page_indices=jnp.where(in_range[:, None], state.page_table, 0),
            cu_q_lens=jnp.arange(S + 1, dtype=jnp.int32), num_seqs=jnp.int32(S), decode_only=True)
        h_1SD, cache = model(state.tokens[None], pos_S[None], cache, c.attention_impl)
        tok, lp, top_ids, top_lp = pick(model.logits(h_1SD)[0], state.sampling, pos_S + 1, state.history)
        act = state.active
        counts = state.history.output_counts.at[jnp.arange(S), tok].add(act.astype(jnp.int32))
        state = state.replace(k=cache.k, v=cache.v, tokens=jnp.where(act, tok, state.tokens),
                              positions=pos_S + act.astype(jnp.int32),
                              history=state.history.replace(output_counts=counts))
        return state, (tok, lp, top_ids, top_lp)

      state, (tok, lp, top_ids, top_lp) = jax.lax.scan(step, state, None, length=c.decode_steps)
      put = lambda dst, src: dst.at[:S].set(src)  # noqa: E731
      full = full.replace(k=state.k, v=state.v, positions=put(full.positions, state.positions),
                          tokens=put(full.tokens, state.tokens),
                          history=jax.tree.map(put, full.history, state.history))
      return full, ResultTokens(tokens=tok.T, logprobs=lp.T, top_ids=top_ids.transpose(1, 0, 2),
                                top_logprobs=top_lp.transpose(1, 0, 2))

    def fork(state: DecodeState, prefix: Prefix, row, slot, page_row_M, src_page, dst_page, token,
             sampling: SamplingArrays):
      """Slot `slot` becomes another sample of prefix row `row` (a prompt of length n just prefilled): it shares the
      prompt's full pages (`page_row_M` starts with them), gets a private copy (`dst_page`) of the page holding
      position n - 1 (`src_page`), and restarts one token early, feeding the prompt's last `token` at position n - 1,
      so its own first token is drawn by the next generate step from its own seed (the draw's key is (seed, n), as a
      prefill's would be)."""
      k = state.k.at[:, dst_page].set(state.k[:, src_page])
      v = state.v.at[:, dst_page].set(state.v[:, src_page])
      one = lambda dst, src: dst.at[slot].set(src[0])  # noqa: E731
      V = state.history.output_counts.shape[1]
      history = TokenHistory(output_counts=state.history.output_counts.at[slot].set(jnp.zeros((V,), jnp.int32)),
                             in_prompt=state.history.in_prompt.at[slot].set(prefix.history.in_prompt[row]))
      return state.replace(
          k=k, v=v, page_table=state.page_table.at[slot].set(page_row_M),
          positions=state.positions.at[slot].set(prefix.lengths[row] - 1), tokens=state.tokens.at[slot].set(token),
          active=state.active.at[slot].set(True), sampling=jax.tree.map(one, state.sampling, sampling),
          history=history)

    def set_pages(state: DecodeState, mask_S, rows_SM):
      return state.replace(page_table=jnp.where(mask_S[:, None], rows_SM, state.page_table))

    def logits(params, tokens_RT):
      """Full forward over rows from position 0, no pages: float32 logits [R, T, V]."""
      model = nnx.merge(graphdef, params)
      R, T = tokens_RT.shape
      positions_RT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (R, T))
      return model.logits(model(tokens_RT, positions_RT, None, c.attention_impl)[0]).astype(jnp.float32)

    def score(params, tokens_RT):
      """log p(token t+1 | tokens <= t) over padded rows, and whether it was the argmax."""
      logprobs_RTV = jax.nn.log_softmax(logits(params, tokens_RT)[:, :-1], axis=-1)
      target_RT = tokens_RT[:, 1:]
      chosen_RT = jnp.take_along_axis(logprobs_RTV, target_RT[..., None], axis=-1)[..., 0]
      return chosen_RT, jnp.argmax(logprobs_RTV, axis=-1) == target_RT

    self._score = jax.jit(score)
    self._logits = jax.jit(logits)
    self._set_pages = jax.jit(set_pages, donate_argnums=0)
    self._fork = jax.jit(fork, donate_argnums=0)
    self._prefill = jax.jit(prefill, donate_argnums=1)
    self._insert = jax.jit(insert, donate_argnums=0)
    self._release = jax.jit(release, donate_argnums=0)
    self._generate = jax.jit(generate, donate_argnums=1, static_argnums=(2, 3))

  # ------------------------------------------------------------------ state
  def init_state(self) -> DecodeState:
    c, mc = self.config, self.model_config
    S, M, V = c.num_slots, c.pages_per_seq, mc.vocab_size
    shape = (mc.num_layers, self.num_pages, mc.num_kv_heads, c.page_size, mc.head_dim)
    sharding = None
    if self.activation_sharding is not None:  # KV heads over the layout's head axis, as the K/V projections
      sharding = self.activation_sharding.named(("layers", None, "kv_heads", None, "head_dim"), shape)
    zeros = jax.jit(lambda: jnp.zeros(shape, self.dtype), out_shardings=sharding)
    return DecodeState(
        k=zeros(), v=zeros(), page_table=jnp.zeros((S, M), jnp.int32), positions=jnp.zeros((S,), jnp.int32),
        tokens=jnp.zeros((S,), jnp.int32), active=jnp.zeros((S,), bool),
        sampling=jax.tree.map(jnp.asarray, SamplingArrays.create(S, temperature=0.0)),
        history=TokenHistory(output_counts=jnp.zeros((S, V), jnp.int32), in_prompt=jnp.zeros((S, V), bool)))

  # ------------------------------------------------------------------ buckets
  def prefill_shape(self, num_prompts: int, longest: int) -> tuple[int, int]:
    """The (R, T) bucket a prefill of `num_prompts` prompts of at most `longest` tokens compiles for."""
    c = self.config
    if not 1 <= num_prompts <= c.prefill_batches[-1]:
      raise ValueError(f"a prefill takes 1..{c.prefill_batches[-1]} prompts, got {num_prompts}.")
    if not 1 <= longest <= c.max_model_len:
      raise ValueError(f"a prompt of {longest} tokens does not fit max_model_len={c.max_model_len}.")
    R = next(b for b in c.prefill_batches if b >= num_prompts)
    T = next(t for t in c.prefill_lengths if t >= longest)
    return R, T

  # ------------------------------------------------------------------ calls (all asynchronous)
  def prefill(self, state: DecodeState, prompts: list[list[int]], prompt_lens: list[int],
              page_rows: list[list[int]], sampling: SamplingArrays) -> tuple[DecodeState, Prefix]:
    """`prompts[i]` (token ids, prompt_lens[i] of them the original prompt) into pages `page_rows[i]`."""
    n = len(prompts)
    R, T = self.prefill_shape(n, max(len(p) for p in prompts))
    tokens = np.zeros((R, T), np.int32)
    lengths = np.ones((R,), np.int32)  # padding rows: one token on the scratch page
    plens = np.ones((R,), np.int32)
    rows = np.zeros((R, self.config.pages_per_seq), np.int32)
    for i, (p, pl, pages) in enumerate(zip(prompts, prompt_lens, page_rows)):
      tokens[i, :len(p)], lengths[i], plens[i] = p, len(p), pl
      rows[i, :len(pages)] = pages
    if R > n:
      sampling = jax.tree.map(lambda a: np.concatenate([a, np.repeat(a[:1], R - n, axis=0)]), sampling)
    return self._prefill(self.params, state, tokens, lengths, plens, rows, sampling)

  def insert(self, state: DecodeState, prefix: Prefix, slots: list[int]) -> DecodeState:
    R = prefix.tokens.shape[0]
    return self._insert(state, prefix, np.asarray(list(slots) + [-1] * (R - len(slots)), np.int32))

  def release(self, state: DecodeState, slots: list[int]) -> DecodeState:
    mask = np.zeros((self.config.num_slots,), bool)
    mask[list(slots)] = True
    return self._release(state, mask)

  def fork(self, state: DecodeState, prefix: Prefix, row: int, slot: int, pages: list[int], src_page: int,
           dst_page: int, last_token: int, sampling: SamplingArrays) -> DecodeState:
    """Another sample of prefill row `row` in `slot`, over `pages` (shared prompt pages, then its own; `dst_page`
    receives a copy of `src_page`, the page holding the prompt's last position). `sampling`: the sample's one row."""
    row_M = np.zeros((self.config.pages_per_seq,), np.int32)
    row_M[:len(pages)] = pages
    i32 = lambda x: np.int32(x)  # noqa: E731
    return self._fork(state, prefix, i32(row), i32(slot), row_M, i32(src_page), i32(dst_page), i32(last_token),
                      sampling)

  def set_pages(self, state: DecodeState, pages: dict[int, list[int]]) -> DecodeState:
    """New page-table rows for the slots whose allocation grew ({slot: page ids})."""
    c = self.config
    mask = np.zeros((c.num_slots,), bool)
    rows = np.zeros((c.num_slots, c.pages_per_seq), np.int32)
    for slot, ids in pages.items():
      mask[slot] = True
      rows[slot, :len(ids)] = ids
    return self._set_pages(state, mask, rows)

  def decode_pages(self, max_kv_len: int) -> int:
    """The page bucket a generate call whose slots reach at most `max_kv_len` tokens runs with."""
    need = -(-max(max_kv_len, 1) // self.config.page_size)
    return next((b for b in self.config.decode_page_buckets if b >= need), self.config.pages_per_seq)

  def decode_slots(self, num_slots: int) -> int:
    """The slot bucket a generate call over slots [0, num_slots) runs with."""
    return next((b for b in self.config.decode_slot_buckets if b >= num_slots), self.config.num_slots)

  def generate(self, state: DecodeState, max_kv_len: int | None = None,
               num_slots: int | None = None) -> tuple[DecodeState, ResultTokens]:
    """`decode_steps` steps for slots [0, num_slots) (None: all), whose results come back as rows [0, bucket).
    `max_kv_len`: no active slot holds more tokens than this by the end of the call (its pages are the only ones
    attention gathers; a slot past it writes and reads the scratch page only); None: max_model_len. Both are rounded
    up to their buckets, so every call runs a program warmup compiled."""
    c = self.config
    pages = c.pages_per_seq if max_kv_len is None else self.decode_pages(max_kv_len)
    slots = c.num_slots if num_slots is None else self.decode_slots(num_slots)
    return self._generate(self.params, state, pages, slots)

  # ------------------------------------------------------------------ scoring (no pages, no state)
  def score_tokens(self, tokens_RT: np.ndarray):
    """Dispatches a full forward over padded token rows [R, T] (one compile per shape; `jaxllm.serving.scoring`
    picks the buckets) -> device arrays (logprob of tokens[:, 1:] given their prefix [R, T-1] float32, and whether
    each was the argmax [R, T-1] bool). Asynchronous: read them with `host_value`."""
    return self._score(self.params, np.asarray(tokens_RT, np.int32))

  def logits(self, tokens_RT) -> np.ndarray:
    """float32 logits [R, T, V] of a full forward over equal-length, unpadded token rows (a test and notebook aid)."""
    return host_value(self._logits(self.params, np.asarray(tokens_RT, np.int32)))

  # ------------------------------------------------------------------ compilation
  def warmup(self, state: DecodeState | None = None) -> DecodeState:
    """Compiles every bucket a scheduler can call: each prefill (R, T) within the prefill token budget (and R = 1 at
    any T), insert per R, fork, release, set_pages, and generate per (slot bucket, page bucket). Runs on `state` (an
    idle scheduler's: only the scratch page is written) and returns it, so no second KV cache is allocated; None
    makes a scratch state that is dropped."""
    c = self.config
    start, before = time.perf_counter(), self.num_compilations()
    state = self.init_state() if state is None else state
    for R in c.prefill_batches:
      for T in c.prefill_lengths:
        if R > 1 and R * T > c.max_prefill_tokens:
          continue
        sampling = SamplingArrays.create(R, temperature=0.0)
        state, prefix = self.prefill(state, [[0] * T] * R, [T] * R, [[0]] * R, sampling)
      state = self.insert(state, prefix, [])
    state = self.fork(state, prefix, 0, 0, [0], 0, 0, 0, SamplingArrays.create(1, temperature=0.0))
    state = self.release(state, [0])
    for slots in c.decode_slot_buckets:
      for pages in c.decode_page_buckets:
        state, _ = self._generate(self.params, state, pages, slots)
    state = jax.block_until_ready(self.set_pages(state, {}))
    logging.getLogger("jaxllm.engine").info("warmup: %d programs in %.1f s", self.num_compilations() - before,
                                            time.perf_counter() - start)
    return state

  def num_compilations(self) -> int:
    """Programs compiled so far (jit cache entries of every engine function); flat after warmup."""
    fns = (self._prefill, self._insert, self._release, self._generate, self._set_pages, self._fork)
    return sum(f._cache_size() for f in fns)


# ---------------------------------------------------------------------------------------------------------- sizing
CPU_KV_CACHE_BYTES = 4 << 30  # vLLM's CPU default KV space; the CPU default fraction is also capped at this


def page_bytes(engine_config: EngineConfig, model_config, dtype, num_shards: int = 1) -> int:
  """Bytes one KV page (all layers, K and V) takes on each device holding a 1/num_shards slice of its heads."""
  mc = model_config
  per_page = 2 * mc.num_layers * mc.num_kv_heads * engine_config.page_size * mc.head_dim * jnp.dtype(dtype).itemsize
  return -(-per_page // num_shards)


def free_device_bytes(devices) -> tuple[int, bool]:
  """(bytes free on the fullest device, whether that came from the accelerator's allocator). CPU devices report no
  memory stats; their figure is the host's available RAM."""
  free = []
  for d in devices:
    stats = d.memory_stats() if hasattr(d, "memory_stats") else None
    if stats and "bytes_limit" in stats:
      free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
  if free:
    return min(free), True
  import os

  return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), False


def size_kv_cache(config: EngineConfig, model_config, dtype, activation_sharding=None) -> int:
  """Number of KV pages: `config.num_pages` if given, else the memory budget's worth, at most `pages_wanted`.

  Raises a ValueError when the pages cannot hold even one sequence of max_model_len (vLLM's "max_model_len is larger
  than the KV cache can hold"), naming the figures and the flags that change them."""
  if config.num_pages is not None:
    return config.num_pages
  devices, shards = jax.local_devices()[:1], 1
  if activation_sharding is not None:
    mesh = activation_sharding.mesh
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    shape = (model_config.num_layers, 1, model_config.num_kv_heads, config.page_size, model_config.head_dim)
    spec = activation_sharding.named(("layers", None, "kv_heads", None, "head_dim"), shape).spec
    for axes in spec:
      for a in (axes if isinstance(axes, tuple) else (axes,) if axes else ()):
        shards *= mesh.shape[a]
  free, accelerator = free_device_bytes(devices)
  fraction = config.kv_cache_memory_fraction
  if fraction is None:
    budget = 0.9 * free if accelerator else min(CPU_KV_CACHE_BYTES, 0.5 * free)
  else:
    budget = fraction * free
  per_page = page_bytes(config, model_config, dtype, shards)
  pages = min(int(budget // per_page), config.pages_wanted)
  if pages < config.pages_per_seq + 1:
    raise ValueError(
        f"the KV cache budget ({budget / 2**30:.2f} GiB per device, {per_page} bytes per page of "
        f"{config.page_size} tokens) holds {max(pages - 1, 0)} pages, fewer than one sequence of "
        f"max_model_len={config.max_model_len} needs ({config.pages_per_seq}); lower max_model_len, or raise "
        "kv_cache_memory_fraction or num_pages.")
  return pages
