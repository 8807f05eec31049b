"""The SentencePiece engine behind :class:`jaxllm.tokenizer.Tokenizer`.

An engine wraps one tokenization library and speaks plain ids; ``Tokenizer`` adds BOS/EOS, chat
templates and the Hugging Face file layout on top. This one wraps ``sentencepiece``, for Llama-2 /
TinyLlama style models, whichever way their ``ModelProto`` arrives::

    tokenizer.model bytes (+ added tokens from tokenizer_config.json)  --- jaxllm.tokenizer ---.
    ModelProto rebuilt from a GGUF 'llama' vocabulary  ---------------- jaxllm.tokenizer_gguf --+
                                                                                                v
                                                            SentencePieceEngine(proto, extra, extra_special, legacy)

    encode(text):  cut the text at control / unknown / added token strings (their ids go out as is);
                   SentencePiece encodes each piece of text in between.
    decode(ids):   runs of ordinary ids go through SentencePiece; special and added ids become their strings
                   (or are dropped with skip_special_tokens).
    save(dir):     tokenizer.model (the proto unchanged); fill_config() adds the tokenizer_config.json
                   keys transformers needs to rebuild the same tokenizer (LlamaTokenizer).

Only the engine lives here; reading tokenizer.model directories is in :mod:`jaxllm.tokenizer`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

TOKENIZER_MODEL = "tokenizer.model"


class SentencePieceEngine:
  """A ``SentencePieceProcessor``, plus matching of control tokens written in the text.

  SentencePiece itself never matches control pieces such as ``<s>`` in input text. Like llama.cpp
  and transformers' Llama tokenizers we cut the text at those strings (and at ``<unk>`` and the added
  tokens), emit their ids, and encode each piece of text in between on its own. With ``legacy``
  (llama.cpp, and transformers' ``legacy=True``) every piece gets SentencePiece's dummy-prefix
  space; without it (transformers' ``legacy=False``) only text at the very start does.
  ``extra`` holds added tokens that live above the SentencePiece vocabulary (from tokenizer_config).
  """

  kind = "sentencepiece"

  def __init__(
      self, proto: bytes, extra: Mapping[str, int] | None = None, extra_special: Iterable[int] = (),
      legacy: bool = True,
  ):
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2 as spb

    self.proto = bytes(proto)
    self.legacy = legacy
    self.sp = sentencepiece.SentencePieceProcessor(model_proto=self.proto)
    self.sp_inner = self.sp  # encodes text that follows a special token
    if not legacy:
      model = spb.ModelProto.FromString(self.proto)
      if model.normalizer_spec.add_dummy_prefix:
        model.normalizer_spec.add_dummy_prefix = False
        self.sp_inner = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
    n = self.sp.get_piece_size()
    self.extra = dict(extra or {})
    self.extra_by_id = {i: t for t, i in self.extra.items()}
    control = [i for i in range(n) if self.sp.is_control(i)]
    self.special_ids = frozenset(control) | frozenset(extra_special)
    split_texts = {self.sp.id_to_piece(i): i for i in control if self.sp.id_to_piece(i)}
    unk = self.sp.unk_id()
    if 0 <= unk < n:
      split_texts[self.sp.id_to_piece(unk)] = unk
    split_texts.update(self.extra)
    self.split_ids = split_texts
    alternatives = "|".join(re.escape(t) for t in sorted(split_texts, key=len, reverse=True))
    self.split_re = re.compile(f"({alternatives})") if alternatives else None
    self.vocab_size = max([n, *(i + 1 for i in self.extra_by_id)])
    self.piece_size = n

  def encode(self, text: str) -> list[int]:
    if self.split_re is None:
      return self.sp.encode(text)
    ids: list[int] = []
    for k, part in enumerate(self.split_re.split(text)):
      if k % 2:
        ids.append(self.split_ids[part])
      elif part:
        ids.extend((self.sp_inner if k else self.sp).encode(part))
    return ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    if skip_special_tokens:
      return self.sp.decode([i for i in ids if i not in self.special_ids and i < self.piece_size])
    out, run = [], []
    for i in ids:
      if i in self.special_ids or i >= self.piece_size:
        if run:
          out.append(self.sp.decode(run))
          run = []
        out.append(self.id_to_piece(i) or "")
      else:
        run.append(i)
    if run:
      out.append(self.sp.decode(run))
    return "".join(out)

  def id_to_piece(self, token_id: int) -> str | None:
    if 0 <= token_id < self.piece_size:
      return self.sp.id_to_piece(token_id)
    return self.extra_by_id.get(token_id)

  def token_to_id(self, piece: str) -> int | None:
    if piece in self.extra:
      return self.extra[piece]
    i = self.sp.piece_to_id(piece)
    if i == self.sp.unk_id() and piece != self.sp.id_to_piece(i):
      return None
    return i

  def serialized(self) -> bytes:
    return self.proto

  def fill_config(self, config: dict) -> None:
    """Add this engine's keys to a tokenizer_config.json being written."""
    config.setdefault("tokenizer_class", "LlamaTokenizer")
    config["legacy"] = self.legacy
    if self.extra:
      config["added_tokens_decoder"] = {
          str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                   "single_word": False, "special": i in self.special_ids}
          for t, i in sorted(self.extra.items(), key=lambda kv: kv[1])
      }

  def save(self, directory: Path, prefix: tuple[int, ...] = (), suffix: tuple[int, ...] = ()) -> None:
    """Write tokenizer.model; BOS/EOS (``prefix``/``suffix``) go in tokenizer_config.json instead."""
    (directory / TOKENIZER_MODEL).write_bytes(self.proto)
