"""Meshes and logical-axis rules -> PartitionSpecs (1D/2D weight-stationary, data-parallel), KV-cache placement.

Every parameter of `jaxllm.layers` already carries logical axis names (`out_sharding` metadata such as
("layers", "embed", "heads", "head_dim")); the rules that map them onto a mesh land here with the sharding issue (#4).
"""
