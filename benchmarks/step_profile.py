"""Where a decode step's time goes on the device: a jax profiler trace of back-to-back engine steps, read back with
`jax.profiler.ProfileData` (no TensorBoard needed), summarized per step.

For each batch size: the step's wall time; the device's busy time (the union of its kernels' intervals) and idle
time (wall - busy: launch gaps, host round trips such as a conditional's predicate read back); kernels per step; the
kernels that take the most time, with their count per step and mean duration; and the bandwidth floor (placed weights
+ KV read at the measured copy bandwidth). A step whose busy time is near the floor but whose wall time is not is
waiting on the host; one whose busy time is far above it has slow kernels, and the table names them.

    python benchmarks/step_profile.py --preset llama3-8b --dtype bfloat16              # on a GPU
    python benchmarks/step_profile.py --preset smollm2-135m --num_layers 4 --steps 3   # a CPU smoke run

On a GPU the events are the kernels of the device plane's streams. On CPU there is no device plane: XLA:CPU's
thunks on its thread pool stand in (overlapping threads make "busy" the union over them), so only the mechanics are
checked there.
"""

import argparse
import collections
import datetime
import glob
import os
import tempfile
import time

import numpy as np

import common

# Lines of a GPU device plane that summarize rather than run kernels.
SUMMARY_LINES = ("XLA Modules", "XLA Ops", "Steps", "Source", "XLA TraceMe")


def kernel_events(data) -> list[tuple[str, int, int]]:
  """(name, start_ns, end_ns) of every kernel the trace holds: the device planes' stream lines on an accelerator;
  XLA:CPU's thunk events on its thread pool otherwise."""
  out = []
  devices = [p for p in data.planes if p.name.startswith("/device:")]
  for plane in devices:
    for line in plane.lines:
      if line.name in SUMMARY_LINES:
        continue
      out += [(e.name, e.start_ns, e.end_ns) for e in line.events]
  if devices:
    return out
  for plane in data.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      if not line.name.startswith("tf_XLA"):
        continue
      out += [(e.name, e.start_ns, e.end_ns) for e in line.events
              if not e.name.startswith(("end: ", "Threadpool", "ThunkExecutor"))]
  return out


def busy_ns(events) -> int:
  """Length of the union of the events' intervals."""
  total, end = 0, None
  for _, s, e in sorted(events, key=lambda x: x[1]):
    if end is None or s >= end:
      total += e - s
      end = e
    elif e > end:
      total += e - end
      end = e
  return total


def profile_steps(eng, slots: int, context: int, steps: int):
  """(wall seconds per step, kernel events) of `steps` back-to-back engine steps of `slots` decoding sequences,
  dispatched without waiting (as the scheduler does) and read at the end."""
  import jax
  from jax.profiler import ProfileData

  batch = common.decode_batch(eng, slots, context)
  state = eng.init_state()
  for _ in range(2):  # compile and warm
    state, result = eng.step(state, batch)
  jax.block_until_ready(result)
  with tempfile.TemporaryDirectory() as tmp:
    with jax.profiler.trace(tmp):
      start = time.perf_counter()
      for _ in range(steps):
        state, result = eng.step(state, batch)
      jax.block_until_ready((state, result))
      wall = (time.perf_counter() - start) / steps
    (path,) = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
    events = kernel_events(ProfileData.from_file(path))
  return wall, events


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--preset", default="llama3-8b")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--quantization", default=None, help="int8 or q8_0 weights")
  ap.add_argument("--num_layers", type=int, default=None, help="layers kept from the preset")
  ap.add_argument("--slots", default="1,32", help="sequences decoding in the step")
  ap.add_argument("--context", type=int, default=256)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--top", type=int, default=15, help="kernels listed per batch size")
  ap.add_argument("--results", default=common.RESULTS)
  args = ap.parse_args()

  import jax

  from jaxllm.serving.kv_cache import page_bytes

  slots = sorted({int(s) for s in args.slots.split(",")})
  max_len = -(-(args.context + 16) // 16) * 16
  llm = common.RandomModel(args.preset, args.dtype, max_len, max(slots), max_num_batched_tokens=max(64, max(slots)),
                           num_layers=args.num_layers, quantization=args.quantization)
  eng, mc = llm.engine, llm.config
  bandwidth = common.copy_bandwidth_gbs()
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(eng.params))
  kv_per_token = page_bytes(eng.config, mc, eng.kv_dtype) / eng.config.page_size
  shape = f"{args.preset}" + (f" cut to {mc.num_layers} layers" if args.num_layers else "")
  lines = [f"### step_profile.py — {datetime.date.today()} — {common.device_name()} — jax {jax.__version__}", "",
           f"{shape}, random {args.dtype} weights{', ' + args.quantization if args.quantization else ''}; decode "
           f"steps at context {args.context}, {args.steps} back-to-back steps traced (jax.profiler); busy = union of "
           f"the kernels' intervals, idle = wall - busy; floor = (placed weights {weight_bytes / 1e6:.0f} MB + KV "
           f"read) / {bandwidth:.0f} GB/s measured copy bandwidth.", "",
           "| sequences | wall ms / step | busy ms | idle ms | floor ms | busy of floor | kernels / step |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
  tops = []
  for n in slots:
    print(f"{n} sequences: {time.strftime('%T')}", flush=True)
    wall, events = profile_steps(eng, n, args.context, args.steps)
    busy = busy_ns(events) / 1e9 / args.steps
    floor = (weight_bytes + n * args.context * kv_per_token) / (bandwidth * 1e9)
    lines.append(f"| {n} | {wall * 1e3:.2f} | {busy * 1e3:.2f} | {max(wall - busy, 0) * 1e3:.2f} | "
                 f"{floor * 1e3:.2f} | {floor / busy:.0%} | {len(events) / args.steps:.0f} |")
    print(lines[-1], flush=True)
    by_name = collections.defaultdict(list)
    for name, s, e in events:
      by_name[name].append(e - s)
    ranked = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:args.top]
    tops += ["", f"Top kernels, {n} sequence{'s' if n > 1 else ''} (per step):", "",
             "| kernel | count | total ms | mean us |", "|---|---:|---:|---:|"]
    tops += [f"| `{name[:90]}` | {len(d) / args.steps:.1f} | {sum(d) / 1e6 / args.steps:.3f} | "
             f"{np.mean(d) / 1e3:.1f} |" for name, d in ranked]
  common.publish(lines + tops + [""], args.results)


if __name__ == "__main__":
  main()
