"""`EngineConfig`: the one carrier of engine settings, and the shape buckets the engine's step compiles for.

    config = EngineConfig(max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=512)
    LLM("default", max_num_seqs=8)                 # LLM(...) takes any field by name
    jaxllm serve --max_num_seqs 8                  # and so does every model command (`jaxllm.commands.engine_flags`)

Every setting has one name (vLLM's where vLLM has one) and one default, here. `LLM`, `ServerConfig` and the command
flags build an `EngineConfig` from these fields; nothing copies them through layers by hand.

Buckets. A step runs a ragged batch of T tokens (one per decoding sequence plus prefill chunks) over at most
min(T, max_num_seqs) sequences. T is rounded up to a token bucket: 1, powers of 4 from 4 up to max_num_batched_tokens,
and max_num_seqs itself (a full decode batch is exact). Nothing is bucketed by pages: every attention implementation
reads only the pages each sequence uses (the XLA path with a loop whose trip count follows them). Compiled programs:
the model per token bucket plus the sampler per distinct min(T, max_num_seqs).
"""

from __future__ import annotations

import dataclasses

from jaxllm.sampling import MAX_LOGPROBS


def _field(default, help_: str):
  return dataclasses.field(default=default, metadata={"help": help_})


@dataclasses.dataclass(frozen=True, kw_only=True)
class EngineConfig:
  max_model_len: int | None = _field(None, "Prompt + generated tokens per sequence (default: the model's context "
                                     "length).")
  max_num_seqs: int = _field(32, "Sequences running together (decoding or being prefilled), per data-parallel "
                             "replica.")
  max_num_batched_tokens: int = _field(512, "Tokens one engine step computes per data-parallel replica: a decode "
                                       "token per running sequence plus prefill chunks; longer prompts are "
                                       "prefilled in chunks across steps.")
  page_size: int = _field(16, "Tokens per KV-cache page.")
  num_pages: int | None = _field(None, "KV-cache pages per data-parallel replica, one of them scratch (default: "
                                 "from kv_cache_memory_fraction).")
  kv_cache_memory_fraction: float | None = _field(None, "Fraction of free device memory for the KV cache (default "
                                                  "0.9 on GPU/TPU; on CPU min(4 GiB, half the free RAM)).")
  kv_cache_dtype: str = _field("auto", "KV-cache storage: auto (the model's dtype), int8 or fp8 (float8_e4m3fn), "
                               "both with a float32 scale per token and KV head: about twice the pages of bfloat16.")
  enable_prefix_caching: bool = _field(True, "Keep full KV pages after a request ends and reuse them for later "
                                       "requests that share the prefix (vLLM's automatic prefix caching).")
  num_top_logprobs: int = _field(MAX_LOGPROBS, "Top-n logprobs the engine can return per token (requests may ask "
                                 "for up to this many; the work is skipped when none asks).")
  attention_impl: str | None = _field(None, "Attention kernel: xla, cpu, tpu, gpu, tpu-interpret or "
                                      "gpu-interpret (default: the backend's best).")

  def __post_init__(self):
    for name in ("max_num_seqs", "max_num_batched_tokens", "page_size"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer.")
    if self.max_model_len is not None and (not isinstance(self.max_model_len, int) or self.max_model_len < 2):
      raise ValueError(f"max_model_len={self.max_model_len!r} must be an integer >= 2.")
    if self.num_pages is not None and (not isinstance(self.num_pages, int) or self.num_pages < 2):
      raise ValueError(f"num_pages={self.num_pages!r} must be an integer >= 2 (one is scratch).")
    f = self.kv_cache_memory_fraction
    if f is not None and (not isinstance(f, (int, float)) or not 0 < f <= 1):
      raise ValueError(f"kv_cache_memory_fraction={f!r} must be in (0, 1].")
    if not isinstance(self.num_top_logprobs, int) or not 0 <= self.num_top_logprobs <= MAX_LOGPROBS:
      raise ValueError(f"num_top_logprobs={self.num_top_logprobs!r} must be in [0, {MAX_LOGPROBS}].")
    if self.max_num_batched_tokens < self.max_num_seqs:
      raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least max_num_seqs="
                       f"{self.max_num_seqs} (every running sequence decodes one token per step).")
    from jaxllm import pallas_kernels
    from jaxllm.pallas_kernels.kv_quant import kv_cache_dtype

    pallas_kernels.split_impl(self.attention_impl)
    kv_cache_dtype(self.kv_cache_dtype, "float32")  # raises naming the choices

  @classmethod
  def from_kwargs(cls, **kwargs) -> "EngineConfig":
    """An EngineConfig from field names (LLM(...)'s keyword arguments); an unknown name is an error naming the
    known ones."""
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
      import difflib

      hints = [f"{u!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(u, known, 1)) else repr(u)
               for u in unknown]
      raise ValueError(f"unknown engine setting {', '.join(hints)}; the settings are {', '.join(known)}.")
    return cls(**kwargs)

  def resolve(self, context_length: int) -> "EngineConfig":
    """This config with max_model_len set (default: the model's context length) and checked against it."""
    n = context_length if self.max_model_len is None else self.max_model_len
    if n > context_length:
      raise ValueError(f"max_model_len={n} exceeds the model's context length {context_length}.")
    return dataclasses.replace(self, max_model_len=n)

  # ------------------------------------------------------------------ derived sizes (max_model_len resolved)
  @property
  def pages_per_seq(self) -> int:
    return cdiv(self.max_model_len, self.page_size)

  @property
  def pages_wanted(self) -> int:
    """Pages for every sequence at max_model_len plus the scratch page: more would never be used."""
    return self.max_num_seqs * self.pages_per_seq + 1

  @property
  def token_buckets(self) -> tuple[int, ...]:
    """1 (a lone decode: XLA:CPU's matrix-vector path runs it 1.6x faster than a 2-row bucket), powers of 4 from 4 up
    to max_num_batched_tokens, and max_num_seqs (a full decode batch is exact)."""
    budget = self.max_num_batched_tokens
    return tuple(sorted(set(ladder(min(4, budget), budget, 4)) | {1, self.max_num_seqs}))


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def ladder(first: int, last: int, ratio: int) -> tuple[int, ...]:
  """first, ratio * first, ... while below `last`, then `last` itself."""
  out, n = [], first
  while n < last:
    out.append(n)
    n *= ratio
  return tuple(out) + (last,)


def bucket(n: int, buckets: tuple[int, ...]) -> int:
  """The smallest bucket >= n (n must fit the largest)."""
  for b in buckets:
    if b >= n:
      return b
  raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}.")
