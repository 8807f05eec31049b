"""Text <-> token ids for jaxllm models, plus chat-template rendering.

One class, :class:`Tokenizer`, fronts two encoding engines, each wrapping one library and speaking
plain ids (Tokenizer adds BOS/EOS, chat templates and the Hugging Face file layout on top):

* ``_HFEngine`` (here): the Rust ``tokenizers`` library, for Hugging Face ``tokenizer.json`` files
  and for byte-level BPE vocabularies stored in GGUF files (``tokenizer.ggml.model == "gpt2"``);
* ``SentencePieceEngine`` (:mod:`jaxllm.tokenizer_spm`): ``sentencepiece``, for ``tokenizer.model``
  files (Llama-2 / TinyLlama style) and for the SentencePiece vocabularies stored in GGUF files
  (``tokenizer.ggml.model == "llama"``), which are rebuilt into a SentencePiece ``ModelProto`` so
  encoding follows SentencePiece (and llama.cpp) exactly.

This module reads Hugging Face directories; :mod:`jaxllm.tokenizer_gguf` reads GGUF vocabularies.

How data flows::

    load_tokenizer(path) --- directory with tokenizer.json --> tokenizers.Tokenizer.from_file
                         |                                      + tokenizer_config.json / special_tokens_map.json
                         |                                      + generation_config.json / chat_template.jinja
                         |-- directory with tokenizer.model --> SentencePieceProcessor + the same json files
                         '-- file.gguf --> read_gguf_metadata() --.
    tokenizer_from_gguf(GGUFReader) --> reader_metadata() ---------+--> tokenizer_gguf.vocabulary_from_metadata:
                                                                   |    BPE (tokens, merges, pre-tokenizer named
                                                                   |    by tokenizer.ggml.pre) or SentencePiece proto
                                                                   v
                                                             engine + Tokenizer

    Tokenizer.encode(text):  engine encodes the text with special tokens (e.g. "<|im_start|>") matched
                             whole, then the model's default prefix (BOS) / suffix (EOS) ids are added.
    Tokenizer.decode(ids):   engine decodes; special tokens are kept unless skip_special_tokens.
    Tokenizer.apply_chat_template(messages): jaxllm.chat_template renders the model's Jinja template.
    Tokenizer.save(dir):     tokenizer.json or tokenizer.model, plus tokenizer_config.json (and
                             chat_template.jinja / generation_config.json when needed).

Behaviour follows ``transformers.AutoTokenizer`` (v5) for Hugging Face directories, and llama.cpp for
GGUF vocabularies, where the two differ (see ``tokenizer_gguf._pre_tokenizer``). This module never
imports ``transformers`` or ``torch``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm import tokenizer_gguf
from jaxllm.chat_template import ChatTemplateError, render_chat_template
from jaxllm.tokenizer_process import TokenizerProcess
from jaxllm.tokenizer_gguf import read_gguf_metadata
from jaxllm.tokenizer_spm import TOKENIZER_MODEL, SentencePieceEngine

__all__ = ["Tokenizer", "load_tokenizer", "tokenizer_from_gguf", "read_gguf_metadata", "ChatTemplateError"]

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
PROCESSOR_TEMPLATE_FILE = "chat_template.json"  # multimodal repos (Gemma 3 4B+) keep the template with the processor

# Keys of tokenizer_config.json that Tokenizer manages itself; others are carried through save().
_MANAGED_CONFIG_KEYS = {
    "bos_token", "eos_token", "pad_token", "unk_token", "add_bos_token", "add_eos_token", "chat_template",
    "added_tokens_decoder",
}
_NAMED_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


# --------------------------------------------------------------------------------------------------
# The tokenizers engine. Engines wrap one library each and speak plain ids; Tokenizer adds BOS/EOS
# and templates on top. The other engine is jaxllm.tokenizer_spm.SentencePieceEngine.
# --------------------------------------------------------------------------------------------------


class _HFEngine:
  """A ``tokenizers.Tokenizer``; its post-processor is never applied (Tokenizer adds BOS/EOS)."""

  kind = "tokenizers"
  process: TokenizerProcess | None = None  # where long texts are encoded (Tokenizer.run_in_process)
  PROCESS_MIN = 1 << 16  # characters below which a text is encoded on the caller's thread: a short prompt never
  # queues behind a multi-megabyte one

  def __init__(self, tok):
    self.tok = tok
    tok.no_truncation()  # some tokenizer.json files carry a max length; never cut prompts silently
    tok.no_padding()
    self.refresh()

  def refresh(self) -> None:
    added = self.tok.get_added_tokens_decoder()
    self.special_ids = frozenset(i for i, t in added.items() if t.special)
    self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

  def _in_process(self, size: int) -> bool:
    return self.process is not None and size >= self.PROCESS_MIN

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_array(self, text: str) -> np.ndarray:
    return self.process.encode_batch([text])[0] if self._in_process(len(text)) else \
        np.asarray(self.encode(text), np.int32)

  def encode_batch(self, texts: list[str]) -> list[list[int]]:
    if self._in_process(sum(map(len, texts))):
      return [a.tolist() for a in self.process.encode_batch(texts)]
    # encode_batch_fast, not encode: the Rust batch calls release the GIL (encode holds it for the whole text, so a
    # 4 MB prompt tokenized on a server's worker thread would stall its event loop for seconds anyway), and the
    # fast one keeps no offsets or token strings, whose freeing (with the GIL held) took 230 ms for 2M tokens.
    return [e.ids for e in self.tok.encode_batch_fast(texts, add_special_tokens=False)]

  def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
    # decode_batch releases the GIL, as above; on the caller's thread, which converts the id list with the GIL held
    return self.tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

  def id_to_piece(self, token_id: int) -> str | None:
    return self.tok.id_to_token(token_id)

  def token_to_id(self, piece: str) -> int | None:
    return self.tok.token_to_id(piece)

  def serialized(self) -> str:
    """The tokenizer.json text, without the post-processor (Tokenizer keeps BOS/EOS itself)."""
    spec = json.loads(self.tok.to_str())
    spec.pop("post_processor", None)
    return json.dumps(spec, sort_keys=True)

  def fill_config(self, config: dict) -> None:
    """Add this engine's keys to a tokenizer_config.json being written."""
    config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")

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
      engine: _HFEngine | SentencePieceEngine,
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
    return self._piece_or_none(self.bos_id)

  @property
  def eos_token(self) -> str | None:
    return self._piece_or_none(self.eos_id)

  @property
  def pad_token(self) -> str | None:
    return self._piece_or_none(self.pad_id)

  @property
  def unk_token(self) -> str | None:
    return self._piece_or_none(self.unk_id)

  def _piece_or_none(self, token_id: int | None) -> str | None:
    return None if token_id is None else self.id_to_piece(token_id)

  def _special_token_strings(self) -> dict[str, str | None]:
    """The named special tokens as strings, keyed as tokenizer_config.json and chat templates name them."""
    return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
            "unk_token": self.unk_token}

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
    ids = self._engine.encode(text)
    return [*prefix, *ids, *suffix] if prefix or suffix else ids

  def encode_batch(self, texts: Sequence[str], add_bos: bool | None = None) -> list[list[int]]:
    """:meth:`encode` for several texts (parallel where the engine supports it)."""
    prefix, suffix = self._affixes(add_bos)
    return [[*prefix, *ids, *suffix] for ids in self._engine.encode_batch(list(texts))]

  def encode_array(self, text: str, add_bos: bool | None = None) -> np.ndarray:
    """:meth:`encode` as an int32 array. With a tokenizer process running (:meth:`run_in_process`), a long text's
    ids never become a Python list in this process: a server checks a multi-megabyte prompt's length, or writes its
    ids out in slices, without holding the GIL for the ~100 ms that building and freeing 2M ints take."""
    if not isinstance(text, str):
      raise TypeError(f"encode_array() takes a str, got {type(text).__name__}.")
    prefix, suffix = self._affixes(add_bos)
    ids = self._engine.encode_array(text) if isinstance(self._engine, _HFEngine) else \
        np.asarray(self._engine.encode(text), np.int32)
    if prefix or suffix:
      ids = np.concatenate([np.asarray(prefix, np.int32), ids, np.asarray(suffix, np.int32)])
    return ids

  def run_in_process(self, nice: int = 0) -> bool:
    """Encode long texts (64K characters and more) in a child process at CPU priority `nice` from now on (see
    `jaxllm.tokenizer_process`); shorter ones stay on the caller's thread. A server does this so that a
    multi-megabyte prompt takes neither its GIL nor, at a low priority, the engine's CPU. False (and nothing changes)
    for the sentencepiece engine, which encodes 1.6M tokens in 0.15 s in-process. `stop_process()` ends it."""
    if not isinstance(self._engine, _HFEngine):
      return False
    self.stop_process()
    self._engine.process = TokenizerProcess(self._engine.tok.to_str(), nice)
    return True

  def stop_process(self) -> None:
    """Ends the tokenizer process (if one runs); texts are encoded in this process again."""
    engine = self._engine
    if isinstance(engine, _HFEngine) and engine.process is not None:
      engine.process.close()
      engine.process = None

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
    context = {name: value for name, value in self._special_token_strings().items() if value is not None}
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
    config.update(self._special_token_strings())
    # For tokenizer.json the post-processor written by the engine is what counts; the flags are
    # informational there (transformers v5 ignores them) and authoritative for tokenizer.model.
    config["add_bos_token"] = self.add_bos
    config["add_eos_token"] = self.add_eos
    self._engine.fill_config(config)
    if self.chat_templates:
      config["chat_template"] = [{"name": n, "template": t} for n, t in self.chat_templates.items()]
    template_file = directory / CHAT_TEMPLATE_FILE
    if self.chat_template is not None:
      template_file.write_text(self.chat_template, encoding="utf-8")
    elif template_file.exists():
      template_file.unlink()  # a stale template would otherwise be picked up on load
    self._engine.save(directory, self._prefix, self._suffix)
    if self.backend == "sentencepiece":
      (directory / TOKENIZER_JSON).unlink(missing_ok=True)  # it would take precedence over tokenizer.model on load
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
    if path.suffix.lower() == ".gguf" or tokenizer_gguf.has_gguf_magic(path):
      return _load_gguf(path)
    raise ValueError(
        f"{path} is not a tokenizer file; expected a directory with tokenizer.json or tokenizer.model, "
        f"or a .gguf file."
    )
  return _load_directory(path)


