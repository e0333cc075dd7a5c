"""Accuracy of a classifier's own logits (feature='logits', e.g. a fine-tuned model) on the
evaluation split."""
from __future__ import annotations

from mim_jax.evaluators.common import topk_accuracy

SPLITS = ("eval",)


def evaluate(config, feats, view, mesh) -> dict:
    del view, mesh
    logits, labels = feats["eval"]
    return {f"classification_{k}": v for k, v in topk_accuracy(logits, labels).items()}
