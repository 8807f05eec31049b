"""Text <-> token ids for jaxllm models, plus chat-template rendering.

One class, :class:`Tokenizer`, fronts two encoding engines:

* the Rust ``tokenizers`` library, for Hugging Face ``tokenizer.json`` files and for byte-level BPE
  vocabularies stored in GGUF files (``tokenizer.ggml.model == "gpt2"``);
* ``sentencepiece``, for ``tokenizer.model`` files (Llama-2 / TinyLlama style) and for the
  SentencePiece vocabularies stored in GGUF files (``tokenizer.ggml.model == "llama"``), which are
  rebuilt into a SentencePiece ``ModelProto`` so encoding follows SentencePiece (and llama.cpp) exactly.

How data flows::

    load_tokenizer(path) --- directory with tokenizer.json --> tokenizers.Tokenizer.from_file
                         |                                      + tokenizer_config.json / special_tokens_map.json
                         |                                      + generation_config.json / chat_template.jinja
                         |-- directory with tokenizer.model --> SentencePieceProcessor + the same json files
                         '-- file.gguf --> read_gguf_metadata() --.
    tokenizer_from_gguf(GGUFReader) -------------------------------+--> BPE (tokens, merges, pre-tokenizer named
                                                                   |    by tokenizer.ggml.pre) or SentencePiece proto
                                                                   v
                                                             Tokenizer

    Tokenizer.encode(text):  engine encodes the text with special tokens (e.g. "<|im_start|>") matched
                             whole, then the model's default prefix (BOS) / suffix (EOS) ids are added.
    Tokenizer.decode(ids):   engine decodes; special tokens are kept unless skip_special_tokens.
    Tokenizer.apply_chat_template(messages): jaxllm.chat_template renders the model's Jinja template.
    Tokenizer.save(dir):     tokenizer.json or tokenizer.model, plus tokenizer_config.json (and
                             chat_template.jinja / generation_config.json when needed).

Behaviour follows ``transformers.AutoTokenizer`` (v5) for Hugging Face directories, and llama.cpp for
GGUF vocabularies, where the two differ (see ``_gguf_pre_tokenizer``). This module never imports
``transformers`` or ``torch``.
"""

from __future__ import annotations

import json
import mmap
import re
import struct
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.chat_template import ChatTemplateError, render_chat_template

__all__ = ["Tokenizer", "load_tokenizer", "tokenizer_from_gguf", "read_gguf_metadata", "ChatTemplateError"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_MODEL = "tokenizer.model"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

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

# Keys of tokenizer_config.json that Tokenizer manages itself; others are carried through save().
_MANAGED_CONFIG_KEYS = {
    "bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token", "chat_template",
    "added_tokens_decoder",
}
_NAMED_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


# --------------------------------------------------------------------------------------------------
# Engines. Each wraps one library and speaks plain ids; Tokenizer adds BOS/EOS and templates on top.
# --------------------------------------------------------------------------------------------------


class _HFEngine:
  """A ``tokenizers.Tokenizer``; its post-processor is never applied (Tokenizer adds BOS/EOS)."""

  kind = "tokenizers"

  def __init__(self, tok):
    self.tok = tok
    tok.no_truncation()  # some tokenizer.json files carry a max length; never cut prompts silently
    tok.no_padding()
    self.refresh()

  def refresh(self) -> None:
    added = self.tok.get_added_tokens_decoder()
    self.special_ids = frozenset(i for i, t in added.items() if t.special)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def id_to_piece(self, token_id: int) -> str | None:
    return self.tok.id_to_token(token_id)

  def token_to_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)

  def serialized(self) -> str:
    """The tokenizer.json text, without the post-processor (Tokenizer keeps BOS/EOS itself)."""
    spec = json.loads(self.tok.to_str())
    spec.pop("post_processor", None)
    return json.dumps(spec, sort_keys=True)

  def save(self, directory: Path, prefix: tuple[int, ...] = (), suffix: tuple[int, ...] = ()) -> None:
    """Write tokenizer.json with a post-processor that adds ``prefix``/``suffix`` around a text."""
    tok = self.tok
    if _post_processor_affixes(tok) != (prefix, suffix):
      from tokenizers import Tokenizer as _RustTokenizer, processors

      tok = _RustTokenizer.from_str(tok.to_str())
      names = {i: tok.id_to_token(i) for i in (*prefix, *suffix)}
      single = " ".join([*(names[i] for i in prefix), "$A", *(names[i] for i in suffix)])
      pair = " ".join([single, *(names[i] for i in prefix), "$B:1", *(f"{names[i]}:1" for i in suffix)])
      tok.post_processor = processors.TemplateProcessing(
          single=single, pair=pair, special_tokens=[(t, i) for i, t in names.items()]
      )
    tok.save(str(directory / TOKENIZER_JSON))


