"""What the evaluators report: top-k accuracy of class scores; mIoU and pixel accuracy of label maps."""
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


def _scored(truth, predicted, ignore_labels):
    truth, predicted = np.asarray(truth).ravel(), np.asarray(predicted).ravel()
    keep = ~np.isin(truth, ignore_labels)
    return truth[keep].astype(np.int64), predicted[keep].astype(np.int64)


def mean_iou(truth, predicted, ignore_labels=()) -> float:
    """Macro-averaged Jaccard index of per-pixel labels over the classes present in the truth or the
    predictions, pixels whose true label is ignored left out: scikit-learn's
    `jaccard_score(average="macro")` on those pixels, from one confusion matrix."""
    truth, predicted = _scored(truth, predicted, ignore_labels)
    classes = np.union1d(truth, predicted)
    t, p = np.searchsorted(classes, truth), np.searchsorted(classes, predicted)
    confusion = np.bincount(t * len(classes) + p, minlength=len(classes) ** 2).reshape(len(classes), len(classes))
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    return float(np.mean(hits / union)) if len(classes) else 0.0


def pixel_accuracy(truth, predicted, ignore_labels=()) -> float:
    truth, predicted = _scored(truth, predicted, ignore_labels)
    return float(np.mean(truth == predicted)) if len(truth) else 0.0
