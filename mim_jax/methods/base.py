"""The interface a pre-training method implements; the trainer knows nothing else about methods.

A method owns:
- `params`: the trainable pytree (student, decoders, heads), created by `init_params`;
- `extras`: non-trainable state that evolves during training (an EMA teacher, momentum heads,
  BatchNorm statistics, per-image ContrastiveCrop boxes), created by `init_extras` and advanced by
  `update_extras` after every optimizer step; it is checkpointed and sharded like params;
- `frozen`: weights that never change (a CLIP teacher), described by `init_frozen` (so the trainer
  can shard it) and filled by `load_frozen`; no gradients, no optimizer state, not checkpointed;
- its loss, with metrics, computed inside the jitted, sharded train step (masks are sampled there);
- its host-side data transform (views, degradations), run in the Grain workers;
- its analytic training FLOPs per example, for MFU.
Global-batch operations (Sinkhorn-Knopp column sums, contrastive negatives) are written as plain
jnp over the global batch axis: under `jax.jit` with a sharded batch XLA inserts the collectives.
"""
from __future__ import annotations

import abc
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax.data import pipeline

PyTree = Any


class Method(abc.ABC):
    """Base class: subclasses are registered in `mim_jax.methods.REGISTRY` by name."""

    # The ViT whose features evaluators read and other runs distil from (`params["encoder"]`);
    # None for a method without one.
    encoder: nn.Module | None = None

    def __init__(self, config: ml_collections.ConfigDict):
        self.config = config

    # -- state ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def init_params(self, rng: jax.Array, batch: dict) -> PyTree:
        """Trainable params (may keep flax logical-partitioning boxes)."""

    def init_extras(self, rng: jax.Array, params: PyTree, batch: dict) -> PyTree:
        return {}

    def init_variables(self, rng: jax.Array, batch: dict) -> tuple[PyTree, PyTree]:
        """(params, extras) of a fresh run: what the trainer creates and a checkpoint restores into."""
        params = self.init_params(rng, batch)
        return params, self.init_extras(jax.random.fold_in(rng, 1), params, batch)

    def init_frozen(self, rng: jax.Array, batch: dict) -> PyTree:
        """Template (shapes and logical axes) of the frozen weights; traced abstractly only."""
        return {}

    def load_frozen(self, abstract: PyTree, shardings: PyTree) -> PyTree:
        """Loads the frozen weights onto `shardings`; must fail clearly if the weights are missing."""
        return {}

    # -- step ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, params: PyTree, extras: PyTree, frozen: PyTree, batch: dict, rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, dict]:
        """Returns (scalar loss, metrics). `rng` is the run's key: per-example randomness (masks)
        comes from `batch['index']` via `self.example_keys`, per-step randomness (drop path) from
        `jax.random.fold_in(rng, step)`, so both are mesh- and resume-invariant."""

    def update_extras(self, extras: PyTree, params: PyTree, step: jax.Array, lr: jax.Array) -> PyTree:
        """After each optimizer step, from the updated params; `lr` is this step's learning rate
        (CAPI's EMA momentum is 1 - lr)."""
        return extras

    # -- host side -----------------------------------------------------------------------------
    def batch_spec(self, global_batch_size: int) -> dict:
        """Shapes of one global batch as `train_transform` delivers it (Beyond Masking's images are
        a wider view than the encoder's input)."""
        inp = self.config.input
        return {"image": jax.ShapeDtypeStruct((global_batch_size, inp.image_size, inp.image_size, inp.channels),
                                              jnp.float32),
                "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32),
                "index": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}

    def train_transform(self, image_size: int | None = None) -> Callable:
        inp = self.config.input
        return pipeline.pretrain_transform(
            image_size=image_size or inp.image_size, crop_scale=tuple(inp.crop_scale), crop_ratio=tuple(inp.crop_ratio),
            flip=inp.flip, mean=tuple(inp.mean), std=tuple(inp.std), color_jitter=inp.get("color_jitter", 0.0),
            interpolation=inp.get("interpolation", "auto"))

    # -- accounting and features ---------------------------------------------------------------
    @abc.abstractmethod
    def train_flops_per_example(self) -> float:
        """Analytic FLOPs of one training step per example (forward + backward)."""

    @abc.abstractmethod
    def encode(self, params: PyTree, images: jax.Array) -> dict:
        """Features of the pre-trained encoder on full images, for evaluators."""

    def eval_params(self, params: PyTree, extras: PyTree) -> PyTree:
        """The weights a finished run is evaluated with (CAPI: the EMA teacher's); periodic
        evaluations during training use the trained params, as the official codes do."""
        return params

    def example_keys(self, rng_seed: jax.Array, batch: dict, purpose: int = 0) -> jax.Array:
        """One key per example from the run seed and the global example index (not the step)."""
        from mim_jax import masking
        return masking.example_keys(jax.random.fold_in(rng_seed, purpose), batch["index"])