class _SPEngine:
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

  def save(self, directory: Path, prefix: tuple[int, ...] = (), suffix: tuple[int, ...] = ()) -> None:
    (directory / TOKENIZER_MODEL).write_bytes(self.proto)  # BOS/EOS go in tokenizer_config.json
    (directory / TOKENIZER_JSON).unlink(missing_ok=True)  # it would take precedence on load


# --------------------------------------------------------------------------------------------------
# The public class.
# --------------------------------------------------------------------------------------------------


class Tokenizer:
  """A model's tokenizer: ids <-> text, special token ids, and its chat template.

  Build one with :func:`load_tokenizer` or :func:`tokenizer_from_gguf`; the constructor is internal.

  Attributes:
      bos_id, pad_id, unk_id: special token ids (``None`` when the model has none).
      eos_id: the model's primary end-of-sequence id (the one ``add_eos`` appends).
      eos_ids: every id that ends generation (``eos_id`` first).
      vocab_size: number of token ids (base vocabulary plus added tokens).
      add_bos / add_eos: whether :meth:`encode` adds BOS / EOS by default for this model.
      chat_template: the default Jinja chat template, or ``None``.
      chat_templates: named templates (e.g. ``"tool_use"``) besides the default.
      special_ids: ids dropped by ``decode(..., skip_special_tokens=True)``.
  """

  def __init__(
      self,
      engine: _HFEngine | _SPEngine,
      *,
      bos_id: int | None,
      eos_ids: Sequence[int],
      pad_id: int | None,
      unk_id: int | None,
      prefix: Sequence[int],
      suffix: Sequence[int],
      chat_template: str | None,
      chat_templates: Mapping[str, str] | None = None,
      config_extra: Mapping[str, Any] | None = None,
      source: str = "",
  ):
    self._engine = engine
    self.bos_id = bos_id
    self.eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids))
    self.eos_id = self.eos_ids[0] if self.eos_ids else None
    self.pad_id = pad_id
    self.unk_id = unk_id
    self._prefix = tuple(prefix)
    self._suffix = tuple(suffix)
    self.chat_template = chat_template
    self.chat_templates = dict(chat_templates or {})
    self._config_extra = dict(config_extra or {})
    self.source = source

  # -- properties -------------------------------------------------------------------------------

  @property
  def vocab_size(self) -> int:
    return self._engine.vocab_size

  @property
  def add_bos(self) -> bool:
    return self.bos_id is not None and self.bos_id in self._prefix

  @property
  def add_eos(self) -> bool:
    return self.eos_id is not None and self.eos_id in self._suffix

  @property
  def special_ids(self) -> frozenset[int]:
    return self._engine.special_ids

  @property
  def backend(self) -> str:
    """``"tokenizers"`` or ``"sentencepiece"``: the library that does the encoding."""
    return self._engine.kind

  @property
  def bos_token(self) -> str | None:
    return None if self.bos_id is None else self.id_to_piece(self.bos_id)

  @property
  def eos_token(self) -> str | None:
    return None if self.eos_id is None else self.id_to_piece(self.eos_id)

  @property
  def pad_token(self) -> str | None:
    return None if self.pad_id is None else self.id_to_piece(self.pad_id)

  @property
  def unk_token(self) -> str | None:
    return None if self.unk_id is None else self.id_to_piece(self.unk_id)

  # -- encoding ---------------------------------------------------------------------------------

  def _affixes(self, add_bos: bool | None) -> tuple[tuple[int, ...], tuple[int, ...]]:
    prefix = self._prefix
    if add_bos is True and not self.add_bos:
      if self.bos_id is None:
        raise ValueError(f"add_bos=True, but the tokenizer from {self.source or '?'} has no BOS token.")
      prefix = (self.bos_id, *prefix)
    elif add_bos is False and self.add_bos:
      prefix = tuple(i for i in prefix if i != self.bos_id)
    return prefix, self._suffix

  def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
    """Token ids for ``text``.

    Special tokens written in the text (``"<|im_start|>"``, ``"<s>"``, ...) become their ids, as
    with transformers' default. ``add_bos=None`` adds what the model adds by default (BOS and/or
    EOS, see :attr:`add_bos`/:attr:`add_eos`); ``True``/``False`` force BOS on or off. Like
    transformers, a text that already starts with the BOS string gets a second BOS unless you
    pass ``add_bos=False`` (chat templates that write BOS themselves need this).
    """
    if not isinstance(text, str):
      raise TypeError(f"encode() takes a str, got {type(text).__name__}.")
    prefix, suffix = self._affixes(add_bos)
    return [*prefix, *self._engine.encode(text), *suffix]

  def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    """:meth:`encode` for several texts (parallel where the engine supports it)."""
    prefix, suffix = self._affixes(add_bos)
    return [[*prefix, *ids, *suffix] for ids in self._engine.encode_batch(list(texts))]

  def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
    """Text for ``ids`` (a list, tuple, numpy/jax array, or a single id)."""
    if isinstance(ids, (int, np.integer)):
      ids = [ids]
    return self._engine.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens)

  def id_to_piece(self, token_id: int) -> str | None:
    """The vocabulary entry for ``token_id`` as stored (e.g. ``"Ġworld"``, ``"▁world"``), or None."""
    return self._engine.id_to_piece(int(token_id))

  def token_to_id(self, piece: str) -> int | None:
    """The id of vocabulary entry ``piece`` (as stored, see :meth:`id_to_piece`), or None."""
    return self._engine.token_to_id(piece)

  def is_special(self, token_id: int) -> bool:
    return int(token_id) in self._engine.special_ids

  # -- chat -------------------------------------------------------------------------------------

  def apply_chat_template(
      self,
      messages: list[dict],
      add_generation_prompt: bool = True,
      chat_template: str | None = None,
      tools: list | None = None,
      documents: list | None = None,
      **kwargs: Any,
  ) -> str:
    """Render ``messages`` like ``transformers``' ``apply_chat_template(..., tokenize=False)``.

    The template sees ``messages``, ``add_generation_prompt``, ``tools``, ``documents``, the
    special-token strings (``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``) and
    ``kwargs``. ``chat_template`` may name one of :attr:`chat_templates` or be a template text.
    Encode the result with ``encode(prompt, add_bos=False)`` if the template writes BOS itself.
    """
    template = self._pick_template(chat_template, tools)
    context = {
        name: value
        for name, value in (
            ("bos_token", self.bos_token),
            ("eos_token", self.eos_token),
            ("unk_token", self.unk_token),
            ("pad_token", self.pad_token),
        )
        if value is not None
    }
    context.update(kwargs)
    return render_chat_template(
        template, messages, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
        **context,
    )

  def _pick_template(self, chat_template: str | None, tools) -> str:
    if chat_template is not None:
      return self.chat_templates.get(chat_template, chat_template)
    if tools is not None and "tool_use" in self.chat_templates:
      return self.chat_templates["tool_use"]
    if self.chat_template is not None:
      return self.chat_template
    if self.chat_templates:
      raise ValueError(
          f"The tokenizer from {self.source or '?'} has several chat templates and no default; pass "
          f"chat_template= one of {sorted(self.chat_templates)}."
      )
    raise ValueError(f"The tokenizer from {self.source or '?'} has no chat template.")

  # -- persistence ------------------------------------------------------------------------------

  def save(self, directory: str | Path) -> None:
    """Write this tokenizer to ``directory`` so that ``load_tokenizer(directory)`` gives it back.

    Writes tokenizer.json (tokenizers engine) or tokenizer.model (SentencePiece engine), and
    tokenizer_config.json; chat_template.jinja when there is a default template, and
    generation_config.json (merged into an existing one) when ``eos_ids`` lists extra ids.
    The files follow the Hugging Face layout, so ``transformers.AutoTokenizer`` reads them too.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(self._config_extra)
    for key, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id), ("pad_token", self.pad_id),
                          ("unk_token", self.unk_id)):
      config[key] = None if token_id is None else self.id_to_piece(token_id)
    # For tokenizer.json the post-processor written by the engine is what counts; the flags are
    # informational there (transformers v5 ignores them) and authoritative for tokenizer.model.
    config["add_bos_token"] = self.add_bos
    config["add_eos_token"] = self.add_eos
    if self._engine.kind == "sentencepiece":
      config.setdefault("tokenizer_class", "LlamaTokenizer")
      config["legacy"] = self._engine.legacy
      if self._engine.extra:
        config["added_tokens_decoder"] = {
            str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": i in self._engine.special_ids}
            for t, i in sorted(self._engine.extra.items(), key=lambda kv: kv[1])
        }
    else:
      config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
    if self.chat_templates:
      config["chat_template"] = [{"name": n, "template": t} for n, t in self.chat_templates.items()]
    template_file = directory / CHAT_TEMPLATE_FILE
    if self.chat_template is not None:
      template_file.write_text(self.chat_template, encoding="utf-8")
    elif template_file.exists():
      template_file.unlink()  # a stale template would otherwise be picked up on load
    self._engine.save(directory, self._prefix, self._suffix)
    _write_json(directory / TOKENIZER_CONFIG, config)
    if len(self.eos_ids) > 1:
      gen_path = directory / GENERATION_CONFIG
      gen = _read_json(gen_path) if gen_path.exists() else {}
      gen["eos_token_id"] = list(self.eos_ids)
      if self.bos_id is not None:
        gen.setdefault("bos_token_id", self.bos_id)
      _write_json(gen_path, gen)

  # -- comparison -------------------------------------------------------------------------------

  def _key(self):
    return (
        self._engine.kind, self._engine.serialized(), getattr(self._engine, "legacy", None),
        self.bos_id, self.eos_ids, self.pad_id, self.unk_id,
        self._prefix, self._suffix, self.chat_template, tuple(sorted(self.chat_templates.items())),
    )

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Tokenizer):
      return NotImplemented
    return self._key() == other._key()

  __hash__ = None  # mutable-ish and compared by content

  def __repr__(self) -> str:
    return (
        f"Tokenizer(source={self.source!r}, backend={self.backend!r}, vocab_size={self.vocab_size}, "
        f"bos_id={self.bos_id}, eos_ids={self.eos_ids}, pad_id={self.pad_id}, add_bos={self.add_bos})"
    )


# --------------------------------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path) -> Tokenizer:
  """Load the tokenizer stored at ``path``.

  ``path`` may be a directory holding ``tokenizer.json`` (Hugging Face fast tokenizer) or
  ``tokenizer.model`` (SentencePiece), each with optional ``tokenizer_config.json``,
  ``special_tokens_map.json``, ``generation_config.json`` and ``chat_template.jinja``; one of those
  two files itself; a ``.gguf`` file; or a directory holding exactly one ``.gguf`` file.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"Tokenizer path {path} does not exist; expected a directory with tokenizer.json or "
        f"tokenizer.model, or a .gguf file."
    )
  if path.is_file():
    if path.name in (TOKENIZER_JSON, TOKENIZER_MODEL):
      return _load_directory(path.parent, prefer=path.name)
    if path.suffix.lower() == ".gguf" or _has_gguf_magic(path):
      return _tokenizer_from_metadata(read_gguf_metadata(path), str(path))
    raise ValueError(
        f"{path} is not a tokenizer file; expected a directory with tokenizer.json or tokenizer.model, "
        f"or a .gguf file."
    )
  return _load_directory(path)


