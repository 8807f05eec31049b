"""Layouts as rules: logical axis names (attached to every parameter) -> mesh axes -> PartitionSpecs.

Layouts, after Pope et al., "Efficiently Scaling Transformer Inference" (MLSys 2023):
  tp  1D weight-stationary: heads, kv_heads, mlp and vocab over `model`; embed replicated. Each layer needs two
      all-reduces of [B, T, D] activations (after the attention out-projection and after the MLP down-projection).
  2d  2D weight-stationary: embed over `x`, heads / kv_heads / mlp / vocab over `y`, so every weight matrix is split
      over both axes and activations are gathered / reduce-scattered along each.
  dp  weights replicated; only the batch is split.
In every layout a `data` axis, if the mesh has one, splits the batch (data-parallel replicas).

`resolve()` drops a mesh axis that does not divide its dimension (or that is already used by an earlier dimension)
instead of letting XLA fail deep inside compilation; for KV heads fewer than `model` shards this means K/V weights and
the KV cache are replicated across `model` (vLLM's choice), which `kv_heads_note()` reports.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from flax import nnx

LAYOUTS: dict[str, dict[str, str | tuple[str, ...] | None]] = {
    "tp": {"heads": "model", "kv_heads": "model", "mlp": "model", "vocab": "model"},
    "2d": {"embed": "x", "heads": "y", "kv_heads": "y", "mlp": "y", "vocab": "y"},
    "dp": {},
}
BATCH_AXIS = "data"


def rules_for(layout: str, mesh: Mesh) -> dict[str, str | tuple[str, ...] | None]:
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r} is unknown; choose one of {sorted(LAYOUTS)}.")
  rules = dict(LAYOUTS[layout])
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
  """The query heads and MLP width must split evenly over the axes that shard them, or the layout is pointless."""
  rules = rules_for(layout, mesh)
  for logical, dim, what in (("heads", config.num_heads, "query heads"), ("mlp", config.d_ff, "d_ff"),
                             ("embed", config.d_model, "d_model")):
    axis = rules.get(logical)
    for a in (axis,) if isinstance(axis, str) else axis or ():
      if dim % mesh.shape[a]:
        raise ValueError(f"mesh axis {a!r} has size {mesh.shape[a]}, which does not divide the model's {dim} {what} "
                         f"(layout {layout!r}); choose a size that divides {dim}.")


def kv_heads_note(config, mesh: Mesh, layout: str) -> str:
  axis = rules_for(layout, mesh).get("kv_heads")
  if not isinstance(axis, str):
    return "KV heads replicated (layout does not shard them)."
  n = mesh.shape[axis]
  if config.num_kv_heads % n == 0:
    return f"{config.num_kv_heads} KV heads split over {axis}={n}."
  return (f"{config.num_kv_heads} KV heads do not split over {axis}={n}: K/V projections and the KV cache are "
          "replicated across that axis (vLLM's choice).")
