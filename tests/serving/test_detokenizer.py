"""Incremental detokenization with the default model's real BPE tokenizer: streamed deltas add up to the final text,
never show half a UTF-8 character or the start of a stop string that later completes."""

from jaxllm.serving.detokenizer import Detokenizer

TEXT = "Héllo wörld 😀 — naïve café! Stop here END and more text after it."


def stream(tokenizer, ids, **kw):
  d = Detokenizer(tokenizer, **kw)
  deltas = []
  for t in ids:
    deltas.append(d.add(t))
    if d.finished:
      break
  else:
    deltas.append(d.flush())
  return d, deltas


def test_deltas_add_up_and_never_split_a_character(default_llm):
  tok = default_llm.tokenizer
  ids = tok.encode(TEXT, add_bos=False)
  d, deltas = stream(tok, ids)
  assert "".join(deltas) == d.text == tok.decode(ids, skip_special_tokens=True) == TEXT
  assert not any("\ufffd" in x for x in deltas)
  assert d.stop_reason is None


def test_stop_string_is_cut_and_never_streamed(default_llm):
  tok = default_llm.tokenizer
  ids = tok.encode(TEXT, add_bos=False)
  d, deltas = stream(tok, ids, stop_strings=("END", "zzz"))
  assert d.finished and d.stop_reason == "END"
  assert "".join(deltas) == d.text == "Héllo wörld 😀 — naïve café! Stop here "
  assert not any("E" in x for x in deltas)


def test_stop_token_ends_and_special_tokens_are_not_text(default_llm):
  tok = default_llm.tokenizer
  ids = tok.encode("Hi there", add_bos=False) + [2] + tok.encode(" never", add_bos=False)
  d, deltas = stream(tok, ids, stop_ids=frozenset({2}))
  assert d.stop_reason == 2 and "".join(deltas) == d.text == "Hi there"


TEXTS = [TEXT, "日本語のテキストと中文混合，还有한국어 문장。", "Emoji 👩‍👩‍👧‍👦 family, flags 🇯🇵🇫🇷, math ∑∫√ and ¾.",
         "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\n\tTabs\r\nCRLF   spaces", "Ελληνικά, русский, עברית, العربية."]


def test_incremental_decoding_equals_a_whole_decode(default_llm):
  """Each token decodes a short window after a little context; the deltas add up to what decoding all tokens at once
  gives, for scripts, emoji sequences, whitespace and code."""
  tok = default_llm.tokenizer
  for text in TEXTS:
    ids = tok.encode(text, add_bos=False)
    d, deltas = stream(tok, ids)
    assert "".join(deltas) == d.text == tok.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in x for x in deltas)


def test_a_token_decodes_a_window_not_the_whole_output(default_llm):
  """The work per token does not grow with the output: decoding everything so far after every token cost 0.9 ms a
  token at 4,000 tokens."""
  tok = default_llm.tokenizer

  class Counting:
    decoded = 0

    def decode(self, ids, skip_special_tokens=True):
      Counting.decoded += len(ids)
      return tok.decode(ids, skip_special_tokens=skip_special_tokens)

  ids = tok.encode(" ".join(TEXTS) * 20, add_bos=False)
  d, deltas = stream(Counting(), ids, stop_strings=("never there",))
  assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True) and len(ids) > 2000
  assert Counting.decoded < 8 * len(ids), Counting.decoded  # a few tokens of context per token; whole: ~len^2 / 2


def test_a_stop_token_is_not_text(default_llm):
  """A sequence ended by a stop_token_ids token (not special, unlike EOS) leaves that token's text out, as vLLM does
  unless include_stop_str_in_output."""
  tok = default_llm.tokenizer
  ids = tok.encode("Paris. And more", add_bos=False)
  period = tok.encode(".", add_bos=False)
  assert len(period) == 1 and period[0] in ids
  for stream_ in (True, False):
    d, deltas = stream(tok, ids, stop_ids=frozenset(period), stream=stream_)
    assert d.stop_reason == period[0] and "".join(deltas) == d.text == "Paris"


def test_min_tokens_holds_stop_strings_back(default_llm):
  """Stop strings are not searched for in the text of the first min_tokens tokens (vLLM's rule): a match must end
  after it."""
  tok = default_llm.tokenizer
  ids = tok.encode("One. Two. Three. Four.", add_bos=False)
  d, _ = stream(tok, ids, stop_strings=(".",))
  assert d.text == "One"
  n = len(tok.encode("One. Two", add_bos=False))
  d, deltas = stream(tok, ids, stop_strings=(".",), min_tokens=n)
  assert d.stop_reason == "." and "".join(deltas) == d.text == "One. Two"
  d, _ = stream(tok, ids, stop_strings=(". T",), min_tokens=2)  # ". T" ends past the first 2 tokens' text "One."
  assert d.text == "One"
