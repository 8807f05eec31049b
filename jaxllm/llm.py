"""`LLM`: the notebook API. Load a model once, then `generate`, `chat` and `score` on batches of prompts.

    llm = LLM("default")                                   # SmolLM2-135M-Instruct; or a .gguf / HF dir / convert dir
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    out[0].text, out[0].token_ids, out[0].finish_reason
    llm.chat([{"role": "user", "content": "Hi!"}])
    for chunk in llm.stream([{"role": "user", "content": "Hi!"}]): print(chunk, end="")   # as it is generated
    llm.score([("The capital of France is", " Paris")])   # continuation logprobs, their sum, is_greedy
    llm.score(["A whole text to score."])[0].perplexity   # long texts: sliding windows (`stride=`)

Requests are validated on the host (clear errors, nothing reaches the device) and tokenized; then every prompt goes
into the engine's continuous-batching scheduler at once (offline mode: `jaxllm.serving.scheduler` over the paged
`jaxllm.serving.engine`), which keeps up to `max_num_seqs` sequences decoding and admits the next prompt as soon as
one finishes. Outputs come back in input order. The n > 1 samples of a prompt share its KV pages. Programs compile
on first use of each shape bucket (`warmup()` compiles them all ahead).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Iterator, Sequence

import numpy as np

from jaxllm import checkpoint
from jaxllm.sampling import MAX_LOGPROBS, SamplingParams
from jaxllm.serving.config import EngineConfig
from jaxllm.serving.engine import Engine
from jaxllm.serving.scheduler import Scheduler


@dataclasses.dataclass
class CompletionOutput:
  index: int
  text: str
  token_ids: list[int]
  logprobs: list[float]  # logprob of each generated token under the model
  finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
  stop_reason: str | int | None = None  # the stop string or token id that ended it, if any
  top_logprobs: list[dict[int, float]] | None = None  # with SamplingParams.logprobs: {token id: logprob} per position

  @property
  def cumulative_logprob(self) -> float:
    return float(sum(self.logprobs))


@dataclasses.dataclass
class RequestOutput:
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]
  # With SamplingParams.prompt_logprobs, vLLM's shape: per prompt token, None for the first, else {token id: logprob}
  # holding the prompt token itself and the top-n tokens at that position (n or n + 1 entries).
  prompt_logprobs: list[dict[int, float] | None] | None = None
  # Prompt tokens the prefix cache supplied instead of computing them (vLLM's field): the fewest over the samples.
  num_cached_tokens: int = 0

  # The first sample's fields, for the common n == 1 case.
  @property
  def text(self) -> str:
    return self.outputs[0].text

  @property
  def token_ids(self) -> list[int]:
    return self.outputs[0].token_ids

  @property
  def finish_reason(self) -> str:
    return self.outputs[0].finish_reason


def _prompt_logprobs(ids: list[int], req) -> list[dict[int, float] | None] | None:
  """RequestOutput.prompt_logprobs from a finished request's per-position scores."""
  if req.prompt_logprobs is None:
    return None
  return [None] + [{tok: lp, **tops} for tok, lp, tops in zip(ids[1:], req.prompt_logprobs[1:],
                                                                 req.prompt_top_logprobs[1:])]


@dataclasses.dataclass
class StreamChunk:
  """New output of a streamed request: `print(chunk, end="")` prints its text."""
  text: str  # the new text (never a partial UTF-8 character, never a prefix of a stop string that may still match)
  token_ids: list[int]  # the new tokens
  finish_reason: str | None = None  # set on the last chunk: "stop" or "length"

  def __str__(self) -> str:
    return self.text


@dataclasses.dataclass
class ScoreOutput:
  """A scored pair, or a scored text (its first token is the context, the rest are scored)."""
  context_token_ids: list[int]
  continuation_token_ids: list[int]
  logprobs: list[float]  # per continuation token
  sum_logprob: float
  is_greedy: bool  # every continuation token is the argmax given its prefix
  top_logprobs: list[dict[int, float]] | None = None  # per continuation token, its num_top_logprobs likeliest tokens

  @property
  def num_tokens(self) -> int:
    return len(self.logprobs)

  @property
  def perplexity(self) -> float:
    import math

    return math.exp(-self.sum_logprob / len(self.logprobs))


