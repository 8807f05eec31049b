"""Structured outputs: the constraint compiles (or names its error), the mask allows exactly what the grammar allows,
the engine applies it on device (a greedy constrained token is the argmax of the model's logits over the allowed
set), outputs always match, and unconstrained neighbours in the same steps are untouched."""

import json
import re
import time

import jsonschema
import numpy as np
import pytest

from jaxllm import SamplingParams, StructuredOutputsParams
from jaxllm.structured_outputs import GrammarCompiler
from jaxllm.tokenizer import load_tokenizer
from tests.test_tokenizer import sp_model  # noqa: F401 - the tiny SentencePiece model fixture

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pets"],
          "properties": {"name": {"type": "string", "maxLength": 20},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pets": {"type": "array", "maxItems": 3, "items": {"enum": ["cat", "dog", "fish"]}}}}
ASK = [{"role": "user", "content": "Describe a person as JSON."}]


def allowed(mask_row: np.ndarray, vocab_size: int) -> np.ndarray:
  return np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


@pytest.fixture(scope="module")
def compiler(default_llm):
  return default_llm.scheduler.grammars


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"), ({"json": PERSON, "regex": "a"}, "exactly one"), ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1]}, "JSON schema"), ({"choice": []}, "non-empty list"), ({"choice": "ab"}, "non-empty list"),
    ({"regex": ""}, "non-empty string")])
def test_params_name_what_is_wrong(kwargs, message):
  with pytest.raises(ValueError, match=message):
    StructuredOutputsParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [({"json": {"type": "int"}}, "int"), ({"regex": "(a"}, "unclosed group"),
                                             ({"grammar": "start: foo"}, "foo")])
def test_bad_constraints_fail_to_compile_with_the_reason(compiler, kwargs, message):
  with pytest.raises(ValueError, match=message):
    compiler.compile(StructuredOutputsParams(**kwargs))


def test_mask_follows_a_valid_document_and_refuses_the_rest(compiler, default_llm):
  tok = default_llm.tokenizer
  V = default_llm.config.vocab_size
  m = compiler.compile(StructuredOutputsParams(json=PERSON))
  doc = json.dumps({"name": "Ada", "age": 36, "pets": ["cat", "fish"]})
  for t in tok.encode(doc, add_bos=False):
    ok = allowed(compiler.fill_masks([(m, 0)], 1)[0], V)
    assert ok[t], (tok.decode([t]), doc)
    assert not ok[tok.encode("x", add_bos=False)[0]] or t != tok.encode("{", add_bos=False)[0]
    assert m.consume_token(t)
  assert m.is_accepting()
  ok = allowed(compiler.fill_masks([(m, 1)], 2)[1], V)  # done: only the end of sequence, any of the model's EOS ids
  assert set(np.flatnonzero(ok)) == set(tok.eos_ids)
  assert compiler.fill_masks([], 3).tolist() == np.full((3, compiler.num_words), -1).tolist()  # rows without one
  # A cached constraint hands out independent matchers.
  a, b = compiler.compile(StructuredOutputsParams(choice=["yes", "no"])), compiler.compile(
      StructuredOutputsParams(choice=["yes", "no"]))
  assert a.consume_token(tok.encode("yes", add_bos=False)[0]) and not b.is_stopped() and a.is_stopped()


def test_a_constraint_compiles_once_however_many_threads_ask(default_llm, monkeypatch):
  """`prefetch` (a multi-process server's followers compile what process 0 announces) and concurrent `compile`s of
  one constraint build one matcher; each caller gets its own copy; a bad constraint still raises for a caller."""
  import concurrent.futures
  import threading

  c = GrammarCompiler(default_llm.tokenizer, default_llm.config.vocab_size, tuple(default_llm.tokenizer.eos_ids))
  c._setup()
  built, gate = [], threading.Event()
  real = StructuredOutputsParams.llguidance_grammar

  def slow_grammar(self):  # the start of every compile
    built.append(self.key)
    gate.wait(10)  # every caller arrives while the first one compiles
    return real(self)

  monkeypatch.setattr(StructuredOutputsParams, "llguidance_grammar", slow_grammar)
  params = StructuredOutputsParams(json=PERSON)
  assert not c.known(params)
  ahead = c.prefetch(params)
  assert c.known(params) and c.prefetch(params) is None  # from the call on, before its thread starts
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    waiting = [pool.submit(c.compile, params) for _ in range(4)]
    deadline = time.monotonic() + 30
    while not built and time.monotonic() < deadline:
      time.sleep(0.01)
    assert built and c.known(params), ahead.exception(0) if ahead.done() else "not built in 30 s"
    assert not any(f.done() for f in waiting)
    gate.set()
    matchers = [f.result(30) for f in waiting]
  ahead.result(30)
  assert len(built) == 1 and c.known(params)
  tok = default_llm.tokenizer.encode("{", add_bos=False)[0]
  assert matchers[0].consume_token(tok) and not matchers[1].is_stopped()
  assert len({id(m) for m in matchers}) == 4
  bad = StructuredOutputsParams(json={"type": "int"})
  c.prefetch(bad).result(30)  # dropped there ...
  with pytest.raises(ValueError, match="int"):  # ... and named to whoever compiles it for a request
    c.compile(bad)
  assert not c.known(bad)