def tokenizer_from_gguf(reader) -> Tokenizer:
  """Build the tokenizer described by the metadata of an open ``gguf.GGUFReader``."""
  fields = getattr(reader, "fields", None)
  if fields is None:
    raise TypeError(f"tokenizer_from_gguf expects a gguf.GGUFReader, got {type(reader).__name__}.")
  source = str(getattr(getattr(reader, "data", None), "filename", None) or "GGUF reader")
  meta = {k: f.contents() for k, f in fields.items() if k.startswith("tokenizer.") or k == "general.architecture"}
  return _tokenizer_from_metadata(meta, source)


def _load_directory(directory: Path, prefer: str | None = None) -> Tokenizer:
  has_json = (directory / TOKENIZER_JSON).is_file()
  has_model = (directory / TOKENIZER_MODEL).is_file()
  if has_json and prefer != TOKENIZER_MODEL:
    return _load_hf_json(directory)
  if has_model:
    return _load_sentencepiece_dir(directory)
  ggufs = sorted(directory.glob("*.gguf"))
  if len(ggufs) == 1:
    return _tokenizer_from_metadata(read_gguf_metadata(ggufs[0]), str(ggufs[0]))
  if len(ggufs) > 1:
    raise ValueError(
        f"Directory {directory} has no tokenizer.json or tokenizer.model and several .gguf files; "
        f"pass the .gguf file to use."
    )
  raise ValueError(
      f"Directory {directory} contains no tokenizer files; expected tokenizer.json, tokenizer.model or a .gguf file."
  )


