"""Train state, its shardings, and the jitted train step: shared by the trainer and the benchmark.
`build` reads in three steps: the abstract state, the initial state and the train step."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mim_jax import parallel, pretrained
from mim_jax.errors import ConfigError
from mim_jax.training import optim


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    extras: Any


@dataclasses.dataclass
class Setup:
    """Everything derived from (config, method, mesh) that the loop needs."""
    sharding: parallel.Sharding   # the run's mesh and logical rules, which every jitted function uses
    abstract: TrainState      # ShapeDtypeStructs carrying their shardings on the mesh
    create: Callable          # rng -> TrainState, created directly on its shardings
    frozen: Any               # frozen weights (e.g. a CLIP teacher), already on device
    train_step: Callable      # (state, frozen, batch) -> (state, metrics), jitted and donated; .lower for AOT
    lr_schedule: Callable

    @property
    def shardings(self) -> TrainState:
        return parallel.shardings_of(self.abstract)


def normalize_images(batch: dict, mean, std) -> dict:
    """uint8 image arrays of a batch (what the input workers deliver: a quarter of float32's bytes
    to copy and to move to the device) -> float32 (x / 255 - mean) / std, the same operations in
    the same order as the host's `transforms.normalize`; other entries are left as they are."""
    mean, std = jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32)
    return {k: (v.astype(jnp.float32) / 255.0 - mean) / std if v.dtype == jnp.uint8 and v.ndim == 4 else v
            for k, v in batch.items()}


def _dict_path(path) -> tuple:
    return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def shardings_by_param_path(tree, param_shardings, mesh):
    """Optimizer states mirror params inside optax's own containers: give each leaf the sharding of
    the parameter whose dict path ends its own path (same shape), else replicate it."""
    by_path = {_dict_path(p): s for p, s in jax.tree_util.tree_flatten_with_path(param_shardings)[0]}

    def pick(path, leaf):
        keys = _dict_path(path)
        for start in range(len(keys)):
            sharding = by_path.get(keys[start:])
            if sharding is not None and len(sharding.spec) <= leaf.ndim:
                return sharding
        return parallel.replicated(mesh)

    return jax.tree_util.tree_map_with_path(pick, tree)


def accumulation_steps(config, method, mesh, global_batch_size: int) -> int:
    """`config.grad_accum_steps` (k), checked against the batch, the mesh and the method: every
    micro-batch of `global_batch_size / k` must split evenly over the devices that share the batch,
    and a method whose loss reads the whole batch at once (`Method.inexact_accumulation`) is refused unless
    `config.allow_inexact_accumulation` (then a warning says what changes)."""
    k = config.grad_accum_steps
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ConfigError(f"config.grad_accum_steps={k!r} must be a positive integer (1: no accumulation).")
    if k == 1:
        return 1
    n = parallel.batch_sharding(mesh).num_devices
    if global_batch_size % (k * n):
        raise ConfigError(
            f"config.input.batch_size={global_batch_size} must be divisible by config.grad_accum_steps={k} x the "
            f"{n} devices that share the batch (= {k * n}): each of the {k} micro-batches is split over every "
            f"device. Use a batch size that is a multiple of {k * n}, or another grad_accum_steps.")
    if method.inexact_accumulation is not None:
        why = method.inexact_accumulation.format(k=k, micro=global_batch_size // k, batch=global_batch_size)
        if not config.allow_inexact_accumulation:
            raise ConfigError(
                f"{why} Gradient accumulation would change the method, not just its memory use: set "
                f"config.grad_accum_steps=1 (fit the batch with more devices, config.model.remat=True or a "
                f"smaller config.input.batch_size), or config.allow_inexact_accumulation=True to run it anyway.")
        logging.warning("config.allow_inexact_accumulation=True: %s The update is not the global batch's.", why)
    return k


def split_micro_batches(batch: dict, k: int, mesh) -> dict:
    """[B, ...] -> [k, B/k, ...], micro-batch j holding rows j, j + k, j + 2k, ... Each device's
    contiguous shard of the batch thus holds its own 1/k of every micro-batch: the split is a local
    reshape (no communication) and every micro-batch keeps every device busy."""
    spec = parallel.batch_sharding(mesh).spec

    def split(x):
        x = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, *spec)))

    return jax.tree.map(split, batch)


