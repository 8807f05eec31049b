"""Layouts as rules: logical axis names (attached to every parameter) -> mesh axes -> PartitionSpecs.

Layouts, after Pope et al., "Efficiently Scaling Transformer Inference" (MLSys 2023):
  tp  1D weight-stationary: heads, kv_heads, mlp and vocab over `model`; embed replicated. Each layer needs two
      all-reduces of [B, T, D] activations (after the attention out-projection and after the MLP down-projection).
  2d  2D weight-stationary: embed over `x`, heads / kv_heads / mlp / vocab over `y`, so every weight matrix is split
      over both axes and activations are gathered / reduce-scattered along each.
  dp  weights replicated; only the batch is split.
In every layout a `data` axis, if the mesh has one, splits the batch (data-parallel replicas).

`resolve()` drops a mesh axis that does not divide its dimension (or that is already used by an earlier dimension)
instead of letting XLA fail deep inside compilation.

KV heads (K) that do not split over the head axis (s shards) are replicated at load, vLLM's way generalised:
`kv_placement()` repeats each KV head r = lcm(K, s) / K times, so the model runs with K' = lcm(K, s) KV heads that split
evenly (K'/s per device, e.g. 8 KV heads on 16 shards -> 1 per device; 3 on 2 -> 3). Query head n keeps reading a copy
of its own KV head, because n // (N / K') // r == n // (N / K). The K/V projections and the KV cache then shard over
`s` like every other head axis, instead of sitting whole on every device. (Pope et al. shard the KV cache over batch
instead, which stores less when the batch is large; `jaxllm plan --kv_placement batch` shows that figure, but the
runtime does not implement it.)

`ActivationSharding` is the one place layers get a layout from: the model constrains its [B, T, D] residual stream at
block boundaries (after the embedding and after every decoder layer) to the layout's ("batch", "length", "embed").
Inside a `shard_map` that is manual over some mesh axes (the serving engine runs each data-parallel replica's step
that way, manual over `data`), the constraint names only the other axes, on the context's abstract mesh.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

LAYOUTS: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    "tp": {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
    "2d": {"embed": "x", "heads": "y", "kv_heads": "y", "mlp": "y", "vocab": "y"},
    "dp": {},
}
BATCH_AXIS = "data"


def default_layout(mesh_axes) -> str:
  """The layout a mesh's axis names ask for: 2d with `x` / `y`, tp with `model`, else dp (`data=8`: 8 replicas)."""
  axes = set(mesh_axes)
  return "2d" if {"x", "y"} & axes else "tp" if "model" in axes else "dp"


def _layout(layout: str) -> dict[str, str | tuple[str, ...] | None]:
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is unknown; choose one of {sorted(LAYOUTS)}.")
  return LAYOUTS[layout]


def rules_for(layout: str, mesh: Mesh) -> dict[str, str | tuple[str, ...] | None]:
  rules = dict(_layout(layout))
  for logical, axis in rules.items():
    for a in (axis,) if isinstance(axis, str) else axis or ():
      if a not in mesh.shape:
        raise ValueError(f"layout {layout!r} shards {logical!r} over mesh axis {a!r}, which mesh "
                         f"{dict(mesh.shape)} does not have.")
  if BATCH_AXIS in mesh.shape:
    rules["batch"] = BATCH_AXIS
  return rules


def resolve(logical_axes, shape, rules, mesh: Mesh) -> P:
  """PartitionSpec for one array; a mesh axis that does not divide its dimension, or is taken, is dropped."""
  used, spec = set(), []
  for name, dim in zip(logical_axes, shape):
    axis = rules.get(name) if name else None
    axes = (axis,) if isinstance(axis, str) else tuple(axis or ())
    kept = []
    for a in axes:
      size = mesh.shape[a]
      if a not in used and dim % (size * max(1, _prod(mesh, kept))) == 0:
        kept.append(a)
    used.update(kept)
    spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*spec)


def _prod(mesh, axes):
  out = 1
  for a in axes:
    out *= mesh.shape[a]
  return out


