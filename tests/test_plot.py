"""The training plot of a workdir's metrics."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_plot_writes_a_png_of_loss_and_probe_accuracy(tmp_path):
    import json

    from mim_jax import plot
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 11)] + [{"step": 5, "eval/knn/knn_top1": 0.5},
                                                                   {"step": 10, "eval/knn/knn_top1": 0.7}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = plot.plot(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_the_quick_start_install_has_the_plots_dependency():
    requirements = (ROOT / "requirements.txt").read_text().splitlines()
    assert any(line.split("#")[0].strip().startswith("matplotlib") for line in requirements)


@pytest.mark.parametrize("hide_matplotlib, message", [
    (True, "Plotting needs matplotlib (in requirements.txt): pip install matplotlib"),
    (False, "metrics.jsonl not found: pass the --workdir of a pre-training run.")])
def test_plot_errors_are_one_line(tmp_path, hide_matplotlib, message):
    if hide_matplotlib:
        (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    hide = "import sys; sys.modules['matplotlib'] = None; " if hide_matplotlib else ""
    out = subprocess.run([sys.executable, "-c", f"{hide}import runpy, sys; sys.argv = ['plot', {str(tmp_path)!r}]; "
                          "runpy.run_module('mim_jax.plot', run_name='__main__')"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr
    assert message in out.stderr
