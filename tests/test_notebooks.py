"""The notebooks in notebooks/, executed end to end on CPU with nbclient, and committed with their outputs cleared.

Each notebook runs in a fresh python3 kernel (ipykernel; jupyter_client starts it with this interpreter) with
JAX_PLATFORMS=cpu, in a temporary working directory, with a time limit per cell. The notebooks use tiny configs or
the embedded demo model and check what matters themselves (an `assert` in a cell fails the run): the sharded logits
equal the unsharded ones (01), the converted checkpoint's logits equal the HF checkpoint's (02), the fine-tuning
loss falls, fully and with LoRA, and the merged LoRA model's logits equal the adapted model's (03). The Cloud TPU
notebook (02) skips its TPU-only cells through its own hardware check and runs its conversion and sampling cells on
a tiny random checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbclient
import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ["01_quickstart_cpu.ipynb", "02_cloud_tpu.ipynb", "03_finetune.ipynb"]
CELL_TIMEOUT_S = 300


def execute(name: str, workdir: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute()  # raises CellExecutionError (with the cell and its traceback) if any cell fails
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    """All stream and text/plain outputs of the executed notebook, in order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("execute_result", "display_data"):
                parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def images_of(nb: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.fixture
def cpu_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")  # the kernel inherits this process's environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
    return tmp_path


def test_notebooks_are_committed_with_outputs_cleared():
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == NOTEBOOKS
    for name in NOTEBOOKS:
        nb = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
        nbformat.validate(nb)
        assert nb.metadata.kernelspec.name == "python3", name
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, f"{name} cell {i} has outputs"


def test_quickstart_cpu(cpu_env: Path):
    nb = execute("01_quickstart_cpu.ipynb", cpu_env)
    text = text_of(nb)
    assert "8 devices" in text
    assert "sharded logits equal the unsharded ones" in text
    assert "tensor=8 is rejected" in text
    assert images_of(nb) >= 1  # the expert-load heatmap


def test_cloud_tpu_on_cpu(cpu_env: Path):
    nb = execute("02_cloud_tpu.ipynb", cpu_env)
    text = text_of(nb)
    assert "ON_TPU = False" in text
    assert "converted checkpoint's logits equal the HF checkpoint's" in text
    assert "sampled on mesh" in text


def test_finetune(cpu_env: Path):
    nb = execute("03_finetune.ipynb", cpu_env)
    text = text_of(nb)
    assert "loss fell from" in text
    assert images_of(nb) >= 2  # the loss curve; full fine-tuning's and LoRA's
    # The runs' metrics, as the notebook saved them: the loss fell, fully fine-tuned and with LoRA adapters.
    metrics = json.loads((cpu_env / "sft_run" / "metrics.json").read_text())
    assert metrics["loss"][-1] < metrics["loss"][0]
    assert metrics["lora_loss"][-1] < metrics["lora_loss"][0] / 4
    assert "the merged model's logits equal the adapted model's" in text
