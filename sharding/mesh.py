"""Device meshes from a flag string: `--mesh data=2,model=4`, `--mesh model=8`, or `--mesh auto`.

    parse_mesh("data=2,model=4") -> {"data": 2, "model": 4}
    make_mesh("auto")            -> Mesh over all devices, ("data", "model") = (1, n)

Axis names are free, but the layouts in `jaxllm.sharding.rules` use `data` (replicas / batch), `model` (1D
weight-stationary) and `x`, `y` (2D weight-stationary). The product of the sizes must equal the device count.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh


def parse_mesh(spec: str) -> dict[str, int]:
  axes: dict[str, int] = {}
  for part in (spec or "").split(","):
    name, sep, size = part.strip().partition("=")
    name = name.strip()
    if not sep or not name.isidentifier() or not size.strip().isdigit() or int(size) < 1:
      raise ValueError(f"mesh {spec!r}: {part.strip()!r} is not AXIS=SIZE with a positive integer size "
                       "(e.g. --mesh data=2,model=4).")
    if name in axes:
      raise ValueError(f"mesh {spec!r}: axis {name!r} appears twice.")
    axes[name] = int(size)
  return axes


def make_mesh(spec: str | dict[str, int] = "auto", devices=None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  if spec == "auto":
    axes = {"data": 1, "model": len(devices)}
  else:
    axes = parse_mesh(spec) if isinstance(spec, str) else dict(spec)
  if math.prod(axes.values()) != len(devices):
    raise ValueError(f"mesh {axes} has {math.prod(axes.values())} positions but {len(devices)} devices are present; "
                     "the sizes must multiply to the device count.")
  grid = np.array(devices).reshape(tuple(axes.values()))
  return Mesh(grid, tuple(axes))
