"""The interface a pre-training method implements; the trainer knows nothing else about methods.

A method owns:
- `params`: the trainable pytree (student, decoders, heads), created by `init_params`;
- `extras`: non-trainable state that evolves during training (an EMA teacher, momentum heads,
  BatchNorm statistics, per-image ContrastiveCrop boxes), created by `init_extras`, changed by the
  forward pass and by the `ema` and `refresh` components; checkpointed and sharded like params;
- its loss, with metrics and the extras as its forward pass leaves them, computed inside the
  jitted, sharded train step (masks are sampled there);
- its host-side data transform (views, degradations), run in the Grain workers;
- its analytic training FLOPs per example, for MFU, and its features for evaluators (`encode`).
Optional capabilities are components: attributes that are None or an object the method builds,
with one of the small protocols below (`frozen`, `ema`, `refresh`, `host_state`,
`reconstructions`); the trainer, evaluators and exports ask whether a method has one.
Global-batch operations (Sinkhorn-Knopp column sums, contrastive negatives) are written as plain
jnp over the global batch axis: under `jax.jit` with a sharded batch XLA inserts the collectives.
A method with such an operation declares it (`inexact_accumulation`, a sentence saying what would
change): with gradient accumulation (`config.grad_accum_steps`) its loss would see only a
micro-batch, and the trainer refuses to run it that way unless told to
(`config.allow_inexact_accumulation`).
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mim_jax import parallel
from mim_jax.data import pipeline

PyTree = Any

class RefreshInterrupted(Exception):
    """`Refresh.run` stopped early because `should_stop()` said so (a preemption notice): the
    extras are unchanged and the refresh has to be done again."""

    def __init__(self, done: int, total: int):
        super().__init__(f"refresh stopped after {done} of {total} examples")
        self.done, self.total = done, total


class Component:
    """Base of the components a method builds: each reads what it needs from its method."""

    def __init__(self, method: Method):
        self.method = method


class FrozenWeights(Protocol):
    """`Method.frozen`: weights that never change (CAE v2's CLIP teacher), sharded like params, with
    no gradients, optimizer state or checkpoint. `template`: their shapes and logical axes, traced
    abstractly only; `load`: the weights on `shardings`, failing clearly when they are missing."""
    def template(self, rng: jax.Array, batch: dict) -> PyTree: ...
    def load(self, abstract: PyTree, shardings: PyTree) -> PyTree: ...


class EvaluatedEMA(Protocol):
    """`Method.ema`: an EMA of trained weights in the extras (CAPI's teacher). `update`: the extras
    after an optimizer step, from the updated params and that step's learning rate (CAPI's
    momentum is 1 - lr); `weights`: what a finished run is evaluated with (so evaluation restores
    the extras too; periodic evaluations during training read the params, as the official codes do)."""
    def update(self, extras: PyTree, params: PyTree, lr: jax.Array) -> PyTree: ...
    def weights(self, params: PyTree, extras: PyTree) -> PyTree: ...


class Refresh(Protocol):
    """`Method.refresh`: a pass over the training set after the `steps` it names (CMAE's boxes from
    heat maps). `run`: (new extras, whose leaves may be host arrays; host arrays to log: scalars,
    and 1-D arrays as histograms) from the current params and the training `source` (random access
    by stable example index), jitting through the run's `sharding`; it asks `should_stop()` between
    batches and raises RefreshInterrupted when told to (a long pass must not hold up a preemption).
    `applied`: how many refreshes the extras hold, so a resume redoes one a preemption stopped;
    `flops`: per training example."""
    def steps(self, total_steps: int) -> tuple[int, ...]: ...
    def run(self, params: PyTree, extras: PyTree, source, sharding: parallel.Sharding,
            should_stop: Callable[[], bool] | None = None) -> tuple[PyTree, dict]: ...
    def applied(self, extras: PyTree) -> int: ...
    def flops(self) -> float: ...


class HostState(Protocol):
    """`Method.host_state`: extras the Grain workers read (CMAE's boxes). `read`: their host (numpy)
    copy, None while there is nothing to read; the trainer passes it to `Method.train_transform`
    whenever it builds the pipeline (at the start, on resume, after every refresh)."""
    def read(self, extras: PyTree) -> PyTree | None: ...


class Reconstructions(Protocol):
    """`Method.reconstructions` of a pixel decoder (MAE, Beyond Masking, CMAE), for
    `mim_jax.visualize` and a run's evaluation images: {'images', 'masked', 'reconstruction',
    'pasted'} [B, H, W, C] in [0, 1] and 'mask' [B, N] of a batch, masked as the run masks it."""
    def __call__(self, params: PyTree, batch: dict, rng: jax.Array) -> dict: ...


class Method(abc.ABC):
    """Base class: subclasses are registered in `mim_jax.methods.REGISTRY` by name."""

    # The ViT whose features evaluators read and other runs distil from (`params["encoder"]`);
    # None for a method without one.
    encoder: nn.Module | None = None

    # Optional capabilities: None, or a component the method builds in its constructor.
    frozen: FrozenWeights | None = None
    ema: EvaluatedEMA | None = None
    refresh: Refresh | None = None
    host_state: HostState | None = None
    reconstructions: Reconstructions | None = None

    # A declaration, not a capability (no code runs for it): what gradient accumulation
    # (`config.grad_accum_steps`) does to the method's update. None: it is exact, the loss being a
    # mean of per-example terms (per-example randomness keyed by the example index), so k
    # micro-batches give the global batch's update, to float rounding; only per-step randomness
    # (drop path, a mixing coefficient) is drawn per micro-batch, as a data-parallel trainer draws
    # it per device. A sentence: the loss reads the batch as a whole (batch normalisation,
    # negatives, a balanced assignment), each micro-batch would see 1/k of it, and the sentence
    # says what would change, formatted with {k} (micro-batches), {micro} (their size) and {batch}
    # (the global batch size) for the trainer's refusal.
    inexact_accumulation: str | None = None

    # The layout (`weights.registry` name) of the method's official code, which `mim_jax.export
    # --format=official` writes; timm's where there is no official code.
    weight_layout: str = "timm"
    # What the method's released weights were trained with, as far as rebuilding their model needs
    # it: config fields over the library's defaults (`model`, `method`, ...; the file gives its
    # encoder), read by `pretrained.imported_config` for a layout this method evaluates
    # (`Layout.evaluated_by`). They describe the published files, so they stay when configs/ changes.
    released: dict | None = None

    @classmethod
    def resolve_config(cls, config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
        """`config` with the fields that depend on files filled in where they are still unset (a
        teacher's width, the architecture of the run a fine-tuning starts from), so overrides win.
        Config files leave them unset, so building a config reads nothing; every entry point calls
        this once (`methods.resolve_config`) before it builds the method, and a run saves the
        result, so its model rebuilds later without those files. Returns a new config; the
        default has nothing to resolve."""
        return config

    def __init__(self, config: ml_collections.ConfigDict, num_examples: int | None = None):
        """`num_examples`: the size of the training set, for methods with per-example state
        (ContrastiveCrop boxes); None where no data is attached (evaluating a trained encoder)."""
        self.config = config
        self.num_examples = num_examples

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

    # -- step ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def loss(self, params: PyTree, extras: PyTree, frozen: PyTree, batch: dict, rng: jax.Array,
             step: jax.Array) -> tuple[jax.Array, tuple[dict, PyTree]]:
        """(scalar loss, (metrics, extras as the forward pass leaves them)): what the train step
        differentiates (`has_aux`). A forward pass that changes no state returns `extras` as given;
        CMAE's advances its BatchNorm statistics and its momentum head (before it computes its keys).

        `rng` is the run's key: per-example randomness (masks) comes from `batch['index']` via
        `self.example_keys`, per-step randomness (drop path) from `jax.random.fold_in(rng, step)`,
        so both are mesh- and resume-invariant.

        `step` identifies this forward pass for per-step randomness only (no schedule may read it):
        the optimizer step, or with k-step gradient accumulation `step * k + j` for micro-batch j,
        so each micro-batch draws its own drop path while its masks stay the global batch's.
        Unless `inexact_accumulation` says otherwise, the loss and metrics must be means over the examples."""

    # -- host side -----------------------------------------------------------------------------
    def batch_spec(self, global_batch_size: int) -> dict:
        """Shapes of one global batch as `train_transform` delivers it (Beyond Masking's images are
        a wider view than the encoder's input)."""
        inp = self.config.input
        return {"image": jax.ShapeDtypeStruct((global_batch_size, inp.image_size, inp.image_size, inp.channels),
                                              jnp.float32),
                "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32),
                "index": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32)}

    def train_transform(self, host_state: PyTree | None = None) -> Callable:
        """The Grain workers' transform `(record, rng) -> example`, by default MAE's views ([colour
        jitter,] random-resized crop to `batch_spec`'s size, flip; uint8); `host_state`: what the
        `host_state` component read. `record` carries `pipeline.SOURCE_INDEX`, its stable index in
        the source; uint8 images are normalised with config.input's mean/std in the train step."""
        image_size = self.batch_spec(1)["image"].shape[1]
        inp = self.config.input
        return pipeline.PretrainTransform(
            image_size=image_size, crop_scale=tuple(inp.crop_scale), crop_ratio=tuple(inp.crop_ratio),
            flip=inp.flip, mean=tuple(inp.mean), std=tuple(inp.std), color_jitter=inp.color_jitter,
            interpolation=inp.interpolation, max_reduction=inp.max_decode_reduction)

    # -- accounting and features ---------------------------------------------------------------
    @abc.abstractmethod
    def train_flops_per_example(self) -> float:
        """Analytic FLOPs of one training step per example (forward + backward)."""

    @abc.abstractmethod
    def encode(self, params: PyTree, images: jax.Array) -> dict:
        """Features of the pre-trained encoder on full images, for evaluators."""

    def example_keys(self, rng_seed: jax.Array, batch: dict, purpose: int = 0) -> jax.Array:
        """One key per example from the run seed and the global example index (not the step)."""
        from mim_jax import masking
        return masking.example_keys(jax.random.fold_in(rng_seed, purpose), batch["index"])
