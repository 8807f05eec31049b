#!/usr/bin/env bash
# The checks that need a GPU, in one run from the repo root on a machine with jax[cuda], flax, torch and transformers
# (e.g. a lent H100/H200). Phases, run in the order given (default: step profile); seconds are each phase's time
# limit, which it stays well inside on an H200 with a cold compilation cache:
#   kernels   (210 s) the Pallas GPU kernels compiled (Triton) against the same references and tolerances as the
#             interpreted CPU tests, and the model over a paged cache with them;
#   step      (300 s) a Llama-3-8B-shaped model (random weights), bf16 / bf16+int8 / bf16+q8_0: the decode step (1 and
#             32 sequences) against its bandwidth / compute floors;
#   profile   (240 s) step_profile.py on the same shape, bf16 and bf16+int8: each step's device busy and idle time and
#             the kernels that take it (where the step's time beyond the floor goes);
#   sampler   (120 s) lm_head_sampler.py: the LM head and the sampler at a 128K vocabulary, and both pick programs
#             (the greedy argmax one and the sampler) with their conditionals counted;
#   chunked   (240 s) chunked_prefill.py on the same shape cut to 8 layers (bf16): the decoders' inter-token latency
#             while a 4,000-token prompt is prefilled in chunks of a 512-token step, against one whole-prompt step;
#   workload  (200 s) throughput.py's workload against transformers on the same GPU (bf16);
#   attention (100 s) attention_kernels.py: flash and ragged paged attention against XLA and cuDNN.
# Logs and the RESULTS.md sections go to $OUT (default ./gpu-check-logs), to be appended to benchmarks/RESULTS.md.
#   bash benchmarks/gpu_checks.sh                  # step profile: at most 9 minutes, of a 15-minute lease (the
#                                                  # machine's start takes 1-2)
#   bash benchmarks/gpu_checks.sh chunked sampler  # a second call, if the lease has 8 minutes left
#   bash benchmarks/gpu_checks.sh kernels attention
set -u
OUT=${OUT:-gpu-check-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cuda
export JAX_COMPILATION_CACHE_DIR=/tmp/jaxllm-gpu-jit-cache
PHASES=("$@")
[ ${#PHASES[@]} -eq 0 ] && PHASES=(step profile)
for p in "${PHASES[@]}"; do
  case $p in kernels|step|profile|sampler|chunked|workload|attention) ;; *) echo "unknown phase: $p" >&2; exit 2 ;; esac
done
phase() { echo; echo "=== $1 ($(date -u +%T))"; }

phase "install"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/jaxllm-site . 2>&1 | tail -3
export PYTHONPATH=/tmp/jaxllm-site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi -L
python3 -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', \
torch.__version__, 'transformers', transformers.__version__, jax.devices())"

for p in "${PHASES[@]}"; do
  phase "$p"
  case $p in
    kernels)
      # The tests run from a copy so that `import jaxllm` finds the installed package, not the repo's source folders.
      rm -rf /tmp/jaxllm-tests && mkdir -p /tmp/jaxllm-tests && cp -r tests /tmp/jaxllm-tests/
      (cd /tmp/jaxllm-tests && timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 -rfE \
        tests/pallas_kernels -k gpu 2>&1 | tail -25)
      (cd /tmp/jaxllm-tests && JAX_DEFAULT_MATMUL_PRECISION=highest timeout 60 python3 -m pytest -q \
        -p no:cacheprovider -rfE tests/test_paged_model.py -k gpu 2>&1 | tail -8) ;;
    step)
      timeout 300 python3 benchmarks/throughput.py --preset llama3-8b --variants bf16,bf16+int8,bf16+q8_0 \
        --steps_only --results "$OUT/steps.md" ;;
    profile)
      timeout 120 python3 benchmarks/step_profile.py --preset llama3-8b --dtype bfloat16 --results "$OUT/profile.md"
      timeout 120 python3 benchmarks/step_profile.py --preset llama3-8b --dtype bfloat16 --quantization int8 \
        --results "$OUT/profile.md" ;;
    sampler)
      timeout 120 python3 benchmarks/lm_head_sampler.py --preset llama3-8b --dtype bfloat16 --results "$OUT/sampler.md" ;;
    chunked)
      timeout 240 python3 benchmarks/chunked_prefill.py --preset llama3-8b --num_layers 8 --dtype bfloat16 \
        --max_num_batched_tokens 512 --prompt_len 4000 --results "$OUT/chunked.md" ;;
    workload)
      timeout 200 python3 benchmarks/throughput.py --preset llama3-8b --variants bf16 --results "$OUT/throughput.md" ;;
    attention)
      timeout 100 python3 benchmarks/attention_kernels.py --quick --dtype bfloat16 --results "$OUT/attention.md" ;;
  esac
done
phase "done"
