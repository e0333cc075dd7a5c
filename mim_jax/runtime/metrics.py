"""Metric writers: TensorBoard + JSON lines + log lines (host 0 only)."""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from clu import metric_writers
from etils import epath

from mim_jax.runtime.console import duration


class JsonlWriter(metric_writers.MetricWriter):
    """One JSON object per write: {"step": s, name: value, ...}, easy to load into pandas.

    Each row is appended by its own open and close: a kill loses at most the row being written,
    and a file deleted mid-run is created again. `resumed_at=N` first drops the rows past step N
    (logged after the checkpoint a run resumes from, they are logged again), so every step appears
    once; `resumed_at=0`, a fresh start, drops them all (the hparams are written again).
    """

    def __init__(self, path, resumed_at: int | None = None):
        self._path = epath.Path(path)
        if resumed_at is not None and self._path.exists():
            _drop_rows_after(self._path, resumed_at)

    def _append(self, row: dict):
        with self._path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write_scalars(self, step, scalars):
        self._append({"step": int(step), **{k: float(v) for k, v in scalars.items()}})

    def write_hparams(self, hparams):
        self._append({"hparams": {k: str(v) for k, v in hparams.items()}})

    # Non-scalar summaries are TensorBoard's business.
    def write_summaries(self, step, values, metadata=None): pass
    def write_images(self, step, images): pass
    def write_videos(self, step, videos): pass
    def write_audios(self, step, audios, *, sample_rate): pass
    def write_texts(self, step, texts): pass
    def write_histograms(self, step, arrays, num_buckets=None): pass

    def flush(self): pass   # every row is written when it comes
    def close(self): pass


def _drop_rows_after(path: epath.Path, step: int):
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a row cut short by a kill
            row = None
        if isinstance(row, dict) and step > 0 and row.get("step", 0) <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.parent / f"{path.name}.tmp"
        tmp.write_text("".join(kept))
        tmp.replace(path)  # atomic: a kill leaves either the old or the new file
        logging.info("%s: dropped %d rows past step %d, the step this run starts from.", path, dropped, step)


def create_writer(workdir, *, resumed_at: int | None = None) -> metric_writers.MetricWriter:
    """TensorBoard events and `metrics.jsonl` on host 0 (other hosts write nothing: the values
    are global). The console gets `progress_line`s instead of one line per scalar.
    `resumed_at`: the step training starts from, see JsonlWriter."""
    if jax.process_index() > 0:
        return metric_writers.MultiWriter([])
    events = metric_writers.AsyncWriter(metric_writers.SummaryWriter(os.fspath(workdir)))
    return metric_writers.MultiWriter([events, JsonlWriter(epath.Path(workdir) / "metrics.jsonl", resumed_at)])


def progress_line(step: int, total: int, scalars: dict, eval_s: float = 0.0, evals_untimed: int = 0) -> str:
    """`step 120/938  loss 0.8123 (mae_loss 0.8123)  1,234 img/s  MFU 31.5%  ETA 12m05s`: the
    loss terms, throughput and the time left: the steps left at this interval's pace plus
    `eval_s`, what the evaluations still to run will take; `evals_untimed` more evaluations whose
    cost is not known yet (none has run) are named instead (`ETA 12m05s + 4 evaluations`)."""
    terms = [k for k in scalars if k.endswith("_loss")]
    loss = f"loss {scalars['loss']:.4g}" if "loss" in scalars else ""
    if terms and terms != ["loss"]:
        loss += " (" + ", ".join(f"{k} {scalars[k]:.4g}" for k in terms) + ")"
    parts = [f"step {step}/{total}", loss]
    if "images_per_s" in scalars:
        parts.append(f"{scalars['images_per_s']:,.0f} img/s")
    if "mfu" in scalars:
        parts.append(f"MFU {100 * scalars['mfu']:.1f}%")
    if "step_time_s" in scalars:
        eta = f"ETA {duration(scalars['step_time_s'] * max(total - step, 0) + eval_s)}"
        if evals_untimed:
            eta += f" + {evals_untimed} evaluation{'s' if evals_untimed > 1 else ''}"
        parts.append(eta)
    return "  ".join(p for p in parts if p)


def to_host_scalars(metric_list) -> dict:
    """Averages a list of per-step metric dicts (device scalars) over the logging interval."""
    fetched = jax.device_get(metric_list)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
