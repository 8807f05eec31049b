"""Offline throughput: `LLM.generate` (continuous batching over the paged engine) vs transformers `generate` with
padding-based static batching, on the same prompts in one run; plus decode-step time vs the memory-bandwidth floor.

Workload (vLLM's "random" dataset shaped like ShareGPT): --num_prompts requests whose prompt and output lengths are
drawn from log-normal distributions (ShareGPT's long right tail), clipped to [--min_*, --max_*]; prompt tokens are
random vocabulary ids; every request generates exactly its output length (EOS ignored), greedy (or sampled on
both sides: --temperature, --top_p), float32.
  jaxllm:        all prompts queued at once; up to --max_num_seqs decode together, a new one joins as one finishes.
  transformers:  consecutive batches of --max_num_seqs prompts, left-padded; each batch runs until its longest output
                 is done (what static batching costs); only the tokens each request asked for are counted.
A warm-up pass first on both sides (jit compilation / first-call overhead not timed). Figure: requested output tokens
per second of wall time, prefill included.

Decode step: one engine step (forward + sampler programs) with every sequence decoding one token at context
--step_context; the bandwidth floor is (weight bytes + KV bytes read per step) / measured copy bandwidth, the compute
floor the step's FLOPs / measured matmul FLOP/s. Beside them, where the step's time goes: its attention alone (every
layer's ragged paged attention with the step's metadata) and its weight FLOPs at the FLOP/s the model's matmul (on CPU
the native kernel) reaches on a GEMM of the step's own row count.

    python benchmarks/throughput.py [--num_prompts 64] [--max_num_seqs 32] [--variants f32,int8,kv-int8]
    python benchmarks/throughput.py --variants q8_0 --temperature 0.8 --top_p 0.95        # a chat client's sampling
    python benchmarks/throughput.py --preset llama3-8b --variants bf16,bf16+int8 --max_num_seqs 64 --num_prompts 256
    python benchmarks/throughput.py --replicas data=2,model=4 --max_num_seqs 32   # data-parallel replicas vs one
"""

import argparse
import datetime
import os
import time

import numpy as np

import common


def workload(rng, n, vocab, args):
  def lengths(median, lo, hi):
    return np.clip(np.round(rng.lognormal(np.log(median), 0.8, n)), lo, hi).astype(int)

  ins = lengths(args.input_median, args.min_input, args.max_input)
  outs = lengths(args.output_median, args.min_output, args.max_output)
  prompts = [rng.integers(3, vocab, int(m)).tolist() for m in ins]
  return prompts, [int(o) for o in outs]


def run_ours(llm, prompts, outs, temperature=0.0, top_p=1.0):
  from jaxllm import SamplingParams

  def once():
    params = [SamplingParams(max_tokens=o, temperature=temperature, top_p=top_p, seed=i, ignore_eos=True)
              for i, o in enumerate(outs)]
    got = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    assert [len(r.token_ids) for r in got] == outs
    return got

  once()  # compile every bucket this workload touches
  start = time.perf_counter()
  reqs = once()
  return time.perf_counter() - start, reqs


def run_hf(model, prompts, outs, batch, pad_id, temperature=0.0, top_p=1.0):
  import torch

  def once():
    got = []
    for s in range(0, len(prompts), batch):
      chunk, want = prompts[s:s + batch], outs[s:s + batch]
      width = max(len(p) for p in chunk)
      ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=model.device)
      mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model.device)
      n = max(want)
      with torch.no_grad():
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else dict(
            do_sample=False)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=pad_id,
                             **sampling)
      got += [out[i, width:width + w].tolist() for i, w in enumerate(want)]
    return got

  once()
  start = time.perf_counter()
  got = once()
  return time.perf_counter() - start, got


