"""Tokenizer vocabularies stored in GGUF files (the ``tokenizer.*`` metadata keys), read as llama.cpp does.

This module turns GGUF metadata into the library objects and token ids a
:class:`jaxllm.tokenizer.Tokenizer` is built from; it knows nothing about ``Tokenizer`` itself::

    file.gguf --> read_gguf_metadata() ---.      (stops before the tensor table)
    gguf.GGUFReader --> reader_metadata() --+--> meta: {"tokenizer.ggml.model": ..., "tokenizer.ggml.tokens": ...}
                                            v
    vocabulary_from_metadata(meta, source):
        tokenizer.ggml.model == "gpt2"  --> tokenizers.Tokenizer: byte-level BPE from tokens + merges, with
                                            the pre-tokenizer llama.cpp uses for tokenizer.ggml.pre
        tokenizer.ggml.model == "llama" --> a SentencePiece BPE ModelProto from tokens + scores + token types
        both                            --> BOS/EOS/pad/unk ids, end-of-generation ids, whether BOS/EOS are
                                            added, chat templates
                                            v
                                      GGUFVocabulary --> jaxllm.tokenizer wraps it in an engine + Tokenizer

Where transformers' GGUF loader and llama.cpp differ, we follow llama.cpp (see ``_pre_tokenizer``).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# llama.cpp token types (tokenizer.ggml.token_type); SentencePiece uses the same numbers.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Token texts llama.cpp treats as end-of-generation in any GGUF vocabulary that has them.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
        "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    }
)

# Pre-tokenizer split expressions, as llama.cpp spells them for each tokenizer.ggml.pre value.
_GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_PRE_SMOLLM = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_PRE_GPT2 = {"gpt2", "gpt-2", "phi-2", "mpt", "olmo", "jais"}
_PRE_LLAMA3 = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "dbrx",
               "smaug-bpe"}
_PRE_QWEN2 = {"qwen2", "deepseek-r1-qwen", "stablelm2"}
_SUPPORTED_PRE = sorted(_PRE_SMOLLM | _PRE_GPT2 | _PRE_LLAMA3 | _PRE_QWEN2 | {"default"})

_GGUF_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class GGUFVocabulary(NamedTuple):
  """A GGUF tokenizer: exactly one of ``bpe`` / ``sentencepiece_proto``, plus the ids around it."""

  bpe: Any | None  # tokenizers.Tokenizer, for tokenizer.ggml.model == "gpt2"
  sentencepiece_proto: bytes | None  # serialized ModelProto, for tokenizer.ggml.model == "llama"
  size: int  # number of entries in tokenizer.ggml.tokens
  bos_id: int | None
  eos_ids: list[int]  # tokenizer.ggml.eos_token_id first, then every other end-of-generation id
  pad_id: int | None
  unk_id: int | None
  prefix: tuple[int, ...]  # what encode() adds by default before / after a text
  suffix: tuple[int, ...]
  chat_template: str | None
  chat_templates: dict[str, str]  # named templates (tokenizer.chat_template.<name>)


# --------------------------------------------------------------------------------------------------
# Metadata.
# --------------------------------------------------------------------------------------------------


def has_gguf_magic(path: Path) -> bool:
  try:
    with open(path, "rb") as f:
      return f.read(4) == b"GGUF"
  except OSError:
    return False


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
  """The key/value metadata of a GGUF file (no tensors), as plain Python values.

  Much faster than ``gguf.GGUFReader`` for large vocabularies, since it stops before the tensor
  table and decodes string arrays directly. Arrays come back as lists, like ``contents()``.
  """
  path = Path(path)
  try:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      return _parse_gguf_metadata(buf, path)
  except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
    raise ValueError(f"{path} is not a valid GGUF file (corrupt or truncated metadata: {exc}).") from exc
  except ValueError as exc:
    if str(path) in str(exc):
      raise
    raise ValueError(f"{path} is not a valid GGUF file ({exc}).") from exc


def _parse_gguf_metadata(buf, path: Path) -> dict[str, Any]:
  if buf[:4] != b"GGUF":
    raise ValueError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes).")
  endian = "<"
  (version,) = struct.unpack_from("<I", buf, 4)
  if version & 0xFFFF == 0:  # a big-endian file
    endian = ">"
    (version,) = struct.unpack_from(">I", buf, 4)
  if version not in (2, 3):
    raise ValueError(f"{path} is GGUF version {version}; only versions 2 and 3 are supported.")
  _, n_kv = struct.unpack_from(endian + "QQ", buf, 8)
  size = len(buf)
  offset = 24

  def read_str(off: int) -> tuple[str, int]:
    (length,) = struct.unpack_from(endian + "Q", buf, off)
    end = off + 8 + length
    if end > size:
      raise ValueError(f"{path}: a string runs past the end of the file.")
    return buf[off + 8:end].decode("utf-8"), end

  def read_value(vtype: int, off: int) -> tuple[Any, int]:
    if vtype in _GGUF_SCALAR_CODES:
      fmt = endian + _GGUF_SCALAR_CODES[vtype]
      return struct.unpack_from(fmt, buf, off)[0], off + struct.calcsize(fmt)
    if vtype == _GGUF_STRING:
      return read_str(off)
    if vtype == _GGUF_ARRAY:
      etype, count = struct.unpack_from(endian + "IQ", buf, off)
      off += 12
      if etype in _GGUF_SCALAR_CODES:
        dtype = np.dtype(endian + _GGUF_SCALAR_CODES[etype])
        if off + count * dtype.itemsize > size:
          raise ValueError(f"{path}: an array runs past the end of the file.")
        values = np.frombuffer(buf, dtype=dtype, count=count, offset=off).tolist()
        return values, off + count * dtype.itemsize
      if count > size:
        raise ValueError(f"{path}: an array claims {count} elements.")
      values = []
      for _ in range(count):
        value, off = read_value(etype, off)
        values.append(value)
      return values, off
    raise ValueError(f"{path}: unknown GGUF value type {vtype}.")

  meta: dict[str, Any] = {}
  for _ in range(n_kv):
    key, offset = read_str(offset)
    (vtype,) = struct.unpack_from(endian + "I", buf, offset)
    meta[key], offset = read_value(vtype, offset + 4)
  return meta


def reader_metadata(reader) -> tuple[dict[str, Any], str]:
  """The tokenizer metadata of an open ``gguf.GGUFReader``, and the name to use for it in messages."""
  fields = getattr(reader, "fields", None)
  if fields is None:
    raise TypeError(f"tokenizer_from_gguf expects a gguf.GGUFReader, got {type(reader).__name__}.")
  source = str(getattr(getattr(reader, "data", None), "filename", None) or "GGUF reader")
  meta = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.") or k == "general.architecture"}
  return meta, source


# --------------------------------------------------------------------------------------------------
# Vocabulary.
# --------------------------------------------------------------------------------------------------


def vocabulary_from_metadata(meta: dict[str, Any], source: str) -> GGUFVocabulary:
  """The tokenizer described by GGUF metadata; ``source`` names the file in error messages."""
  model = meta.get("tokenizer.ggml.model")
  tokens = meta.get("tokenizer.ggml.tokens")
  if model is None or tokens is None:
    raise ValueError(f"{source} carries no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens metadata).")
  tokens = [str(t) for t in tokens]
  n = len(tokens)
  types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * n)
  if len(types) != n:
    raise ValueError(f"{source}: {len(types)} token types for {n} tokens.")
  ids = {k: _token_id(meta, f"tokenizer.ggml.{k}_token_id", n, source)
         for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
  pre = meta.get("tokenizer.ggml.pre", "default")

  bpe = proto = None
  if model == "gpt2":
    bpe = _bpe_tokenizer(meta, tokens, types, ids, pre, source)
    default_add_bos = pre in _PRE_LLAMA3  # llama.cpp turns BOS on for Llama-3 vocabularies
  elif model == "llama":
    proto = _sentencepiece_proto(meta, tokens, types, ids, source)
    default_add_bos = True
  else:
    raise ValueError(f"{source}: tokenizer.ggml.model {model!r} is not supported (expected 'gpt2' or 'llama').")

  add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", default_add_bos)) and ids["bos"] is not None
  add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and ids["eos"] is not None
  eos_ids = [i for i in (ids["eos"], ids["eot"], ids["eom"]) if i is not None]
  eos_ids += [i for i, (t, ty) in enumerate(zip(tokens, types))
              if t in _EOG_TEXTS and ty in (_CONTROL, _USER_DEFINED)]
  templates = {k[len("tokenizer.chat_template."):]: v for k, v in meta.items()
               if k.startswith("tokenizer.chat_template.") and isinstance(v, str)}
  template = meta.get("tokenizer.chat_template")
  return GGUFVocabulary(
      bpe=bpe, sentencepiece_proto=proto, size=n, bos_id=ids["bos"], eos_ids=eos_ids, pad_id=ids["padding"],
      unk_id=ids["unknown"], prefix=(ids["bos"],) if add_bos else (), suffix=(ids["eos"],) if add_eos else (),
      chat_template=template if isinstance(template, str) else None, chat_templates=templates,
  )


def _token_id(meta: dict, key: str, n: int, source: str) -> int | None:
  value = meta.get(key)
  if value is None:
    return None
  value = int(value)
  if value == -1 or value == 0xFFFFFFFF:  # llama.cpp's "no token"
    return None
  if not 0 <= value < n:
    raise ValueError(f"{source}: {key} = {value} is outside the vocabulary of {n} tokens.")
  return value


def _pre_tokenizer(pre: str, source: str):
  """The ``tokenizers`` pre-tokenizer equal to llama.cpp's split rules for ``tokenizer.ggml.pre``.

  Returns ``(pre_tokenizer, ignore_merges)``. Note that transformers' GGUF loader gives "smollm"
  files a plain ByteLevel pre-tokenizer, without the digit split that SmolLM's own tokenizer.json
  and llama.cpp use; we follow llama.cpp. For "default" llama.cpp uses its own four-step split,
  which we copy too.
  """
  from tokenizers import Regex, pre_tokenizers as pt

  def byte_level(use_regex: bool):
    return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=use_regex)

  def split_then_byte_level(*expressions: str):
    return pt.Sequence([pt.Split(Regex(e), behavior="isolated") for e in expressions] + [byte_level(False)])

  if pre in _PRE_SMOLLM:
    return pt.Sequence([pt.Digits(individual_digits=True), byte_level(True)]), False
  if pre in _PRE_GPT2:
    return byte_level(True), False
  if pre in _PRE_LLAMA3:
    return split_then_byte_level(_LLAMA3_RE), True
  if pre in _PRE_QWEN2:
    return split_then_byte_level(_QWEN2_RE), False
  if pre == "default":
    return split_then_byte_level(r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"), False
  raise ValueError(
      f"{source}: unsupported tokenizer.ggml.pre value {pre!r}; supported values are {', '.join(_SUPPORTED_PRE)}."
  )


def _bpe_tokenizer(meta, tokens, types, ids, pre, source):
  """Byte-level BPE from tokens + merges, with llama.cpp's pre-tokenizer and special-token matching."""
  from tokenizers import AddedToken, Tokenizer as _RustTokenizer, decoders, models

  merges_raw = meta.get("tokenizer.ggml.merges")
  if not merges_raw:
    raise ValueError(f"{source}: a 'gpt2' (BPE) vocabulary needs tokenizer.ggml.merges, which is missing.")
  pre_tokenizer, ignore_merges = _pre_tokenizer(pre, source)
  vocab = {t: i for i, t in enumerate(tokens)}  # duplicates: the last id wins, as in llama.cpp
  merges = []
  for m in merges_raw:
    parts = str(m).split(" ")
    if len(parts) != 2:
      raise ValueError(f"{source}: malformed merge {m!r} in tokenizer.ggml.merges.")
    merges.append((parts[0], parts[1]))
  try:
    model = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                       end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
  except Exception as exc:
    raise ValueError(f"{source}: the BPE vocabulary and merges do not fit together ({exc}).") from exc
  tok = _RustTokenizer(model)
  tok.pre_tokenizer = pre_tokenizer
  tok.decoder = decoders.ByteLevel()
  # CONTROL tokens are special (dropped by skip_special_tokens), USER_DEFINED ones are not; both are
  # matched whole in text, as llama.cpp does. The named special tokens are special as well.
  special = {i for i, ty in enumerate(types) if ty == _CONTROL}
  special |= {i for k, i in ids.items() if i is not None and k in ("bos", "eos", "unknown", "padding")}
  tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
  user = [i for i, ty in enumerate(types) if ty == _USER_DEFINED and i not in special]
  if user:
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
  return tok


