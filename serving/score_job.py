"""The batch scoring job behind `jaxllm score`: JSONL / ArrayRecord records in, one JSON line per record out.

    records ─► grain: source (JSONL line index | ArrayRecord) ─► this process's shard ─► parse + tokenize (worker
      processes) ─► chunks of `checkpoint_every` records ─► prefetch
    chunk ─► windows ─► length-bucketed batches (`scoring.Scorer`) ─► device          (chunk k+1 is dispatched
    chunk ─► results in input order ─► output file ─► fsync ─► progress file          before chunk k is written)

Records: `{"id"?, "text"}` (log-likelihood and perplexity of the whole text) or `{"id"?, "context", "continuation"}`
(continuation log-likelihood and is_greedy, lm-eval-harness semantics); the field names are settable. An ArrayRecord
record is the same JSON object as bytes. Outputs, one per input record in input order:

    {"line": 3, "id": "a", "num_tokens": 12, "logprob": -30.1, "perplexity": 12.3}          (a text)
    {"line": 4, "id": "b", "num_tokens": 2, "logprob": -1.5, "is_greedy": false}            (a pair)
    {"line": 5, "id": null, "error": "missing field 'text' (or 'context' and 'continuation')"}

plus "token_logprobs" with `token_logprobs=True`. "line" is the record's 1-based line in a JSONL file (blank lines are
skipped, not records) or its 1-based index in the ArrayRecord files.

**Resuming.** After each chunk the job appends its lines, fsyncs, then atomically replaces `OUTPUT.progress.json`
with the grain iterator's state after that chunk, the output's byte length and the job's settings. Rerunning the
same command truncates the output to that length and restores the iterator, so the output equals an uninterrupted
run's byte for byte (chunks, hence batches, are the same). Settings that change results must match, or it refuses.

**Multi-process.** With `jax.distributed` (the `--coordinator_address` flags or `--distributed`), process p scores
the p-th contiguous block of records into `OUTPUT.part-0000p-of-0000P` (with its own progress file); all processes
run each batch together on the mesh (see `scoring`), and process 0 concatenates the parts into OUTPUT at the end
(`merge` does the same by hand).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import math
import os
import sys
import time

import grain
import numpy as np

from jaxllm.serving import scoring

log = logging.getLogger("jaxllm.score")
VERSION = 1


class JobError(Exception):
  """A job that cannot start or must stop (bad settings, a strict-mode bad record); the message says why."""


@dataclasses.dataclass(frozen=True)
class Fields:
  text: str = "text"
  context: str = "context"
  continuation: str = "continuation"
  id: str = "id"


@dataclasses.dataclass(frozen=True)
class JobConfig:
  input: str
  output: str
  stride: int | None = None  # sliding-window stride for long texts (None: max_model_len // 2)
  fields: Fields = Fields()
  token_logprobs: bool = False
  checkpoint_every: int = 1024  # records per chunk: the unit of length bucketing and of progress checkpoints
  num_workers: int = 2  # grain worker processes for parsing and tokenization (0: threads in this process)
  strict: bool = False  # stop at the first bad record instead of writing it as an error
  overwrite: bool = False  # start over even if OUTPUT exists
  max_batch_size: int = 64
  max_batch_tokens: int = 4096
  log_every_s: float = 10.0


# ---------------------------------------------------------------------------------------------------------- sources
class JsonlSource:
  """Random access to the non-blank lines of a JSONL file: item i -> (1-based line number, the line's bytes)."""

  def __init__(self, path: str):
    self.path = path
    size = os.path.getsize(path)
    data = np.memmap(path, np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    block = 1 << 26  # the newline scan reads 64 MiB at a time, so a huge file is never held in memory
    ends = np.concatenate([np.flatnonzero(data[k:k + block] == 10) + k for k in range(0, size, block)] or
                          [np.zeros(0, np.int64)]).astype(np.int64)
    if size and data[-1] != 10:
      ends = np.append(ends, size)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)[:len(ends)]
    lengths = ends - starts
    crlf_blank = np.zeros(len(ends), bool)
    one = np.flatnonzero(lengths == 1)
    crlf_blank[one] = data[starts[one]] == 13
    keep = (lengths > 0) & ~crlf_blank
    self._starts, self._ends = starts[keep], ends[keep]
    self._lines = (np.flatnonzero(keep) + 1).astype(np.int64)
    self._fd = None

  def __len__(self) -> int:
    return len(self._starts)

  def __getitem__(self, i: int) -> tuple[int, bytes]:
    if self._fd is None:
      self._fd = os.open(self.path, os.O_RDONLY)
    # pread: no shared file position, so grain's reader threads can call this at once.
    return int(self._lines[i]), os.pread(self._fd, int(self._ends[i] - self._starts[i]), int(self._starts[i]))

  def __getstate__(self):
    return {**self.__dict__, "_fd": None}


class ArrayRecordInput:
  """ArrayRecord files (records are JSON objects as bytes): item i -> (i + 1, bytes)."""

  def __init__(self, paths: list[str]):
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> tuple[int, bytes]:
    return i + 1, self._source[i]


def open_source(spec: str):
  """A JSONL file, or ArrayRecord files: a path, a glob or a comma-separated list of files named *.array_record,
  *.arrayrecord or *.array_record-NNNNN-of-NNNNN (the sharded naming)."""
  paths = []
  for part in spec.split(","):
    found = sorted(glob.glob(part)) if any(c in part for c in "*?[") else [part]
    if not found:
      raise JobError(f"--input {part!r} matches no file.")
    paths += found
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise JobError(f"--input file {missing[0]!r} does not exist.")
  if all(p.endswith((".array_record", ".arrayrecord")) for p in paths) or any("array_record-" in p for p in paths):
    return ArrayRecordInput(paths)
  if len(paths) != 1:
    raise JobError(f"--input: several files are read only as ArrayRecord (.array_record); got {paths[:3]}.")
  return JsonlSource(paths[0])


# ---------------------------------------------------------------------------------------------------------- parsing
class Tokenize(grain.transforms.Map):
  """(line, raw bytes) -> a record dict: its line, id, kind ("text" / "pair") and Item, or an error message. Runs in
  grain's worker processes, so it is a module-level class holding the (picklable) tokenizer."""

  def __init__(self, tokenizer, fields: Fields):
    self.tokenizer, self.fields = tokenizer, fields

  def map(self, element):
    line, raw = element
    rec = {"line": line, "id": None, "kind": None, "item": None, "error": None}
    try:
      obj = json.loads(raw)
    except UnicodeDecodeError as e:
      rec["error"] = f"invalid UTF-8: {e}"
      return rec
    except json.JSONDecodeError as e:
      rec["error"] = f"invalid JSON: {e.msg} at column {e.colno}"
      return rec
    if not isinstance(obj, dict):
      rec["error"] = f"expected a JSON object, got {type(obj).__name__}"
      return rec
    f = self.fields
    rec["id"] = obj.get(f.id)
    try:
      if f.continuation in obj or f.context in obj:
        ctx, cont = obj.get(f.context), obj.get(f.continuation)
        for name, v in ((f.context, ctx), (f.continuation, cont)):
          if not isinstance(v, str):
            raise ValueError(f"field {name!r} must be a string, got {_describe(v)}")
        if not cont:
          raise ValueError(f"field {f.continuation!r} is empty")
        rec["kind"], rec["item"] = "pair", scoring.pair_item(*scoring.encode_pair(self.tokenizer, ctx, cont))
      elif f.text in obj:
        text = obj[f.text]
        if not isinstance(text, str):
          raise ValueError(f"field {f.text!r} must be a string, got {_describe(text)}")
        if not text.strip():
          raise ValueError(f"field {f.text!r} is empty")
        rec["kind"], rec["item"] = "text", scoring.text_item(self.tokenizer.encode(text))
      else:
        raise ValueError(f"missing field {f.text!r} (or {f.context!r} and {f.continuation!r})")
    except ValueError as e:
      rec["error"] = str(e)
    return rec


def _describe(v) -> str:
  return "null" if v is None else f"{type(v).__name__} {json.dumps(v)[:40]}"


def _chunk(records):  # grain's batch_fn: a chunk is a plain list of record dicts (module-level: picklable)
  return list(records)


# ---------------------------------------------------------------------------------------------------------- the job
def part_path(output: str, index: int, count: int) -> str:
  return output if count == 1 else f"{output}.part-{index:05d}-of-{count:05d}"


def progress_path(path: str) -> str:
  return path + ".progress.json"


def run(llm, config: JobConfig) -> dict:
  """Scores config.input into config.output with `llm` (every process of a multi-process run calls this). Returns
  this process's summary: records, errors, tokens, seconds, padding fraction."""
  import jax

  P, p = jax.process_count(), jax.process_index()
  if config.checkpoint_every < 1:
    raise JobError(f"--checkpoint_every={config.checkpoint_every} must be positive.")
  stride = config.stride if config.stride is not None else llm.max_model_len // 2
  if not 1 <= stride <= llm.max_model_len:
    raise JobError(f"--stride={stride} must be in [1, max_model_len={llm.max_model_len}].")
  if llm.tokenizer is None:
    raise JobError(f"{llm.source} has no tokenizer; scoring text needs one (pass --tokenizer).")
  source = open_source(config.input)
  bounds = [len(source) * k // P for k in range(P + 1)]
  lo, hi = bounds[p], bounds[p + 1]
  out_path = part_path(config.output, p, P)
  prog_path = progress_path(out_path)
  fingerprint = {
      "version": VERSION, "input": os.path.abspath(config.input), "input_bytes": _input_bytes(source, config.input),
      "model": str(llm.source), "dtype": str(llm.dtype), "max_model_len": llm.max_model_len, "stride": stride,
      "fields": dataclasses.asdict(config.fields), "token_logprobs": config.token_logprobs,
      "checkpoint_every": config.checkpoint_every, "max_batch_size": config.max_batch_size,
      "max_batch_tokens": config.max_batch_tokens, "num_workers": config.num_workers,
      "mesh": dict(llm.mesh.shape) if llm.mesh is not None else None, "process": [p, P]}

  state, done, out_bytes, complete = None, 0, 0, False
  if config.overwrite:
    for path in (out_path, prog_path):
      if os.path.exists(path):
        os.remove(path)
  if os.path.exists(prog_path):
    with open(prog_path) as f:
      prog = json.load(f)
    changed = sorted(k for k in set(fingerprint) | set(prog.get("job", {}))
                     if fingerprint.get(k) != prog.get("job", {}).get(k))
    if changed:
      raise JobError(f"{prog_path} belongs to a job with other settings ({', '.join(changed)} differ); rerun the same "
                     "command to resume it, pass --overwrite to start over, or choose another --output.")
    if not os.path.exists(out_path) or os.path.getsize(out_path) < prog["output_bytes"]:
      raise JobError(f"{out_path} is shorter than its progress file says ({prog['output_bytes']} bytes); pass "
                     "--overwrite to start over.")
    state, done, out_bytes, complete = (prog["iterator_state"], prog["records"], prog["output_bytes"],
                                        prog["done"])
    if complete:
      log.info("%s is already complete (%d records).", out_path, done)
    else:
      log.info("resuming %s after %d records.", out_path, done)
  elif os.path.exists(out_path) and (P > 1 or os.path.getsize(out_path)):
    raise JobError(f"{out_path} exists and no progress file says which job wrote it; pass --overwrite to replace it "
                   "or choose another --output.")

  ds = grain.MapDataset.source(source)[lo:hi].map(Tokenize(llm.tokenizer, config.fields))
  ds = ds.batch(config.checkpoint_every, batch_fn=_chunk)
  if config.num_workers > 0:
    from absl import flags

    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; a notebook or script has parsed none
      flags.FLAGS.mark_as_parsed()
    it_ds = ds.to_iter_dataset().mp_prefetch(grain.MultiprocessingOptions(num_workers=config.num_workers))
  else:
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  it = iter(it_ds) if not complete else None
  if state is not None and not complete:
    it.set_state(state)

  scorer = scoring.Scorer(llm.engine, max_batch_size=config.max_batch_size, max_batch_tokens=config.max_batch_tokens)
  summary = {"records": done, "errors": 0, "scored_tokens": 0, "seconds": 0.0}
  progress = _Progress(hi - lo, done, config.log_every_s, p)
  start = time.perf_counter()
  with open(out_path, "r+b" if os.path.exists(out_path) else "wb") as out:
    out.truncate(out_bytes)
    out.seek(out_bytes)
    pending = None
    while True:
      chunk = None if complete else next(it, None)
      if _all_processes_done(chunk is None) if P > 1 else chunk is None:
        break
      # A process with nothing left still takes part in the others' batches (multi-process runs are in lockstep).
      submitted = _submit(scorer, chunk or [], stride, config.strict, it.get_state() if chunk else None)
      if pending is not None:
        out_bytes = _finish(pending, out, prog_path, fingerprint, config, summary, progress, out_bytes)
      pending = submitted if chunk is not None else None
    if pending is not None:
      out_bytes = _finish(pending, out, prog_path, fingerprint, config, summary, progress, out_bytes)
  _save_progress(prog_path, fingerprint, state if complete else it.get_state(), summary["records"], out_bytes, True)
  progress.close()
  summary["seconds"] = time.perf_counter() - start
  summary["padding_fraction"] = scorer.stats.padding_fraction
  summary["output"] = out_path
  if P > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("jaxllm score: parts written")
    if p == 0:
      merge(config.output, P)
  return summary


def _input_bytes(source, spec: str) -> int:
  if isinstance(source, JsonlSource):
    return os.path.getsize(source.path)
  return sum(os.path.getsize(x) for part in spec.split(",") for x in (glob.glob(part) or [part]))


def _load(path):
  with open(path) as f:
    return json.load(f)


def _all_processes_done(mine: bool) -> bool:
  from jax.experimental import multihost_utils

  return bool(np.asarray(multihost_utils.process_allgather(np.array([mine]))).all())


def _submit(scorer, chunk, stride, strict, state_after):
  """Windows each good record of `chunk` and dispatches them; bad records (and records too long to score) carry
  their error to the output, or stop the job under strict."""
  items, wins, keep = [], [], []
  for rec in chunk:
    if rec["error"] is None:
      try:
        wins.append(scorer.windows(rec["item"], stride if rec["kind"] == "text" else None))
        items.append(rec["item"])
        keep.append(rec)
      except ValueError as e:
        rec["error"] = str(e)
    if rec["error"] is not None and strict:
      raise JobError(f"line {rec['line']}: {rec['error']} (without --strict it would be written as an error and "
                     "the job would carry on).")
  return chunk, keep, scorer.submit(items, wins), state_after


def _finish(pending, out, prog_path, fingerprint, config, summary, progress, out_bytes) -> int:
  chunk, keep, submitted, state_after = pending
  scores = dict(zip((id(r) for r in keep), submitted.result()))
  lines = []
  for rec in chunk:
    row = {"line": rec["line"], "id": rec["id"]}
    if rec["error"] is not None:
      row["error"] = rec["error"]
      summary["errors"] += 1
    else:
      s = scores[id(rec)]
      row["num_tokens"] = len(s.logprobs)
      row["logprob"] = s.sum_logprob
      if rec["kind"] == "text":
        row["perplexity"] = s.perplexity if math.isfinite(s.perplexity) else None
      else:
        row["is_greedy"] = s.is_greedy
      if config.token_logprobs:
        row["token_logprobs"] = [float(v) for v in s.logprobs]
      summary["scored_tokens"] += len(s.logprobs)
    lines.append(json.dumps(row, ensure_ascii=False))
  data = ("\n".join(lines) + "\n").encode() if lines else b""
  out.write(data)
  out.flush()
  os.fsync(out.fileno())
  out_bytes += len(data)
  summary["records"] += len(chunk)
  _save_progress(prog_path, fingerprint, state_after, summary["records"], out_bytes, False)
  progress.update(len(chunk), sum(len(scores[id(r)].logprobs) for r in keep), summary["errors"])
  return out_bytes


def _save_progress(path, fingerprint, state, records, out_bytes, done):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump({"job": fingerprint, "records": records, "output_bytes": out_bytes, "done": done,
               "iterator_state": state}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class _Progress:
  """A log line every `every_s` seconds (records/s, tokens/s, ETA), and a tqdm bar on a terminal."""

  def __init__(self, total, done, every_s, process):
    self.total, self.done, self.every_s, self.process = total, done, every_s, process
    self.start = self.last = time.perf_counter()
    self.new = self.tokens = self.errors = 0
    self.bar = None
    if sys.stderr.isatty() and process == 0:
      from tqdm.auto import tqdm

      self.bar = tqdm(total=total, initial=done, desc="Scoring", unit="rec", dynamic_ncols=True)

  def update(self, records, tokens, errors):
    self.done += records
    self.new += records
    self.tokens += tokens
    self.errors = errors
    now = time.perf_counter()
    if self.bar is not None:
      self.bar.update(records)
      self.bar.set_postfix(tok_s=f"{self.tokens / max(now - self.start, 1e-9):.0f}", errors=errors)
    if now - self.last >= self.every_s or self.done == self.total:
      self.last = now
      rate = self.new / max(now - self.start, 1e-9)
      eta = (self.total - self.done) / rate if rate > 0 else float("inf")
      log.info("process %d: %d/%d records (%.1f%%), %.1f records/s, %.0f tokens/s, ETA %s, %d errors", self.process,
               self.done, self.total, 100.0 * self.done / max(self.total, 1), rate,
               self.tokens / max(now - self.start, 1e-9), _hms(eta), errors)

  def close(self):
    if self.bar is not None:
      self.bar.close()


def _hms(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  s = int(seconds)
  return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def merge(output: str, num_parts: int | None = None) -> int:
  """Concatenates OUTPUT.part-*-of-N (each complete, by its progress file) into OUTPUT in process order; returns the
  number of records. Records are contiguous blocks per process, so this is input order."""
  parts = sorted(glob.glob(glob.escape(output) + ".part-*-of-*"))
  parts = [x for x in parts if not x.endswith((".progress.json", ".tmp"))]
  if not parts:
    raise JobError(f"no part files {output}.part-*-of-* to merge.")
  counts = {int(x.rsplit("-of-", 1)[1]) for x in parts}
  if len(counts) != 1 or (num_parts is not None and counts != {num_parts}):
    raise JobError(f"{output}: part files of different runs are mixed ({sorted(counts)} processes); remove the old ones.")
  n = counts.pop()
  want = [part_path(output, k, n) for k in range(n)]
  missing = [x for x in want if x not in parts]
  if missing:
    raise JobError(f"{output}: part {missing[0]} is missing; rerun the job on all {n} processes.")
  records = 0
  for x in want:
    prog = progress_path(x)
    if not os.path.exists(prog) or not _load(prog)["done"]:
      raise JobError(f"{x} is not complete; rerun the job on all {n} processes to finish it.")
    records += _load(prog)["records"]
  tmp = output + ".merge.tmp"
  with open(tmp, "wb") as dst:
    for x in want:
      with open(x, "rb") as src:
        while block := src.read(1 << 24):
          dst.write(block)
    dst.flush()
    os.fsync(dst.fileno())
  os.replace(tmp, output)
  log.info("merged %d parts into %s (%d records).", n, output, records)
  return records
