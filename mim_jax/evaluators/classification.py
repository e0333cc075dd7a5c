"""Accuracy of a classifier's own logits (feature='logits', e.g. a fine-tuned model) on the
evaluation split."""
from __future__ import annotations

from mim_jax.evaluators.common import topk_accuracy

SPLITS = ("eval",)


def evaluate(config, feats, num_classes, mesh) -> dict:
    logits, labels = feats["eval"]
    return {f"classification_{k}": v for k, v in topk_accuracy(logits, labels).items()}