def _read_json(path: Path) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
    raise ValueError(f"{path} is not a readable JSON file ({exc}).") from exc
  if not isinstance(data, dict):
    raise ValueError(f"{path} should hold a JSON object, but holds a {type(data).__name__}.")
  return data


def _write_json(path: Path, data: dict) -> None:
  path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
  if isinstance(value, Mapping):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _added_token(value, *, special: bool = True):
  """A ``tokenizers.AddedToken`` for a config entry (string or AddedToken dict), as transformers builds it."""
  from tokenizers import AddedToken

  if isinstance(value, Mapping):
    return AddedToken(
        value["content"],
        single_word=bool(value.get("single_word", False)),
        lstrip=bool(value.get("lstrip", False)),
        rstrip=bool(value.get("rstrip", False)),
        normalized=bool(value.get("normalized", False)),
        special=bool(value.get("special", special)),
    )
  return AddedToken(value, special=special, normalized=False)


def _read_side_files(directory: Path) -> tuple[dict, dict, dict]:
  """tokenizer_config.json (merged over special_tokens_map.json), generation_config.json, templates."""
  config: dict = {}
  if (directory / SPECIAL_TOKENS_MAP).is_file():
    config.update(_read_json(directory / SPECIAL_TOKENS_MAP))
  if (directory / TOKENIZER_CONFIG).is_file():
    for key, value in _read_json(directory / TOKENIZER_CONFIG).items():
      if value is not None or key not in config:
        config[key] = value
  generation = _read_json(directory / GENERATION_CONFIG) if (directory / GENERATION_CONFIG).is_file() else {}
  templates: dict[str, str] = {}
  raw = config.get("chat_template")
  if isinstance(raw, str):
    templates["default"] = raw
  elif isinstance(raw, list):
    for entry in raw:
      if isinstance(entry, Mapping) and isinstance(entry.get("name"), str) \
              and isinstance(entry.get("template"), str):
        templates[entry["name"]] = entry["template"]
  elif raw is not None:
    raise ValueError(
        f"{directory / TOKENIZER_CONFIG}: chat_template must be a string or a list of {{name, template}}."
    )
  if (directory / CHAT_TEMPLATE_FILE).is_file():
    templates["default"] = (directory / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
  return config, generation, templates


def _id_list(value) -> list[int]:
  if value is None:
    return []
  if isinstance(value, (list, tuple)):
    return [int(v) for v in value]
  return [int(value)]


def _finish_from_configs(
    engine, directory: Path, config: dict, generation: dict, templates: dict, prefix, suffix
) -> Tokenizer:
  def named_id(key: str) -> int | None:
    content = _token_content(config.get(key))
    return None if content is None else engine.token_to_id(content)

  bos_id = named_id("bos_token")
  if bos_id is None and generation.get("bos_token_id") is not None:
    bos_id = _id_list(generation["bos_token_id"])[0]
  eos_ids = [i for i in (named_id("eos_token"),) if i is not None] + _id_list(generation.get("eos_token_id"))
  pad_id = named_id("pad_token")
  if pad_id is None and isinstance(generation.get("pad_token_id"), int):
    pad_id = generation["pad_token_id"]
  unk_id = named_id("unk_token")
  if prefix is None:  # tokenizer.model: the add_bos_token / add_eos_token flags decide
    prefix = (bos_id,) if config.get("add_bos_token") and bos_id is not None else ()
    suffix = (eos_ids[0],) if config.get("add_eos_token") and eos_ids else ()
  default = templates.pop("default", None)
  extra = {k: v for k, v in config.items() if k not in _MANAGED_CONFIG_KEYS}
  return Tokenizer(
      engine, bos_id=bos_id, eos_ids=eos_ids, pad_id=pad_id, unk_id=unk_id, prefix=prefix, suffix=suffix,
      chat_template=default, chat_templates=templates, config_extra=extra, source=str(directory),
  )


def _load_hf_json(directory: Path) -> Tokenizer:
  from tokenizers import Tokenizer as _RustTokenizer

  file = directory / TOKENIZER_JSON
  try:
    tok = _RustTokenizer.from_file(str(file))
  except Exception as exc:  # the Rust side raises plain Exception subclasses
    raise ValueError(f"{file} is not a valid tokenizer.json ({exc}).") from exc
  config, generation, templates = _read_side_files(directory)

  # As transformers does: added tokens listed only in the config, then every named special token,
  # become special added tokens (matched whole in text).
  decoder = config.get("added_tokens_decoder") or {}
  present = {t.content for t in tok.get_added_tokens_decoder().values()}
  for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
    if isinstance(entry, Mapping) and entry.get("content") not in present:
      tok.add_tokens([_added_token(entry, special=bool(entry.get("special", False)))])
  named = [config.get(k) for k in _NAMED_SPECIAL_KEYS]
  for key in ("additional_special_tokens", "extra_special_tokens"):
    value = config.get(key)
    if isinstance(value, list):
      named.extend(value)
    elif isinstance(value, Mapping):
      named.extend(value.values())
  named = [v for v in named if _token_content(v) is not None]
  if named:
    tok.add_special_tokens([_added_token(v) for v in named])
  engine = _HFEngine(tok)
  # The tokenizer.json post-processor decides what encode() adds by default; like transformers v5,
  # add_bos_token / add_eos_token in tokenizer_config.json are ignored when tokenizer.json exists.
  try:
    prefix, suffix = _post_processor_affixes(tok)
  except ValueError as exc:
    raise ValueError(f"{file}: {exc}") from exc
  return _finish_from_configs(engine, directory, config, generation, templates, prefix, suffix)


def _post_processor_affixes(tok) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The ids a ``tokenizers.Tokenizer``'s post-processor puts before and after a single text."""
  plain = tok.encode("a", add_special_tokens=False).ids
  full = tok.encode("a", add_special_tokens=True).ids
  start = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), None)
  if start is None:
    raise ValueError("cannot tell which special tokens the post-processor adds")
  return tuple(full[:start]), tuple(full[start + len(plain):])


