"""Grammar engines for structured outputs on our workload: llguidance always, xgrammar when it imports.

With the default model's tokenizer (SmolLM2, 49152 tokens) it times: the tokenizer setup from our Tokenizer
(tokenizer.json text + LLTokenizer; the vocabulary's pieces + TokenizerInfo + GrammarCompiler); compiling each of
--schemas generated JSON schemas (nested objects, arrays with minItems/maxItems, enums, bounded numbers and integers,
patterns, maxLength, anyOf, required and optional properties, additionalProperties false), two regexes and a 5-way
choice, cold (xgrammar's cache off); and compile + the first mask (llguidance builds its lexer lazily, xgrammar its
token masks ahead of time). Then it walks each engine's matcher along one valid document per grammar, tokenized with
our tokenizer, plus EOS, filling the full-vocabulary bitmask before every token: the time per mask, any token an engine
refuses, and the steps where the two bitmasks differ. Prints a table and appends it to --results.

    .venv/bin/python benchmarks/grammar_backends.py          # llguidance only (the main venv has no xgrammar)
    python3 -m venv /tmp/xgvenv                                # both: xgrammar in a venv that sees the main one
    echo "import site; site.addsitedir('$PWD/.venv/lib/python3.11/site-packages')" \\
        > /tmp/xgvenv/lib/python3.11/site-packages/main.pth
    /tmp/xgvenv/bin/pip install --no-deps xgrammar==0.2.8 apache-tvm-ffi
    /tmp/xgvenv/bin/python benchmarks/grammar_backends.py --results /tmp/scratch.md

xgrammar runs with vLLM's settings (its defaults: any_whitespace, strict_mode), llguidance with its defaults (what
jaxllm.structured_outputs uses); every generated object says additionalProperties false, so the two agree on keys.
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import random
import sys
import time
from importlib import metadata

import numpy as np

import common

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: jaxllm

from jaxllm import default_model  # noqa: E402
from jaxllm.tokenizer import load_tokenizer  # noqa: E402

WORDS = ["alpha", "beta", "gamma", "delta", "red", "green", "blue", "north", "south", "Paris", "Zoë", "x-ray"]
REGEXES = {  # name -> (regex, a match)
    "regex email": (r"[a-z0-9._%+-]+@[a-z0-9.-]+\.[a-z]{2,}", "jane.doe+jax@example.co.uk"),
    "regex date": (r"\d{4}-\d{2}-\d{2}", "2026-12-03"),
}
CHOICES = ["positive", "negative", "neutral", "mixed", "not applicable"]


def schema(rng: random.Random, depth: int = 0) -> dict:
  """A random JSON schema; objects below depth 3."""
  kind = rng.choice(["string", "enum", "integer", "number", "boolean", "pattern", "anyOf"]
                    + ["object", "array", "object"] * (depth < 3))
  if kind == "string":
    return {"type": "string", "maxLength": rng.randint(8, 40)} if rng.random() < 0.5 else {"type": "string"}
  if kind == "enum":
    return {"enum": rng.sample(WORDS, 4)}
  if kind in ("integer", "number"):
    lo = rng.randint(-100, 50)
    return {"type": kind, "minimum": lo, "maximum": lo + rng.randint(1, 5000)}
  if kind == "pattern":
    return {"type": "string", "pattern": r"^[A-Z]{3}-\d{4}$"}
  if kind == "anyOf":
    return {"anyOf": [schema(rng, 3), schema(rng, 3), {"type": "null"}]}
  if kind == "array":
    lo = rng.randint(0, 2)
    return {"type": "array", "items": schema(rng, depth + 1), "minItems": lo, "maxItems": lo + rng.randint(1, 4)}
  if kind == "boolean":
    return {"type": "boolean"}
  props = {f"{rng.choice(WORDS[:9])}_{i}": schema(rng, depth + 1) for i in range(rng.randint(1, 6))}
  return {"type": "object", "properties": props, "required": [k for k in props if rng.random() < 0.6],
          "additionalProperties": False}


def instance(s: dict, rng: random.Random):
  """A random document valid for a schema from `schema`."""
  if "enum" in s:
    return rng.choice(s["enum"])
  if "anyOf" in s:
    return instance(rng.choice(s["anyOf"]), rng)
  kind = s["type"]
  if kind == "string":
    return f"{rng.choice(['ABC', 'XYZ'])}-{rng.randint(0, 9999):04d}" if "pattern" in s else \
        " ".join(rng.sample(WORDS, 3))[:rng.randint(1, s.get("maxLength", 30))]
  if kind == "integer":
    return rng.randint(s["minimum"], s["maximum"])
  if kind == "number":
    return round(rng.uniform(s["minimum"], s["maximum"]), rng.randint(0, 4))
  if kind == "array":
    return [instance(s["items"], rng) for _ in range(rng.randint(s["minItems"], s["maxItems"]))]
  if kind == "object":
    return {k: instance(v, rng) for k, v in s["properties"].items() if k in s["required"] or rng.random() < 0.5}
  return {"boolean": rng.random() < 0.5, "null": None}[kind]


def workload(n: int) -> list[tuple[str, str, object, str]]:
  """(name, kind, grammar, a valid document) for n JSON schemas (objects at the top), the regexes and the choice.
  Every 4th document is indented (newlines in the whitespace), the rest use json.dumps' ", " and ": "."""
  rng, cases = random.Random(0), []
  while len(cases) < n:
    s = schema(rng)
    if s.get("type") == "object" and len(json.dumps(s)) > 150:
      text = json.dumps(instance(s, rng), ensure_ascii=False, indent=2 if len(cases) % 4 == 3 else None)
      cases.append((f"schema {len(cases)}", "json", s, text))
  cases += [(name, "regex", regex, text) for name, (regex, text) in REGEXES.items()]
  return cases + [("choice 5", "choice", CHOICES, CHOICES[3])]


