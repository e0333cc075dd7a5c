"""Attentive probe (CAPI, data2vec 2.0): one cross-attention block with a learned query over the
frozen patch tokens, then a linear classifier; AdamW, cosine; a learning-rate sweep trained at once."""
from __future__ import annotations

from mim_jax.evaluators import probes

SPLITS = ("train", "eval")


def evaluate(config, feats, view, mesh) -> dict:
    num_classes = view.classes(feats)
    (x, y), (x_eval, y_eval) = feats["train"], feats["eval"]
    return probes.sweep(probes.AttentiveHead(num_classes, config.num_heads), (x, y), (x_eval, y_eval),
                        prefix="attentive", learning_rates=tuple(config.learning_rates),
                        extensions=config.sweep_extensions, epochs=config.epochs,
                        batch_size=config.probe_batch_size, optimizer="adamw", weight_decay=config.weight_decay,
                        seed=config.seed)
