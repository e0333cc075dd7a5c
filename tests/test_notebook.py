"""notebooks/quickstart.ipynb runs headless from top to bottom (nbclient, a real Jupyter kernel),
with a few steps instead of a few hundred: pre-training, reconstructions, linear probe, timm export."""
import json
import os
import pathlib
import subprocess

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.slow   # runs the whole notebook (about 3 min)
def test_the_quickstart_notebook_runs_from_top_to_bottom(tmp_path, fashion_mnist_dir, monkeypatch):
    for name, value in dict(QUICKSTART_STEPS="4", QUICKSTART_PROBE_EPOCHS="2", QUICKSTART_PROBE_EXAMPLES="1000",
                            QUICKSTART_INSTALL="0", QUICKSTART_DATA_DIR=fashion_mnist_dir,
                            QUICKSTART_WORKDIR=str(tmp_path), JAX_PLATFORMS="cpu").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("XLA_FLAGS", raising=False)   # one CPU device, as in a plain runtime
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()   # raises on a failing cell
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "step 4/4" in text                           # the trainer's progress line
    assert any("image/png" in o.get("data", {}) for o in outputs)   # the reconstructions, shown
    results = json.loads((tmp_path / "linear" / "results.json").read_text())
    assert f"linear probe top-1: {results['linear_top1']:.1%}" in text and results["linear_top1"] > 0.2
    assert "timm VisionTransformer" in text and "features (1, 50, 192)" in text
    assert (tmp_path / "mae" / "reconstructions.png").stat().st_size > 0
    assert "Given directory is read only" not in text   # orbax's expected warnings stay off the console


def test_the_notebooks_text_agrees_with_the_local_preset():
    from configs import mae
    local = mae.get_config("local")
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    text = "\n".join(cell.source for cell in notebook.cells)
    assert f"# pre-training steps (batch {local.input.batch_size})" in text
    text = " ".join(text.split())    # markdown line breaks are spaces
    assert f"steps of {local.input.batch_size} images" in text and f"One progress line per {local.log_steps} steps" in text


@pytest.mark.parametrize("folder", ["notebooks/quickstart_run", "quickstart_run"])   # Jupyter started there or at the root
def test_the_notebooks_work_folder_is_ignored_by_git(folder):
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/mae/metrics.jsonl"], cwd=ROOT)
    assert ignored.returncode == 0, f"{folder} is not git-ignored"
