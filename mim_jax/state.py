"""Train state, its shardings, and the jitted train step: shared by the trainer and the benchmark."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mim_jax import image_ops, optim, parallel, pretrained
from mim_jax.methods.base import ACCUMULATION


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    extras: Any


@dataclasses.dataclass
class Setup:
    """Everything derived from (config, method, mesh) that the loop needs."""
    create: Callable          # rng -> TrainState, created directly on its shardings
    abstract: TrainState      # ShapeDtypeStructs carrying the current mesh's shardings
    shardings: TrainState
    frozen: Any               # frozen weights (e.g. a CLIP teacher), already on device
    frozen_shardings: Any
    train_step: Callable      # (state, frozen, batch) -> (state, metrics), jitted and donated
    lower_step: Callable      # same arguments -> jax.stages.Lowered (cost analysis, AOT)
    lr_schedule: Callable


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
    and a method whose loss reads the whole batch at once (`Method.accumulation`) is refused unless
    `config.allow_inexact_accumulation` (then a warning says what changes)."""
    k = config.grad_accum_steps
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"config.grad_accum_steps={k!r} must be a positive integer (1: no accumulation).")
    if k == 1:
        return 1
    n = parallel.batch_sharding(mesh).num_devices
    if global_batch_size % (k * n):
        raise ValueError(
            f"config.input.batch_size={global_batch_size} must be divisible by config.grad_accum_steps={k} x the "
            f"{n} devices that share the batch (= {k * n}): each of the {k} micro-batches is split over every "
            f"device. Use a batch size that is a multiple of {k * n}, or another grad_accum_steps.")
    if method.accumulation not in ACCUMULATION:
        raise ValueError(f"{type(method).__name__}.accumulation={method.accumulation!r}: use one of {ACCUMULATION}.")
    if method.accumulation != "exact":
        why = method.accumulation_note.format(k=k, micro=global_batch_size // k, batch=global_batch_size)
        if not config.allow_inexact_accumulation:
            raise ValueError(
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
    """The train state, its optimizer and the jitted step of `method` on `mesh`. A state created
    here (not restored) starts from `config.init`'s weights for the params named by
    `config.init_keys` when `config.init` names a pre-training workdir (fine-tuning's warm start)."""
    rules = tuple(tuple(r) for r in config.sharding_rules)
    batch = method.batch_spec(global_batch_size)
    batch_sharding = {k: parallel.batch_sharding(mesh) for k in batch}
    peak_lr = optim.learning_rate(config.optax, global_batch_size)
    lr_schedule = optim.schedule(config.optax, peak_lr, total_steps, warmup_steps,
                                 decay_steps=int(config.optax.decay_percent * total_steps))

    with parallel.activate(mesh, rules):
        boxed_params, boxed_extras = jax.eval_shape(method.init_variables, jax.random.key(0), batch)
        param_shardings = parallel.logical_shardings(boxed_params, mesh, rules)
        extras_shardings = parallel.logical_shardings(boxed_extras, mesh, rules)
        abstract_params = parallel.unbox_abstract(boxed_params)
        tx = optim.make_optimizer(config.optax, abstract_params, lr_schedule)
        opt_shape = jax.eval_shape(tx.init, abstract_params)
        shardings = TrainState(step=parallel.replicated(mesh), params=param_shardings,
                               opt_state=shardings_by_param_path(opt_shape, param_shardings, mesh),
                               extras=extras_shardings)

        boxed_frozen = jax.eval_shape(method.frozen.template, jax.random.key(0), batch) if method.frozen else {}
        frozen_shardings = parallel.logical_shardings(boxed_frozen, mesh, rules)
    frozen = method.frozen.load(parallel.unbox_abstract(boxed_frozen), frozen_shardings) if method.frozen else {}

    with parallel.activate(mesh, rules):
        # Params depend on shapes only: initialise on a zero batch as small as the mesh allows.
        init_batch = method.batch_spec(parallel.batch_sharding(mesh).num_devices)

        def create(rng, loaded):
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), init_batch)
            params, extras = nn.unbox(method.init_variables(rng, zeros))
            params = dict(params, **loaded)     # warm start (config.init) before the optimizer sees them
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), extras=extras)

        create = jax.jit(create, out_shardings=shardings)
        abstract_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       abstract_params, param_shardings)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                jax.eval_shape(create, jax.random.key(0), {}), shardings)

    seed_key = jax.random.key(config.seed)
    accum = accumulation_steps(config, method, mesh, global_batch_size)

    def accumulated_grads(state, frozen, batch):
        """Mean loss, metrics and gradients of the `accum` micro-batches, one at a time under
        `lax.scan` (only one micro-batch's activations alive), and the extras as the last forward
        pass leaves them. Masks are keyed by example index, so they are the global batch's; per-step
        randomness (drop path) gets a distinct step per micro-batch, `step * accum + j`."""
        micro = split_micro_batches(batch, accum, mesh)
        batch_shardings = jax.tree.map(lambda _: parallel.batch_sharding(mesh), batch)

        def grad_fn(extras, j, micro_batch):
            micro_batch = jax.lax.with_sharding_constraint(micro_batch, batch_shardings)

            def loss_fn(params):
                return method.loss(params, extras, frozen, micro_batch, seed_key, state.step * accum + j)

            (loss, (metrics, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
            return grads, dict(metrics, loss=loss), extras

        def body(carry, xs):
            grad_sum, metric_sum, extras = carry
            grads, metrics, extras = grad_fn(extras, *xs)
            add = lambda a, b: a + b.astype(a.dtype)   # noqa: E731
            return (jax.tree.map(add, grad_sum, grads), jax.tree.map(add, metric_sum, metrics), extras), None

        first = jax.tree.map(lambda x: x[0], micro)
        grad_shape, metric_shape, _ = jax.eval_shape(grad_fn, state.extras, jnp.zeros((), jnp.int32), first)
        zeros = lambda shapes: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)   # noqa: E731
        grad_sum = jax.lax.with_sharding_constraint(zeros(grad_shape), shardings.params)
        (grad_sum, metric_sum, extras), _ = jax.lax.scan(
            body, (grad_sum, zeros(metric_shape), state.extras), (jnp.arange(accum, dtype=jnp.int32), micro))
        grads = jax.tree.map(lambda g: g / accum, grad_sum)
        metrics = jax.tree.map(lambda m: m / accum, metric_sum)
        return metrics.pop("loss"), metrics, extras, grads

    def train_step(state, frozen, batch):
        batch = image_ops.normalize_images(batch, config.input.mean, config.input.std)

        if accum == 1:
            def loss_fn(params):
                return method.loss(params, state.extras, frozen, batch, seed_key, state.step)

            (loss, (metrics, extras)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        else:
            loss, metrics, extras, grads = accumulated_grads(state, frozen, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extras = method.ema.update(extras, params, lr_schedule(state.step)) if method.ema else extras
        metrics = dict(metrics, loss=loss, lr=lr_schedule(state.step), grad_norm=optax.tree.norm(grads),
                       param_norm=optax.tree.norm(params), update_norm=optax.tree.norm(updates))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, extras=extras), metrics

    jitted = jax.jit(train_step, donate_argnums=(0,),
                     in_shardings=(shardings, frozen_shardings, batch_sharding),
                     out_shardings=(shardings, parallel.replicated(mesh)))

    def step_fn(state, frozen, batch):
        with parallel.activate(mesh, rules):  # logical constraints need both while tracing
            return jitted(state, frozen, batch)

    def create_fn(rng):
        loaded = {}
        if config.init:
            loaded = pretrained.warm_start_params(config.init, tuple(config.init_keys), abstract_params)
        with parallel.activate(mesh, rules):
            return create(rng, loaded)

    def lower(*args):
        with parallel.activate(mesh, rules):
            return jitted.lower(*args)

    return Setup(create=create_fn, abstract=abstract, shardings=shardings, frozen=frozen,
                 frozen_shardings=frozen_shardings, train_step=step_fn, lower_step=lower,
                 lr_schedule=lr_schedule)