def test_sentencepiece_tokenizers_get_masks_too(sp_model):
  """A Llama-2 style tokenizer (SentencePiece BPE with byte fallback): the matcher reads its pieces' bytes."""
  tok = load_tokenizer(sp_model[0])
  V = tok.vocab_size + 5  # a model whose embedding is wider than the tokenizer
  c = GrammarCompiler(tok, V, tuple(tok.eos_ids))
  # Pieces are matched by their bytes: "▁Hello" is " Hello" (the decoder drops that space only at the very start).
  m = c.compile(StructuredOutputsParams(regex=r" Hello [0-9]+ 🎉"))
  assert not allowed(c.fill_masks([(m, 0)], 1)[0], V)[tok.token_to_id("H")]
  for t in tok.encode("Hello 42 🎉", add_bos=False):
    ok = allowed(c.fill_masks([(m, 0)], 1)[0], V)
    assert ok[t] and not ok[tok.vocab_size:].any(), tok.decode([t])
    assert m.consume_token(t)
  assert m.is_accepting() and not m.is_error()


def test_greedy_constrained_tokens_are_the_argmax_over_the_allowed_set(default_llm, compiler):
  """The device-side mask against a host oracle: at each step the token is the model's argmax among the tokens the
  grammar allowed there (from the full-forward logits), and unconstrained requests in the same steps are unchanged."""
  llm, tok = default_llm, default_llm.tokenizer
  constrained = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=PERSON))
  free = SamplingParams(temperature=0, max_tokens=12)
  prompt = tok.apply_chat_template(ASK, add_generation_prompt=True)
  alone = llm.generate(["The capital of France is", "1, 2, 3,"], free)
  mixed = llm.generate([prompt, "The capital of France is", "1, 2, 3,"], [constrained, free, free])
  assert [o.outputs[0].token_ids for o in mixed[1:]] == [o.outputs[0].token_ids for o in alone]
  out = mixed[0].outputs[0]
  assert out.finish_reason == "stop"
  jsonschema.validate(json.loads(out.text), PERSON)
  ids = mixed[0].prompt_token_ids
  logits = llm.logits([ids + out.token_ids])[0, len(ids) - 1:]
  m = compiler.compile(constrained.structured_outputs)
  V = llm.config.vocab_size
  for k, t in enumerate(out.token_ids):
    ok = allowed(compiler.fill_masks([(m, 0)], 1)[0], V)
    assert t == int(np.argmax(np.where(ok, logits[k], -np.inf))), k
    assert m.consume_token(t)
  assert m.is_stopped()  # finished the moment the document closed: no extra step for the EOS


def test_sampled_outputs_always_match(default_llm):
  llm = default_llm
  so = StructuredOutputsParams
  runs = llm.chat([ASK, [{"role": "user", "content": "Is the sky blue?"}],
                   [{"role": "user", "content": "Give me a date."}]],
                  [SamplingParams(temperature=1.0, n=3, seed=1, max_tokens=80, structured_outputs=so(json=PERSON)),
                   SamplingParams(temperature=1.0, n=3, seed=2, max_tokens=5,
                                  structured_outputs=so(choice=["yes", "no", "it depends"])),
                   SamplingParams(temperature=1.0, n=3, seed=3, max_tokens=12,
                                  structured_outputs=so(regex=r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]"))])
  for o in runs[0].outputs:
    jsonschema.validate(json.loads(o.text), PERSON)
  assert all(o.text in ("yes", "no", "it depends") for o in runs[1].outputs)
  assert all(re.fullmatch(r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]", o.text) for o in runs[2].outputs)
  assert all(o.finish_reason == "stop" for r in runs for o in r.outputs)


def test_disable_additional_properties_closes_every_object():
  from jaxllm.structured_outputs import close_objects

  schema = {"type": "object", "properties": {"properties": {"type": "object", "properties": {"a": {"enum": [{}]}}},
                                             "list": {"type": "array", "items": {"properties": {"b": {}}}}},
            "$defs": {"open": {"type": "object", "additionalProperties": True}}}
  closed = close_objects(schema)
  assert closed["additionalProperties"] is False
  assert closed["properties"]["properties"]["additionalProperties"] is False  # a property named "properties"
  assert closed["properties"]["properties"]["properties"]["a"] == {"enum": [{}]}  # values stay values
  assert closed["properties"]["list"]["items"]["additionalProperties"] is False
  assert closed["$defs"]["open"]["additionalProperties"] is True  # what a schema says is kept
  assert "additionalProperties" not in closed["properties"]
