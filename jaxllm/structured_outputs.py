"""Structured outputs: generation constrained to a JSON schema, a regex, a list of choices or a grammar.

    from jaxllm import LLM, SamplingParams, StructuredOutputsParams
    params = SamplingParams(structured_outputs=StructuredOutputsParams(json={"type": "object", ...}))

The names are vLLM's (`StructuredOutputsParams`, and `structured_outputs: {"json": ...}` in a request, which
replaced its `guided_json` / `guided_regex` / ... fields in v0.12). The grammar engine is llguidance: a request's
constraint compiles once (cached by its text) into a matcher; each sample gets its own copy, which the scheduler feeds
every sampled token and asks for the next allowed set as a bitmask over the vocabulary ([ceil(V / 32)] int32 words,
bit v % 32 of word v // 32). The engine applies that bitmask to the logits on device, so unconstrained requests
never pay for it (see `serving.scheduler` for how the mask overlaps the device step).

Why llguidance (over xgrammar; both are what vLLM ships): no dependencies (xgrammar requires torch, transformers and
triton at install), a few milliseconds to compile a typical schema, masks in tens of microseconds, compilation that
releases the GIL and runs under bounded fuel (a constraint's lexer is built and checked on the worker thread that
compiles it, under tighter limits than llguidance's defaults, so a pathological regex is a 400, not a stall of the
engine thread), and Lark/GBNF grammars,
regexes and JSON schemas behind one API. The figures are in benchmarks/RESULTS.md (benchmarks/grammar_backends.py).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import json as _json
import threading
from typing import Any

import numpy as np

DEFAULT_WHITESPACE = r"(\r?\n[ \t]{0,32}| )?"  # between JSON tokens, unless the request says otherwise
MAX_GRAMMAR_CHARS = 1 << 20  # a constraint's text (schema, regex, grammar or choices) beyond this is refused
_CACHE_SIZE = 256  # compiled constraints kept (by their text)
MAX_SCHEMA_DEPTH = 64  # nesting of a JSON schema (objects in objects ...) beyond this is refused


def _limits():
  """llguidance's work bounds per constraint: lexer states and per-mask fuel well under its defaults, so one request's
  constraint costs at most milliseconds per mask and a bounded build."""
  import llguidance

  return llguidance.LLParserLimits(max_lexer_states=50_000, step_lexer_fuel=100_000, initial_lexer_fuel=500_000,
                                   max_grammar_size=200_000)


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredOutputsParams:
  """One constraint on the generated text (exactly one of json, regex, choice, grammar, json_object).

  Attributes:
    json: a JSON schema (a dict, or its JSON text): the output is one JSON value that validates against it.
    regex: the output matches this regular expression (Rust `regex` syntax, the whole output).
    choice: the output is exactly one of these strings.
    grammar: a context-free grammar in Lark syntax (llguidance's) or llama.cpp's GBNF.
    json_object: the output is any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    disable_any_whitespace: JSON without whitespace between tokens. By default a single space, or a newline and up to
      32 spaces or tabs of indent, may stand where JSON allows whitespace (DEFAULT_WHITESPACE): any pretty-printing
      a model tends to, but not the endless runs of blank lines small models fall into when any whitespace is free.
    whitespace_pattern: a regex for the whitespace allowed between JSON tokens (overrides both of the above).
    disable_additional_properties: objects that do not say otherwise take no properties beyond those they list
      (JSON Schema allows any by default, and a model told nothing more may invent keys without end).
  """

  json: dict | str | bool | None = None
  regex: str | None = None
  choice: tuple[str, ...] | list[str] | None = None
  grammar: str | None = None
  json_object: bool = False
  disable_any_whitespace: bool = False
  whitespace_pattern: str | None = None
  disable_additional_properties: bool = False

  def __post_init__(self):
    set_ = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
    set_ += ["json_object"] if self.json_object else []
    if len(set_) != 1:
      raise ValueError("StructuredOutputsParams takes exactly one of json, regex, choice, grammar, json_object; got "
                       f"{set_ or 'none'}.")
    if self.json is not None:
      schema = self.json
      if isinstance(schema, str):
        try:
          schema = _json.loads(schema)
        except ValueError as e:
          raise ValueError(f"StructuredOutputsParams.json is not valid JSON: {e}.") from None
      if not isinstance(schema, (dict, bool)):
        raise ValueError(f"StructuredOutputsParams.json must be a JSON schema (an object); got {schema!r:.80}.")
      object.__setattr__(self, "json", schema)
    for name in ("regex", "grammar", "whitespace_pattern"):
      value = getattr(self, name)
      if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(f"StructuredOutputsParams.{name} must be a non-empty string; got {value!r:.80}.")
    if self.choice is not None:
      if (isinstance(self.choice, str) or not self.choice
          or not all(isinstance(c, str) and c for c in self.choice)):
        raise ValueError(f"StructuredOutputsParams.choice must be a non-empty list of non-empty strings; got "
                         f"{self.choice!r:.80}.")
      object.__setattr__(self, "choice", tuple(self.choice))
    if len(self.key) > MAX_GRAMMAR_CHARS:
      raise ValueError(f"the structured output constraint is {len(self.key)} characters long; at most "
                       f"{MAX_GRAMMAR_CHARS} are accepted.")

  @property
  def key(self) -> str:
    """The constraint as canonical text (what compiled grammars are cached by)."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return _json.dumps({k: v for k, v in fields.items() if v not in (None, False)}, sort_keys=True)

  def llguidance_grammar(self) -> str:
    """The constraint as an llguidance grammar (raises ValueError for an input llguidance cannot read)."""
    import llguidance

    if self.json is not None or self.json_object:
      schema = {"type": "object"} if self.json_object else self.json
      if self.disable_additional_properties:
        schema = close_objects(schema)
      if self.disable_any_whitespace and self.whitespace_pattern is None:
        options: dict[str, Any] = {"whitespace_flexible": False}
      else:
        options = {"whitespace_pattern": self.whitespace_pattern or DEFAULT_WHITESPACE}
      return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
    if self.regex is not None:
      return llguidance.LLMatcher.grammar_from_regex(self.regex)
    if self.choice is not None:
      return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(_json.dumps(c) for c in self.choice))
    return llguidance.grammar_from("grammar", self.grammar)  # Lark, or GBNF converted to Lark