class LLGuidance:
  name = "llguidance"

  def __init__(self, tok, vocab: int, eos: list[int]):
    import llguidance
    import llguidance.numpy

    self.ll, self.fill = llguidance, llguidance.numpy.fill_next_token_bitmask
    self.tok = llguidance.LLTokenizer(tok._engine.serialized(), n_vocab=vocab, eos_token=eos)

  def compile(self, kind: str, grammar):
    M = self.ll.LLMatcher
    text = {"json": lambda: M.grammar_from_json_schema(grammar), "regex": lambda: M.grammar_from_regex(grammar),
            "choice": lambda: M.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in grammar))}[kind]()
    matcher = M(self.tok, text, log_level=0)
    if matcher.is_error():
      raise ValueError(matcher.get_error())
    return matcher

  def mask(self, matcher, bitmask: np.ndarray) -> None:
    self.fill(matcher, bitmask)

  def accept(self, matcher, token: int) -> bool:
    return matcher.consume_token(token) and not matcher.is_error()


class XGrammar:
  name = "xgrammar"

  def __init__(self, tok, vocab: int, eos: list[int]):
    import xgrammar

    # TokenizerInfo.from_huggingface(transformers.PreTrainedTokenizerFast(tokenizer_object=...)) finds no special
    # token in this vocabulary and lets <|im_start|> & co. appear inside JSON strings; a blank piece marks one.
    pieces = ["" if i in tok.special_ids else tok.id_to_piece(i) or "" for i in range(vocab)]
    info = xgrammar.TokenizerInfo(pieces, xgrammar.VocabType.BYTE_LEVEL, vocab_size=vocab, stop_token_ids=eos)
    self.xgr, self.compiler = xgrammar, xgrammar.GrammarCompiler(info, cache_enabled=False)

  def compile(self, kind: str, grammar):
    c = self.compiler
    compiled = {"json": lambda: c.compile_json_schema(json.dumps(grammar)), "regex": lambda: c.compile_regex(grammar),
                "choice": lambda: c.compile_grammar("root ::= " + " | ".join(json.dumps(s) for s in grammar))}[kind]()
    return self.xgr.GrammarMatcher(compiled)

  def mask(self, matcher, bitmask: np.ndarray) -> None:
    matcher.fill_next_token_bitmask(bitmask)

  def accept(self, matcher, token: int) -> bool:
    return matcher.accept_token(token)


def run(engine, cases, docs, words: int) -> dict:
  """Compile times, first-mask times, per-mask times and the bitmasks of every step (None after a refusal)."""
  compile_ms, first_ms, mask_us, masks, refused = [], [], [], {}, []
  for (name, kind, grammar, _), doc in zip(cases, docs):
    bitmask = np.zeros((1, words), np.int32)
    start = time.perf_counter()
    matcher = engine.compile(kind, grammar)
    compile_ms.append((time.perf_counter() - start) * 1e3)
    engine.mask(matcher, bitmask)
    first_ms.append((time.perf_counter() - start) * 1e3)
    matcher = engine.compile(kind, grammar)  # a fresh one: the walk below times its first mask too
    steps = []
    for i, token in enumerate(doc):
      start = time.perf_counter()
      engine.mask(matcher, bitmask)
      mask_us.append((time.perf_counter() - start) * 1e6)
      steps.append(bitmask[0].copy())
      if not engine.accept(matcher, token):
        refused.append(f"{name} token {i} ({token})")
        break
    masks[name] = steps
  return {"compile_ms": compile_ms, "first_ms": first_ms, "mask_us": mask_us, "masks": masks, "refused": refused}


