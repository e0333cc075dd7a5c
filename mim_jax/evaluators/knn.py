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


def nearest(queries, bank, bank_values, valid, *, k: int, mesh, axes):
    """The k highest scores `queries @ bank.T` over a bank sharded along its rows on `axes`, and the
    bank values (labels, or label vectors) of those k: each device finds its local top k and only
    those k candidates per query are gathered (padding rows, `valid` False, never win)."""
    def per_shard(q, b, values, ok):
        scores = jnp.where(ok[None, :], q @ b.T, -jnp.inf)
        top, idx = jax.lax.top_k(scores, k)
        top = jax.lax.all_gather(top, axes, axis=1, tiled=True)
        values = jax.lax.all_gather(values[idx], axes, axis=1, tiled=True)
        best, pos = jax.lax.top_k(top, k)
        pos = pos.reshape(pos.shape + (1,) * (values.ndim - 2))
        return best, jnp.take_along_axis(values, pos, axis=1)

    return jax.shard_map(per_shard, mesh=mesh, in_specs=(P(), P(axes), P(axes), P(axes)), out_specs=(P(), P()),
                         check_vma=False)(queries, bank, bank_values, valid)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "mesh", "axes"))
def _knn_logits(queries, bank, bank_labels, valid, temperature, *, k, num_classes, mesh, axes):
    best, labels = nearest(queries, bank, bank_labels, valid, k=k, mesh=mesh, axes=axes)
    votes = jax.nn.one_hot(labels, num_classes) * jnp.exp(best / temperature)[..., None]
    return votes.sum(axis=1)


def shard_rows(mesh, *arrays):
    """`arrays` (same length) padded to a multiple of the mesh size and placed along every mesh
    axis, plus the sharded `valid` mask of the real rows."""
    axes = tuple(mesh.axis_names)
    n = len(arrays[0])
    pad = (-n) % mesh.size
    sharding = NamedSharding(mesh, P(axes))
    padded = [np.concatenate([np.asarray(a), np.zeros((pad,) + np.shape(a)[1:], np.asarray(a).dtype)]) for a in arrays]
    valid = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
    return [jax.device_put(a, sharding) for a in padded] + [jax.device_put(valid, sharding)]


class KnnClassifier:
    """Holds a sharded, normalised bank; `predict` returns class scores for query features."""

    def __init__(self, bank: np.ndarray, bank_labels: np.ndarray, num_classes: int, mesh, *,
                 k: int = 20, temperature: float = 0.07):
        self.mesh, self.k, self.temperature, self.num_classes = mesh, k, temperature, num_classes
        self.axes = tuple(mesh.axis_names)
        if -(-len(bank) // mesh.size) < k:
            raise ValueError(f"kNN with k={k} needs at least k bank entries per device ({len(bank)} on {mesh.size}).")
        bank = np.asarray(l2_normalize(jnp.asarray(bank, jnp.float32)))
        self.bank, self.labels, self.valid = shard_rows(mesh, bank, np.asarray(bank_labels, np.int32))

    def predict(self, queries: np.ndarray) -> jax.Array:
        q = l2_normalize(jnp.asarray(queries, jnp.float32))
        return _knn_logits(q, self.bank, self.labels, self.valid, self.temperature, k=self.k,
                           num_classes=self.num_classes, mesh=self.mesh, axes=self.axes)


def evaluate(config, feats, view, mesh) -> dict:
    num_classes = view.classes(feats)
    (bank, bank_labels), (queries, labels) = feats["train"], feats["eval"]
    classifier = KnnClassifier(bank, bank_labels, num_classes=num_classes, mesh=mesh, k=config.k,
                               temperature=config.temperature)
    scores = np.concatenate([np.asarray(classifier.predict(queries[i:i + 1024])) for i in range(0, len(queries), 1024)])
    return {f"knn_{k}": v for k, v in topk_accuracy(scores, labels).items()}
