"""The exact steps a run executes, compiled for a device list without running anything: the train
step (as `training.state.build` makes it) and the evaluators' feature extraction, on abstract
state, frozen weights and batches."""
from __future__ import annotations

import dataclasses
import logging
import re
import time
from typing import Any

import jax
import numpy as np

from mim_jax import flops, parallel
from mim_jax.data import catalog, pipeline
from mim_jax.errors import ConfigError
from mim_jax.evaluators import encoder as encoder_lib
from mim_jax.methods import get_method
from mim_jax.training import optim, state as state_lib


class DoesNotFit(Exception):
    """The TPU compiler refused the step: what it needs exceeds the device's HBM (its message
    says how much)."""

    def __init__(self, message: str):
        super().__init__(message)
        found = re.search(r"required for (.*?) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)", message)
        self.what = found.group(1) if found else "the step"
        self.needed = float(found.group(2)) * 2 ** 30 if found else None
        self.available = float(found.group(3)) * 2 ** 30 if found else None


def _compile(lowered):
    try:
        return lowered.compile()
    except Exception as e:   # jax raises its runtime error type; only the memory refusal is expected
        if "RESOURCE_EXHAUSTED" in str(e) and "HBM" in str(e):
            raise DoesNotFit(str(e).splitlines()[0]) from None
        raise


@dataclasses.dataclass
class CompiledStep:
    name: str                  # "train" or "features"
    compiled: Any              # jax.stages.Compiled
    compile_s: float
    batch_size: int            # global
    analytic_flops: float      # the whole step on every device (a multiply-add is 2 FLOPs)
    mesh_shape: dict
    batch_devices: int         # the devices the batch is split over
    argument_parts: dict = dataclasses.field(default_factory=dict)   # name -> bytes per device
    param_bytes: float = 0.0   # the parameters' whole (unsharded) size

    def memory(self) -> dict:
        """Bytes per device of XLA's plan: arguments (params, optimizer state, frozen weights,
        the batch), outputs, temporaries, less what donation aliases, and the code."""
        m = self.compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
                 + m.generated_code_size_in_bytes)
        return dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, temporaries=m.temp_size_in_bytes,
                    aliased=m.alias_size_in_bytes, code=m.generated_code_size_in_bytes, total=total)

    def xla_flops(self, num_devices: int) -> float:
        """XLA's count for the whole step (its cost analysis is of one device's SPMD program)."""
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float((cost or {}).get("flops", 0.0)) * num_devices


def delivered_dtypes(method) -> dict:
    """What the host pipeline hands the step for each batch entry (uint8 images for pre-training,
    normalised float32 for fine-tuning): the method's own train transform run on one blank
    record; `batch_spec`'s dtypes where that cannot run."""
    spec = method.batch_spec(1)
    size, channels = spec["image"].shape[1], spec["image"].shape[3]
    record = {"image": np.zeros((size, size, channels), np.uint8), "label": np.int64(0), pipeline.SOURCE_INDEX: 0}
    try:
        example = method.train_transform()(record, np.random.default_rng(0))
    except Exception as e:   # a transform that needs more of a record than a blank one has
        logging.info("Batch dtypes from batch_spec (the train transform did not run on a blank record: %s)", e)
        return {}
    return {k: np.asarray(v).dtype for k, v in example.items() if k in spec}


def abstract_batch(method, global_batch_size: int, mesh) -> dict:
    dtypes = delivered_dtypes(method)
    sharding = parallel.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(s.shape, dtypes.get(k, s.dtype), sharding=sharding)
            for k, s in method.batch_spec(global_batch_size).items()}


def bytes_per_device(tree) -> float:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    return float(sum(np.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
                     for x in jax.tree.leaves(tree)))


def _check_batch(mesh, batch_size: int, what: str):
    devices = parallel.batch_sharding(mesh).num_devices
    if batch_size % devices:
        raise ConfigError(f"{what}={batch_size} must be divisible by the {devices} devices that share the batch "
                          f"(mesh {dict(mesh.shape)}): use a multiple of {devices}.")


def compile_train_step(config, devices) -> CompiledStep:
    """The train step of `config` (resolved) on `devices` with the config's mesh and rules."""
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    batch_size = config.input.batch_size
    _check_batch(mesh, batch_size, "config.input.batch_size")
    method = get_method(config, num_examples=catalog.TRAIN_EXAMPLES.get(config.input.dataset, batch_size))
    sharding = parallel.Sharding.of(config, mesh)
    # The schedule's length changes constants of the program, not its shapes or memory.
    lr_schedule = optim.schedule(config.optax, optim.learning_rate(config.optax, batch_size), 10_000, 100,
                                 decay_steps=int(config.optax.decay_percent * 10_000))
    abstract, tx = state_lib.abstract_state(config, method, sharding, lr_schedule)
    frozen = state_lib.abstract_frozen(method, sharding)
    step = state_lib.train_step(config, method, sharding, tx, lr_schedule, abstract=abstract,
                                frozen_shardings=parallel.shardings_of(frozen), global_batch_size=batch_size)
    batch = abstract_batch(method, batch_size, mesh)
    start = time.perf_counter()
    compiled = _compile(step.lower(abstract, frozen, batch))
    parts = dict(params=abstract.params, optimizer=abstract.opt_state, extras=abstract.extras, frozen=frozen,
                 batch=batch)
    return CompiledStep(name="train", compiled=compiled, compile_s=time.perf_counter() - start, batch_size=batch_size,
                        analytic_flops=method.train_flops_per_example() * batch_size, mesh_shape=dict(mesh.shape),
                        batch_devices=parallel.batch_sharding(mesh).num_devices,
                        argument_parts={k: bytes_per_device(v) for k, v in parts.items() if jax.tree.leaves(v)},
                        param_bytes=float(sum(x.size * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(abstract.params))))


def compile_feature_step(config, devices, batch_size: int) -> CompiledStep:
    """The evaluators' feature extraction (`Method.encode`, every feature at once) of the train
    state's parameters, on their training shardings, for a batch of normalised images (rounded up
    to a multiple of the devices, as `encoder.extract` does)."""
    mesh = parallel.make_mesh(config.mesh, devices=devices)
    batch_size = encoder_lib.extraction_batch(batch_size, mesh)   # as an evaluation rounds it
    method = get_method(config, num_examples=batch_size)
    sharding = parallel.Sharding.of(config, mesh)
    params, _ = sharding.abstract(method.init_variables, parallel.abstract_key(), state_lib.init_batch(method, mesh))
    inp = config.input
    images = jax.ShapeDtypeStruct((batch_size, inp.image_size, inp.image_size, inp.channels), np.float32,
                                  sharding=parallel.batch_sharding(mesh))
    encode = sharding.jit(method.encode, out_shardings=parallel.replicated(mesh))
    start = time.perf_counter()
    compiled = _compile(encode.lower(params, images))
    return CompiledStep(name="features", compiled=compiled, compile_s=time.perf_counter() - start,
                        batch_size=batch_size, mesh_shape=dict(mesh.shape),
                        batch_devices=parallel.batch_sharding(mesh).num_devices, analytic_flops=batch_size * flops.vit_forward(
                            method.encoder, (inp.image_size // method.encoder.patch_size) ** 2, inp.channels))
