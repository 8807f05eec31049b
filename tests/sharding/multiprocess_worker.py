"""One of two processes x 4 CPU devices joined with `jax.distributed.initialize` on loopback (see test_sharding.py).

    python multiprocess_worker.py PROCESS_ID PORT   -> process 0 prints one JSON line: logits and greedy tokens
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

from jaxllm.sharding import distributed  # noqa: E402  (before anything starts a jax backend)

distributed.initialize(f"127.0.0.1:{sys.argv[2]}", num_processes=2, process_id=int(sys.argv[1]))

import json  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from jaxllm import checkpoint  # noqa: E402
from jaxllm.layers import Llama  # noqa: E402
from jaxllm.sharding import make_mesh  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(os.path.dirname(HERE))]  # common.py, and the repo root for tests.oracle
from common import TINY_8_2, greedy, inputs  # noqa: E402
from tests.oracle import Generator  # noqa: E402


def main():
  assert (jax.process_count(), len(jax.devices()), len(jax.local_devices())) == (2, 8, 4)
  tokens, prompts = inputs()
  params = jax.tree.map(np.asarray, nnx.state(Llama(TINY_8_2, rngs=nnx.Rngs(2)), nnx.Param).to_pure_dict())
  out = {"runs": []}
  for spec, layout in (("model=8", "tp"), ("data=2,model=4", "tp")):
    mesh = make_mesh(spec)  # process 0's four devices first: `data` splits across the two processes
    g = Generator(checkpoint.build_model(TINY_8_2, params, "float32", mesh, layout), mesh=mesh)
    toks, _ = g.generate(prompts, [6] * 8, greedy(8), lambda i, t: False, max_len=64)
    out["runs"].append({"mesh": spec, "logits": g.logits(tokens).tolist(), "tokens": toks})
  if jax.process_index() == 0:
    print(json.dumps(out))


if __name__ == "__main__":
  main()
