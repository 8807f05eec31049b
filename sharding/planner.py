"""Capacity planner: a model config + a device mesh -> weight and KV-cache bytes per device, how many tokens of KV
cache fit, and the collectives each decoder layer costs (the cost model of Pope et al., "Efficiently Scaling
Transformer Inference", MLSys 2023). Arithmetic on `ModelConfig`; nothing is allocated on a device.

    mesh = parse_mesh("model=8")                                    # {"model": 8}, jaxllm.sharding.mesh's parser
    p = plan(ModelConfig.from_preset("llama3-70b"), mesh, "bfloat16", 8192, 80 * 2**30, "tp")
    print(format_plan(p))                                           # or json.dumps(p.to_dict())

Data flows: config + mesh -> `_check_mesh` (the layout's axes, then `jaxllm.sharding.rules.check_model_fits`, so a
mesh the runtime refuses is refused here with the same ValueError) -> KV placement (`_kv_placement`) -> per-device
weight bytes -> HBM left after weights and the reserve -> KV tokens per device -> batch x context -> the per-layer
collectives of the layout -> `Plan` -> `format_plan` (text) or `Plan.to_dict` (JSON).

Layouts (the logical-axis rules of `jaxllm.sharding.rules`; a `data` axis replicates the weights and splits the batch):

  tp   1D weight-stationary over `model` (m devices): heads, kv_heads, mlp and vocab split over m, embed (D)
       replicated. Activations [B, T, D] are replicated, so each layer does two all-reduces over `model`: after the
       attention out-projection and after the MLP down-projection. Pope et al. (Sec. 3.2.1) model one such block as an
       all-gather plus a reduce-scatter of B*T*D elements per device, independent of the number of chips.
  2d   2D weight-stationary over `x` (X) and `y` (Y): every weight matrix split over both axes, embed (D) over x and
       heads / kv_heads / mlp / vocab over y. Between blocks the activations are [B, T, D] with D split over x*y. Each
       block all-gathers its input over y, reduce-scatters the partial sums of its first projections over x (along
       the batch for attention, so the attention core and the KV cache are split over batch on x; along F for the
       MLP), all-gathers over x before the second projection and reduce-scatters its output over y. Pope et al.
       (Sec. 3.2.2, derived in App. A.2.1; their Y*Z is our y) give 2*B*T*D/X + 2*B*T*F/Y elements per device per
       feed-forward block, 8*B*T*D/sqrt(n) at F = 4D and X = sqrt(n)/2, the minimum being at X = sqrt(n*D/F). Their
       block has one input matrix; a gated (SwiGLU) MLP moves gate and up (2F/Y) plus the hidden (F/Y), so ours is
       2*B*T*D/X + 3*B*T*F/Y, minimal at X = sqrt(2*n*D/(3*F)); the table counts the gated block.
  dp   weights replicated on every device, only the batch split over `data`; no per-layer collectives.

KV heads (K) versus the shards of the head axis (s: `model` for tp, `y` for 2d), as the runtime places them
(`jaxllm.sharding.rules.kv_placement`, the one source of truth for both):
  K % s == 0   split: K/s heads per device.
  otherwise    replicated: each KV head copied lcm(K, s)/K times at load, lcm(K, s)/s heads per device (vLLM's way,
               generalised; e.g. 8 heads on 16 shards -> 1 per device, 4 on 6 -> 2).
With `kv_placement="batch"` (`--kv_placement batch`) the planner shows Pope et al.'s alternative (Sec. 3.3, written
there for multiquery attention and extended here to grouped KV heads that do not divide the axis) for the
second case instead: the KV cache sharded over the batch, K/V weights replicated, every device holding all K heads for
1/s of the sequences, and the query heads and the attention output moved between head- and batch-sharding with an
all-to-all each. It stores less KV per device at large batch; the runtime does not implement it (a what-if).

Byte counts of the collectives are what each device sends per token of its data-parallel replica's batch with ring
algorithms: all-gather and reduce-scatter (k-1)/k of the full tensor, all-reduce twice that. Not counted: the RMSNorm
statistics (B*T scalars), the embedding lookup and the logits (once per step, not per layer), KV-cache page rounding
and any quantization scales of a float8 KV cache. A vocabulary that does not divide its axis is replicated, as the
runtime's rules do.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
from typing import Any, Mapping

from jaxllm.config import NO_WINDOW, ModelConfig
from jaxllm.layers.ops import BLOCK, QUANTIZATIONS
from jaxllm.pallas_kernels.kv_quant import SCALE_DTYPE, bytes_per_token_head, is_quantized
from jaxllm.pallas_kernels.kv_quant import kv_cache_dtype as kv_dtype
from jaxllm.sharding.mesh import parse_mesh  # noqa: F401  (the planner reads --mesh as the runtime does)

# Parameters jaxllm loads (jaxllm.checkpoint.DTYPES); the KV cache may be stored narrower.
WEIGHT_DTYPES = {"float32": 4, "bfloat16": 2}
LAYOUTS = {"tp": ("data", "model"), "2d": ("data", "x", "y"), "dp": ("data",)}  # the mesh axes each layout uses
LAYOUT_NAMES = {"tp": "1D weight-stationary", "2d": "2D weight-stationary", "dp": "data-parallel only"}
GiB = 2**30


def format_mesh(mesh: Mapping[str, int]) -> str:
  return ",".join(f"{a}={n}" for a, n in mesh.items())


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective of a decoder layer. `bytes_per_token`: what each device sends per token (ring algorithms)."""

  block: str  # "attention" | "mlp"
  op: str  # "all-reduce" | "all-gather" | "reduce-scatter" | "all-to-all"
  axis: str  # mesh axis it runs over
  axis_size: int
  tensor: str  # what moves, as seen by one device
  bytes_per_token: float