def hf_random_model(mc, dtype):
  """transformers' LlamaForCausalLM with a preset's shape and random weights, in `dtype`, on the GPU when torch sees
  one: the same-shape opponent for --preset (speed only: the weights differ from ours)."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  if mc.qkv_bias or mc.o_bias or mc.qk_norm or mc.sliding_window or mc.post_norms or mc.norm_plus_one:
    raise ValueError(f"{mc.name}: the transformers opponent is built for plain Llama presets only")
  config = LlamaConfig(vocab_size=mc.vocab_size, hidden_size=mc.d_model, intermediate_size=mc.d_ff,
                       num_hidden_layers=mc.num_layers, num_attention_heads=mc.num_heads,
                       num_key_value_heads=mc.num_kv_heads, head_dim=mc.head_dim, rms_norm_eps=mc.rms_norm_eps,
                       max_position_embeddings=mc.max_position_embeddings, tie_word_embeddings=mc.tie_embeddings)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  previous = torch.get_default_dtype()
  torch.set_default_dtype(getattr(torch, dtype))
  try:
    with torch.device(device):
      model = LlamaForCausalLM(config)
  finally:
    torch.set_default_dtype(previous)
  return model.eval()


def decode_step_seconds(llm, slots, context):
  """Seconds per engine step with `slots` sequences each decoding one token at `context` (distinct pages each):
  the step's forward and sampler programs, warm, best of 10 (this VM's run-to-run spread is ~10%)."""
  import jax

  eng = llm.engine
  batch = common.decode_batch(eng, slots, context)
  st = eng.init_state()
  st, r = eng.step(st, batch)
  jax.block_until_ready(r)
  best = {"step": float("inf"), "forward": float("inf"), "pick": float("inf")}

  def timed(name, fn, *a, **kw):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*a, **kw))
    best[name] = min(best[name], time.perf_counter() - start)
    return out

  for _ in range(10):  # the whole step, then its two programs on their own (the per-stage profile)
    st, r = timed("step", eng.step, st, batch)
    st, h, _ = timed("forward", eng.forward, st, batch)
    st, r = timed("pick", eng.pick, st, h, batch.seqs)
  best["attention"] = attention_seconds(eng, batch, st)
  del st
  return best, batch.tokens_T.shape[0] // eng.num_replicas


def attention_seconds(eng, batch, state):
  """Seconds of a step's attention alone: `ragged_paged_attention` over every layer's pages with the step's metadata
  (the kernel and block sizes the model's step runs, on the pages of `state`, the step's own; no K/V write, no
  projections), the layers in one jitted scan, median of rounds. None with data-parallel replicas (the step's blocks
  are per replica)."""
  import jax
  import jax.numpy as jnp

  from jaxllm import pallas_kernels
  from jaxllm.pallas_kernels.kv_quant import QuantizedPages

  if eng.num_replicas != 1:
    return None
  mc = eng.model_config
  L = mc.num_layers
  P = jax.tree.leaves(state.k)[0].shape[0] // L
  impl, interpret = pallas_kernels.split_impl(eng.config.attention_impl)
  q = jax.random.normal(jax.random.key(0), (batch.tokens_T.shape[0], mc.num_heads, mc.head_dim), eng.dtype)

  def pages(x, name):
    if isinstance(x, QuantizedPages):
      return {f"{name}_pages": x.values, f"{name}_scales": x.scales}
    return {f"{name}_pages": x}

  @jax.jit
  def layers(q, k, v, page_indices, kv_lens, cu_q_lens, num_seqs):
    def body(acc, layer):
      o = pallas_kernels.ragged_paged_attention(q, kv_lens=kv_lens, page_indices=page_indices + layer * P,
                                                cu_q_lens=cu_q_lens, num_seqs=num_seqs, implementation=impl,
                                                interpret=interpret, **pages(k, "k"), **pages(v, "v"))
      return acc + o[0, 0].astype(jnp.float32), None
    return jax.lax.scan(body, jnp.zeros((mc.head_dim,), jnp.float32), jnp.arange(L))[0]

  ms = common.median_ms(layers, q, state.k, state.v, batch.page_indices_SM, batch.seqs.kv_lens_S, batch.cu_q_lens_S1,
                        batch.seqs.num_seqs[0], reps=5)
  return ms / 1e3


def dump_forward_hlo(llm, slots, context, path) -> None:
  """Writes the optimized HLO of one decode step's forward program (`slots` sequences at `context`) to `path`: where
  a step's time goes beyond the weights is read there (e.g. per-layer copies of the stacked weights out of a scan, a
  convert of 8-bit weights materialized before the GEMM)."""
  eng = llm.engine
  with open(path, "w") as f:
    f.write(forward_program(eng, slots, context).as_text())


def forward_program(eng, slots, context):
  """The compiled forward program of a decode step of `slots` sequences at `context` (per device, under SPMD)."""
  import jax

  from jaxllm.serving import engine as engine_lib

  return engine_lib._forward.lower(eng.graphdef, eng.params, jax.eval_shape(eng.init_state),
                                   common.decode_batch(eng, slots, context), mesh=eng.mesh,
                                   attention_impl=eng.config.attention_impl).compile()


def program_flops(compiled) -> float:
  """FLOPs of one device's program, from XLA's cost analysis (a dict, or a list of one in older jax)."""
  cost = compiled.cost_analysis()
  return float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))


def replica_table(args) -> list[str]:
  """Data-parallel replicas: the same load (--max_num_seqs sequences decoding at --step_context, then the workload)
  on one replica of the model's sharding (`--replicas`' mesh with data=1, on the first devices) and on `--replicas`.
  Each replica steps only its own sequences: the rows a device's program computes, and its FLOPs, divide by D."""
  import jax

  from jaxllm import LLM
  from jaxllm.sharding import make_mesh, parse_mesh

  axes = parse_mesh(args.replicas)
  D = axes.get("data", 1)
  one = dict(axes, data=1)
  size = int(np.prod(list(one.values())))
  max_len = args.max_input + args.max_output + 16
  rows, prompts = [], None
  for label, mesh in ((",".join(f"{k}={v}" for k, v in one.items()), make_mesh(one, jax.devices()[:size])),
                      (args.replicas, make_mesh(axes))):
    llm = LLM("default", mesh=mesh, max_model_len=max_len, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    eng = llm.engine
    if prompts is None:
      prompts, outs = workload(np.random.default_rng(args.seed), args.num_prompts, llm.config.vocab_size, args)
    times, T = decode_step_seconds(llm, args.max_num_seqs, args.step_context)
    flops = program_flops(forward_program(eng, args.max_num_seqs, args.step_context))
    seconds, _ = run_ours(llm, prompts, outs)
    steps = llm.scheduler.num_steps // 2  # run_ours ran the workload twice (the first compiles)
    rows.append((label, eng.num_replicas, eng.num_replicas * eng.config.max_num_seqs, T, flops, times["step"],
                 eng.num_pages - 1, steps, seconds))
    print(rows[-1], flush=True)
    del llm, eng
  device = common.device_name()
  return [f"### throughput.py --replicas — {datetime.date.today()} — {device} x {len(jax.devices())} — "
          f"jax {jax.__version__}", "",
          f"SmolLM2-135M-Instruct (q8_0) on one replica vs {D} data-parallel replicas. Decode step: "
          f"{args.max_num_seqs} sequences decoding at context {args.step_context}, dealt round-robin over the "
          f"replicas. Workload: {args.num_prompts} requests as in the main table (greedy), all queued at once. "
          "'rows / replica' is the step's token bucket per replica; 'forward MFLOP / device / layer' is XLA's "
          "cost analysis of one device's forward program (which counts the layer loop's body once). Step and "
          "workload times are wall time on this machine (on a CPU the devices share its cores: only the ratios of "
          "rows, FLOPs and steps carry over).", "",
          "| mesh | replicas | slots | rows / replica | forward MFLOP / device / layer | step ms | "
          "KV pages / replica | workload steps | workload s |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|"] + [
          f"| {m} | {d} | {z} | {t} | {f / 1e6:.1f} | {s * 1e3:.1f} | {p} | {n} | {w:.1f} |"
          for m, d, z, t, f, s, p, n, w in rows] + [""]


def step_flops(mc, rows, context):
  """FLOPs of one decode step: 2 per weight per row (LM head on the sampled rows included) plus attention scores and
  values over `context` keys."""
  weights = mc.num_params - (0 if mc.tie_embeddings else mc.vocab_size * mc.d_model)  # the lookup table is free
  attention = 4 * mc.num_layers * mc.num_heads * mc.head_dim * context
  return rows * (2 * weights + attention)


VARIANTS = {"f32": dict(dtype="float32"), "bf16": dict(dtype="bfloat16"), "int8": dict(quantization="int8"),
            "q8_0": dict(quantization="q8_0"),
            "bf16+int8": dict(dtype="bfloat16", quantization="int8"),
            "bf16+q8_0": dict(dtype="bfloat16", quantization="q8_0"),
            "kv-int8": dict(kv_cache_dtype="int8"), "bf16+kv-int8": dict(dtype="bfloat16", kv_cache_dtype="int8"),
            "kv-fp8": dict(kv_cache_dtype="fp8"), "int8+kv-int8": dict(quantization="int8", kv_cache_dtype="int8")}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--num_prompts", type=int, default=64)
  ap.add_argument("--max_num_seqs", type=int, default=32)
  ap.add_argument("--max_num_batched_tokens", type=int, default=512)
  ap.add_argument("--input_median", type=int, default=96)
  ap.add_argument("--min_input", type=int, default=8)
  ap.add_argument("--max_input", type=int, default=512)
  ap.add_argument("--output_median", type=int, default=64)
  ap.add_argument("--min_output", type=int, default=8)
  ap.add_argument("--max_output", type=int, default=192)
  ap.add_argument("--step_context", type=int, default=256)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--temperature", type=float, default=0.0, help="> 0: both sides sample (with --top_p), each "
                  "request seeded on ours; 0: greedy, and the first 8 tokens are compared")
  ap.add_argument("--top_p", type=float, default=1.0)
  ap.add_argument("--skip_hf", action="store_true", help="jaxllm only")
  ap.add_argument("--steps_only", action="store_true", help="only the decode-step table (no workload, no transformers)")
  ap.add_argument("--dump_hlo", default=None, help="a folder: write each variant's optimized HLO of the decode "
                  "forward program (--max_num_seqs sequences) there, to see where a step's time goes")
  ap.add_argument("--preset", default=None, help="a configs/models.toml preset with random weights instead of the "
                  "default model, e.g. llama3-8b on a GPU; transformers then runs a random model of the same shape "
                  "in the first variant's dtype, on the GPU when torch sees one")
  ap.add_argument("--variants", default="f32", help="comma-separated weight / KV-cache variants, each run on the "
                  f"same workload: {', '.join(VARIANTS)}")
  ap.add_argument("--replicas", default=None, help="a mesh with a data axis, e.g. data=2,model=4: compare its "
                  "data-parallel replicas with one replica of the same sharding on the same load (only this table; "
                  "on CPU the devices are simulated: XLA_FLAGS gets their count)")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()
  if args.replicas:
    from jaxllm.sharding import parse_mesh

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      count = int(np.prod(list(parse_mesh(args.replicas).values())))
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    common.publish(replica_table(args), args.results)
    return
  unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
  if unknown:
    ap.error(f"unknown --variants {unknown}; choose from {', '.join(VARIANTS)}")

  import jax

  from jaxllm import LLM, default_model
  from jaxllm.serving.kv_cache import page_bytes

  max_len = args.max_input + args.max_output + 16
  # Decode steps and bandwidth before transformers loads: torch's OpenMP threads keep spinning after its generate
  # and would slow every later measurement in this process.
  bandwidth = common.copy_bandwidth_gbs()
  rows, steps, floors, prompts = [], [], {}, None
  for name in args.variants.split(","):
    v = dict(VARIANTS[name])
    dtype = v.pop("dtype", "float32")
    if args.preset:
      llm = common.RandomModel(args.preset, dtype, max_len, args.max_num_seqs, max_num_batched_tokens=max(
          512, args.max_num_seqs), **v)
      model_name = f"{args.preset} shape, random weights"
    else:
      llm = LLM("default", dtype=dtype, quantization=v.pop("quantization", None), max_model_len=max_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens, **v)
      model_name = ("SmolLM2-135M-Instruct (Q4_1 GGUF dequantized; int8: requantized per output channel, q8_0: per "
                    "block of 32)")
    if prompts is None:
      prompts, outs = workload(np.random.default_rng(args.seed), args.num_prompts, llm.config.vocab_size, args)
    if not args.steps_only:
      ours, reqs = run_ours(llm, prompts, outs, args.temperature, args.top_p)
      rows.append((f"jaxllm {name} (continuous batching, paged)", ours))
    pad_id = getattr(getattr(llm, "tokenizer", None), "pad_id", None) or 0
    eng, mc = llm.engine, llm.config
    if args.dump_hlo:
      os.makedirs(args.dump_hlo, exist_ok=True)
      path = os.path.join(args.dump_hlo, f"forward_{name.replace('+', '_')}.txt")
      dump_forward_hlo(llm, args.max_num_seqs, args.step_context, path)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(eng.params))  # the placed arrays a step streams
    kv_per_token = page_bytes(eng.config, mc, eng.kv_dtype) / eng.config.page_size  # values and scales
    floors[name] = (weight_bytes, kv_per_token, str(eng.kv_dtype))
    tflops = common.matmul_tflops(dtype)
    for slots in sorted({1, args.max_num_seqs}):
      times, T = decode_step_seconds(llm, slots, args.step_context)
      t = times["step"]
      floor = (weight_bytes + slots * args.step_context * kv_per_token) / (bandwidth * 1e9)
      compute = step_flops(mc, slots, args.step_context) / (tflops * 1e12)
      # The weights' FLOPs at the rate the model's matmul reaches on the step's own GEMM shape (slots rows).
      at_rows = step_flops(mc, slots, 0) / (common.matmul_tflops(dtype, (slots, mc.d_model, mc.d_ff)) * 1e12)
      steps.append((name, slots, T, t, floor, compute, times["forward"], times["pick"], times["attention"], at_rows))
      attention = "-" if times["attention"] is None else f"{times['attention'] * 1e3:.2f}"
      print(f"{name}: {slots} sequences, step {t * 1e3:.2f} ms (model {times['forward'] * 1e3:.2f}, of it attention "
            f"{attention}; sampler {times['pick'] * 1e3:.2f}); floors: bandwidth {floor * 1e3:.2f} ms, compute "
            f"{compute * 1e3:.2f} ms; weight matmuls at this row count {at_rows * 1e3:.2f} ms", flush=True)
    del llm, eng

  agree = None
  first_dtype = VARIANTS[args.variants.split(",")[0]].get("dtype", "float32")
  if args.preset and not (args.skip_hf or args.steps_only):
    hf = hf_random_model(mc, first_dtype)
    theirs, _ = run_hf(hf, prompts, outs, args.max_num_seqs, pad_id, args.temperature, args.top_p)
    rows.append((f"transformers generate {first_dtype} on {hf.device.type} (static batches, left-padded)", theirs))
    del hf
  elif not (args.skip_hf or args.steps_only):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    path = default_model.gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=torch.float32).eval()
    theirs, got = run_hf(hf, prompts, outs, args.max_num_seqs, pad_id, args.temperature, args.top_p)
    rows.append(("transformers generate f32 (static batches, left-padded)", theirs))
    # Greedy on both sides: count the requests whose first 8 tokens agree (f32 noise may flip a near-tie later).
    agree = sum(r.token_ids[:8] == g[:8] for r, g in zip(reqs, got)) if args.temperature == 0 else None

  total_out = sum(outs)
  decoding = "greedy" if args.temperature == 0 else f"sampled (temperature {args.temperature}, top_p {args.top_p})"
  device = common.device_name()
  lines = [f"### throughput.py — {datetime.date.today()} — {device} — jax {jax.__version__}", ""]
  if not rows:
    lines += [f"{model_name}: decode steps only (--steps_only)."]
  else:
    lines += [
      f"{model_name}, {decoding}, {args.num_prompts} requests: prompt lengths "
      f"{min(len(p) for p in prompts)}..{max(len(p) for p in prompts)} (mean {np.mean([len(p) for p in prompts]):.0f}), "
      f"output lengths {min(outs)}..{max(outs)} (mean {np.mean(outs):.0f}), {total_out} output tokens; "
      f"{args.max_num_seqs} sequences at a time{' on both sides' if agree is not None else ''}; one run.",
      "",
      "| engine | seconds | output tok/s | ratio |",
      "|---|---:|---:|---:|",
    ] + [f"| {name} | {t:.1f} | {total_out / t:.1f} | {rows[-1][1] / t:.2f}x |" for name, t in rows]
  if agree is not None:
    lines += ["", f"First 8 greedy tokens identical on both sides ({args.variants.split(',')[-1]}) for "
              f"{agree}/{len(reqs)} requests."]
  lines += [
      "",
      f"Decode step (one engine step: forward + sampler, every sequence decoding one token) at context "
      f"{args.step_context}. Bandwidth floor = (bytes of the placed weights + KV bytes read, values and scales) / "
      f"{bandwidth:.1f} GB/s measured copy bandwidth; compute floor = FLOPs of the step (2 per weight per row + "
      f"attention) / measured matmul FLOP/s of the variant's dtype (on CPU the better of XLA's dot and the native "
      f"kernel at 1024^3). 'of floor' is the larger floor over the step time. "
      f"Where the rest goes: 'attention' is the step's ragged paged attention alone (every layer, its kernel and "
      f"metadata, no projections); 'matmuls at rows' is the step's weight FLOPs at the FLOP/s the model's matmul (on "
      f"CPU the native kernel) reaches on a [sequences, d_model] x [d_model, d_ff] product (its own shape, not the "
      f"square peak).",
      "",
      "| variant | weights | KV cache (B/token) | sequences | token bucket | step ms | model ms | attention ms | "
      "LM head + sampler ms | bandwidth floor ms | compute floor ms | matmuls at rows ms | of floor |",
      "|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
  ] + [f"| {n} | {floors[n][0] / 1e6:.0f} MB | {floors[n][2]} ({floors[n][1]:.0f}) | {s} | {T} | {t * 1e3:.1f} | "
       f"{fw * 1e3:.1f} | {'-' if at is None else f'{at * 1e3:.1f}'} | {pk * 1e3:.1f} | {f * 1e3:.1f} | "
       f"{c * 1e3:.1f} | {ar * 1e3:.1f} | {max(f, c) / t:.0%} |"
       for n, s, T, t, f, c, fw, pk, at, ar in steps] + [""]
  common.publish(lines, args.results)


if __name__ == "__main__":
  main()