def tokenizer_from_gguf(reader) -> Tokenizer:
  """Build the tokenizer described by the metadata of an open ``gguf.GGUFReader``."""
  return _tokenizer_from_gguf_metadata(*tokenizer_gguf.reader_metadata(reader))


def _load_directory(directory: Path, prefer: str | None = None) -> Tokenizer:
  has_json = (directory / TOKENIZER_JSON).is_file()
  has_model = (directory / TOKENIZER_MODEL).is_file()
  if has_json and prefer != TOKENIZER_MODEL:
    return _load_hf_json(directory)
  if has_model:
    return _load_sentencepiece_dir(directory)
  ggufs = sorted(directory.glob("*.gguf"))
  if len(ggufs) == 1:
    return _load_gguf(ggufs[0])
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
  elif "default" not in templates and (directory / PROCESSOR_TEMPLATE_FILE).is_file():
    raw = _read_json(directory / PROCESSOR_TEMPLATE_FILE).get("chat_template")
    if not isinstance(raw, str):
      raise ValueError(f"{directory / PROCESSOR_TEMPLATE_FILE}: chat_template must be a string.")
    templates["default"] = raw
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
  engine = SentencePieceEngine(proto, extra, extra_special, legacy=config.get("legacy") is not False)
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


def _load_gguf(path: Path) -> Tokenizer:
  return _tokenizer_from_gguf_metadata(read_gguf_metadata(path), str(path))


def _tokenizer_from_gguf_metadata(meta: dict[str, Any], source: str) -> Tokenizer:
  """Wrap the vocabulary that :mod:`jaxllm.tokenizer_gguf` reads from GGUF metadata in an engine."""
  vocab = tokenizer_gguf.vocabulary_from_metadata(meta, source)
  if vocab.bpe is not None:
    engine = _HFEngine(vocab.bpe)
  else:
    try:
      engine = SentencePieceEngine(vocab.sentencepiece_proto)
    except Exception as exc:
      raise ValueError(
          f"{source}: the 'llama' vocabulary does not make a valid SentencePiece model ({exc})."
      ) from exc
  engine.vocab_size = max(engine.vocab_size, vocab.size)  # duplicate token texts leave holes in a BPE vocab
  return Tokenizer(
      engine, bos_id=vocab.bos_id, eos_ids=vocab.eos_ids, pad_id=vocab.pad_id, unk_id=vocab.unk_id,
      prefix=vocab.prefix, suffix=vocab.suffix, chat_template=vocab.chat_template,
      chat_templates=vocab.chat_templates, source=source,
  )