@dataclasses.dataclass(frozen=True)
class Plan:
  """The planner's answer. Byte counts are per device unless named `_total`."""

  model: str
  num_params: int
  shape: dict[str, int]  # the config's shape letters: V D F L N K H
  layout: str  # "tp" | "2d" | "dp"
  mesh: dict[str, int]
  num_devices: int
  dtype: str
  kv_cache_dtype: str  # the engine's --kv_cache_dtype: auto (= dtype), int8 or fp8
  max_model_len: int
  hbm_bytes: int
  reserve: float  # fraction of HBM kept for activations / workspace
  # weights
  weight_bytes_per_device: int
  weight_bytes_total: int  # the model once (num_params x dtype bytes; int8 matrices at 1 byte plus their scales)
  vocab_rows_per_device: int  # of the embedding (and LM head): V / vocab shards, or V when they do not divide
  # KV cache
  kv_placement: str  # "split" | "replicated" | "batch"
  kv_heads_per_device: int
  kv_note: str
  kv_bytes_per_token_total: int  # 2 * L * K * H * kv bytes: one token's K and V, all layers and heads, once
  kv_bytes_per_token_per_device: int  # what one device stores per token of each sequence it holds
  batch_shards: int  # groups the batch is split over (data, x for 2d, a batch-sharded KV axis); batch is a multiple
  batch_split: str  # which axes split it, e.g. "data=2 x x=2"
  # capacity
  reserve_bytes: int
  kv_free_bytes_per_device: int  # HBM - reserve - weights; negative when the weights do not fit
  fits: bool
  tokens_per_device: int  # KV tokens (of the sequences it holds) one device has room for
  max_tokens: int  # batch x context over the whole mesh
  max_batch: int  # sequences of max_model_len tokens
  max_context_batch1: int  # longest single sequence, capped at max_model_len
  # communication
  collectives: tuple[Collective, ...]
  comm_bytes_per_token_per_layer: float
  comm_model: str  # the paper's per-layer formula, with this model's numbers
  notes: tuple[str, ...] = ()
  quantization: str | None = None  # weight quantization planned for
  # hosts (with devices_per_host): each process holds its devices' shards, and reads the checkpoint itself
  devices_per_host: int | None = None
  num_hosts: int | None = None
  host_load_bytes: int = 0  # host memory an HF / GGUF load takes per process: the model once, as placed

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def load_model_config(model: str) -> ModelConfig:
  """A preset name (exact), or a path to an HF config.json (or to the directory holding one)."""
  if os.path.isdir(model):
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
      raise ValueError(f"{model} is a directory without a config.json.")
    return ModelConfig.from_hf_file(path)
  if os.path.isfile(model):
    return ModelConfig.from_hf_file(model)
  try:
    return ModelConfig.from_preset(model)
  except ValueError as e:
    raise ValueError(f"{e} Or pass a path to an HF config.json.") from None


