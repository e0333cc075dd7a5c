"""Trained weights of a run of this project, for inference and warm starts.

A pre-training workdir holds checkpoints of the whole train state and the config that wrote them.
This module reads that config, rebuilds the method's parameter tree abstractly
(`jax.eval_shape(method.init_variables, ...)`: shapes and logical shardings on the current mesh,
nothing computed), and restores only `params` and `extras` onto it: no optimizer state, no train
step, no teacher. Evaluators, fine-tuning's warm start (`config.init`) and run teachers all load
through here.
"""
from __future__ import annotations

import dataclasses
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from mim_jax import checkpoint, parallel
from mim_jax.methods import Method, get_method

PyTree = object


@dataclasses.dataclass
class Weights:
    """A method with the weights it is evaluated with (`method.eval_params`, e.g. CAPI's EMA)."""
    config: ml_collections.ConfigDict
    method: Method
    params: PyTree
    step: int | None          # None: random initialisation
    description: str


def _checkpoints(workdir) -> checkpoint.Checkpointer:
    directory = epath.Path(workdir) / "checkpoints"
    # Checked first: orbax would otherwise report an empty directory, or create one at a typo.
    if not directory.exists() or not any(p.name.isdigit() for p in directory.iterdir()):
        raise FileNotFoundError(f"No pre-training checkpoint in {directory}: pass the --workdir "
                                "of a `python -m mim_jax.main --config=configs/<method>.py` run.")
    return checkpoint.Checkpointer(directory, read_only=True)


def read_config(workdir) -> ml_collections.ConfigDict:
    """The config of the newest checkpoint of a pre-training workdir."""
    ckpt = _checkpoints(workdir)
    return ml_collections.ConfigDict(ckpt.restore_config(ckpt.latest_step()))


def abstract_variables(method: Method, mesh, parts=("params", "extras")) -> dict:
    """{'params'[, 'extras']} of a fresh run of `method` as ShapeDtypeStructs carrying the
    shardings that the config's logical rules give on `mesh`."""
    rules = tuple(tuple(r) for r in method.config.sharding_rules)
    batch = method.batch_spec(parallel.batch_sharding(mesh).num_devices)

    def init(rng, b):
        if "extras" not in parts:
            return {"params": method.init_params(rng, b)}
        return dict(zip(("params", "extras"), method.init_variables(rng, b)))

    with parallel.activate(mesh, rules):
        boxed = jax.eval_shape(init, jax.random.key(0), batch)
        shardings = parallel.logical_shardings(boxed, mesh, rules)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        parallel.unbox_abstract(boxed), shardings)


def random_init(config: ml_collections.ConfigDict, mesh, seed: int | None = None) -> Weights:
    """The architecture of `config`, untrained (a baseline for evaluations)."""
    method = get_method(config)
    parts = ("params", "extras") if method.eval_uses_extras else ("params",)
    abstract = abstract_variables(method, mesh, parts)
    batch = method.batch_spec(parallel.batch_sharding(mesh).num_devices)
    rules = tuple(tuple(r) for r in config.sharding_rules)

    def init(rng):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch)
        params, extras = nn.unbox(method.init_variables(rng, zeros)) if "extras" in parts else (
            nn.unbox(method.init_params(rng, zeros)), {})
        return {"params": params, "extras": extras} if "extras" in parts else {"params": params}

    with parallel.activate(mesh, rules):
        variables = jax.jit(init, out_shardings=jax.tree.map(lambda x: x.sharding, abstract))(
            jax.random.key(config.seed if seed is None else seed))
    params = method.eval_params(variables["params"], variables.get("extras", {}))
    return Weights(config=config, method=method, params=params, step=None, description="random init")


def load(workdir, mesh, keys=None) -> Weights:
    """The newest checkpoint of a pre-training workdir, restored onto `mesh` whatever mesh it was
    written on; `keys` (e.g. ('encoder',)) restores only those params (not a decoder or heads).
    A checkpoint whose tree does not match its own config is an error that lists the missing,
    unexpected and mis-shaped entries."""
    ckpt = _checkpoints(workdir)
    step = ckpt.latest_step()
    config = ml_collections.ConfigDict(ckpt.restore_config(step))
    method = get_method(config)
    parts = ("params", "extras") if method.eval_uses_extras else ("params",)
    abstract = abstract_variables(method, mesh, parts)
    subtrees = None
    if keys is not None:
        unknown = [k for k in keys if k not in abstract["params"]]
        if unknown:
            raise ValueError(f"The run in {workdir} ({config.method.name}) has no params {unknown}; it has "
                             f"{sorted(abstract['params'])}.")
        abstract["params"] = {k: abstract["params"][k] for k in keys}
        subtrees = {"params": tuple(keys)}
    variables = ckpt.restore_parts(step, abstract, subtrees)
    logging.info("Loaded %s weights from %s at step %d.", config.method.name, workdir, step)
    params = method.eval_params(variables["params"], variables.get("extras", {}))
    return Weights(config=config, method=method, params=params, step=step, description=f"{workdir} @ step {step}")


def warm_start_params(init: str, keys, target: dict) -> dict:
    """The subtrees `keys` (e.g. ('encoder',)) of a run's evaluation weights, checked against the
    abstract `target` params (same tree and shapes) and placed on its shardings: a new run starts
    from them (big_vision's `model_init`)."""
    mesh = jax.tree.leaves(target)[0].sharding.mesh
    absent = [key for key in keys if key not in target]
    if absent:
        raise ValueError(f"config.init_keys names {absent}, but this model's params are {sorted(target)}.")
    weights = load(init, mesh, keys=keys)    # only those params are read (EMA extras where evaluated)
    loaded = {}
    for key in keys:
        if key not in weights.params:
            raise ValueError(f"config.init_keys names {key!r}, but the run in {init} has params "
                             f"{sorted(weights.params)}.")
        mismatch = checkpoint.tree_mismatch(weights.params[key], target[key])
        if mismatch:
            raise ValueError(f"The {key!r} weights in {init} ({weights.config.method.name}, "
                             f"{weights.config.model.get('variant')}) do not fit this model: {mismatch}. "
                             "Build the same architecture (config.model) as the run you start from.")
        loaded[key] = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), weights.params[key], target[key])
    return loaded