def close_objects(schema, depth: int = 0):
  """The schema with `additionalProperties: false` in every object schema (at any depth) that does not set it."""
  if depth > MAX_SCHEMA_DEPTH:
    raise ValueError(f"the JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep.")
  if isinstance(schema, list):
    return [close_objects(s, depth + 1) for s in schema]
  if not isinstance(schema, dict):
    return schema
  out = {}
  for k, v in schema.items():
    if k in ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas") and isinstance(v, dict):
      out[k] = {name: close_objects(sub, depth + 1) for name, sub in v.items()}  # maps of names to schemas
    elif k in ("const", "enum", "default", "examples", "required"):
      out[k] = v  # values, not schemas
    else:
      out[k] = close_objects(v, depth + 1)
  if (out.get("type") == "object" or "properties" in out) and "additionalProperties" not in out:
    out["additionalProperties"] = False
  return out


class GrammarCompiler:
  """Compiles constraints into llguidance matchers for one tokenizer (thread-safe; compiled ones are cached).

  `vocab_size` is the model's (its logits' width, which may exceed the tokenizer's); `eos_ids` are the tokens a
  finished constraint allows (every id that ends generation)."""

  def __init__(self, tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    self.tokenizer = tokenizer
    self.vocab_size = vocab_size
    self.eos_ids = tuple(eos_ids)
    self.num_words = (vocab_size + 31) // 32
    self._lock = threading.Lock()
    self._ll_tokenizer = None
    self._executor = None
    self._cache: collections.OrderedDict[str, Any] = collections.OrderedDict()
    self._compiling: dict[str, threading.Event] = {}  # constraints some thread is compiling now
    self._prefetcher = None

  def _setup(self):
    """The llguidance tokenizer (~0.5 s to build for a 50k vocabulary) and executor, made on first use."""
    with self._lock:
      if self._ll_tokenizer is None:
        import llguidance

        if self.tokenizer is None:
          raise ValueError("structured outputs need the model's tokenizer; this engine was built without one.")
        if not self.eos_ids:
          raise ValueError("structured outputs need an end-of-sequence token; this model has none.")
        self._ll_tokenizer = llguidance.LLTokenizer(_tokenizer_source(self.tokenizer, self.eos_ids[0]),
                                                    n_vocab=self.vocab_size, eos_token=list(self.eos_ids))
        self._executor = llguidance.LLExecutor()
    return self._ll_tokenizer

  def compile(self, params: StructuredOutputsParams):
    """A fresh matcher for `params` (raises ValueError naming what is wrong with the constraint). A constraint another
    thread is compiling (e.g. `prefetch`'s) is waited for, not compiled twice."""
    while True:
      with self._lock:
        proto = self._cache.get(params.key)
        if proto is not None:
          self._cache.move_to_end(params.key)
          return proto.deep_copy()
        compiling = self._compiling.get(params.key)
        if compiling is None:
          self._compiling[params.key] = threading.Event()
          break
      compiling.wait()  # then the cache has it, or that compile failed and this thread tries (and fails) itself
    return self._build(params).deep_copy()

  def _build(self, params: StructuredOutputsParams):
    """Compiles the constraint this thread claimed in `_compiling` into the cache; releases the claim."""
    import llguidance

    try:
      ll_tokenizer = self._setup()
      grammar = params.llguidance_grammar()
      proto = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0, limits=_limits())  # releases the GIL
      # llguidance builds its lexer lazily, on the first mask: build it here, on the caller's (worker) thread and
      # under the limits, so a pathological regex is refused now instead of stalling the engine thread later (the
      # lexer is shared by the copies the samples get).
      if not proto.is_error():
        proto.deep_copy().compute_bitmask()
      if proto.is_error():
        raise ValueError(f"invalid structured output constraint: {proto.get_error()}")
      with self._lock:
        self._cache[params.key] = proto
        while len(self._cache) > _CACHE_SIZE:
          self._cache.popitem(last=False)
      return proto
    finally:
      with self._lock:
        self._compiling.pop(params.key).set()

  def known(self, params: StructuredOutputsParams) -> bool:
    """Whether `params` is compiled or being compiled (so `compile` returns without compiling it)."""
    with self._lock:
      return params.key in self._cache or params.key in self._compiling

  def prefetch(self, params: StructuredOutputsParams) -> concurrent.futures.Future | None:
    """Starts compiling `params` on a background thread, into the cache `compile` reads; `known(params)` holds from
    the call on. A constraint that does not compile is dropped there (whoever compiles it for a request gets the
    error). -> the compile's future, or None when it is already compiled or being compiled."""
    with self._lock:
      if params.key in self._cache or params.key in self._compiling:
        return None
      self._compiling[params.key] = threading.Event()
      if self._prefetcher is None:
        self._prefetcher = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jaxllm-grammar")

    def run():
      try:
        self._build(params)
      except ValueError:
        pass

    return self._prefetcher.submit(run)

  def fill_masks(self, matchers: list[tuple[Any, int]], num_rows: int) -> np.ndarray:
    """[num_rows, ceil(V / 32)] int32 bitmask: row i allows what matchers' (matcher, i) allows, other rows
    everything. Computed in parallel by llguidance's executor (the GIL released)."""
    mask = np.full((num_rows, self.num_words), -1, np.int32)
    if matchers:
      self._setup()
      self._executor.unsafe_compute_mask_ptr(matchers, mask.ctypes.data, self.num_words * 4, num_rows)
    return mask