KV_PLACEMENTS = ("runtime", "batch")


def _kv_placement(K: int, mesh: dict[str, int], layout: str, mode: str) -> tuple[str, int, int, str]:
  """-> (placement, KV heads per device, batch shards it adds, note)."""
  from jaxllm.sharding import rules

  kv = rules.kv_placement(K, mesh, layout)
  if kv.kind == "replicated" and mode == "batch":
    s, axis = kv.shards, kv.axis
    return ("batch", K, s, f"{K} KV heads do not divide over {axis}={s}: KV cache sharded over batch (Pope et al. "
            f"Sec. 3.3), all {K} heads for 1/{s} of the sequences per device [what-if: the runtime replicates heads "
            f"instead, {kv.heads_per_device} per device]")
  kind = "replicated" if kv.kind == "none" else kv.kind
  return kind, kv.heads_per_device, 1, kv.note


def _check_mesh(config: ModelConfig, mesh: dict[str, int], layout: str) -> dict:
  """The layout's logical-axis rules on `mesh`; the runtime's own checks (`jaxllm.sharding.rules`) run first."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r} is not supported; choose one of {sorted(LAYOUTS)}.")
  for axis, n in mesh.items():
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
      raise ValueError(f"mesh axis {axis!r} needs a positive integer size, got {n!r}.")
    if axis not in LAYOUTS[layout]:
      other = next((name for name, axes in LAYOUTS.items() if axis in axes and axis != "data"), None)
      raise ValueError(f"mesh axis {axis!r} is not an axis of layout {layout!r}, whose axes are "
                       f"{', '.join(LAYOUTS[layout])}" + (f"; use --layout {other}." if other else "."))
  from jaxllm.sharding import rules

  shaped = types.SimpleNamespace(shape=mesh)  # all the rules read of a jax Mesh
  rules.check_model_fits(config, shaped, layout)  # query heads, d_ff (and d_model for 2d) must divide their axes
  return rules.rules_for(layout, shaped)


def _scale_dtype(p: "Plan") -> str:
  return "float16" if p.quantization == "q8_0" else p.dtype


def _kv_entry_bytes(p: "Plan") -> str:
  """How one token of one KV head is stored, e.g. 'H=128 x 1 B + 4 B scale'."""
  dtype = kv_dtype(p.kv_cache_dtype, p.dtype)
  scale = f" + {SCALE_DTYPE.itemsize} B scale" if is_quantized(dtype) else ""
  return f"H={p.shape['H']} x {dtype.itemsize} B{scale}"


def plan(config: ModelConfig, mesh: Mapping[str, int], dtype: str, max_model_len: int, hbm_bytes: int, layout: str,
         kv_cache_dtype: str = "auto", reserve: float = 0.1, kv_placement: str = "runtime",
         quantization: str | None = None, devices_per_host: int | None = None) -> Plan:
  """Plans `config` on `mesh` (axis -> size); see the module docstring for the layouts and the cost model.
  quantization="int8": the attention projections and MLP take 1 byte per weight plus a `dtype` scale per output channel
  ("q8_0": plus a float16 scale per 32 weights); embedding, LM head, norms and biases stay in `dtype` (as
  `jaxllm.layers.Llama` holds them). devices_per_host: the devices each host (process) has, for the per-host
  figures of a multi-host mesh."""
  c = config
  num_devices = math.prod(mesh.values())
  if devices_per_host is not None and (not isinstance(devices_per_host, int) or devices_per_host < 1
                                       or num_devices % devices_per_host):
    raise ValueError(f"devices_per_host={devices_per_host!r} must be a positive integer dividing the mesh's "
                     f"{num_devices} devices.")
  if quantization not in QUANTIZATIONS:
    raise ValueError(f"quantization {quantization!r} is not supported; choose int8, q8_0 or none.")
  if dtype == "auto":  # what `--dtype auto` loads on the accelerators a plan is for
    dtype = "bfloat16"
  if dtype not in WEIGHT_DTYPES:
    raise ValueError(f"dtype {dtype!r} is not supported; choose auto or one of {sorted(WEIGHT_DTYPES)}.")
  if not isinstance(max_model_len, int) or max_model_len <= 0:
    raise ValueError(f"max_model_len must be a positive integer, got {max_model_len!r}.")
  if max_model_len > c.max_position_embeddings:
    raise ValueError(f"max_model_len {max_model_len} exceeds {c.name}'s max_position_embeddings "
                     f"{c.max_position_embeddings}.")
  if not hbm_bytes > 0:
    raise ValueError(f"HBM per device must be > 0 bytes, got {hbm_bytes}.")
  if kv_placement not in KV_PLACEMENTS:
    raise ValueError(f"kv_placement {kv_placement!r} is not supported; choose one of {KV_PLACEMENTS}.")
  if not 0 <= reserve < 1:
    raise ValueError(f"reserve must be a fraction in [0, 1), got {reserve}.")
  mesh = dict(mesh)
  axis_rules = _check_mesh(c, mesh, layout)

  D, F, N, K, H, V, L = c.d_model, c.d_ff, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, c.num_layers
  wb = WEIGHT_DTYPES[dtype]
  kb = bytes_per_token_head(H, kv_dtype(kv_cache_dtype, dtype))  # K (or V) of one token and KV head
  ab = wb  # activations are carried in the parameter dtype
  data = mesh.get("data", 1)
  head_axis = axis_rules.get("heads")  # "model" (tp), "y" (2d), None (dp)
  X = mesh[axis_rules["embed"]] if "embed" in axis_rules else 1
  Y = mesh[head_axis] if head_axis else 1
  notes = []
  if head_axis:
    from jaxllm.sharding import rules

    padded = rules.padded_query_heads(N, K, mesh, layout)
    if padded > N:
      notes.append(f"{N} query heads do not split over {head_axis}={Y}: each KV head's {N // K} padded with zero "
                   f"heads to {padded // K}, {padded} in all ({padded - N} of them compute nothing)")
      N = padded
  Dx, Ny, Fy = D // X, N // Y, F // Y  # divisibility checked above (query heads padded to split)
  placement, kvh, kv_batch, kv_note = _kv_placement(K, mesh, layout, kv_placement)
  if placement != "split" and head_axis:
    notes.append(kv_note)
  if c.sliding_window is not None:
    local = int((c.layer_windows() < NO_WINDOW).sum())
    notes.append(f"{local} of {L} layers attend over a {c.sliding_window}-token window: they read only that window, "
                 "but their pages are kept (one page table for all layers), so KV is counted for every layer")
  if data > 1:
    notes.append(f"weights replicated over data={data}, which splits the batch")
  vocab_rows = V // Y if V % Y == 0 else V
  if V % Y:
    notes.append(f"vocab {V} does not split over {head_axis}={Y}: embedding and LM head replicated (as "
                 "jaxllm.sharding.rules does)")

  # --- weights per device
  matrices = (Dx * Ny * H * 2  # wq, wo
              + Dx * kvh * H * 2  # wk, wv: the heads (or copies) a device holds; all K when batch-sharded
              + Dx * Fy * 3)  # gate, up, down
  per_layer = (Dx * (4 if c.post_norms else 2)  # RMSNorms (embed axis: replicated for tp, over x for 2d)
               + (Ny + 2 * kvh) * H * c.qkv_bias + Dx * c.o_bias  # biases, split like their projections' outputs
               + 2 * H * c.qk_norm)  # q/k norms over head_dim (replicated)
  if quantization is None:
    per_layer_bytes = (matrices + per_layer) * wb
  elif quantization == "int8":  # a scale per output channel: wq [N, H], wk / wv [K, H], wo [D], gate / up [F], down [D]
    scales = Ny * H + 2 * kvh * H + Dx + 2 * Fy + Dx
    per_layer_bytes = matrices + (scales + per_layer) * wb
    notes.append("int8 weights: attention projections and MLP at 1 byte plus per-channel scales; embedding, LM head, "
                 f"norms and biases in {dtype}")
  else:  # q8_0: a float16 scale per 32 weights, sharded with them
    per_layer_bytes = matrices + matrices * 2 // BLOCK + per_layer * wb
    notes.append("q8_0 weights: attention projections and MLP at 1 byte plus a float16 scale per 32 (8.5 bits); "
                 f"embedding, LM head, norms and biases in {dtype}")
  embed = vocab_rows * Dx * (1 if c.tie_embeddings else 2)
  weight_bytes = L * per_layer_bytes + (embed + Dx) * wb
  total_bytes = c.num_params * wb  # the model once
  if quantization is not None:
    Dc, Nc, Kc = c.d_model, c.num_heads, c.num_kv_heads
    all_matrices = Dc * Nc * H * 2 + Dc * Kc * H * 2 + 3 * Dc * F
    if quantization == "int8":
      all_scales = (Nc * H + 2 * Kc * H + 2 * Dc + 2 * F) * wb
    else:
      all_scales = all_matrices * 2 // BLOCK
    total_bytes = L * all_matrices + (c.num_params - L * all_matrices) * wb + L * all_scales

  # --- KV cache
  kv_total = 2 * L * K * kb
  kv_dev = 2 * L * kvh * kb
  batch_axes = {"data": data, "x": X if layout == "2d" else 1, head_axis or "-": kv_batch}
  batch_shards = math.prod(batch_axes.values())
  batch_split = " x ".join(f"{a}={n}" for a, n in batch_axes.items() if n > 1) or "none"

  # --- capacity
  reserve_bytes = math.ceil(hbm_bytes * reserve)
  free = hbm_bytes - reserve_bytes - weight_bytes
  tokens_dev = max(free, 0) // kv_dev
  fits = tokens_dev > 0
  if not fits:
    notes.append(f"does not fit: weights need {weight_bytes / GiB:.2f} GiB per device, "
                 f"{(hbm_bytes - reserve_bytes) / GiB:.2f} GiB is usable after the reserve")
  max_tokens = tokens_dev * batch_shards
  max_batch = (tokens_dev // max_model_len) * batch_shards
  max_ctx1 = min(tokens_dev, max_model_len)

  # --- collectives per layer, bytes each device sends per token
  def ring(k):
    return (k - 1) / k

  if layout == "dp":
    coll = []
    comm_model = "dp: weights replicated on every device, each replica runs whole sequences; no per-layer collectives"
  elif layout == "tp":
    m = Y
    ar = 2 * ring(m) * D * ab
    coll = [Collective("attention", "all-reduce", "model", m, "out-proj partial sums [B, T, D]", ar)]
    if placement == "batch":
      a2a = ring(m) * Ny * H / m * ab
      coll[:0] = [Collective("attention", "all-to-all", "model", m, "q heads -> batch [B, T, N/m, H]", a2a),
                  Collective("attention", "all-to-all", "model", m, "attn out batch -> heads [B/m, T, N, H]", a2a)]
    coll.append(Collective("mlp", "all-reduce", "model", m, "down-proj partial sums [B, T, D]", ar))
    comm_model = (f"Pope et al. 2023 Sec. 3.2.1 (1D weight-stationary): 2*B*T*D elements per device per block, "
                  f"independent of the chip count; 2 blocks per layer (attention, MLP) = 4*D*{ab} B = "
                  f"{4 * D * ab:,} B/token/layer; ring algorithms send (m-1)/m of that, the table's count")
  else:
    ag_y = ring(Y) * Dx * ab
    qkv = (Ny + 2 * kvh) * H
    coll = [
        Collective("attention", "all-gather", "y", Y, "input [B, T, D/xy] -> [B, T, D/x]", ag_y),
        Collective("attention", "reduce-scatter", "x", X, "q,k,v partial sums [B, T, (N/y+2*kvh)*H] -> B/x",
                   ring(X) * qkv * ab),
    ]
    if placement == "batch":
      a2a = ring(Y) * Ny * H / X * ab
      coll += [Collective("attention", "all-to-all", "y", Y, "q heads -> batch [B/x, T, N/y, H]", a2a),
               Collective("attention", "all-to-all", "y", Y, "attn out batch -> heads [B/xy, T, N, H]", a2a)]
    coll += [
        Collective("attention", "all-gather", "x", X, "attn out [B/x, T, N/y, H] -> [B, T, N/y, H]",
                   ring(X) * Ny * H * ab),
        Collective("attention", "reduce-scatter", "y", Y, "out-proj partial sums [B, T, D/x] -> D/xy", ag_y),
        Collective("mlp", "all-gather", "y", Y, "input [B, T, D/xy] -> [B, T, D/x]", ag_y),
        Collective("mlp", "reduce-scatter", "x", X, "gate,up partial sums [B, T, 2F/y] -> 2F/xy",
                   ring(X) * 2 * Fy * ab),
        Collective("mlp", "all-gather", "x", X, "hidden [B, T, F/xy] -> [B, T, F/y]", ring(X) * Fy * ab),
        Collective("mlp", "reduce-scatter", "y", Y, "down-proj partial sums [B, T, D/x] -> D/xy", ag_y),
    ]
    n = X * Y
    paper = (2 * D / X + 2 * F / Y) * ab
    comm_model = (f"Pope et al. 2023 Sec. 3.2.2 / App. A.2.1 (2D weight-stationary): 2*B*T*D/X + 2*B*T*F/Y elements "
                  f"per device per single-matrix feed-forward block = {paper:,.0f} B/token here (8*D/sqrt(n) at F=4D, "
                  f"X=sqrt(n)/2; optimal x = sqrt(n*D/F) = {math.sqrt(n * D / F):.2f} for n={n}); a gated MLP moves "
                  f"2*D/X + 3*F/Y, optimal x = sqrt(2nD/3F) = {math.sqrt(2 * n * D / (3 * F)):.2f}")

  return Plan(
      model=c.name, num_params=c.num_params, shape=dict(V=V, D=D, F=F, L=L, N=N, K=K, H=H), layout=layout, mesh=mesh,
      num_devices=num_devices, dtype=dtype, kv_cache_dtype=kv_cache_dtype, max_model_len=max_model_len,
      hbm_bytes=int(hbm_bytes), reserve=float(reserve),
      weight_bytes_per_device=weight_bytes, weight_bytes_total=total_bytes, vocab_rows_per_device=vocab_rows,
      kv_placement=placement, kv_heads_per_device=kvh, kv_note=kv_note, kv_bytes_per_token_total=kv_total,
      kv_bytes_per_token_per_device=kv_dev, batch_shards=batch_shards, batch_split=batch_split,
      reserve_bytes=reserve_bytes, kv_free_bytes_per_device=free, fits=fits, tokens_per_device=tokens_dev,
      max_tokens=max_tokens, max_batch=max_batch, max_context_batch1=max_ctx1, collectives=tuple(coll),
      comm_bytes_per_token_per_layer=sum(x.bytes_per_token for x in coll), comm_model=comm_model, notes=tuple(notes),
      quantization=quantization, devices_per_host=devices_per_host,
      num_hosts=None if devices_per_host is None else num_devices // devices_per_host, host_load_bytes=total_bytes)


# ------------------------------------------------------------------------------------------------ text output
def _gib(b: float) -> str:
  return f"{b / GiB:,.2f} GiB"


def _table(rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> list[str]:
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return ["  " + "  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in
                           enumerate(zip(r, widths))).rstrip() for r in rows]


def format_plan(p: Plan) -> str:
  """The plan as an aligned plain-text report."""
  out = [f"{p.model} ({p.num_params / 1e9:.2f}B params; {' '.join(f'{k}={v}' for k, v in p.shape.items())}) on mesh "
         f"{format_mesh(p.mesh)} ({p.num_devices} device{'s' * (p.num_devices > 1)}), layout {p.layout} "
         f"({LAYOUT_NAMES[p.layout]})",
         f"weights {p.dtype if p.quantization is None else f'{p.quantization} (scales {_scale_dtype(p)})'}, "
         f"KV cache {p.kv_cache_dtype}, HBM {_gib(p.hbm_bytes)} per device, "
         f"reserve {p.reserve:.0%} for activations/workspace, max_model_len {p.max_model_len:,}", ""]
  out.append("Memory per device")
  out += _table([
      ("weights", _gib(p.weight_bytes_per_device), f"{p.weight_bytes_per_device:,} B"),
      (f"reserve ({p.reserve:.0%})", _gib(p.reserve_bytes), f"{p.reserve_bytes:,} B"),
      ("free for KV cache", _gib(p.kv_free_bytes_per_device), f"{p.kv_free_bytes_per_device:,} B"),
  ], right={1, 2})
  out += ["", "KV cache"]
  out += _table([
      ("placement", f"{p.kv_placement}: {p.kv_note}"),
      ("KV heads per device", str(p.kv_heads_per_device)),
      ("bytes per token, total", f"{p.kv_bytes_per_token_total:,} B (K and V x L={p.shape['L']} x K={p.shape['K']} x "
                                 f"{_kv_entry_bytes(p)})"),
      ("bytes per token, per device", f"{p.kv_bytes_per_token_per_device:,} B (per token of each sequence it holds)"),
      ("batch split over", f"{p.batch_shards} groups ({p.batch_split}); the batch is a multiple of {p.batch_shards}"
       if p.batch_shards > 1 else "not split: every device holds every sequence"),
  ])
  if p.devices_per_host is not None:
    n = p.devices_per_host
    out += ["", f"Per host ({n} device{'s' * (n > 1)} each, {p.num_hosts} host{'s' * (p.num_hosts > 1)})"]
    out += _table([
        ("accelerator memory", f"{n} x {_gib(p.hbm_bytes)}: weights {_gib(n * p.weight_bytes_per_device)}, "
                               f"KV cache up to {_gib(n * max(p.kv_free_bytes_per_device, 0))}"),
        ("host memory to load", f"{_gib(p.host_load_bytes)}: each process reads an HF or GGUF checkpoint whole into "
                                "host memory, then places its devices' shards"),
        ("", f"{_gib(n * p.weight_bytes_per_device)}: from a `jaxllm convert` (orbax) checkpoint, restored shard by "
             "shard onto its devices"),
    ])
  out += ["", "Capacity" + ("" if p.fits else " -- DOES NOT FIT: no room for KV cache after weights and reserve")]
  at_len = p.tokens_per_device >= p.max_model_len
  out += _table([
      ("KV tokens per device", f"{p.tokens_per_device:,}", "of the sequences it holds"),
      ("max batch x context", f"{p.max_tokens:,}", "tokens over the mesh"),
      (f"max batch at {p.max_model_len:,} tokens", f"{p.max_batch:,}", "sequences"),
      ("max context at batch 1", f"{p.max_context_batch1:,}", "= max_model_len" if at_len else "tokens"),
  ], right={1})
  out += ["", "Collectives per layer (bytes each device sends per token, ring algorithms)"]
  if not p.collectives:
    out.append(f"  none: {p.comm_model}")
    return "\n".join(out + (["", "Notes"] + [f"  - {n}" for n in p.notes] if p.notes else []))
  rows = [("block", "collective", "axis", "what moves", "bytes/token")]
  rows += [(x.block, x.op, f"{x.axis}={x.axis_size}", x.tensor, f"{x.bytes_per_token:,.0f}") for x in p.collectives]
  rows.append(("total per layer", "", "", "", f"{p.comm_bytes_per_token_per_layer:,.0f}"))
  out += _table(rows, right={4})
  out.append(f"  cost model: {p.comm_model}")
  if p.notes:
    out += ["", "Notes"] + [f"  - {n}" for n in p.notes]
  return "\n".join(out)
