"""Meshes and logical-axis rules -> PartitionSpecs (1D/2D weight-stationary, data-parallel), KV-cache placement.

Every parameter of `jaxllm.layers` carries logical axis names (`out_sharding` metadata such as
("layers", "embed", "heads", "head_dim")); `rules` maps them onto a mesh built by `mesh`, and
`jaxllm.checkpoint.build_model(..., mesh=, layout=)` places each tensor straight onto its sharding.
"""

from jaxllm.sharding.mesh import make_mesh, parse_mesh
from jaxllm.sharding.rules import (LAYOUTS, ActivationSharding, KVPlacement, default_layout, kv_placement,
                                   param_shardings, resolve, rules_for)

__all__ = ["LAYOUTS", "ActivationSharding", "KVPlacement", "default_layout", "kv_placement", "make_mesh", "param_shardings",
           "parse_mesh", "resolve", "rules_for"]
