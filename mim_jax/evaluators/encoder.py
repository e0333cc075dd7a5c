"""Frozen encoders for evaluation: from a pre-training workdir, untrained, or raw pixels."""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from mim_jax import parallel, pretrained
from mim_jax.data import pipeline
from mim_jax.models import layers, vit
from mim_jax.runtime import console


@dataclasses.dataclass
class Encoder:
    """`features(images) -> [B, D]` on the mesh, plus the pre-training config it came from."""
    features: Callable
    config: ml_collections.ConfigDict
    description: str


def select(out: dict, feature: str) -> jax.Array:
    parts = feature.split("+")
    missing = [p for p in parts if p not in out]
    if missing:
        raise ValueError(f"Feature {missing} not produced by this encoder; available: {sorted(out)}.")
    return jnp.concatenate([out[p].astype(jnp.float32) for p in parts], axis=-1)


def pixel_features(images, patch_size: int) -> dict:
    """Raw pixels in the shape of an encoder's outputs (the `init=pixels` baseline): every global
    feature is the flattened normalised image, the tokens are its patches."""
    flat = images.reshape(images.shape[0], -1)
    return {"cls": flat, "patch_mean": flat, "patch_tokens": layers.patchify(images, patch_size)}


def load(init: str, mesh, *, feature: str = "cls", base_config: ml_collections.ConfigDict | None = None) -> Encoder:
    """`init` is a pre-training workdir (its newest checkpoint), 'random' (the same architecture,
    untrained: needs `base_config`) or 'pixels' (raw normalised pixels: needs `base_config`)."""
    if init == "pixels":
        patch = vit.decode_variant(base_config.model.variant)["patch_size"]
        fn = jax.jit(lambda images: select(pixel_features(images, patch), feature))
        return Encoder(fn, base_config, "raw pixels")
    weights = pretrained.random_init(base_config, mesh) if init == "random" else pretrained.load(init, mesh)
    sharding = parallel.Sharding.of(weights.config, mesh)
    encode = sharding.jit(lambda p, images: select(weights.method.encode(p, images), feature))
    return Encoder(lambda images: encode(weights.params, images), weights.config, weights.description)


def extraction_batch(batch_size: int, mesh) -> int:
    """`batch_size` rounded up to a multiple of the devices that share a batch and of the processes:
    on a slice with more devices than an evaluation's batch (512 TPU chips, batch 256) each device
    takes at least one image a step (the padding is masked out)."""
    n = math.lcm(parallel.batch_sharding(mesh).num_devices, jax.process_count())
    return -(-batch_size // n) * n


def extract(encoder: Encoder, source, mesh, *, batch_size: int, transform, max_examples: int | None = None,
            what: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a whole split (the views `transform` makes: the centre view, or an
    image and its label map), gathered on the host in order, `batch_size` images a step (rounded
    up by `extraction_batch`); a long pass logs its progress as `what: n/N images`."""
    if max_examples:
        source = _Head(source, max_examples)
    it = pipeline.eval_iterator(source, global_batch_size=extraction_batch(batch_size, mesh), process_index=jax.process_index(),
                                process_count=jax.process_count(), transform=transform)
    progress = console.Progress(what, len(source), "images")
    feats, labels = [], []
    for local in it:
        progress.update(sum(len(f) for f in feats))
        batch = parallel.host_batch_to_global(local, mesh)
        out = multihost_utils.process_allgather(encoder.features(batch["image"]), tiled=True)
        keep = multihost_utils.process_allgather(local["_mask"], tiled=True)
        lab = multihost_utils.process_allgather(local["label"], tiled=True)
        feats.append(np.asarray(out)[keep])
        labels.append(np.asarray(lab)[keep])
    return np.concatenate(feats), np.concatenate(labels)


class _Head:
    """The first n examples of a source (quick evaluations during pre-training)."""

    def __init__(self, source, n):
        self.source, self.n = source, min(n, len(source))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.source[i]

