"""Flags every model-loading subcommand shares: the device mesh, its layout, the multi-host start, and the
persistent compilation cache.

    --mesh data=2,model=4 --layout tp                                   # one host
    --mesh model=16 --coordinator_address HOST:PORT --num_processes 2 --process_id 0   # each of two hosts
    --mesh model=64 --distributed                                      # TPU pod / SLURM: jax detects the cluster

`setup()` joins the processes (before anything touches a device) and returns the mesh and layout for `LLM` and the
checkpoint readers; see `jaxllm.sharding.distributed` for the process layout.
"""

from absl import flags

_MESH = flags.DEFINE_string("mesh", None, "Device mesh, e.g. 'model=8', 'data=2,model=4', 'x=2,y=4' or 'auto'; "
                            "default: one device.")
_LAYOUT = flags.DEFINE_enum("layout", None, ["tp", "2d", "dp"], "Sharding layout over the mesh: tp (1D "
                            "weight-stationary over 'model'), 2d (over 'x' and 'y'), dp (replicas over 'data'); "
                            "default: what the mesh's axes name (x / y: 2d, model: tp, data alone: dp).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "Multi-host: HOST:PORT of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's index in [0, num_processes).")
_COMPILATION_CACHE = flags.DEFINE_string("compilation_cache_dir", None, "A directory for jax's persistent "
                                          "compilation cache: programs compiled once are loaded by later runs.")
_QUANTIZATION = flags.DEFINE_enum("quantization", "auto", ["auto", "none", "int8", "q8_0"], "Weight quantization "
                                   "of the attention projections and MLP, at load: int8 (a scale per output channel), "
                                   "q8_0 (a float16 scale per 32 weights, llama.cpp's Q8_0: a Q8_0 GGUF loads "
                                   "bit-exactly) or none (float); auto: q8_0 for a GGUF stored quantized (the default "
                                   "model), float for HF checkpoints, as saved for a `jaxllm convert` directory. "
                                   "Embedding, LM head, norms and biases stay in --dtype.")


def quantization() -> str | None:
  """--quantization as `LLM` / `load_checkpoint` take it ("none" -> None)."""
  return None if _QUANTIZATION.value == "none" else _QUANTIZATION.value


_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Multi-host with the cluster detected by jax (Cloud TPU pods, "
                                 "SLURM, Open MPI) instead of the three flags above.")


def setup():
  """-> (mesh or None, layout). Raises ValueError for a bad multi-host setting or mesh."""
  from jaxllm.sharding import distributed

  if _COMPILATION_CACHE.value:
    from jaxllm.llm import enable_compilation_cache

    enable_compilation_cache(_COMPILATION_CACHE.value)
  joined = distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                                  auto=_DISTRIBUTED.value)
  if joined and not _MESH.value:
    raise ValueError("a multi-process start needs --mesh (e.g. --mesh model=8 over all processes' devices).")
  if not _MESH.value:
    return None, _LAYOUT.value or "tp"
  from jaxllm.sharding import default_layout, make_mesh

  mesh = make_mesh(_MESH.value)
  return mesh, _LAYOUT.value or default_layout(mesh.shape)


def is_primary() -> bool:
  """Whether this process prints results (process 0; every process of a single-host run)."""
  import jax

  return jax.process_index() == 0
