"""`jaxllm score` as a data team runs it: killed and resumed, split over processes, fed bad records and ArrayRecord.

A tiny random Llama (written by transformers' save_pretrained) with SmolLM2's real tokenizer keeps these fast; the
numbers against transformers on the default model are in test_scoring.py.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxllm.serving import score_job
from tests.serving.test_scoring import varied_records


@pytest.fixture(scope="module")
def tiny_llm(tiny_model):
  from jaxllm import LLM

  return LLM(tiny_model, max_model_len=128, max_num_seqs=1)


def write_jsonl(path, records, extra_lines=()):
  """records as JSON lines, with raw `extra_lines` inserted at their indices (for bad records)."""
  lines = [json.dumps(r, ensure_ascii=False).encode() for r in records]
  for i, raw in sorted(extra_lines):
    lines.insert(i, raw)
  path.write_bytes(b"\n".join(lines) + b"\n")


def score_cli(*args, env=None, **kwargs):
  return subprocess.run([sys.executable, "-m", "jaxllm.cli", "score", *args], capture_output=True, text=True,
                        timeout=600, env=env, **kwargs)


def test_kill_and_rerun_gives_the_uninterrupted_output(tmp_path, tiny_model):
  write_jsonl(tmp_path / "in.jsonl", varied_records(1200, seed=1), [(5, b"{not json"), (900, b'{"txt": "x"}')])
  common = ["--model", tiny_model, "--input", str(tmp_path / "in.jsonl"), "--max_model_len", "128",
            "--checkpoint_every", "8", "--num_workers", "1", "--log_every_s", "1"]
  ref = score_cli(*common, "--output", str(tmp_path / "ref.jsonl"))
  assert ref.returncode == 0, ref.stderr[-3000:]

  out, prog = tmp_path / "out.jsonl", tmp_path / "out.jsonl.progress.json"
  job = subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "score", *common, "--output", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline and job.poll() is None:
    if prog.exists() and json.loads(prog.read_text())["records"] >= 120:
      break
    time.sleep(0.02)
  os.killpg(job.pid, signal.SIGKILL)  # the job and its grain workers, as a preempted machine loses them
  job.wait()
  state = json.loads(prog.read_text())
  assert not state["done"] and 120 <= state["records"] < 1202, state["records"]

  again = score_cli(*common, "--output", str(out))
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming {out} after {state['records']} records" in again.stderr
  assert out.read_bytes() == (tmp_path / "ref.jsonl").read_bytes()
  lines = out.read_text().split("\n")[:-1]
  assert len(lines) == 1202 and [json.loads(x)["line"] for x in lines] == list(range(1, 1203))
  assert sum("error" in json.loads(x) for x in lines) >= 2


def test_a_finished_job_reruns_as_a_no_op_and_other_settings_are_refused(tmp_path, tiny_llm):
  write_jsonl(tmp_path / "in.jsonl", varied_records(40, seed=4))
  cfg = score_job.JobConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"), num_workers=0,
                            checkpoint_every=8)
  first = score_job.run(tiny_llm, cfg)
  data = (tmp_path / "out.jsonl").read_bytes()
  again = score_job.run(tiny_llm, cfg)
  assert again["records"] == first["records"] == 40 and again["scored_tokens"] == 0
  assert (tmp_path / "out.jsonl").read_bytes() == data
  with pytest.raises(score_job.JobError, match=r"\(checkpoint_every, stride differ\).*--overwrite"):
    score_job.run(tiny_llm, dataclasses.replace(cfg, checkpoint_every=16, stride=50))
  (tmp_path / "other.jsonl").write_text("not ours\n")
  with pytest.raises(score_job.JobError, match="other.jsonl exists and no progress file"):
    score_job.run(tiny_llm, dataclasses.replace(cfg, output=str(tmp_path / "other.jsonl")))
  redo = score_job.run(tiny_llm, dataclasses.replace(cfg, output=str(tmp_path / "other.jsonl"), overwrite=True))
  assert redo["records"] == 40 and (tmp_path / "other.jsonl").read_bytes() == data


def _free_port() -> int:
  import socket

  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def test_two_processes_of_four_devices_give_the_one_process_output(tmp_path, tiny_model, tiny_llm):
  write_jsonl(tmp_path / "in.jsonl", varied_records(121, seed=2), [(7, b"[1, 2]")])
  common = ["--model", tiny_model, "--input", str(tmp_path / "in.jsonl"), "--max_model_len", "128",
            "--checkpoint_every", "32", "--num_workers", "0", "--token_logprobs"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-m", "jaxllm.cli", "score", *common, "--output",
                             str(tmp_path / "multi.jsonl"), "--mesh", "model=8", "--coordinator_address",
                             f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(i)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  score_job.run(tiny_llm, score_job.JobConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "one.jsonl"),
                                              num_workers=0, checkpoint_every=32, token_logprobs=True))

  parts = [tmp_path / f"multi.jsonl.part-0000{i}-of-00002" for i in (0, 1)]
  part_lines = [[json.loads(x)["line"] for x in p.read_text().split("\n")[:-1]] for p in parts]
  assert part_lines[0] == list(range(1, 62)) and part_lines[1] == list(range(62, 123))  # contiguous shards
  multi = [json.loads(x) for x in (tmp_path / "multi.jsonl").read_text().split("\n")[:-1]]
  single = [json.loads(x) for x in (tmp_path / "one.jsonl").read_text().split("\n")[:-1]]
  assert len(multi) == len(single) == 122
  for m, s in zip(multi, single):
    assert {k: v for k, v in m.items() if k not in ("logprob", "perplexity", "token_logprobs")} == {
        k: v for k, v in s.items() if k not in ("logprob", "perplexity", "token_logprobs")}
    if "error" not in s:
      assert abs(m["logprob"] - s["logprob"]) <= 1e-4, (m, s)
      np.testing.assert_allclose(m["token_logprobs"], s["token_logprobs"], atol=1e-5, rtol=0)
  assert multi[7]["error"] == "expected a JSON object, got list"

  # `--merge` by hand: it checks that every part is there and complete.
  again = str(tmp_path / "again.jsonl")
  with pytest.raises(score_job.JobError, match="no part files"):
    score_job.merge(again)
  os.rename(parts[1], again + ".part-00001-of-00002")
  with pytest.raises(score_job.JobError, match="part-00000-of-00002 is missing"):
    score_job.merge(again)
  os.rename(parts[0], again + ".part-00000-of-00002")
  with pytest.raises(score_job.JobError, match="part-00000-of-00002 is not complete"):
    score_job.merge(again)
  for i in (0, 1):
    os.rename(str(parts[i]) + ".progress.json", again + f".part-0000{i}-of-00002.progress.json")
  merged = score_cli("--merge", "--output", again)
  assert merged.returncode == 0 and f"{again}: 122 records" in merged.stdout, merged.stderr
  assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "multi.jsonl").read_bytes()


BAD = [
    (b"{not json", "invalid JSON: Expecting property name enclosed in double quotes at column 2"),
    (b'{"id": 7}', "missing field 'text' (or 'context' and 'continuation')"),
    (b'{"id": 8, "text": "   "}', "field 'text' is empty"),
    (b'{"text": 42}', "field 'text' must be a string, got int 42"),
    (b'{"context": "a", "continuation": ""}', "field 'continuation' is empty"),
    (b'{"context": null, "continuation": "b"}', "field 'context' must be a string, got null"),
    (b'{"text": "\xff\xfe broken"}', "invalid UTF-8"),
    (b'"just a string"', "expected a JSON object, got str"),
    (b'{"text": "x"}', "the text has 1 token(s); scoring needs at least 2"),
]


def test_bad_records_are_reported_with_their_line_and_the_job_carries_on(tmp_path, tiny_llm):
  good = [{"id": i, "text": f"Record number {i} is a fine sentence."} for i in range(len(BAD))]
  write_jsonl(tmp_path / "in.jsonl", good, [(1 + 2 * k, raw) for k, (raw, _) in enumerate(BAD)])  # lines 2, 4, ..
  summary = score_job.run(tiny_llm, score_job.JobConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "out.jsonl"),
                                                        num_workers=0, checkpoint_every=4))
  rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().split("\n")[:-1]]
  assert summary["records"] == len(rows) == len(good) + len(BAD) and summary["errors"] == len(BAD)
  errors = {r["line"]: r["error"] for r in rows if "error" in r}
  for k, (_, message) in enumerate(BAD):
    assert message in errors[2 + 2 * k], (k, errors)
  assert [r["id"] for r in rows if "error" not in r] == list(range(len(BAD)))
  assert rows[3]["id"] == 7  # an error line keeps the record's id when it has one

  strict = score_cli("--model", tiny_llm.source, "--input", str(tmp_path / "in.jsonl"), "--output",
                     str(tmp_path / "strict.jsonl"), "--strict", "--num_workers", "0", "--max_model_len", "128")
  assert strict.returncode == 1 and "error: line 2: invalid JSON" in strict.stderr, strict.stderr[-2000:]


def test_array_record_input_and_field_flags_match_jsonl(tmp_path, tiny_llm):
  from array_record.python.array_record_module import ArrayRecordWriter

  records = varied_records(60, seed=3)
  renamed = [{"doc": r["id"], **({"body": r["text"]} if "text" in r else {"q": r["context"], "a": r["continuation"]})}
             for r in records]
  for k, shard in enumerate((renamed[:25], renamed[25:])):
    writer = ArrayRecordWriter(str(tmp_path / f"data-{k}.array_record"), "group_size:1")
    for r in shard:
      writer.write(json.dumps(r).encode())
    writer.close()
  write_jsonl(tmp_path / "in.jsonl", records)
  cfg = dict(num_workers=0, checkpoint_every=16, token_logprobs=True, stride=32)
  score_job.run(tiny_llm, score_job.JobConfig(str(tmp_path / "in.jsonl"), str(tmp_path / "a.jsonl"), **cfg))
  score_job.run(tiny_llm, score_job.JobConfig(str(tmp_path / "data-*.array_record"), str(tmp_path / "b.jsonl"),
                                              fields=score_job.Fields("body", "q", "a", "doc"), **cfg))
  assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
  rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().split("\n")[:-1]]
  assert [r["id"] for r in rows] == [r["id"] for r in records]
  # The long text (over max_model_len=128 tokens) went through sliding windows: every token after the first scored.
  long = [r for r, rec in zip(rows, records) if "text" in rec and r.get("num_tokens", 0) > 127]
  assert long and all(len(r["token_logprobs"]) == r["num_tokens"] for r in long)


def test_cli_errors_name_the_bad_value(tmp_path):
  (tmp_path / "in.jsonl").write_text('{"text": "hello world"}\n')
  r = score_cli("--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o.jsonl"))
  assert r.returncode == 1 and "missing.jsonl' does not exist" in r.stderr
  r = score_cli("--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path / "o.jsonl"), "--checkpoint_every",
                "0")
  assert r.returncode == 1 and "--checkpoint_every=0 must be a positive integer" in r.stderr
  r = score_cli("--model", "nonexistent-model-dir", "--input", str(tmp_path / "in.jsonl"), "--output",
                str(tmp_path / "o.jsonl"))
  assert r.returncode == 1 and "nonexistent-model-dir" in r.stderr
