#!/bin/bash
# lm-evaluation-harness's stock API models against `jaxllm serve`, and its `hf` model on transformers for the same
# GGUF: the per-choice log-likelihoods of a multiple-choice task (local-completions, with token ids and with text) and
# the greedy outputs of a generate task (local-chat-completions) must agree. Appends the figures to RESULTS.md.
#
#   bash benchmarks/lm_eval_parity.sh            # from the repository root, after `make setup`
#
# lm-eval goes into its own venv (WORK/lmeval) that also sees this repository's .venv (torch, transformers); the
# tasks read local JSONL files, so nothing is downloaded but the lm-eval package.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/jaxllm-lm-eval}
PORT=${PORT:-8123}
PY=$ROOT/.venv/bin/python
mkdir -p "$WORK/tasks"
if [ ! -x "$WORK/lmeval/bin/lm_eval" ]; then
  python3 -m venv "$WORK/lmeval"
  echo "import site; site.addsitedir('$ROOT/.venv/lib/python3.11/site-packages')" \
    > "$WORK/lmeval/lib/python3.11/site-packages/jaxllm-venv.pth"
  "$WORK/lmeval/bin/pip" install -q lm-eval==0.4.13
fi

"$PY" - "$WORK" <<'EOF'
import json, os, sys
from transformers import AutoTokenizer
from jaxllm.default_model import gguf_path
work = sys.argv[1]
d, f = os.path.split(gguf_path())
AutoTokenizer.from_pretrained(d, gguf_file=f).save_pretrained(f"{work}/tok")  # what lm-eval tokenizes with
mc = [("What is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"], 0),
      ("How many legs does a spider have?", ["Six", "Four", "Eight", "Ten"], 2),
      ("Which planet is known as the Red Planet?", ["Venus", "Jupiter", "Saturn", "Mars"], 3),
      ("What do bees make?", ["Milk", "Silk", "Honey", "Wool"], 2),
      ("What gas do plants absorb?", ["Oxygen", "Carbon dioxide", "Helium", "Neon"], 1),
      ("Which language is spoken in Brazil?", ["Spanish", "French", "English", "Portuguese"], 3),
      ("Which fruit is yellow and curved?", ["Apple", "Banana", "Grape", "Cherry"], 1),
      ("Who wrote Romeo and Juliet?", ["Dickens", "Shakespeare", "Tolstoy", "Hemingway"], 1),
      ("Which shape has three sides?", ["Square", "Circle", "Triangle", "Hexagon"], 2),
      ("What is the boiling point of water in Celsius?", ["100", "50", "0", "212"], 0)]
gen = ["What is the capital of France?", "What is 3 + 4?", "What color is grass?", "What is the capital of Japan?",
       "What is the largest planet?", "What animal says meow?"]
with open(f"{work}/mc.jsonl", "w") as out:
  out.writelines(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in mc)
with open(f"{work}/gen.jsonl", "w") as out:
  out.writelines(json.dumps({"question": q, "answer": ""}) + "\n" for q in gen)
common = "dataset_path: json\ntest_split: test\n"
with open(f"{work}/tasks/jaxllm_mc.yaml", "w") as out:
  out.write(f"task: jaxllm_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {work}/mc.jsonl\n"
            "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\nmetric_list:\n  - metric: acc\n")
with open(f"{work}/tasks/jaxllm_gen.yaml", "w") as out:
  out.write(f"task: jaxllm_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {work}/gen.jsonl\n"
            "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
            "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 24\n  do_sample: false\n"
            "metric_list:\n  - metric: exact_match\n")
EOF

GGUF=$("$PY" -c "from jaxllm.default_model import gguf_path; print(gguf_path())")
LM="$WORK/lmeval/bin/lm_eval --include_path $WORK/tasks --log_samples"
export HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$ROOT/.venv/bin/jaxllm" serve --model default --port "$PORT" --max_model_len 1024 --max_num_seqs 16 --quantization none \
  --compilation_cache_dir "$ROOT/.jit-cache" > "$WORK/serve.log" 2>&1 &
SERVE=$!
trap 'kill $SERVE 2>/dev/null || true' EXIT
until curl -sf "localhost:$PORT/health" > /dev/null; do sleep 2; done
API="model=default,tokenizer_backend=huggingface,tokenizer=$WORK/tok,num_concurrent=4"
$LM --model local-completions --tasks jaxllm_mc --output_path "$WORK/out/ours_ids" \
  --model_args "$API,base_url=http://127.0.0.1:$PORT/v1/completions,tokenized_requests=True" > "$WORK/ours_ids.log" 2>&1
$LM --model local-completions --tasks jaxllm_mc --output_path "$WORK/out/ours_text" \
  --model_args "$API,base_url=http://127.0.0.1:$PORT/v1/completions,tokenized_requests=False" > "$WORK/ours_text.log" 2>&1
$LM --model local-chat-completions --tasks jaxllm_gen --apply_chat_template --output_path "$WORK/out/ours_chat" \
  --model_args "model=default,base_url=http://127.0.0.1:$PORT/v1/chat/completions,num_concurrent=4" \
  > "$WORK/ours_chat.log" 2>&1
kill $SERVE
HF="pretrained=$(dirname "$GGUF"),gguf_file=$(basename "$GGUF"),tokenizer=$WORK/tok,dtype=float32"
$LM --model hf --model_args "$HF" --device cpu --batch_size 4 --tasks jaxllm_mc --output_path "$WORK/out/hf" \
  > "$WORK/hf.log" 2>&1
$LM --model hf --model_args "$HF" --device cpu --batch_size 4 --tasks jaxllm_gen --apply_chat_template \
  --output_path "$WORK/out/hf_chat" > "$WORK/hf_chat.log" 2>&1

"$PY" - "$WORK" "$ROOT/benchmarks" <<'EOF'
import datetime, glob, json, sys
sys.path.insert(0, sys.argv[2])
import common
work = sys.argv[1]

def samples(run, task):
  return {r["doc_id"]: r for r in map(json.loads, open(sorted(glob.glob(f"{work}/out/{run}/*/samples_{task}_*.jsonl"))[-1]))}

def lls(run):
  return {k: [float(x[0][0]) for x in r["resps"]] for k, r in samples(run, "jaxllm_mc").items()}

hf = lls("hf")
lines = [f"### lm_eval_parity.sh — {datetime.date.today()} — {common.device_name()}", "",
         "lm-evaluation-harness 0.4.13's stock API models against `jaxllm serve` (default model) vs its `hf` model on "
         "transformers for the same GGUF (float32).", "",
         "| lm-eval model | task | compared | max abs diff | agree |", "|---|---|---:|---:|---:|"]
for run, how in (("ours_ids", "local-completions (token ids)"), ("ours_text", "local-completions (text)")):
  ours = lls(run)
  diffs = [abs(a - b) for k in hf for a, b in zip(hf[k], ours[k])]
  picks = sum(max(range(4), key=hf[k].__getitem__) == max(range(4), key=ours[k].__getitem__) for k in hf)
  lines.append(f"| {how} | multiple choice, per-choice log-likelihood | {len(diffs)} | {max(diffs):.2e} | "
               f"{picks}/{len(hf)} picks |")
mine, theirs = samples("ours_chat", "jaxllm_gen"), samples("hf_chat", "jaxllm_gen")
same = sum(mine[k]["resps"][0][0] == theirs[k]["resps"][0][0] for k in theirs)
lines += [f"| local-chat-completions | generate_until, greedy (chat template) | {len(theirs)} | — | {same}/{len(theirs)} "
          "identical |", ""]
common.publish(lines)
EOF