def _load_sentencepiece_dir(directory: Path) -> Tokenizer:
  file = directory / TOKENIZER_MODEL
  config, generation, templates = _read_side_files(directory)
  proto = file.read_bytes()
  import sentencepiece

  try:
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
  except Exception as exc:
    raise ValueError(f"{file} is not a valid SentencePiece model ({exc}).") from exc
  n = sp.get_piece_size()
  extra, extra_special = {}, []
  for key, entry in (config.get("added_tokens_decoder") or {}).items():
    content = _token_content(entry)
    if content is not None and int(key) >= n:
      extra[content] = int(key)
      if isinstance(entry, Mapping) and entry.get("special", True):
        extra_special.append(int(key))
  engine = _SPEngine(proto, extra, extra_special, legacy=config.get("legacy") is not False)
  # SentencePiece's own ids unless the config names the special tokens.
  for key, sp_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()),
                     ("pad_token", sp.pad_id())):
    if _token_content(config.get(key)) is None and sp_id >= 0:
      config[key] = sp.id_to_piece(sp_id)
  if config.get("add_bos_token") is None:
    config["add_bos_token"] = True  # Llama-2 / SentencePiece convention (and transformers v4's default)
  if config.get("add_eos_token") is None:
    config["add_eos_token"] = False
  return _finish_from_configs(engine, directory, config, generation, templates, None, None)


