"""What every evaluator reports: top-k accuracy of class scores."""
from __future__ import annotations

import numpy as np


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict:
    order = np.argsort(-np.asarray(scores), axis=1)
    labels = np.asarray(labels)[:, None]
    return {f"top{k}": float(np.mean((order[:, :k] == labels).any(axis=1))) for k in ks if k <= order.shape[1]}


def scalars(results: dict) -> dict:
    """The numbers of an evaluator's results (for TensorBoard and metrics.jsonl); results.json
    keeps the rest, such as a probe's whole learning-rate sweep."""
    return {k: float(v) for k, v in results.items() if isinstance(v, (int, float, np.number))}
