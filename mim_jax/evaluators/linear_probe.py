"""Linear probe (MAE protocol): BatchNorm without affine + a linear layer on frozen features, SGD
momentum 0.9, cosine; a sweep of learning rates trained at once (`probes.py`), widened past an edge where the best
sits, the best reported."""
from __future__ import annotations

from mim_jax.evaluators import probes

SPLITS = ("train", "eval")


def evaluate(config, feats, view, mesh) -> dict:
    num_classes = view.classes(feats)
    (x, y), (x_eval, y_eval) = feats["train"], feats["eval"]
    x, x_eval = probes.standardize(x, x_eval)
    return probes.sweep(probes.LinearHead(num_classes), (x, y), (x_eval, y_eval), prefix="linear",
                        learning_rates=tuple(config.learning_rates), extensions=config.sweep_extensions,
                        epochs=config.epochs, batch_size=config.probe_batch_size, optimizer="sgd", seed=config.seed)
