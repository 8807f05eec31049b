"""`LLM`: the notebook API. Load a model once, then `generate`, `chat` and `score` on batches of prompts.

    llm = LLM("default")                                   # SmolLM2-135M-Instruct; or a .gguf / HF dir / convert dir
    out = llm.generate(["The capital of France is"], SamplingParams(max_tokens=16, temperature=0))
    out[0].text, out[0].token_ids, out[0].finish_reason
    llm.chat([{"role": "user", "content": "Hi!"}])
    llm.score([("The capital of France is", " Paris")])   # continuation logprobs, their sum, is_greedy

Requests are validated on the host (clear errors, nothing reaches the device), tokenized, then run through
`jaxllm.generate.Generator` in batches of at most `max_batch_size`; outputs come back in input order.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from jaxllm import checkpoint
from jaxllm.generate import Generator
from jaxllm.sampling import SamplingArrays, SamplingParams
from jaxllm.serving.detokenizer import Detokenizer


@dataclasses.dataclass
class CompletionOutput:
  index: int
  text: str
  token_ids: list[int]
  logprobs: list[float]  # logprob of each generated token under the model
  finish_reason: str  # "stop" (EOS, stop token or stop string) or "length"
  stop_reason: str | int | None = None  # the stop string or token id that ended it, if any

  @property
  def cumulative_logprob(self) -> float:
    return float(sum(self.logprobs))


@dataclasses.dataclass
class RequestOutput:
  prompt: str | None
  prompt_token_ids: list[int]
  outputs: list[CompletionOutput]

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


@dataclasses.dataclass
class ScoreOutput:
  context_token_ids: list[int]
  continuation_token_ids: list[int]
  logprobs: list[float]  # per continuation token
  sum_logprob: float
  is_greedy: bool  # every continuation token is the argmax given its prefix


class LLM:
  """A loaded model with its tokenizer and compiled generation programs."""

  def __init__(self, model: str = "default", *, dtype: str = "float32", tokenizer: str | None = None,
               max_model_len: int | None = None, max_batch_size: int = 32, seed: int = 0,
               mesh: str | None = None, layout: str = "tp"):
    self.mesh = None
    if mesh is not None:
      from jaxllm.sharding import make_mesh

      self.mesh = mesh if not isinstance(mesh, str) else make_mesh(mesh)
    self.layout = layout
    ckpt = checkpoint.load_checkpoint(model, dtype, self.mesh, layout)
    self.config = ckpt.config
    self.dtype = ckpt.dtype
    self.source = ckpt.source
    if tokenizer is not None:
      from jaxllm.tokenizer import load_tokenizer

      self.tokenizer = load_tokenizer(tokenizer)
    else:
      self.tokenizer = ckpt.tokenizer
    self.max_model_len = min(max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings)
    if max_batch_size < 1:
      raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}.")
    self.max_batch_size = max_batch_size
    self._rng = np.random.default_rng(seed)
    model = checkpoint.build_model(self.config, ckpt.params, self.dtype, self.mesh, layout)
    self.kv_placement = getattr(model, "kv_placement", None)  # how the KV heads sit on the mesh (None: one device)
    self.generator = Generator(model, max_batch_size, self.mesh)

  def __repr__(self) -> str:
    c = self.config
    return (f"LLM({c.name!r}, {c.num_params / 1e6:.1f}M params, dtype={self.dtype}, layers={c.num_layers}, "
            f"heads={c.num_heads}/{c.num_kv_heads}, max_model_len={self.max_model_len}"
            + (f", mesh={dict(self.mesh.shape)}, layout={self.layout}, KV: {self.kv_placement.note}"
               if self.mesh is not None else "") + ")")

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
  def generate(self, prompts: str | Sequence[str] | None = None, sampling_params: SamplingParams | None = None, *,
               prompt_token_ids: Sequence[Sequence[int]] | None = None) -> list[RequestOutput]:
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
    return self._generate(list(prompts), ids, params)

  def chat(self, messages, sampling_params: SamplingParams | None = None, *,
           add_generation_prompt: bool = True) -> list[RequestOutput]:
    """`messages`: one conversation (a list of {"role", "content"} dicts) or a list of conversations."""
    tok = self._require_tokenizer()
    convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
    if not convs or any(not c for c in convs):
      raise ValueError("chat() needs at least one non-empty conversation of {'role', 'content'} messages.")
    texts = [tok.apply_chat_template(c, add_generation_prompt=add_generation_prompt) for c in convs]
    # The template already holds any BOS the model wants; do not add a second one.
    ids = [self._check_tokens(tok.encode(t, add_bos=False), f"conversation {i}") for i, t in enumerate(texts)]
    return self._generate(texts, ids, sampling_params or SamplingParams())

  def _generate(self, prompts: list, ids: list[list[int]], params: SamplingParams) -> list[RequestOutput]:
    if params.stop and self.tokenizer is None:
      raise ValueError(f"stop strings need a tokenizer and {self.source} has none; pass tokenizer=PATH or use "
                       "stop_token_ids.")
    rows = []  # (request index, sample index, seed)
    for r in range(len(ids)):
      base = params.seed if params.seed is not None else int(self._rng.integers(0, 2**63 - 1))
      # Sample k of seed s gets its own stream: hash (s, k), so (s, 1) never collides with (s + 1, 0).
      rows += [(r, k, int(np.random.SeedSequence([base, k]).generate_state(1)[0])) for k in range(params.n)]
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos and self.tokenizer is not None:
      stop_ids |= set(self.tokenizer.eos_ids)
    results: dict[tuple[int, int], CompletionOutput] = {}
    for start in range(0, len(rows), self.max_batch_size):
      batch = rows[start:start + self.max_batch_size]
      prompt_ids = [ids[r] for r, _, _ in batch]
      max_new = [min(params.max_tokens, self.max_model_len - len(p)) for p in prompt_ids]
      sampling = SamplingArrays.from_params([params] * len(batch), [s for _, _, s in batch],
                                            [tuple(stop_ids)] * len(batch),
                                            [len(p) + params.min_tokens for p in prompt_ids])
      detoks = [Detokenizer(self.tokenizer, frozenset(stop_ids), params.stop, stream=False) for _ in batch]

      def stopped(i, toks):
        detoks[i].add(toks[-1])
        return detoks[i].finished

      tokens, logprobs = self.generator.generate(prompt_ids, max_new, sampling, stopped, self.max_model_len)
      for (r, k, _), toks, lps, d in zip(batch, tokens, logprobs, detoks):
        if not d.finished:
          d.flush()
        # Special tokens (EOS) are skipped; an ordinary stop token id keeps its text, as vLLM does.
        results[(r, k)] = CompletionOutput(k, d.text, toks, lps, "stop" if d.stop_reason is not None else "length",
                                           d.stop_reason)
    return [RequestOutput(prompts[r], ids[r], [results[(r, k)] for k in range(params.n)]) for r in range(len(ids))]

  # ------------------------------------------------------------------ score
  def score(self, pairs: Sequence[tuple[str, str]] | None = None, *,
            token_pairs: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None) -> list[ScoreOutput]:
    """log p(continuation | context) per token, as lm-eval-harness computes it (context and continuation tokenized
    separately, BOS only on the context)."""
    if (pairs is None) == (token_pairs is None):
      raise ValueError("pass exactly one of `pairs` (text) or `token_pairs`.")
    if pairs is not None:
      tok = self._require_tokenizer()
      token_pairs = [(tok.encode(c), tok.encode(x, add_bos=False)) for c, x in pairs]
    token_pairs = [(list(c), list(x)) for c, x in token_pairs]
    for i, (c, x) in enumerate(token_pairs):
      if not c or not x:
        raise ValueError(f"pair {i}: context and continuation must both be non-empty after tokenization.")
      self._check_tokens(c + x, f"pair {i}")
    out = []
    for start in range(0, len(token_pairs), self.max_batch_size):
      batch = token_pairs[start:start + self.max_batch_size]
      chosen, greedy = self.generator.score([c + x for c, x in batch])
      for (c, x), lp, g in zip(batch, chosen, greedy):
        lp, g = lp[len(c) - 1:], g[len(c) - 1:]
        out.append(ScoreOutput(c, x, [float(v) for v in lp], float(np.sum(lp, dtype=np.float64)), bool(np.all(g))))
    return out