def _sentencepiece_proto(meta, tokens, types, ids, source) -> bytes:
  """A SentencePiece BPE ModelProto rebuilt from a llama.cpp 'llama' vocabulary."""
  from sentencepiece import sentencepiece_model_pb2 as spb

  scores = meta.get("tokenizer.ggml.scores")
  if scores is None:
    scores = [0.0] * len(tokens)
  if len(scores) != len(tokens):
    raise ValueError(f"{source}: {len(scores)} token scores for {len(tokens)} tokens.")
  types = list(types)
  if _UNKNOWN not in types:  # SentencePiece needs exactly one unknown piece
    if ids["unknown"] is None:
      raise ValueError(f"{source}: the 'llama' vocabulary has no unknown token.")
    types[ids["unknown"]] = _UNKNOWN
  proto = spb.ModelProto()
  valid_types = {_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE}
  for token, score, ty in zip(tokens, scores, types):
    piece = proto.pieces.add()
    piece.piece = token
    piece.score = float(score)
    piece.type = ty if ty in valid_types else _NORMAL
  trainer = proto.trainer_spec
  trainer.model_type = spb.TrainerSpec.BPE
  trainer.vocab_size = len(tokens)
  trainer.byte_fallback = _BYTE in types
  for field, key in (("unk", "unknown"), ("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
    token_id = ids[key]
    setattr(trainer, f"{field}_id", -1 if token_id is None else token_id)
    if token_id is not None:
      setattr(trainer, f"{field}_piece", tokens[token_id])
  norm = proto.normalizer_spec
  norm.name = "identity"
  norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
  norm.remove_extra_whitespaces = False
  norm.escape_whitespaces = True
  return proto.SerializeToString()
