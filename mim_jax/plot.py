"""Plots pre-training loss and periodic probe accuracy against steps from a workdir's metrics.

  python -m mim_jax.plot /tmp/mae_local        # writes /tmp/mae_local/training.png
"""
from __future__ import annotations

import json
import pathlib
import sys


def load_metrics(workdir) -> list[dict]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass the --workdir of a pre-training run.")
    return [row for row in map(json.loads, path.read_text().splitlines()) if "step" in row]


def plot(workdir, output=None) -> pathlib.Path:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("Plotting needs matplotlib (in requirements.txt): pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_metrics(workdir)
    losses = sorted((r["step"], r["loss"]) for r in rows if "loss" in r)
    accuracy = sorted({k for r in rows for k in r if k.startswith("eval/") and k.endswith("top1")})
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*losses), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if accuracy:
        ax2 = ax.twinx()
        for name in accuracy:
            points = sorted((r["step"], r[name]) for r in rows if name in r)
            ax2.plot(*zip(*points), marker="o", label=name.removeprefix("eval/"))
        ax2.set_ylabel("top-1 accuracy")
        ax2.legend(loc="center right")
    ax.set_title(pathlib.Path(workdir).name)
    fig.tight_layout()
    output = pathlib.Path(output or pathlib.Path(workdir) / "training.png")
    fig.savefig(output, dpi=120)
    return output


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m mim_jax.plot WORKDIR")
    try:
        print(plot(sys.argv[1]))
    except FileNotFoundError as e:   # no metrics.jsonl: the message says which workdir to pass
        sys.exit(str(e))