class LLM:
  """A loaded model with its tokenizer and the engine that runs it.

  Args:
    model: "default", a preset-free checkpoint path (.gguf file, HF dir, `jaxllm convert` dir).
    dtype: parameter dtype, "float32" or "bfloat16"; "auto" (the default): bfloat16 on a GPU / TPU, float32 on CPU
      (where XLA emulates bfloat16 matmuls, 10-15x slower).
    quantization: "auto", None, "int8" or "q8_0": weight-only int8 for the attention projections and the MLP
      (embedding, LM head, norms and biases stay in `dtype`), quantized as the checkpoint is read: "int8" with a
      scale per output channel, "q8_0" with a float16 scale per 32 weights (llama.cpp's Q8_0; a Q8_0 GGUF loads
      bit-exactly); None: float. "auto" (the default): q8_0 for a GGUF stored quantized (so the default model, a
      Q4_1 GGUF, runs q8_0: 2.4x fewer bytes than float32, faster, +0.02% perplexity), float for HF and float GGUF
      checkpoints, and what a `jaxllm convert` directory holds.
    tokenizer: a tokenizer path to use instead of the checkpoint's own.
    seed: seeds the draws of requests whose SamplingParams.seed is None.
    mesh, layout: a device mesh ("model=8", "data=2,model=4", or a jax Mesh) and its sharding layout ("tp", "2d",
      "dp"; None: what the mesh's axes name, e.g. "data=8" alone is 8 replicas, "dp").
    compilation_cache_dir: a directory for jax's persistent compilation cache (programs compiled once are reused
      by later processes).
    engine_config: the engine's settings (`jaxllm.serving.config.EngineConfig`), or
    **engine_args: any of its fields by name, e.g. max_model_len=2048, max_num_seqs=8, max_num_batched_tokens=256,
      enable_prefix_caching=False, kv_cache_dtype="int8" (or "fp8"), page_size, num_pages,
      kv_cache_memory_fraction.
  """

  def __init__(self, model: str = "default", *, dtype: str = "auto", quantization: str | None = "auto",
               tokenizer: str | None = None, seed: int = 0,
               mesh: str | None = None, layout: str | None = None, compilation_cache_dir: str | None = None,
               engine_config: EngineConfig | None = None, **engine_args):
    if engine_config is not None and engine_args:
      raise ValueError(f"pass engine_config or engine settings by name ({', '.join(engine_args)}), not both.")
    engine_config = engine_config or EngineConfig.from_kwargs(**engine_args)  # a bad setting fails before loading
    if compilation_cache_dir is not None:
      enable_compilation_cache(compilation_cache_dir)
    self.mesh = None
    if mesh is not None:
      from jaxllm.sharding import default_layout, make_mesh

      self.mesh = mesh if not isinstance(mesh, str) else make_mesh(mesh)
      layout = layout or default_layout(self.mesh.shape)
    self.layout = layout = layout or "tp"
    ckpt = checkpoint.load_checkpoint(model, dtype, self.mesh, layout, quantization)
    self.config = ckpt.config
    self.dtype = ckpt.dtype
    self.quantization = ckpt.quantization
    self.source = ckpt.source
    if tokenizer is not None:
      from jaxllm.tokenizer import load_tokenizer

      self.tokenizer = load_tokenizer(tokenizer)
    else:
      self.tokenizer = ckpt.tokenizer
    engine_config = engine_config.resolve(self.config.max_position_embeddings)
    self.max_model_len = engine_config.max_model_len
    self._rng = np.random.default_rng(seed)
    built = checkpoint.build_model(self.config, ckpt.params, self.dtype, self.mesh, layout, self.quantization)
    self.kv_placement = getattr(built, "kv_placement", None)  # how the KV heads sit on the mesh (None: one device)
    self.engine = Engine(built, engine_config)
    eos = tuple(self.tokenizer.eos_ids) if self.tokenizer is not None else ()
    self.scheduler = Scheduler(self.engine, self.tokenizer, eos_ids=eos, seed=seed)

  def __repr__(self) -> str:
    c = self.config
    e = self.engine.config
    return (f"LLM({c.name!r}, {c.num_params / 1e6:.1f}M params, dtype={self.dtype}, "
            f"{self.quantization + ' weights, ' if self.quantization else ''}layers={c.num_layers}, "
            f"heads={c.num_heads}/{c.num_kv_heads}, max_model_len={self.max_model_len}, "
            f"KV cache: {self.engine.num_pages - 1} pages x {e.page_size} tokens of {self.engine.kv_dtype}, "
            f"max_num_seqs={e.max_num_seqs}, max_num_batched_tokens={e.max_num_batched_tokens}, "
            + (f"each of {self.engine.num_replicas} data-parallel replicas, " if self.engine.num_replicas > 1 else "")
            + f"prefix caching {'on' if e.enable_prefix_caching else 'off'}"
            + (f", mesh={dict(self.mesh.shape)}, layout={self.layout}, KV: {self.kv_placement.note}"
               if self.mesh is not None else "") + ")")

  def warmup(self) -> None:
    """Compiles every shape bucket now (as a server does at start) instead of on first use."""
    self.scheduler.state = self.engine.warmup(self.scheduler.state)

  def logits(self, token_rows) -> np.ndarray:
    """float32 logits [R, T, V] of a full forward pass over equal-length token rows."""
    return self.engine.logits(token_rows)

  # ------------------------------------------------------------------ tokens
  def _require_tokenizer(self):
    if self.tokenizer is None:
      raise ValueError(f"{self.source} has no tokenizer; pass tokenizer=PATH or use prompt_token_ids.")
    return self.tokenizer

  def _check_tokens(self, ids: Sequence[int], what: str) -> list[int]:
    ids = [int(i) for i in ids]
    if not ids:
      raise ValueError(f"{what} is empty; a prompt needs at least one token.")
    bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
    if bad:
      raise ValueError(f"{what} has token ids outside [0, {self.config.vocab_size}): {bad[:5]}.")
    if len(ids) >= self.max_model_len:
      raise ValueError(f"{what} has {len(ids)} tokens; max_model_len is {self.max_model_len}, which must leave room "
                       "for at least one generated token.")
    return ids

  # ------------------------------------------------------------------ generate
  def generate(self, prompts: str | Sequence[str] | None = None,
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
               prompt_token_ids: Sequence[Sequence[int]] | None = None,
               use_tqdm: bool | None = None) -> list[RequestOutput]:
    """Continuations of every prompt, in input order. sampling_params: one for all prompts or a list of one per
    prompt. use_tqdm: a progress bar over finished sequences (None: on when stderr is a terminal or a notebook)."""
    params = sampling_params or SamplingParams()
    if (prompts is None) == (prompt_token_ids is None):
      raise ValueError("pass exactly one of `prompts` (text) or `prompt_token_ids`.")
    if prompts is not None:
      prompts = [prompts] if isinstance(prompts, str) else list(prompts)
      tok = self._require_tokenizer()
      ids = [self._check_tokens(tok.encode(p), f"prompt {i}") for i, p in enumerate(prompts)]
    else:
      ids = [self._check_tokens(p, f"prompt_token_ids[{i}]") for i, p in enumerate(prompt_token_ids)]
      prompts = [None] * len(ids)
    return self._generate(list(prompts), ids, params, use_tqdm)

  def chat(self, messages, sampling_params: SamplingParams | None = None, *,
           add_generation_prompt: bool = True, use_tqdm: bool | None = None) -> list[RequestOutput]:
    """`messages`: one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
    tok = self._require_tokenizer()
    convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    if not convs or any(not c for c in convs):
      raise ValueError("chat() needs at least one non-empty conversation of {'role', 'content'} messages.")
    texts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in convs]
    # The template already holds any BOS the model wants; do not add a second one.
    ids = [self._check_tokens(tok.encode(t, add_bos=False), f"conversation {i}") for i, t in enumerate(texts)]
    return self._generate(texts, ids, sampling_params or SamplingParams(), use_tqdm)

  def _generate(self, prompts: list, ids: list[list[int]], params,
                use_tqdm: bool | None = None) -> list[RequestOutput]:
    plist = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
    if len(plist) != len(ids) or not all(isinstance(p, SamplingParams) for p in plist):
      raise ValueError(f"sampling_params must be one SamplingParams or a list of one per prompt ({len(ids)}); got "
                       f"{len(plist)} items.")
    if any(p.stop for p in plist) and self.tokenizer is None:
      raise ValueError(f"stop strings need a tokenizer and {self.source} has none; pass tokenizer=PATH or use "
                       "stop_token_ids.")
    sched = self.scheduler
    grammars = []
    for i, (p, sp) in enumerate(zip(ids, plist)):  # every prompt (and constraint) is checked before any is queued
      try:
        sched.validate(p, sp)
        grammars.append(None if sp.structured_outputs is None else sched.grammars.compile(sp.structured_outputs))
      except ValueError as e:
        raise ValueError(f"prompt {i}: {e}") from None
    groups = []
    for p, sp, grammar in zip(ids, plist, grammars):
      base = sp.seed if sp.seed is not None else int(self._rng.integers(0, 2**63 - 1))
      # Sample k of seed s gets its own stream: hash (s, k), so (s, 1) never collides with (s + 1, 0).
      seeds = [int(np.random.SeedSequence([base, k]).generate_state(1)[0]) for k in range(sp.n)]
      groups.append(sched.add_samples(p, sp, seeds=seeds, grammar=grammar))
    bar = _progress(sum(len(g) for g in groups), use_tqdm)
    try:
      done = 0
      while sched.has_work():
        sched.step()
        if bar is not None:
          now = sum(r.finished for g in groups for r in g)
          bar.update(now - done)
          done = now
    except BaseException:  # KeyboardInterrupt in a notebook: nothing of this call stays queued or holds pages
      for g in groups:
        for r in g:
          sched.cancel(r.request_id)
      sched.run_until_done()
      raise
    finally:
      if bar is not None:
        bar.close()
    return [RequestOutput(prompts[i], ids[i], [
        # The text leaves out the token that stopped a sample (EOS, a stop_token_ids entry), as vLLM does.
        CompletionOutput(r.index, r.text, r.output_ids, r.logprobs, r.finish_reason, r.stop_reason,
                         r.top_logprobs if r.params.logprobs is not None else None) for r in g],
                          _prompt_logprobs(ids[i], g[0]), min(r.num_cached_prompt_tokens or 0 for r in g))
            for i, g in enumerate(groups)]

  # ------------------------------------------------------------------ stream
  def stream(self, prompt, sampling_params: SamplingParams | None = None, *,
             add_generation_prompt: bool = True) -> Iterator[StreamChunk]:
    """Yields the continuation of one prompt as it is generated:

        for chunk in llm.stream([{"role": "user", "content": "Hi!"}]):
            print(chunk, end="", flush=True)

    prompt: a text, a conversation (a list of {"role", "content"} dicts, rendered with the chat template), or token
    ids. A chunk arrives after every engine step (each token as it is made). Leaving the loop early (break, an exception,
    KeyboardInterrupt) cancels the request and frees its KV pages."""
    tok = self.tokenizer
    if isinstance(prompt, str):
      ids = self._check_tokens(self._require_tokenizer().encode(prompt), "prompt")
    elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
      text = self._require_tokenizer().apply_chat_template(list(prompt), add_generation_prompt=add_generation_prompt)
      ids = self._check_tokens(tok.encode(text, add_bos=False), "conversation")
    elif isinstance(prompt, (list, tuple, np.ndarray)) and len(prompt) and all(
        isinstance(t, (int, np.integer)) for t in prompt):
      ids = self._check_tokens(prompt, "prompt token ids")
    else:
      raise ValueError(f"stream() takes a text, a conversation (a list of {{'role', 'content'}} dicts) or a list of "
                       f"token ids; got {type(prompt).__name__} {prompt!r:.60}.")
    params = sampling_params or SamplingParams()
    if not isinstance(params, SamplingParams):
      raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
    if params.n != 1:
      raise ValueError(f"stream() streams one sequence; got SamplingParams(n={params.n}). Use generate() for n > 1.")
    if params.stop and tok is None:
      raise ValueError(f"stop strings need a tokenizer and {self.source} has none.")
    sched = self.scheduler
    sched.validate(ids, params)
    deltas: list[str] = []
    seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**63 - 1))
    seed = int(np.random.SeedSequence([seed, 0]).generate_state(1)[0])  # sample 0 of generate() with this seed
    req = sched.add(ids, params, seed=seed, on_update=lambda r, d: deltas.append(d))
    sent = 0
    try:
      while True:
        if not req.finished:
          sched.step()
        new_ids, text = req.output_ids[sent:], "".join(deltas)
        deltas.clear()
        sent += len(new_ids)
        if text or new_ids or req.finished:
          yield StreamChunk(text, list(new_ids), req.finish_reason if req.finished else None)
        if req.finished:
          return
    finally:
      if not req.finished:
        sched.cancel(req.request_id)
        sched.run_until_done()

  # ------------------------------------------------------------------ score
  def score(self, inputs=None, *, token_pairs: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
            token_texts: Sequence[Sequence[int]] | None = None, stride: int | None = None,
            max_length: int | None = None, max_batch_size: int = 64, max_batch_tokens: int = 4096,
            num_top_logprobs: int = 0) -> list[ScoreOutput]:
    """Log-likelihoods, by the path `jaxllm score` runs (`jaxllm.serving.scoring`), in input order.

    inputs: a text, a (context, continuation) pair, or a list of them (mixed is fine).
      - A pair: log p(continuation | context) per continuation token and `is_greedy`, as lm-eval-harness's
        `loglikelihood` computes them; context beyond max_model_len is cut from the left.
      - A text: every token after the first, and `perplexity`. A text longer than max_length (default
        max_model_len) is scored in sliding windows of max_length tokens every `stride` tokens (default
        max_length // 2), HF's recipe.
    token_pairs / token_texts: the same with token ids instead of text.
    max_batch_size, max_batch_tokens: rows and padded tokens per forward pass (length-bucketed batches).
    num_top_logprobs: also return, per scored token, the logprobs of the n likeliest tokens there (0..20), as the
      legacy completions API's `echo` + `logprobs` returns them.
    """
    from jaxllm.serving import scoring

    given = [x is not None for x in (inputs, token_pairs, token_texts)]
    if sum(given) != 1:
      raise ValueError("pass exactly one of `inputs` (texts and/or (context, continuation) pairs), `token_pairs` "
                       "or `token_texts`.")
    if isinstance(num_top_logprobs, bool) or not isinstance(num_top_logprobs, int) or not (
        0 <= num_top_logprobs <= MAX_LOGPROBS):
      raise ValueError(f"num_top_logprobs={num_top_logprobs!r} must be an integer in [0, {MAX_LOGPROBS}].")
    scorer = scoring.Scorer(self.engine, max_batch_size=max_batch_size, max_batch_tokens=max_batch_tokens,
                            max_length=max_length, num_top=num_top_logprobs)
    stride = scorer.max_len // 2 if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= scorer.max_len:
      raise ValueError(f"stride={stride!r} must be an integer in [1, max_length={scorer.max_len}].")
    items, kinds = [], []
    if inputs is not None:
      inputs = [inputs] if isinstance(inputs, (str, tuple)) else list(inputs)
      tok = self._require_tokenizer()
      for i, x in enumerate(inputs):
        try:
          if isinstance(x, str):
            items.append(scoring.text_item(tok.encode(x)))
          elif isinstance(x, (tuple, list)) and len(x) == 2 and all(isinstance(s, str) for s in x):
            items.append(scoring.pair_item(*scoring.encode_pair(tok, *x)))
          else:
            raise ValueError(f"expected a text or a (context, continuation) pair of strings, got {x!r:.80}")
        except ValueError as e:
          raise ValueError(f"inputs[{i}]: {e}") from None
        kinds.append("text" if isinstance(x, str) else "pair")
    else:
      rows = token_pairs if token_pairs is not None else token_texts
      for i, x in enumerate(rows):
        try:
          items.append(scoring.pair_item(*x) if token_pairs is not None else scoring.text_item(list(x)))
        except (ValueError, TypeError) as e:
          raise ValueError(f"{'token_pairs' if token_pairs is not None else 'token_texts'}[{i}]: {e}") from None
        kinds.append("pair" if token_pairs is not None else "text")
    wins = []
    for i, (item, kind) in enumerate(zip(items, kinds)):
      bad = item.tokens[(item.tokens < 0) | (item.tokens >= self.config.vocab_size)]
      try:
        if len(bad):
          raise ValueError(f"token ids outside [0, {self.config.vocab_size}): {bad[:5].tolist()}")
        wins.append(scorer.windows(item, stride if kind == "text" else None))
      except ValueError as e:
        raise ValueError(f"item {i}: {e}") from None
    out = []
    for item, s in zip(items, scorer.submit(items, wins).result()):
      ids = item.tokens.tolist()
      tops = None if s.top_ids is None else [dict(zip(i.tolist(), v.tolist())) for i, v in
                                             zip(s.top_ids, s.top_logprobs)]
      out.append(ScoreOutput(ids[:item.first_target], ids[item.first_target:], [float(v) for v in s.logprobs],
                             s.sum_logprob, s.is_greedy, tops))
    return out


def _progress(total: int, use_tqdm: bool | None):
  """A tqdm bar over `total` sequences, or None. Default: shown on a terminal or in a notebook, not in a log."""
  if use_tqdm is None:
    use_tqdm = sys.stderr.isatty() or "ipykernel" in sys.modules
  if not use_tqdm:
    return None
  from tqdm.auto import tqdm

  return tqdm(total=total, desc="Generating", unit="seq", dynamic_ncols=True)


def enable_compilation_cache(path: str) -> None:
  """jax's persistent compilation cache in `path`: every program compiled from now on is stored there, and a later
  process that compiles the same program loads it instead (a server restart skips most of its warmup)."""
  import os

  import jax

  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
