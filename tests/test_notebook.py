"""notebooks/quickstart.ipynb runs top to bottom on CPU in a real Jupyter kernel (nbclient), and its plots render."""

import os

import nbformat
import pytest

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(__file__)), "notebooks", "quickstart.ipynb")


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_executes_and_draws_its_plots(monkeypatch):
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOK, as_version=4)
  # The kernel inherits this environment: CPU, small generations, and the test session's compilation cache.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("QUICKSTART_MAX_TOKENS", "8")
  monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError, naming the cell, on any error
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
  assert len(images) == 2  # per-token logprobs, and tokens/s vs batch size
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "The capital of France is" in text and "tokens/s" in text
  reprs = [o["data"]["text/plain"] for o in outputs if o.output_type == "execute_result"]
  assert any(r.startswith("LLM('") and "KV cache" in r and "mesh=" in r for r in reprs), reprs


@pytest.mark.parametrize("kwargs,message", [
    ({"model": "defualt"}, "Did you mean 'default'?"),
    ({"model": "default", "dtype": "bf16"}, "Did you mean 'bfloat16'?"),
])
def test_common_mistakes_get_a_suggestion(kwargs, message):
  from jaxllm import LLM

  with pytest.raises((ValueError, FileNotFoundError), match=message):
    LLM(**kwargs)


def test_a_mistyped_path_suggests_the_close_names(tmp_path):
  from jaxllm import LLM

  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match="Did you mean '.*models/SmolLM2-135M-Instruct.Q4_1.gguf'"):
    LLM(str(tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.ggfu"))
  with pytest.raises(FileNotFoundError, match="Did you mean '.*/models/SmolLM2-135M-Instruct.Q4_1.gguf'"):
    LLM(str(tmp_path / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
