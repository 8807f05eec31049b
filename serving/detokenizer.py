"""Host-side stop rules and incremental detokenization for one sequence.

    d = Detokenizer(tokenizer, stop_ids={2}, stop_strings=("\\n\\n",))
    for tok in new_tokens:
        delta = d.add(tok)        # text that is now final (never half a UTF-8 character, never part of a stop string)
        if d.finished: break      # d.stop_reason: the stop token id or stop string
    d.text                        # all text so far, stop string cut off

Text is decoded from all tokens so far (BPE merges and byte fallback can change how earlier bytes render), and a
delta is released only up to the last complete character; while a stop string could still be forming at the end,
that many characters are held back, so a stream never shows text the final output does not contain. With
`stream=False` and no stop strings nothing reads the text before the end, so it is decoded once when the sequence
finishes (`add` then returns "" until the last token).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


class Detokenizer:

  def __init__(self, tokenizer, stop_ids: set[int] | frozenset[int] = frozenset(),
               stop_strings: tuple[str, ...] = (), stream: bool = True):
    if stop_strings and tokenizer is None:
      raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids).")
    self.tokenizer = tokenizer
    self.stop_ids = stop_ids
    self.stop_strings = tuple(stop_strings)
    self.eager = stream or bool(self.stop_strings)  # decode after every token (else once, at the end)
    self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
    self.tokens: list[int] = []
    self.text = ""
    self.sent = 0  # characters of `text` already released
    self.stop_reason: str | int | None = None
    self.finished = False

  def add(self, token: int) -> str:
    """Takes one generated token; returns the newly final text."""
    if self.finished:
      raise RuntimeError("add() after the sequence finished")
    self.tokens.append(token)
    if token in self.stop_ids:
      self.stop_reason, self.finished = token, True
    if self.tokenizer is None:
      return ""
    if not self.eager:
      return self.flush() if self.finished else ""
    text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
    if self.stop_strings:
      start = max(0, self.sent - self.hold - 4)  # a match must end in text not searched yet
      hits = [(i, s) for s in self.stop_strings if (i := text.find(s, start)) >= 0]
      if hits:
        cut, self.stop_reason = min(hits)
        self.text, self.finished = text[:cut], True
        return self._release(len(self.text))
    self.text = text
    if self.finished:
      return self._release(len(text))
    end = len(text)
    while end > self.sent and text[end - 1] == REPLACEMENT:  # an unfinished UTF-8 sequence
      end -= 1
    return self._release(max(self.sent, end - self.hold) if self.stop_strings else end)

  def flush(self) -> str:
    """The rest of the text, once the sequence ended for another reason (length, cancellation)."""
    self.finished = True
    if not self.eager and self.tokenizer is not None:
      self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
    return self._release(len(self.text))

  def _release(self, end: int) -> str:
    out = self.text[self.sent:end]
    self.sent = max(self.sent, end)
    return out
