"""What every evaluator reports: top-k accuracy of class scores."""
from __future__ import annotations

import numpy as np


def topk_accuracy(scores, labels, ks=(1, 5)) -> dict:
    order = np.argsort(-np.asarray(scores), axis=1)
    labels = np.asarray(labels)[:, None]
    return {f"top{k}": float(np.mean((order[:, :k] == labels).any(axis=1))) for k in ks if k <= order.shape[1]}