# --------------------------------------------------------------------------------------------------
# GGUF.
# --------------------------------------------------------------------------------------------------

_GGUF_SCALAR_CODES = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _has_gguf_magic(path: Path) -> bool:
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


def _gguf_pre_tokenizer(pre: str, source: str):
  """The ``tokenizers`` pre-tokenizer equal to llama.cpp's split rules for ``tokenizer.ggml.pre``.

  Returns ``(pre_tokenizer, ignore_merges)``. Note that transformers' GGUF loader gives "smollm"
  files a plain ByteLevel pre-tokenizer, without the digit split that SmolLM's own tokenizer.json
  and llama.cpp use; we follow llama.cpp. For "default" llama.cpp uses its own four-step split,
  which we copy too.
  """
  from tokenizers import Regex, pre_tokenizers as pt

  byte_level = pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)
  if pre in _PRE_SMOLLM:
    return pt.Sequence([pt.Digits(individual_digits=True),
                        pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]), False
  if pre in _PRE_GPT2:
    return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True), False
  if pre in _PRE_LLAMA3:
    return pt.Sequence([pt.Split(Regex(_LLAMA3_RE), behavior="isolated"), byte_level]), True
  if pre in _PRE_QWEN2:
    return pt.Sequence([pt.Split(Regex(_QWEN2_RE), behavior="isolated"), byte_level]), False
  if pre == "default":
    steps = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]"]
    return pt.Sequence([pt.Split(Regex(s), behavior="isolated") for s in steps] + [byte_level]), False
  raise ValueError(
      f"{source}: unsupported tokenizer.ggml.pre value {pre!r}; supported values are {', '.join(_SUPPORTED_PRE)}."
  )


