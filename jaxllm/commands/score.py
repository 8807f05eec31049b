"""`jaxllm score`: log-likelihoods / perplexities of a JSONL or ArrayRecord dataset (`jaxllm.serving.score_job`).

    jaxllm score --input data.jsonl --output scores.jsonl                       # {"text"} or {"context","continuation"}
    jaxllm score --input data.jsonl --output scores.jsonl --text_field body --id_field doc_id --token_logprobs
    jaxllm score ... --mesh model=8 --coordinator_address h0:1234 --num_processes 2 --process_id 0   # each host
    jaxllm score --merge --output scores.jsonl                                  # join the part files by hand

Killed? Run the same command again: it resumes from its last checkpoint and the output is the same as an
uninterrupted run's.
"""

from absl import flags

from jaxllm.commands import device_flags, fail

_MODEL = flags.DEFINE_string("model", "default", "'default', a .gguf file, an HF checkpoint dir or a convert dir.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tokenizer path to use instead of the checkpoint's own.")
_DTYPE = flags.DEFINE_string("dtype", "auto", "Parameter dtype: float32, bfloat16 or auto (bfloat16 on a GPU / TPU, "
                              "float32 on CPU).")
_INPUT = flags.DEFINE_string("input", None, "A JSONL file, or ArrayRecord files (*.array_record: a path, a glob or a "
                             "comma-separated list) of JSON records.")
_OUTPUT = flags.DEFINE_string("output", None, "The JSONL output: one line per input record, in input order.")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", None, "Tokens per forward pass: the sliding window for long "
                                      "texts and the left-truncation length for pairs (default: the model's "
                                      "context length).")
_STRIDE = flags.DEFINE_integer("stride", None, "Sliding-window stride for texts longer than --max_model_len "
                               "(default: max_model_len / 2); each window scores the tokens the previous one did "
                               "not reach.")
_TEXT = flags.DEFINE_string("text_field", "text", "Record field holding a text to score whole.")
_CONTEXT = flags.DEFINE_string("context_field", "context", "Record field holding a context.")
_CONTINUATION = flags.DEFINE_string("continuation_field", "continuation", "Record field holding the continuation "
                                    "to score given the context.")
_ID = flags.DEFINE_string("id_field", "id", "Record field copied to the output as \"id\" (null if absent).")
_TOKEN_LOGPROBS = flags.DEFINE_bool("token_logprobs", False, "Also write each scored token's logprob.")
_CHECKPOINT_EVERY = flags.DEFINE_integer("checkpoint_every", 1024, "Records per chunk: progress is saved after each "
                                         "chunk, and batches are length-bucketed within it.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "grain worker processes that parse and tokenize (0: threads "
                                    "in this process).")
_MAX_BATCH_SIZE = flags.DEFINE_integer("max_batch_size", 64, "Rows per forward pass.")
_MAX_BATCH_TOKENS = flags.DEFINE_integer("max_batch_tokens", 4096, "Padded tokens per forward pass (its float32 "
                                         "logits take this x vocab x 4 bytes).")
_STRICT = flags.DEFINE_bool("strict", False, "Stop at the first bad record instead of writing it as an error line.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Start over, replacing --output and its progress.")
_MERGE = flags.DEFINE_bool("merge", False, "Only join the part files of a multi-process run into --output.")
_LOG_EVERY = flags.DEFINE_float("log_every_s", 10.0, "Seconds between progress log lines.")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}.")
  import logging

  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from jaxllm.serving import score_job

  if not _OUTPUT.value:
    fail("pass --output (the JSONL file to write).")
  if _MERGE.value:
    try:
      n = score_job.merge(_OUTPUT.value)
    except score_job.JobError as e:
      fail(str(e))
    print(f"{_OUTPUT.value}: {n} records")
    return
  if not _INPUT.value:
    fail("pass --input (a JSONL file or ArrayRecord files).")
  for name, flag in (("checkpoint_every", _CHECKPOINT_EVERY), ("max_batch_size", _MAX_BATCH_SIZE),
                     ("max_batch_tokens", _MAX_BATCH_TOKENS)):
    if flag.value < 1:
      fail(f"--{name}={flag.value} must be a positive integer.")
  if _NUM_WORKERS.value < 0:
    fail(f"--num_workers={_NUM_WORKERS.value} must be >= 0.")
  config = score_job.JobConfig(
      input=_INPUT.value, output=_OUTPUT.value, stride=_STRIDE.value,
      fields=score_job.Fields(_TEXT.value, _CONTEXT.value, _CONTINUATION.value, _ID.value),
      token_logprobs=_TOKEN_LOGPROBS.value, checkpoint_every=_CHECKPOINT_EVERY.value, num_workers=_NUM_WORKERS.value,
      strict=_STRICT.value, overwrite=_OVERWRITE.value, max_batch_size=_MAX_BATCH_SIZE.value,
      max_batch_tokens=_MAX_BATCH_TOKENS.value, log_every_s=_LOG_EVERY.value)
  try:
    score_job.open_source(config.input)  # a bad --input fails before the model loads
    from jaxllm import LLM

    mesh, layout = device_flags.setup()
    llm = LLM(_MODEL.value, dtype=_DTYPE.value, quantization=device_flags.quantization(), tokenizer=_TOKENIZER.value, max_model_len=_MAX_MODEL_LEN.value,
              max_num_seqs=1, mesh=mesh, layout=layout)
    summary = score_job.run(llm, config)
  except (ValueError, OSError, score_job.JobError) as e:
    fail(str(e))
  if device_flags.is_primary():
    print(f"{config.output}: {summary['records']} records ({summary['errors']} errors), {summary['scored_tokens']} "
          f"tokens scored in {summary['seconds']:.1f} s, {100 * summary['padding_fraction']:.1f}% padding")
