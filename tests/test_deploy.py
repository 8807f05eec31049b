"""deploy/kubernetes: every manifest is valid Kubernetes (the schemas of Kubernetes 1.30, via kubernetes-validate,
strict: unknown fields are errors) and every container's command line is one `jaxllm serve` accepts.

The LeaderWorkerSet is a custom resource the Kubernetes schemas do not hold: its pod templates are validated as
PodTemplateSpecs, and the fields around them against the LeaderWorkerSet v1 API (leaderworkerset.x-k8s.io/v1, the
subset of its fields these manifests use, written out below). Nothing here ran on a cluster."""

import copy
import glob
import os
import re
import subprocess
import sys

import jsonschema
import pytest
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFESTS = sorted(glob.glob(os.path.join(HERE, "..", "deploy", "kubernetes", "*.yaml")))
K8S = "1.30.0"

# leaderworkerset.x-k8s.io/v1 LeaderWorkerSetSpec, as its API reference defines the fields used here (the pod
# templates themselves are checked against Kubernetes' PodTemplateSpec).
LWS_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "leaderworkerset.x-k8s.io/v1"},
        "kind": {"const": "LeaderWorkerSet"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["leaderWorkerTemplate"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "startupPolicy": {"enum": ["LeaderCreated", "LeaderReady"]},
                "leaderWorkerTemplate": {
                    "type": "object",
                    "required": ["workerTemplate"],
                    "additionalProperties": False,
                    "properties": {
                        "size": {"type": "integer", "minimum": 1},
                        "restartPolicy": {"enum": ["RecreateGroupOnPodRestart", "None"]},
                        "leaderTemplate": {"type": "object"},
                        "workerTemplate": {"type": "object"},
                    },
                },
            },
        },
    },
}


def documents():
  for path in MANIFESTS:
    with open(path) as f:
      for doc in yaml.safe_load_all(f):
        yield os.path.basename(path), doc


def pod_templates(doc):
  """(where, PodTemplateSpec) of a workload."""
  if doc["kind"] == "LeaderWorkerSet":
    t = doc["spec"]["leaderWorkerTemplate"]
    return [("leaderTemplate", t["leaderTemplate"]), ("workerTemplate", t["workerTemplate"])]
  if doc["kind"] == "Job":
    return [("template", doc["spec"]["template"])]
  return []


def test_the_manifests_are_valid_kubernetes():
  import kubernetes_validate

  kinds = []
  for name, doc in documents():
    kinds.append((name, doc["kind"]))
    if doc["kind"] == "LeaderWorkerSet":
      jsonschema.validate(doc, LWS_SCHEMA)
    else:
      kubernetes_validate.validate(doc, K8S, strict=True)
    for where, template in pod_templates(doc):
      wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{name}-{where}".lower()},
                 "template": template}
      kubernetes_validate.validate(wrapped, K8S, strict=True)
  assert ("leaderworkerset.yaml", "LeaderWorkerSet") in kinds and ("indexed-job.yaml", "Job") in kinds
  assert sum(kind == "Service" for _, kind in kinds) == 3


def test_a_broken_manifest_is_caught():
  """The checks above can fail: an unknown field in a pod template, a wrong type, a bad LeaderWorkerSet policy."""
  import kubernetes_validate

  lws = next(doc for _, doc in documents() if doc["kind"] == "LeaderWorkerSet")
  bad = copy.deepcopy(lws)
  bad["spec"]["leaderWorkerTemplate"]["restartPolicy"] = "Always"
  with pytest.raises(jsonschema.ValidationError):
    jsonschema.validate(bad, LWS_SCHEMA)
  job = next(doc for _, doc in documents() if doc["kind"] == "Job")
  for breakage in (lambda c: c.update(gpus=8), lambda c: c["ports"][0].update(containerPort="8000")):
    bad = copy.deepcopy(job)
    breakage(bad["spec"]["template"]["spec"]["containers"][0])
    with pytest.raises(kubernetes_validate.ValidationError):
      kubernetes_validate.validate(bad, K8S, strict=True)


# The values Kubernetes substitutes for $(VAR) in a container's args (from the LeaderWorkerSet / Job controllers).
ENV = {"LWS_LEADER_ADDRESS": "jaxllm-llama-70b-0.jaxllm-llama-70b.default", "LWS_GROUP_SIZE": "2",
       "LWS_WORKER_INDEX": "1", "JOB_COMPLETION_INDEX": "1"}

CHECK_FLAGS = """
import sys
from absl import flags
from jaxllm.commands import serve  # noqa: F401  (defines serve's flags, with the engine and device ones)
from jaxllm.commands import device_flags, engine_flags
flags.FLAGS(["jaxllm serve", *sys.argv[1:]])
engine_flags.engine_config()
print(flags.FLAGS.mesh, flags.FLAGS.num_processes, flags.FLAGS.process_id)
"""


def test_every_container_runs_a_command_line_jaxllm_serve_accepts():
  lines = {}
  for name, doc in documents():
    for where, template in pod_templates(doc):
      for container in template["spec"]["containers"]:
        assert container["command"] == ["jaxllm", "serve"], (name, where)
        args = [re.sub(r"\$\((\w+)\)", lambda m: ENV[m.group(1)], a) for a in container["args"]]
        r = subprocess.run([sys.executable, "-c", CHECK_FLAGS, *args], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (name, where, r.stderr[-2000:])
        lines[name, where] = r.stdout.split()
  assert lines == {("indexed-job.yaml", "template"): ["model=16", "2", "1"],  # JOB_COMPLETION_INDEX=1 above
                   ("leaderworkerset.yaml", "leaderTemplate"): ["model=16", "2", "0"],
                   ("leaderworkerset.yaml", "workerTemplate"): ["model=16", "2", "1"]}
  r = subprocess.run([sys.executable, "-c", CHECK_FLAGS, "--mesh", "model=16", "--num_proceses", "2"],
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0 and "num_proceses" in r.stderr  # a misspelt flag is caught
