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