def build(config, method, mesh, *, total_steps: int, warmup_steps: int, global_batch_size: int) -> Setup:
    """The train state, its optimizer and the jitted step of `method` on `mesh`. Nothing runs on a
    device here but loading frozen weights (a teacher): the state is made by `Setup.create`."""
    sharding = parallel.Sharding.of(config, mesh)
    peak_lr = optim.learning_rate(config.optax, global_batch_size)
    lr_schedule = optim.schedule(config.optax, peak_lr, total_steps, warmup_steps,
                                 decay_steps=int(config.optax.decay_percent * total_steps))
    abstract, tx = abstract_state(config, method, sharding, lr_schedule)
    frozen, frozen_shardings = frozen_weights(method, sharding)
    step = train_step(config, method, sharding, tx, lr_schedule, abstract=abstract, frozen_shardings=frozen_shardings,
                      global_batch_size=global_batch_size)
    return Setup(sharding=sharding, abstract=abstract, create=initial_state(config, method, sharding, tx, abstract),
                 frozen=frozen, train_step=step, lr_schedule=lr_schedule)


def init_batch(method, mesh) -> dict:
    # Params depend on shapes only: initialise on a batch as small as the mesh allows.
    return method.batch_spec(parallel.batch_sharding(mesh).num_devices)


def abstract_state(config, method, sharding: parallel.Sharding, lr_schedule) -> tuple[TrainState, Any]:
    """(the train state as ShapeDtypeStructs on their shardings, the optimizer): shapes only, with
    an abstract PRNG key, so nothing runs on a device. Each optimizer-state leaf takes the sharding
    of the parameter it mirrors."""
    mesh = sharding.mesh
    params, extras = sharding.abstract(method.init_variables, parallel.abstract_key(), init_batch(method, mesh))
    tx = optim.make_optimizer(config.optax, params, lr_schedule)
    opt_state = jax.eval_shape(tx.init, params)
    opt_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                             opt_state, shardings_by_param_path(opt_state, parallel.shardings_of(params), mesh))
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=parallel.replicated(mesh))
    return TrainState(step=step, params=params, opt_state=opt_state, extras=extras), tx


def abstract_frozen(method, sharding: parallel.Sharding) -> Any:
    """The method's frozen weights as ShapeDtypeStructs on their shardings ({} for none): what a
    step compiles against, without reading a file or touching a device."""
    if not method.frozen:
        return {}
    return sharding.abstract(method.frozen.template, parallel.abstract_key(), init_batch(method, sharding.mesh))


def frozen_weights(method, sharding: parallel.Sharding) -> tuple[Any, Any]:
    """(the method's frozen weights on the device, their shardings); ({}, {}) for none."""
    abstract = abstract_frozen(method, sharding)
    if not abstract:
        return {}, {}
    return method.frozen.load(abstract, parallel.shardings_of(abstract)), parallel.shardings_of(abstract)


def initial_state(config, method, sharding: parallel.Sharding, tx, abstract: TrainState) -> Callable:
    """rng -> a fresh TrainState on the shardings of `abstract`; the params named by
    `config.init_keys` start from `config.init`'s weights when it names a pre-training workdir
    (fine-tuning's warm start)."""
    def create(rng, loaded):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init_batch(method, sharding.mesh))
        params, extras = nn.unbox(method.init_variables(rng, zeros))
        params = dict(params, **loaded)     # warm start (config.init) before the optimizer sees them
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extras=extras)

    create = sharding.jit(create, out_shardings=parallel.shardings_of(abstract))

    def create_fn(rng):
        loaded = {}
        if config.init:
            loaded = pretrained.warm_start_params(config.init, tuple(config.init_keys), abstract.params, method)
        return create(rng, loaded)
    return create_fn


