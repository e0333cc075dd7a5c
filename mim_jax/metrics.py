"""Metric writers: TensorBoard + JSON lines + log lines (host 0 only)."""
from __future__ import annotations

import json

import jax
import numpy as np
from clu import metric_writers
from etils import epath


class JsonlWriter(metric_writers.MetricWriter):
    """One JSON object per write: {"step": s, name: value, ...}, easy to load into pandas."""

    def __init__(self, path):
        self._file = epath.Path(path).open("a")

    def write_scalars(self, step, scalars):
        row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")

    def write_hparams(self, hparams):
        self._file.write(json.dumps({"hparams": {k: str(v) for k, v in hparams.items()}}) + "\n")

    # Non-scalar summaries are TensorBoard's business.
    def write_summaries(self, step, values, metadata=None): pass
    def write_images(self, step, images): pass
    def write_videos(self, step, videos): pass
    def write_audios(self, step, audios, *, sample_rate): pass
    def write_texts(self, step, texts): pass
    def write_histograms(self, step, arrays, num_buckets=None): pass

    def flush(self):
        self._file.flush()

    def close(self):
        self._file.close()


def create_writer(workdir) -> metric_writers.MetricWriter:
    """TensorBoard events + log lines (clu) and `metrics.jsonl` on host 0; log lines elsewhere."""
    if jax.process_index() > 0:
        return metric_writers.create_default_writer(workdir, just_logging=True)
    default = metric_writers.create_default_writer(workdir, asynchronous=True)
    return metric_writers.MultiWriter([default, JsonlWriter(epath.Path(workdir) / "metrics.jsonl")])


def to_host_scalars(metric_list) -> dict:
    """Averages a list of per-step metric dicts (device scalars) over the logging interval."""
    fetched = jax.device_get(metric_list)
    return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
