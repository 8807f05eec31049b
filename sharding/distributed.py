"""Multi-host start: one process per host (or per group of local devices), joined by `jax.distributed.initialize`.

    jaxllm generate --mesh model=8 --coordinator_address 10.0.0.1:1234 --num_processes 2 --process_id 0  # host 0
    jaxllm generate --mesh model=8 --coordinator_address 10.0.0.1:1234 --num_processes 2 --process_id 1  # host 1
    jaxllm generate --mesh model=8 --distributed     # Cloud TPU pod / SLURM / Open MPI: jax detects the layout itself

Process layout: every process runs the same program with the same flags (only --process_id differs) and sees all
devices of all processes in `jax.devices()`; a mesh built from them spans hosts, process 0's devices first. Each
process loads the checkpoint itself and places only the shards its own devices hold (`make_array_from_callback`), so
the checkpoint must be readable on every host. Inputs (prompts, sampling settings) must be identical on every process;
outputs are gathered so every process sees the same tokens, and by convention only process 0 prints or serves.

On CPU, cross-process collectives go through gloo (set here before any backend starts); on GPU and TPU jax uses the
platform's own (NCCL, ICI/DCN). `initialize` must run before anything touches a jax device.
"""

from __future__ import annotations

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False) -> bool:
  """Joins this process to the others; returns True if it did (False: nothing asked for a multi-process start).

  `auto=True` with no address lets jax detect the cluster (Cloud TPU, SLURM, Open MPI). Otherwise all three of
  `coordinator_address` (HOST:PORT of process 0), `num_processes` and `process_id` are required.
  """
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
  if not auto and all(v is None for v in given.values()):
    return False
  if not auto:
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(f"a multi-process start needs coordinator_address, num_processes and process_id together; "
                       f"missing {', '.join(missing)} (or use --distributed to let jax detect the cluster).")
    host, sep, port = coordinator_address.rpartition(":")
    if not sep or not host or not port.isdigit():
      raise ValueError(f"coordinator_address {coordinator_address!r} is not HOST:PORT (e.g. 10.0.0.1:1234).")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"process_id must be in [0, num_processes): got process_id={process_id}, "
                       f"num_processes={num_processes}.")
  # Only the CPU backend reads this; GPU and TPU hosts keep their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**{k: v for k, v in given.items() if v is not None})
  return True


def host_value(x):
  """A jax array as numpy on every process; an array spread over other processes' devices is gathered first."""
  import numpy as np

  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