def _tokenizer_source(tokenizer, eos_id: int):
  """What llguidance.LLTokenizer reads: the tokenizer.json text for a `tokenizers` tokenizer; for SentencePiece, a
  wrapper listing each token's bytes (control and added special tokens prefixed with 0xff, llguidance's mark for
  special tokens) and encoding text with the model's own tokenizer."""
  engine = tokenizer._engine
  if engine.kind == "tokenizers":
    return engine.serialized()
  import llguidance
  import sentencepiece
  from sentencepiece import sentencepiece_model_pb2

  # llguidance tokenizes text it forces with this: the text's own pieces, without SentencePiece's dummy-prefix space
  # (which would make it believe "Hello" can be " Hello").
  model = sentencepiece_model_pb2.ModelProto.FromString(engine.proto)
  model.normalizer_spec.add_dummy_prefix = False
  plain = sentencepiece.SentencePieceProcessor(model_proto=model.SerializeToString())
  tokens = []
  for i in range(engine.vocab_size):
    piece = engine.id_to_piece(i) or ""
    if i in engine.special_ids or i >= engine.piece_size or engine.sp.is_unknown(i):
      tokens.append(b"\xff" + piece.encode() if i in engine.special_ids else piece.encode())
    elif engine.sp.is_byte(i):
      tokens.append(bytes([int(piece[3:5], 16)]))
    else:
      tokens.append(piece.replace("\u2581", " ").encode())

  class _SentencePiece:
    def __init__(self):
      self.eos_token_id, self.bos_token_id = eos_id, tokenizer.bos_id
      self.tokens, self.special_token_ids = tokens, sorted(engine.special_ids)

    def __call__(self, text):
      return plain.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

  return llguidance.TokenizerWrapper(_SentencePiece())
