"""Host-side stop rules and incremental detokenization for one sequence.

    d = Detokenizer(tokenizer, stop_ids={2}, stop_strings=("\\n\\n",), min_tokens=0)
    for tok in new_tokens:
        delta = d.add(tok)        # text that is now final (never half a UTF-8 character, never part of a stop string)
        if d.finished: break      # d.stop_reason: the stop token id or stop string
    d.text                        # all text so far, stop string cut off

Text is decoded incrementally, vLLM's way: each token decodes a short window (the tokens since the last text was
released, after a few tokens of context) and the new text is what that window adds to the context alone, so a token
costs the same however long the output is (decoding everything so far after every token cost 0.9 ms a token at
4,000 tokens) and SentencePiece's leading spaces or BPE byte fallback render as a whole decode would. Text whose UTF-8
sequence is not complete yet (a trailing U+FFFD) waits for the next token. While a stop string could still be forming
at the end, that many characters are held back, so a stream never shows text the final output does not contain.
With `stream=False` and no stop strings nothing reads the text before the end, so it is decoded once when the
sequence finishes (`add` then returns "" until the last token).

The token that ends a sequence by `stop_ids` (EOS, stop_token_ids) is not text; nor are stop strings, which are
searched for only in the text of tokens after the first `min_tokens` (vLLM's rules, without
include_stop_str_in_output).
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"  # what a decoder shows for an incomplete UTF-8 sequence


class Detokenizer:

  def __init__(self, tokenizer, stop_ids: set[int] | frozenset[int] = frozenset(),
               stop_strings: tuple[str, ...] = (), stream: bool = True, min_tokens: int = 0):
    if stop_strings and tokenizer is None:
      raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids).")
    self.tokenizer = tokenizer
    self.stop_ids = stop_ids
    self.stop_strings = tuple(stop_strings)
    self.min_tokens = min_tokens
    self.eager = stream or bool(self.stop_strings)  # decode after every token (else once, at the end)
    self.hold = max((len(s) for s in self.stop_strings), default=1) - 1
    self.tokens: list[int] = []  # the tokens that are text (a stop id is not)
    self.num_added = 0
    self.prefix = 0  # tokens[prefix:read] rendered the text's last piece: the context the next window decodes after
    self.read = 0  # tokens before this are in `text`
    self.text = ""
    self.searched = 0  # stop strings must end past this character (the text of the first min_tokens tokens)
    self.sent = 0  # characters of `text` already released
    self.stop_reason: str | int | None = None
    self.finished = False

  def add(self, token: int) -> str:
    """Takes one generated token; returns the newly final text."""
    if self.finished:
      raise RuntimeError("add() after the sequence finished")
    self.num_added += 1
    if token in self.stop_ids:
      self.stop_reason, self.finished = token, True
    else:
      self.tokens.append(token)
    if self.tokenizer is None:
      return ""
    if not self.eager:
      return self.flush() if self.finished else ""
    before = len(self.text)
    self._render(final=self.finished)
    if self.num_added <= self.min_tokens:
      self.searched = len(self.text)
    new = max(before, self.searched)  # a match must end past here: in new text, after min_tokens' text
    if self.stop_strings and len(self.text) > new:
      hits = [(i, s) for s in self.stop_strings if (i := self.text.find(s, max(0, new - len(s) + 1))) >= 0]
      if hits:
        cut, self.stop_reason = min(hits)
        self.text, self.finished = self.text[:cut], True
        return self._release(len(self.text))
    if self.finished:
      return self._release(len(self.text))
    return self._release(max(self.sent, len(self.text) - self.hold) if self.stop_strings else len(self.text))

  def flush(self) -> str:
    """The rest of the text, once the sequence ended for another reason (length, cancellation)."""
    self.finished = True
    if self.tokenizer is not None:
      if self.eager:
        self._render(final=True)
      else:
        self.text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
    return self._release(len(self.text))

  def _render(self, final: bool) -> None:
    """Appends the text of tokens[read:], decoded after the context tokens[prefix:read]; unless `final`, not while it
    ends in an incomplete character."""
    if self.read == len(self.tokens):
      return
    decode = self.tokenizer.decode
    context = decode(self.tokens[self.prefix:self.read], skip_special_tokens=True) if self.read > self.prefix else ""
    window = decode(self.tokens[self.prefix:], skip_special_tokens=True)
    if len(window) <= len(context) and not final:  # nothing printable yet (a special token, or bytes to come)
      return
    if window.endswith(REPLACEMENT) and not final:
      return
    self.text += window[len(context):]
    self.prefix, self.read = self.read, len(self.tokens)

  def _release(self, end: int) -> str:
    out = self.text[self.sent:end]
    self.sent = max(self.sent, end)
    return out