def accumulated_gradients(loss, state: TrainState, batch, *, accum: int, mesh, param_shardings):
    """The value and gradients of `loss` (`value_and_grad` of the method's loss) averaged over
    `accum` micro-batches, one at a time under `lax.scan` (only one micro-batch's activations
    alive), and the extras as the last forward pass leaves them. Masks are keyed by example index,
    so they are the global batch's; per-step randomness (drop path) gets a distinct step per
    micro-batch, `step * accum + j`."""
    micro = split_micro_batches(batch, accum, mesh)
    batch_shardings = jax.tree.map(lambda _: parallel.batch_sharding(mesh), batch)

    def grad_fn(extras, j, micro_batch):
        micro_batch = jax.lax.with_sharding_constraint(micro_batch, batch_shardings)
        (value, (metrics, extras)), grads = loss(state.params, extras, micro_batch, state.step * accum + j)
        return grads, dict(metrics, loss=value), extras

    def body(carry, xs):
        grad_sum, metric_sum, extras = carry
        grads, metrics, extras = grad_fn(extras, *xs)
        add = lambda a, b: a + b.astype(a.dtype)   # noqa: E731
        return (jax.tree.map(add, grad_sum, grads), jax.tree.map(add, metric_sum, metrics), extras), None

    first = jax.tree.map(lambda x: x[0], micro)
    grad_shape, metric_shape, _ = jax.eval_shape(grad_fn, state.extras, jnp.zeros((), jnp.int32), first)
    zeros = lambda shapes: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)   # noqa: E731
    grad_sum = jax.lax.with_sharding_constraint(zeros(grad_shape), param_shardings)
    (grad_sum, metric_sum, extras), _ = jax.lax.scan(
        body, (grad_sum, zeros(metric_shape), state.extras), (jnp.arange(accum, dtype=jnp.int32), micro))
    grads = jax.tree.map(lambda g: g / accum, grad_sum)
    metrics = jax.tree.map(lambda m: m / accum, metric_sum)
    return metrics.pop("loss"), metrics, extras, grads


def train_step(config, method, sharding: parallel.Sharding, tx, lr_schedule, *, abstract: TrainState,
               frozen_shardings, global_batch_size: int) -> Callable:
    """(state, frozen, batch) -> (state, metrics), jitted with the state donated: one optimizer step
    on the global batch, its gradients accumulated over `config.grad_accum_steps` micro-batches."""
    mesh, shardings = sharding.mesh, parallel.shardings_of(abstract)
    accum = accumulation_steps(config, method, mesh, global_batch_size)

    def step_fn(state, frozen, batch):
        batch = normalize_images(batch, config.input.mean, config.input.std)
        seed_key = jax.random.key(config.seed)   # made inside the trace: a constant of the program

        loss = jax.value_and_grad(lambda params, extras, batch, step: method.loss(
            params, extras, frozen, batch, seed_key, step), has_aux=True)
        if accum == 1:
            (value, (metrics, extras)), grads = loss(state.params, state.extras, batch, state.step)
        else:
            value, metrics, extras, grads = accumulated_gradients(loss, state, batch, accum=accum, mesh=mesh,
                                                                  param_shardings=shardings.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extras = method.ema.update(extras, params, lr_schedule(state.step)) if method.ema else extras
        metrics = dict(metrics, loss=value, lr=lr_schedule(state.step), grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, extras=extras), metrics

    batch_shardings = {k: parallel.batch_sharding(mesh) for k in method.batch_spec(global_batch_size)}
    return sharding.jit(step_fn, donate_argnums=(0,), in_shardings=(shardings, frozen_shardings, batch_shardings),
                        out_shardings=(shardings, parallel.replicated(mesh)))
