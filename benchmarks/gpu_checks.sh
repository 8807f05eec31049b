#!/usr/bin/env bash
# The checks that need a GPU, in one run from the repo root on a machine with jax[cuda], flax, torch and transformers
# (e.g. a lent H100/H200):
#   1. the Pallas GPU kernels compiled (Triton), against the same references and tolerances as the interpreted CPU
#      tests, and the model over a paged cache with them;
#   2. a Llama-3-8B-shaped model (random bf16 weights): throughput.py's workload against transformers on the same GPU,
#      and the decode step against its bandwidth / compute floors;
#   3. the same step with int8 / q8_0 weights, with the optimized HLO of each forward program (where the time goes);
#   4. attention_kernels.py: flash and ragged paged attention against XLA and cuDNN.
# Each phase has its own time limit; logs and the RESULTS.md sections go to $OUT (default ./gpu-check-logs), to be
# appended to benchmarks/RESULTS.md by hand.
set -u
OUT=${OUT:-gpu-check-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxllm-gpu-jit-cache
ROOT=$PWD
phase() { echo; echo "=== $1 ($(date -u +%T))"; }

phase "install"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/jaxllm-site . 2>&1 | tail -3
export PYTHONPATH=/tmp/jaxllm-site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', \
torch.__version__, 'transformers', transformers.__version__, jax.devices())"

phase "1. GPU kernels compiled vs references"
# The tests run from a copy so that `import jaxllm` finds the installed package, not the repo's source folders.
rm -rf /tmp/jaxllm-tests && mkdir -p /tmp/jaxllm-tests && cp -r tests /tmp/jaxllm-tests/
(cd /tmp/jaxllm-tests && timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE \
  tests/pallas_kernels -k gpu 2>&1 | tail -25)
(cd /tmp/jaxllm-tests && JAX_DEFAULT_MATMUL_PRECISION=highest timeout 60 python3 -m pytest -q -p no:cacheprovider \
  -rfE tests/test_paged_model.py -k gpu 2>&1 | tail -8)

phase "2. Llama-3-8B shape, bf16: workload vs transformers, decode step vs floors"
timeout 200 python3 benchmarks/throughput.py --preset llama3-8b --variants bf16 --results "$OUT/throughput_bf16.md"

phase "3. int8 / q8_0 weights: decode step, and the HLO of their forward programs"
timeout 150 python3 benchmarks/throughput.py --preset llama3-8b --variants bf16+int8,bf16+q8_0 --steps_only \
  --dump_hlo "$OUT" --results "$OUT/throughput_quant.md"

phase "4. attention kernels"
timeout 100 python3 benchmarks/attention_kernels.py --quick --dtype bfloat16 --results "$OUT/attention.md"
phase "done"
cd "$ROOT"