def kind(tok, token: int) -> str:
  """What a token allowed by only one engine is, for the disagreement summary."""
  text = tok.decode([token])
  if token in tok.special_ids:
    return "special token"
  if any(ord(c) < 32 for c in text):
    return "control char (raw, invalid in a JSON string)"
  if "\x7f" in text:
    return "DEL (raw, valid JSON)"
  return "backslash" if "\\" in text else "other"


def compare(cases, docs, masks, names, tok) -> list[str]:
  """Steps where the engines' bitmasks differ, by the kind of tokens only one allows, with examples."""
  unpack = lambda m: set(np.flatnonzero(np.unpackbits(m.view(np.uint8), bitorder="little")))  # noqa: E731
  counts, examples, steps, differ = {}, {}, 0, 0
  for (name, *_), doc in zip(cases, docs):
    for i, (a, b) in enumerate(zip(masks[0][name], masks[1][name])):
      steps += 1
      if np.array_equal(a, b):
        continue
      differ += 1
      for n, only in zip(names, (unpack(a) - unpack(b), unpack(b) - unpack(a))):
        for k in {kind(tok, t) for t in only}:
          counts[n, k] = counts.get((n, k), 0) + 1
          picked = [tok.decode([t]) for t in sorted(t for t in only if kind(tok, t) == k)[:5]]
          example = f"{name} after {tok.decode(doc[:i])[-20:]!r}: {picked}"
          examples.setdefault((n, k), example.replace("|", "\\|"))
  lines = [f"Bitmasks differ at {differ} of {steps} steps (both engines at the same prefix). Tokens allowed by only "
           "one engine, by kind (steps; an example):", "", "| allowed only by | kind | steps | example |",
           "|---|---|---:|---|"]
  return lines + [f"| {n} | {k} | {c} | {examples[n, k]} |" for (n, k), c in sorted(counts.items())]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--schemas", type=int, default=50)
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  gguf = default_model.gguf_path()
  tok = load_tokenizer(gguf)
  vocab, eos, words = tok.vocab_size, list(tok.eos_ids), (tok.vocab_size + 31) // 32
  cases = workload(args.schemas)
  docs = [tok.encode(text, add_bos=False) + [eos[0]] for *_, text in cases]

  results = {}
  for cls in (LLGuidance, XGrammar):
    start = time.perf_counter()
    try:
      importlib.import_module(cls.name)
    except ImportError as e:
      print(f"{cls.name} not measured: {e}")
      continue
    import_s, start = time.perf_counter() - start, time.perf_counter()
    engine = cls(tok, vocab, eos)
    setup_s = time.perf_counter() - start
    results[cls.name] = run(engine, cases, docs, words) | {"import_s": import_s, "setup_s": setup_s}

  names = list(results)
  stats = lambda xs, qs: " / ".join(f"{v:.{int(v < 100)}f}" for v in np.percentile(xs, qs))  # noqa: E731
  row = lambda label, f: f"| {label} | " + " | ".join(f(results[n]) for n in names) + " |"  # noqa: E731
  n_json, n_tokens = args.schemas, sum(map(len, docs))
  lines = [
      f"### grammar_backends.py — {datetime.date.today()} — {platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} cores — python {platform.python_version()}", "",
      f"Tokenizer {os.path.basename(gguf)} ({vocab} tokens). {n_json} generated JSON schemas + "
      f"{len(REGEXES)} regexes + a 5-way choice; each walked along one valid document + EOS ({n_tokens} masks in all). "
      "Compile is cold (xgrammar's cache off); first mask = compile + the first bitmask.", "",
      "| | " + " | ".join(f"{n} {metadata.version(n)}" for n in names) + " |",
      "|---|" + "---:|" * len(names),
      row("import s (xgrammar imports torch and transformers)", lambda r: f"{r['import_s']:.2f}"),
      row("tokenizer setup s", lambda r: f"{r['setup_s']:.2f}"),
      row("compile ms median / p90 / max", lambda r: stats(r["compile_ms"], (50, 90, 100))),
      row("first mask ms median / p90 / max", lambda r: stats(r["first_ms"], (50, 90, 100))),
      row("mask µs median / p99 / max", lambda r: stats(r["mask_us"], (50, 99, 100))),
      row("masks over 1 ms", lambda r: f"{sum(us > 1000 for us in r['mask_us'])}"),
      row("all masks ms", lambda r: f"{sum(r['mask_us']) / 1e3:.0f}"),
      row("documents refused", lambda r: f"{len(r['refused'])} / {len(cases)}"),
  ]
  for n in names:
    lines += [f"\n{n} refused: " + "; ".join(results[n]["refused"])] if results[n]["refused"] else []
  if len(names) == 2:
    lines += ["", *compare(cases, docs, [results[n]["masks"] for n in names], names, tok)]
  common.publish(lines + [""], args.results)


if __name__ == "__main__":
  main()
