"""`jaxllm plan --model llama3-70b --mesh model=8`: weight and KV bytes per device, the batch x context that fits in
HBM and the collectives per layer of a layout, as a table (or JSON with --json). Arithmetic only: nothing is loaded.

Flags -> `jaxllm.sharding.planner.plan` -> `format_plan` (or `Plan.to_dict`) on stdout; a bad value is one line on
stderr and exit status 1.
"""

import json

from absl import flags

from jaxllm.commands import fail

_MODEL = flags.DEFINE_string("model", None, "A preset name (configs/models.toml, exact) or a path to an HF "
                             "config.json.")
_MESH = flags.DEFINE_string("mesh", "model=1", "Mesh axes AXIS=SIZE, comma separated: 'model=8', 'data=2,model=4' "
                            "(layout tp), 'x=2,y=4' (layout 2d) or 'data=8' (layout dp).")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Parameter (and activation) dtype: float32 or bfloat16 (auto: "
                             "bfloat16, what the model commands load on a GPU / TPU).")
_KV_CACHE_DTYPE = flags.DEFINE_enum("kv_cache_dtype", "auto", ["auto", "int8", "fp8"], "KV-cache storage, as the "
                                    "engine's flag: auto (--dtype), int8 or fp8 (1 B per element plus a float32 scale "
                                    "per token and KV head).")
_MAX_MODEL_LEN = flags.DEFINE_integer("max_model_len", None, "Context length to plan for (default: the model's "
                                      "max_position_embeddings).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 80.0, "Accelerator memory per device, GiB.")
_RESERVE = flags.DEFINE_float("reserve", 0.1, "Fraction of HBM kept for activations and workspace.")
_LAYOUT = flags.DEFINE_enum("layout", None, ["tp", "2d", "dp"], "tp: 1D weight-stationary over 'model'; 2d: 2D "
                            "weight-stationary over 'x' and 'y'; dp: replicas over 'data' only (default: from the "
                            "axes --mesh names).")
_KV_PLACEMENT = flags.DEFINE_enum("kv_placement", "runtime", ["runtime", "batch"], "runtime: KV heads as jaxllm "
                                  "places them (split, or replicated at load when they do not divide the head axis); "
                                  "batch: what-if of Pope et al.'s batch-sharded KV cache for that case.")
_QUANTIZATION = flags.DEFINE_enum("quantization", None, ["int8", "q8_0"], "Weight quantization to plan for: int8 "
                                   "or q8_0 (attention projections and MLP; embedding, LM head, norms stay in "
                                   "--dtype).")
_DEVICES_PER_HOST = flags.DEFINE_integer("devices_per_host", None, "For a multi-host mesh: the devices each host "
                                         "has (e.g. 8 GPUs, 4 TPU v5e chips); adds the per-host memory.")
_JSON = flags.DEFINE_bool("json", False, "Print the plan as JSON instead of a table.")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; pass everything as --flags.")
  if not _MODEL.value:
    fail("--model is required (a preset name such as llama3-70b, or a path to an HF config.json).")
  from jaxllm.sharding import default_layout, planner

  try:
    config = planner.load_model_config(_MODEL.value)
    mesh = planner.parse_mesh(_MESH.value)
    layout = _LAYOUT.value or default_layout(mesh)
    if not _HBM_GIB.value > 0:
      raise ValueError(f"--hbm_gib must be > 0, got {_HBM_GIB.value}.")
    max_len = config.max_position_embeddings if _MAX_MODEL_LEN.value is None else _MAX_MODEL_LEN.value
    p = planner.plan(config, mesh, _DTYPE.value, max_len, int(_HBM_GIB.value * planner.GiB), layout,
                     kv_cache_dtype=_KV_CACHE_DTYPE.value, reserve=_RESERVE.value, kv_placement=_KV_PLACEMENT.value,
                     quantization=_QUANTIZATION.value, devices_per_host=_DEVICES_PER_HOST.value)
  except (ValueError, OSError) as e:
    fail(str(e))
  print(json.dumps(p.to_dict(), indent=2) if _JSON.value else planner.format_plan(p))