def _gguf_id(meta: dict, key: str, n: int, source: str) -> int | None:
  value = meta.get(key)
  if value is None:
    return None
  value = int(value)
  if value == -1 or value == 0xFFFFFFFF:  # llama.cpp's "no token"
    return None
  if not 0 <= value < n:
    raise ValueError(f"{source}: {key} = {value} is outside the vocabulary of {n} tokens.")
  return value


def _tokenizer_from_metadata(meta: dict[str, Any], source: str) -> Tokenizer:
  model = meta.get("tokenizer.ggml.model")
  tokens = meta.get("tokenizer.ggml.tokens")
  if model is None or tokens is None:
    raise ValueError(f"{source} carries no tokenizer (no tokenizer.ggml.model / tokenizer.ggml.tokens metadata).")
  tokens = [str(t) for t in tokens]
  n = len(tokens)
  types = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * n)
  if len(types) != n:
    raise ValueError(f"{source}: {len(types)} token types for {n} tokens.")
  ids = {k: _gguf_id(meta, f"tokenizer.ggml.{k}_token_id", n, source)
         for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
  pre = meta.get("tokenizer.ggml.pre", "default")

  if model == "gpt2":
    engine = _gguf_bpe_engine(meta, tokens, types, ids, pre, source)
    engine.vocab_size = max(engine.vocab_size, n)  # duplicate token texts leave holes in the BPE vocab
    default_add_bos = pre in _PRE_LLAMA3  # llama.cpp turns BOS on for Llama-3 vocabularies
  elif model == "llama":
    engine = _gguf_spm_engine(meta, tokens, types, ids, source)
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
  return Tokenizer(
      engine, bos_id=ids["bos"], eos_ids=eos_ids, pad_id=ids["padding"], unk_id=ids["unknown"],
      prefix=(ids["bos"],) if add_bos else (), suffix=(ids["eos"],) if add_eos else (),
      chat_template=template if isinstance(template, str) else None, chat_templates=templates, source=source,
  )


def _gguf_bpe_engine(meta, tokens, types, ids, pre, source) -> _HFEngine:
  """Byte-level BPE from tokens + merges, with llama.cpp's pre-tokenizer and special-token matching."""
  from tokenizers import AddedToken, Tokenizer as _RustTokenizer, decoders, models

  merges_raw = meta.get("tokenizer.ggml.merges")
  if not merges_raw:
    raise ValueError(f"{source}: a 'gpt2' (BPE) vocabulary needs tokenizer.ggml.merges, which is missing.")
  pre_tokenizer, ignore_merges = _gguf_pre_tokenizer(pre, source)
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
  return _HFEngine(tok)


def _gguf_spm_engine(meta, tokens, types, ids, source) -> _SPEngine:
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
  try:
    return _SPEngine(proto.SerializeToString())
  except Exception as exc:
    raise ValueError(
        f"{source}: the 'llama' vocabulary does not make a valid SentencePiece model ({exc})."
    ) from exc
