"""jaxllm's own checkpoint format, for fast reloads: params saved with orbax, beside the config and tokenizer.

    DIR/jaxllm_config.json   {"model": ModelConfig.to_dict(), "dtype": "bfloat16", "source": "..."}
    DIR/params/               orbax StandardCheckpointer tree (the nested dict of `params_from_hf`)
    DIR/tokenizer.*           written by `Tokenizer.save`

Restoring reads each array straight into the requested shape/dtype and, given shardings, straight onto the devices
that hold each shard (a model larger than one device never passes through one); `jaxllm convert` writes this format.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from jaxllm.config import ModelConfig

CONFIG_FILE = "jaxllm_config.json"
PARAMS_DIR = "params"


def is_orbax_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR))


def save(directory: str, config: ModelConfig, params: dict, dtype: str, source: str = "",
         quantization: str | None = None) -> None:
  import orbax.checkpoint as ocp

  directory = os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True)
  target = os.path.join(directory, PARAMS_DIR)
  if os.path.exists(target):
    raise FileExistsError(f"{target} already exists; choose an empty output directory.")
  # jax arrays (placed on a mesh) are written shard by shard, by the processes that hold them.
  tree = jax.tree.map(lambda x: x if isinstance(x, jax.Array) else np.asarray(x), params)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, tree)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
      json.dump({"model": config.to_dict(), "dtype": dtype, "quantization": quantization, "source": source}, f,
                indent=2)


def read_config(directory: str) -> tuple[ModelConfig, str, str | None]:
  """(config, dtype, quantization) of a converted checkpoint."""
  path = os.path.join(directory, CONFIG_FILE)
  try:
    with open(path) as f:
      d = json.load(f)
    return ModelConfig.from_dict(d["model"]), d["dtype"], d.get("quantization")
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is not a valid jaxllm config ({e}).") from None


def restore(directory: str, abstract_params: dict) -> dict:
  """Restores params shaped like `abstract_params` (a tree of jax.ShapeDtypeStruct); where those carry a sharding,
  each array is read straight into its shards."""
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(os.path.join(os.path.abspath(directory), PARAMS_DIR), abstract_params)