def param_shardings(state: nnx.State, mesh: Mesh, layout: str):
  """NamedSharding for every parameter of an (abstract) model state, from its `out_sharding` axis names."""
  rules = rules_for(layout, mesh)

  def one(var):
    names = var.get_metadata().get("out_sharding") or (None,) * len(var.shape)
    return NamedSharding(mesh, resolve(names, var.shape, rules, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def check_model_fits(config, mesh: Mesh, layout: str) -> None:
  """The MLP width (and d_model for 2d) must split evenly over the axes that shard them, or the layout is pointless.
  Query heads always fit: those that do not split are padded (`padded_query_heads`)."""
  rules = rules_for(layout, mesh)
  for logical, dim, what in (("mlp", config.d_ff, "d_ff"), ("embed", config.d_model, "d_model")):
    axis = rules.get(logical)
    for a in (axis,) if isinstance(axis, str) else axis or ():
      if dim % mesh.shape[a]:
        raise ValueError(f"mesh axis {a!r} has size {mesh.shape[a]}, which does not divide the model's {dim} {what} "
                         f"(layout {layout!r}); choose a size that divides {dim}.")


@dataclasses.dataclass(frozen=True, kw_only=True)
class KVPlacement:
  kind: str  # "split": K divides over the axis; "replicated": each head copied `copies` times; "none": no head axis
  axis: str | None  # mesh axis the head dimension is sharded over
  shards: int
  copies: int  # each KV head is stored this many times (runtime KV heads = K * copies)
  heads_per_device: int
  note: str


def kv_placement(num_kv_heads: int, mesh_shape, layout: str) -> KVPlacement:
  """How the runtime stores K KV heads on a mesh (`mesh_shape`: axis -> size) under `layout`."""
  K = num_kv_heads
  axis = _layout(layout).get("kv_heads")
  if not isinstance(axis, str) or axis not in mesh_shape:
    return KVPlacement(kind="none", axis=None, shards=1, copies=1, heads_per_device=K,
                       note=f"all {K} KV heads on every device (the layout does not shard heads)")
  s = mesh_shape[axis]
  if K % s == 0:
    return KVPlacement(kind="split", axis=axis, shards=s, copies=1, heads_per_device=K // s,
                       note=f"{K} KV heads split over {axis}={s}: {K // s} per device")
  k_rt = math.lcm(K, s)
  r = k_rt // K
  return KVPlacement(kind="replicated", axis=axis, shards=s, copies=r, heads_per_device=k_rt // s,
                     note=f"{K} KV heads replicated {r}x at load to {k_rt} (vLLM's way) and split over {axis}={s}: "
                     f"{k_rt // s} per device")


def padded_query_heads(num_heads: int, num_kv_heads: int, mesh_shape, layout: str) -> int:
  """The query heads the runtime holds on this mesh: `num_heads`, or more when they do not split over the head axis
  (Qwen2.5-7B's 28 on model=8). Each KV head's group of G query heads is then padded with zero heads (zero q and
  output-projection weights: they add exactly nothing) up to a multiple of the KV head's copies, so that every device
  holds whole groups beside the KV heads they read: 28 = 4 x 7 on model=8 becomes 4 x 8 = 32, four per device."""
  kv = kv_placement(num_kv_heads, mesh_shape, layout)
  group = num_heads // num_kv_heads
  return num_kv_heads * (-(-group // kv.copies) * kv.copies)


def pad_query_heads(attn: dict, num_kv_heads: int, padded_heads: int) -> dict:
  """The attention params (stacked [L, ...]) with each KV group's query heads padded by zero heads to
  `padded_heads` in all: wq [L, D, N, H] (and its int8 scales: [L, N, H] per channel, [L, D / 32, N, H] per block),
  bq [L, N, H] and wo [L, N, H, D] (its q8_0 scales [L, N, H / 32, D]; per-channel ones [L, D] have no head axis).
  Host or device arrays."""
  out = dict(attn)
  for name, axis in (("wq_DNH", 2), ("wq_scale", 2), ("bq_NH", 1), ("wo_NHD", 1), ("wo_scale", 1)):
    if name not in attn:
      continue
    axis = scale_axis(name, axis, attn)
    if axis is None:
      continue
    w = attn[name]
    xp = jax.numpy if isinstance(w, jax.Array) else np
    n = w.shape[axis]
    grouped = w.reshape(*w.shape[:axis], num_kv_heads, n // num_kv_heads, *w.shape[axis + 1:])
    pad = [(0, 0)] * grouped.ndim
    pad[axis + 1] = (0, padded_heads // num_kv_heads - n // num_kv_heads)
    out[name] = xp.pad(grouped, pad).reshape(*w.shape[:axis], padded_heads, *w.shape[axis + 1:])
  return out


def scale_axis(name: str, axis: int, params: dict) -> int | None:
  """The axis of params[name] that corresponds to `axis` of its weight: the same for a weight or a block scale (same
  rank), shifted left past the leading contraction axis for a per-channel scale of wq / wk / wv ([L, D, X, H] ->
  [L, X, H]); None for wo's per-channel scale, which has no head axis."""
  if not name.endswith("_scale"):
    return axis
  weight = next(v for k, v in params.items() if k.startswith(name[:-len("_scale")] + "_") and k != name)
  if len(params[name].shape) == len(weight.shape):
    return axis
  return None if name.startswith("wo") else axis - 1


def repeat_kv_heads(host: np.ndarray, axis: int, copies: int):
  """A lazily indexed view of `host` with every entry of `axis` repeated `copies` times (np.repeat semantics), so
  `make_array_from_callback` materialises only the shard each device asks for."""
  return RepeatedAxis(host, axis, copies)


class RepeatedAxis:

  def __init__(self, host, axis, copies):
    self.host, self.axis, self.copies = host, axis, copies
    self.shape = tuple(n * copies if i == axis else n for i, n in enumerate(host.shape))
    self.dtype = host.dtype

  def __getitem__(self, index):
    index = tuple(index) + (slice(None),) * (len(self.shape) - len(index))
    rows = np.arange(self.shape[self.axis])[index[self.axis]] // self.copies
    picked = np.take(self.host, rows, axis=self.axis)
    return picked[index[:self.axis] + (slice(None),) + index[self.axis + 1:]]


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
  """Constrains an activation to the layout's PartitionSpec for its logical axes (dropping axes that do not divide)."""

  mesh: Mesh
  rules: tuple  # sorted (logical axis, mesh axes) pairs: hashable, so a module can hold it as a static attribute

  @classmethod
  def create(cls, mesh: Mesh, layout: str) -> "ActivationSharding":
    return cls(mesh, tuple(sorted(rules_for(layout, mesh).items())))

  def named(self, logical_axes: tuple[str | None, ...], shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(self.mesh, resolve(logical_axes, shape, dict(self.rules), self.mesh))

  def head_axis(self, *head_counts: int) -> str | None:
    """The mesh axis the layout splits attention heads over, if it splits each of `head_counts` evenly (None: heads
    stay whole on every device)."""
    axis = dict(self.rules).get("kv_heads")
    if not isinstance(axis, str) or self.mesh.shape[axis] == 1:
      return None
    return None if any(n % self.mesh.shape[axis] for n in head_counts) else axis

  def __call__(self, x: jax.Array, logical_axes: tuple[str | None, ...]) -> jax.Array:
    sharding = self.named(logical_axes, x.shape)
    context = jax.sharding.get_abstract_mesh()
    manual = set(getattr(context, "manual_axes", ()))
    if manual:  # inside a shard_map over some axes (the engine's replicas over `data`): constrain over the others
      if manual >= set(self.mesh.axis_names):
        return x
      spec = [_without(axes, manual) for axes in sharding.spec]
      sharding = NamedSharding(context, P(*spec))
    return jax.lax.with_sharding_constraint(x, sharding)


def _without(axes, dropped: set):
  """A PartitionSpec entry without the mesh axes in `dropped`."""
  kept = tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ()) if a not in dropped)
  return None if not kept else kept[0] if len(kept) == 1 else kept


def over_heads(sharding: ActivationSharding | None, fn, args: tuple, head_dims: tuple, out_head_dims,
               head_counts: tuple[int, ...]):
  """`fn(*args)` run on each device's own heads: a `shard_map` manual over the layout's head axis, each argument
  (a pytree: every leaf alike) split on its head dimension in `head_dims` (None: whole on every device), each
  result on its dimension in `out_head_dims`. Attention kernels run this way: a Pallas call is opaque to XLA's
  partitioner, which would gather its operands (the whole KV cache) onto every device. On one device (sharding None)
  or without a head axis that splits `head_counts`, fn(*args) as it is."""
  axis = None if sharding is None else sharding.head_axis(*head_counts)
  if axis is None:
    return fn(*args)
  split = lambda d: P() if d is None else P(*([None] * d), axis)  # noqa: E731
  context = jax.sharding.get_abstract_mesh()
  mesh = context if getattr(context, "manual_axes", ()) else sharding.mesh  # nested in the engine replicas' shard_map
  out_specs = jax.tree.map(split, out_head_dims, is_leaf=lambda d: d is None or isinstance(d, int))
  return jax.shard_map(fn, mesh=mesh, in_specs=tuple(split(d) for d in head_dims), out_specs=out_specs,
                       axis_names={axis}, check_vma=False)(*args)
