"""Frozen encoders for evaluation: from a pre-training workdir, untrained, or raw pixels."""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
from etils import epath

from mim_jax import checkpoint, parallel, state as state_lib
from mim_jax.data import pipeline
from mim_jax.methods import get_method
from mim_jax.models import layers, vit


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


def pretrain_config_of(workdir) -> ml_collections.ConfigDict:
    directory = epath.Path(workdir) / "checkpoints"
    # Checked first: orbax would create a missing directory, leaving litter at a mistyped path.
    ckpt = checkpoint.Checkpointer(directory, save_interval_steps=1, max_to_keep=1) if directory.exists() else None
    step = ckpt.latest_step() if ckpt else None
    if step is None:
        raise FileNotFoundError(f"No pre-training checkpoint in {directory}: pass the --workdir "
                                "of a `python -m mim_jax.main --config=configs/<method>.py` run.")
    return ml_collections.ConfigDict(ckpt.restore_config(step))


def restore_pretrained(workdir, mesh):
    """(pre-training config, params, step) of the newest checkpoint in a pre-training workdir,
    restored onto `mesh` whatever mesh it was written on."""
    config = pretrain_config_of(workdir)
    method = get_method(config)
    setup = state_lib.build(config, method, mesh, total_steps=1, warmup_steps=0,
                            global_batch_size=parallel.batch_sharding(mesh).num_devices, load_frozen=False)
    ckpt = checkpoint.Checkpointer(epath.Path(workdir) / "checkpoints", save_interval_steps=1, max_to_keep=1)
    step, state, _ = ckpt.restore(setup.abstract)
    return config, method.eval_params(state.params, state.extras), step


def load(init: str, mesh, *, feature: str = "cls", base_config: ml_collections.ConfigDict | None = None) -> Encoder:
    """`init` is a pre-training workdir (its newest checkpoint), 'random' (the same architecture,
    untrained: needs `base_config`) or 'pixels' (flattened normalised pixels)."""
    if init == "pixels":  # tokens are raw patches (attentive probe), otherwise the whole image
        patch = vit.decode_variant(base_config.model.variant)["patch_size"]
        fn = ((lambda images: layers.patchify(images, patch)) if feature == "patch_tokens"
              else (lambda images: images.reshape(images.shape[0], -1)))
        return Encoder(jax.jit(fn), base_config, "raw pixels")
    if init == "random":
        config, method = base_config, get_method(base_config)
        setup = state_lib.build(config, method, mesh, total_steps=1, warmup_steps=0,
                                global_batch_size=parallel.batch_sharding(mesh).num_devices, load_frozen=False)
        params, description = setup.create(jax.random.key(config.seed)).params, "random init"
    else:
        config, params, step = restore_pretrained(init, mesh)
        method, description = get_method(config), f"{init} @ step {step}"
        logging.info("Loaded encoder from %s", description)
    encode = jax.jit(lambda p, images: select(method.encode(p, images), feature))
    return Encoder(lambda images: encode(params, images), config, description)


def extract(encoder: Encoder, source, mesh, *, batch_size: int, image_size: int, mean, std,
            max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of a whole split (centre view), gathered on the host in order."""
    if max_examples:
        source = _Head(source, max_examples)
    it = pipeline.eval_iterator(source, global_batch_size=batch_size, process_index=jax.process_index(),
                                process_count=jax.process_count(),
                                transform=pipeline.EvalTransform(image_size, mean, std))
    feats, labels = [], []
    for local in it:
        batch = state_lib.host_batch_to_global(local, mesh)
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

