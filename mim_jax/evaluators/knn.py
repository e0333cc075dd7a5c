"""Weighted k-nearest-neighbour classification (DINO): cosine similarity on L2-normalised
features, the k best bank entries vote with weight exp(sim / T) for their label.

The bank is sharded over every device along its examples; each device finds its local top-k and
only those k candidates per query are gathered, so memory and compute per device shrink with the
mesh size (ImageNet-size banks fit). The bank is the training split, the queries the evaluation split.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_jax.evaluators.common import topk_accuracy
from mim_jax.models.layers import l2_normalize

SPLITS = ("train", "eval")


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "mesh", "axes"))
def _knn_logits(queries, bank, bank_labels, valid, temperature, *, k, num_classes, mesh, axes):
    def per_shard(q, b, labels, ok):
        sims = jnp.where(ok[None, :], q @ b.T, -jnp.inf)  # padding rows never win
        top, idx = jax.lax.top_k(sims, k)
        lab = labels[idx]
        # Gather every shard's candidates, then keep the global top k.
        top = jax.lax.all_gather(top, axes, axis=1, tiled=True)
        lab = jax.lax.all_gather(lab, axes, axis=1, tiled=True)
        best, pos = jax.lax.top_k(top, k)
        votes = jax.nn.one_hot(jnp.take_along_axis(lab, pos, axis=1), num_classes) * jnp.exp(best / temperature)[..., None]
        return votes.sum(axis=1)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(axes), P(axes), P(axes)), out_specs=P(),
                         check_vma=False)(queries, bank, bank_labels, valid)


class KnnClassifier:
    """Holds a sharded, normalised bank; `predict` returns class scores for query features."""

    def __init__(self, bank: np.ndarray, bank_labels: np.ndarray, num_classes: int, mesh, *,
                 k: int = 20, temperature: float = 0.07):
        self.mesh, self.k, self.temperature, self.num_classes = mesh, k, temperature, num_classes
        self.axes = tuple(mesh.axis_names)
        shards = mesh.size
        pad = (-len(bank)) % shards
        if len(bank) // shards + (pad > 0) < k:
            raise ValueError(f"kNN with k={k} needs at least k bank entries per device ({len(bank)} on {shards}).")
        valid = np.concatenate([np.ones(len(bank), bool), np.zeros(pad, bool)])
        bank = np.concatenate([np.asarray(bank, np.float32), np.zeros((pad, bank.shape[1]), np.float32)])
        labels = np.concatenate([np.asarray(bank_labels, np.int32), np.zeros(pad, np.int32)])
        sharding = NamedSharding(mesh, P(self.axes))
        self.bank = jax.device_put(l2_normalize(jnp.asarray(bank)), sharding)
        self.labels = jax.device_put(labels, sharding)
        self.valid = jax.device_put(valid, sharding)

    def predict(self, queries: np.ndarray) -> jax.Array:
        q = l2_normalize(jnp.asarray(queries, jnp.float32))
        return _knn_logits(q, self.bank, self.labels, self.valid, self.temperature, k=self.k,
                           num_classes=self.num_classes, mesh=self.mesh, axes=self.axes)


def evaluate(config, feats, num_classes, mesh) -> dict:
    (bank, bank_labels), (queries, labels) = feats["train"], feats["eval"]
    classifier = KnnClassifier(bank, bank_labels, num_classes=num_classes, mesh=mesh, k=config.k,
                               temperature=config.temperature)
    scores = np.concatenate([np.asarray(classifier.predict(queries[i:i + 1024])) for i in range(0, len(queries), 1024)])
    return {f"knn_{k}": v for k, v in topk_accuracy(scores, labels).items()}
