"""The OpenAI request schemas the server accepts (pydantic), and their translation into `SamplingParams`.

Unknown fields are errors (a typo such as `max_token` must not be silently ignored); types are strict enough that
`"max_tokens": "5"` is refused. vLLM's extra sampling fields (`top_k`, `min_p`, `repetition_penalty`, `ignore_eos`,
`min_tokens`, `stop_token_ids`) are accepted too.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from jaxllm.sampling import SamplingParams


class _Strict(BaseModel):
  model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
  include_usage: StrictBool = False


class _Sampling(_Strict):
  model: str | None = None
  n: StrictInt = 1
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: StrictInt = 0
  min_p: float = 0.0
  presence_penalty: float = 0.0
  frequency_penalty: float = 0.0
  repetition_penalty: float = 1.0
  logit_bias: dict[str, float] | None = None
  seed: StrictInt | None = None
  stop: str | list[str] | None = None
  stop_token_ids: list[StrictInt] | None = None
  ignore_eos: StrictBool = False
  min_tokens: StrictInt = 0
  stream: StrictBool = False
  stream_options: StreamOptions | None = None
  user: str | None = None

  def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
    """Raises ValueError naming the bad field (SamplingParams' own checks)."""
    bias = None
    if self.logit_bias:
      try:
        bias = {int(k): v for k, v in self.logit_bias.items()}
      except ValueError:
        raise ValueError(f"logit_bias keys must be token ids; got {list(self.logit_bias)[:5]}.") from None
    return SamplingParams(
        n=self.n, max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
        min_p=self.min_p, presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
        repetition_penalty=self.repetition_penalty, logit_bias=bias, seed=self.seed, stop=self.stop,
        stop_token_ids=self.stop_token_ids, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
        logprobs=logprobs)


class CompletionRequest(_Sampling):
  prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
  max_tokens: StrictInt | None = 16
  logprobs: StrictInt | None = None
  echo: StrictBool = False
  suffix: None = None  # not supported: only null is accepted
  best_of: StrictInt | None = None


class ChatMessage(_Strict):
  role: Literal["system", "user", "assistant", "developer", "tool"]
  content: str | list[dict] | None = None
  name: str | None = None

  def text(self) -> str:
    if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
      parts = []
      for part in self.content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
          raise ValueError("only text content parts ({'type': 'text', 'text': ...}) are supported.")
        parts.append(part["text"])
      return "".join(parts)
    return self.content or ""


class ChatCompletionRequest(_Sampling):
  messages: list[ChatMessage] = Field(min_length=1)
  max_tokens: StrictInt | None = None
  max_completion_tokens: StrictInt | None = None
  logprobs: StrictBool = False
  top_logprobs: StrictInt | None = None
  add_generation_prompt: StrictBool = True


class TokenizeRequest(_Strict):
  model: str | None = None
  prompt: str | None = None
  messages: list[ChatMessage] | None = None
  add_special_tokens: StrictBool = True


class DetokenizeRequest(_Strict):
  model: str | None = None
  tokens: list[StrictInt]
