"""Trained weights of a run of this project, for inference and warm starts.

A pre-training workdir holds checkpoints of the whole train state and the config that wrote them.
This module reads that config, rebuilds the method's parameter tree abstractly
(`jax.eval_shape(method.init_variables, ...)`: shapes and logical shardings on the current mesh,
nothing computed), and restores only `params` and `extras` onto it: no optimizer state, no train
step, no teacher. Evaluators, fine-tuning's warm start (`config.init`) and run teachers all load
through here.

Where a workdir is accepted, so is any weights spec (`weights.spec`): a file of another codebase
(`mae:/path/file.pth`, a timm or Hugging Face file or folder, `capi:`, `cae_v2:`,
`beyond_masking:`) has its config built from the library's defaults, the settings its method's
released weights were trained with and the encoder the file holds (`weights.registry`), and is
converted on the host by its layout with every tensor accounted for, then placed on the mesh like a
checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from mim_jax import config_defaults, parallel
from mim_jax.errors import WeightsError, WeightsNotFoundError
from mim_jax.methods import Method, get_method, released_settings
from mim_jax.runtime import checkpoint
from mim_jax.weights import registry
from mim_jax.weights import spec as weight_spec
from mim_jax.weights import vit as vit_layouts
from mim_jax.weights.layout import Description

PyTree = object

class UnknownParamsError(WeightsError):
    """Params asked for (`keys`) that the run's model does not have."""


@dataclasses.dataclass
class Weights:
    """A method with the weights it is evaluated with (`method.ema`'s, e.g. CAPI's teacher)."""
    config: ml_collections.ConfigDict
    method: Method
    params: PyTree
    step: int | None          # None: random initialisation
    description: str
    imported: Description | None = None   # what a weight file of another codebase says it holds


def _run_dir(spec) -> str:
    # A hub id names only a CLIP teacher: here it is a workdir that is not there.
    return spec.path if isinstance(spec, weight_spec.Run) else spec.id


def _checkpoints(workdir) -> checkpoint.Checkpointer:
    # orbax reads metadata only through absolute local paths.
    directory = epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir)) / "checkpoints"
    # Checked first: orbax would otherwise report an empty directory, or create one at a typo.
    if not directory.exists() or not any(p.name.isdigit() for p in directory.iterdir()):
        raise WeightsNotFoundError(f"No pre-training checkpoint in {directory}: pass the --workdir "
                                "of a `python -m mim_jax.main --config=configs/<method>.py` run.")
    return checkpoint.Checkpointer(directory, read_only=True)


# What a reader of a run says when none of its steps is readable (it never changes the run).
_UNREADABLE = ("Its checkpoints are corrupt or incomplete: resume its training (the trainer moves unreadable steps "
               "aside), or read another run.")


def read_config(workdir) -> ml_collections.ConfigDict:
    """The config of the newest checkpoint of a pre-training workdir, or the config that builds
    the encoder of a weights spec."""
    spec = weight_spec.parse(workdir)
    if isinstance(spec, weight_spec.File):
        return imported_config(registry.describe(spec.path, spec.layout))
    ckpt = _checkpoints(_run_dir(spec))
    return ckpt.first_readable(ckpt.restore_config, advice=_UNREADABLE)[1]


def abstract_variables(method: Method, mesh, parts=("params", "extras")) -> dict:
    """{'params'[, 'extras']} of a fresh run of `method` as ShapeDtypeStructs carrying the
    shardings that the config's logical rules give on `mesh`."""
    batch = method.batch_spec(parallel.batch_sharding(mesh).num_devices)

    def init(rng, b):
        if "extras" not in parts:
            return {"params": method.init_params(rng, b)}
        return dict(zip(("params", "extras"), method.init_variables(rng, b)))

    return parallel.Sharding.of(method.config, mesh).abstract(init, parallel.abstract_key(), batch)


def imported_config(desc: Description) -> ml_collections.ConfigDict:
    """The config of a weight file's model at its resolution: the library's defaults, its method's
    `Method.released` settings and the encoder the file holds; data stay ImageNet (whose statistics
    released weights expect) unless the file records its normalisation."""
    released = released_settings(desc.config_name)
    config = config_defaults.base_config(dataset="imagenet2012", image_size=desc.image_size, batch_size=256)
    config.model = config_defaults.vit_config(desc.model["variant"], **released.pop("model", {}))
    config.model.update(desc.model)
    config.update(released)
    # float32 so that features equal the PyTorch forward of the same file; a warm start takes only
    # the params, so a new run computes in its own dtype.
    config.model.dtype = "float32"
    config.input.channels = desc.channels
    if desc.mean is not None:
        config.input.update(mean=tuple(desc.mean), std=tuple(desc.std))
    elif desc.channels != len(config.input.mean):
        raise WeightsError(f"{desc.path} takes {desc.channels}-channel images and nothing beside it records their "
                           "normalisation (timm's config.json pretrained_cfg mean/std, or a Hugging Face "
                           "preprocessor_config.json): add one.")
    for key, value in desc.extra.items():   # e.g. CAPI's predictor size
        config[key].update(value)
    config.imported = dict(layout=desc.layout, path=str(desc.path))
    return config


def random_init(config: ml_collections.ConfigDict, mesh, seed: int | None = None) -> Weights:
    """The architecture of `config`, untrained (a baseline for evaluations)."""
    method = get_method(config)
    parts = ("params", "extras") if method.ema else ("params",)
    abstract = abstract_variables(method, mesh, parts)
    batch = method.batch_spec(parallel.batch_sharding(mesh).num_devices)

    def init(rng):
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch)
        variables = method.init_variables(rng, zeros) if method.ema else (method.init_params(rng, zeros),)
        return nn.unbox(dict(zip(parts, variables)))

    init = parallel.Sharding.of(config, mesh).jit(init, out_shardings=parallel.shardings_of(abstract))
    variables = init(jax.random.key(config.seed if seed is None else seed))
    params = method.ema.weights(variables["params"], variables["extras"]) if method.ema else variables["params"]
    return Weights(config=config, method=method, params=params, step=None, description="random init")


def load(workdir, mesh, keys=None, *, step: int | None = None) -> Weights:
    """The newest checkpoint (or `step`) of a pre-training workdir, restored onto `mesh` whatever
    mesh it was written on; `keys` (e.g. ('encoder',)) restores only those params (not a decoder
    or heads). A checkpoint whose tree does not match its own config is an error that lists the
    missing, unexpected and mis-shaped entries."""
    spec = weight_spec.parse(workdir)
    if isinstance(spec, weight_spec.File):
        return load_file(spec, mesh, keys)
    workdir = _run_dir(spec)
    ckpt = _checkpoints(workdir)
    if step is not None and step not in ckpt.all_steps():
        raise WeightsNotFoundError(f"No checkpoint at step {step} in {workdir}: it has steps {ckpt.all_steps()}.")

    def read(candidate):
        config = ckpt.restore_config(candidate)
        method = get_method(config)
        abstract = abstract_variables(method, mesh, ("params", "extras") if method.ema else ("params",))
        subtrees = None
        if keys is not None:
            unknown = [k for k in keys if k not in abstract["params"]]
            if unknown:
                raise UnknownParamsError(f"The run in {workdir} ({config.method.name}) has no params {unknown}; "
                                         f"it has {sorted(abstract['params'])}.")
            abstract["params"] = {k: abstract["params"][k] for k in keys}
            subtrees = {"params": tuple(keys)}
        return config, method, ckpt.restore_parts(candidate, abstract, subtrees)

    # The newest readable step, as training resumes from (a reader moves nothing aside).
    step, (config, method, variables) = ckpt.first_readable(read, None if step is None else [step],
                                                            advice=_UNREADABLE)
    logging.info("Loaded %s weights from %s at step %d.", config.method.name, workdir, step)
    params = method.ema.weights(variables["params"], variables["extras"]) if method.ema else variables["params"]
    return Weights(config=config, method=method, params=params, step=step, description=f"{workdir} @ step {step}")


def load_file(spec, mesh, keys=None) -> Weights:
    """The encoder (and, for keys=('encoder', 'decoder'), MAE's decoder; for CAPI the whole
    released backbone) of a weights file spec on `mesh`."""
    spec = weight_spec.parse(spec)
    desc = registry.describe(spec.path, spec.layout)
    config = imported_config(desc)
    method = get_method(config)
    abstract = abstract_variables(method, mesh, ("params",))["params"]
    params = registry.get(desc.layout).to_params(registry.read(desc.path), desc, method, abstract, keys)
    params = jax.tree.map(lambda x, t: jax.device_put(jnp.asarray(x, t.dtype), t.sharding), params,
                          {k: abstract[k] for k in params})
    logging.info("Loaded %s from %s (%s layout).", sorted(params), desc.path, desc.layout)
    return Weights(config=config, method=method, params=params, step=None, description=f"{desc.layout}:{desc.path}",
                   imported=desc)


def _fit_positions(weights: Weights, encoder: dict, target: dict) -> dict:
    """A learned position table resampled (bicubic) to the new run's grid when the resolutions
    differ; fixed tables and RoPE need nothing, they are computed for any grid."""
    table, want = encoder.get("pos_embedding"), target.get("pos_embedding")
    if table is None or want is None or table.shape == want.shape:
        return encoder
    side = int(round(want.shape[0] ** 0.5))
    if side * side != want.shape[0]:
        return encoder   # not a square grid: reported as a shape mismatch
    resized = vit_layouts.resize_positions(np.asarray(jax.device_get(table)), weights.method.grid, (side, side))
    logging.info("Resampled the learned position table from %s to %s patches.", weights.method.grid, (side, side))
    return dict(encoder, pos_embedding=resized)


# What a weight file's description can state about each params subtree, as (config block, {the
# module's attribute: the description's field}); a warm start compares each it states with the run's
# module. Shapes alone miss a sin-cos table of another layout, another head count or a bias-free
# embedding of the same width.
STATED = {
    "encoder": ("model", {**{f: f for f in ("width", "depth", "mlp_dim", "num_heads", "cls_token", "posemb",
                                            "qkv_bias", "use_bias", "layerscale", "norm", "norm_eps", "num_registers",
                                            "final_norm_affine")},
                          "patch_size": "variant"}),     # the variant ("B/16") states the patch
    "decoder": ("decoder", {f: f for f in ("width", "depth", "num_heads", "mlp_dim", "posemb", "embed_bias")}),
    "predictor": ("predictor", {"depth": "depth", "num_heads": "num_heads", "mlp_dim": "mlp_ratio"}),
}


def _architecture_differences(weights: Weights, method: Method, keys) -> list[str]:
    """The facts of `STATED` that a weight file's description states and that differ in `method`."""
    desc, out = weights.imported, []
    for key in (k for k in STATED if k in keys):
        stated = desc.model if key == "encoder" else desc.extra.get(key, {})
        block, fields = STATED[key]
        file_module, run_module = getattr(weights.method, key), getattr(method, key)
        for field in (f for f, said_as in fields.items() if said_as in stated):
            theirs, ours = getattr(file_module, field), getattr(run_module, field)
            if field == "layerscale":       # the file says whether there is LayerScale, not its init value
                theirs, ours = theirs is not None, ours is not None
            if theirs != ours:
                out.append(f"{block}.{field} (the file's {theirs!r}, this run's {ours!r})")
    return out


def warm_start_params(init: str, keys, target: dict, method: Method) -> dict:
    """The subtrees `keys` (e.g. ('encoder',)) of a run's evaluation weights, checked against the
    abstract `target` params of `method` (same tree and shapes; for a weight file also every
    architectural fact its layout states) and placed on its shardings: a new run starts from them
    (big_vision's `model_init`)."""
    mesh = jax.tree.leaves(target)[0].sharding.mesh
    absent = [key for key in keys if key not in target]
    if absent:
        raise WeightsError(f"config.init_keys names {absent}, but this model's params are {sorted(target)}.")
    weights = load(init, mesh, keys=keys)    # only those params are read (EMA extras where evaluated)
    if weights.imported is not None:
        differences = _architecture_differences(weights, method, keys)
        if differences:
            raise WeightsError(f"{init} holds another architecture than this run's: {'; '.join(differences)}. "
                               "Set those fields of the config to the file's.")
    loaded = {}
    for key in keys:
        if key not in weights.params:
            raise WeightsError(f"config.init_keys names {key!r}, but the run in {init} has params "
                               f"{sorted(weights.params)}.")
        if key == "encoder":
            weights.params[key] = _fit_positions(weights, weights.params[key], target[key])
        mismatch = checkpoint.tree_mismatch(weights.params[key], target[key])
        if mismatch:
            raise WeightsError(f"The {key!r} weights in {init} ({weights.config.method.name}, "
                               f"{weights.config.model.variant}) do not fit this model: {mismatch}. "
                               "Build the same architecture (config.model) as the run you start from.")
        loaded[key] = jax.tree.map(lambda x, t: jax.device_put(x, t.sharding), weights.params[key], target[key])
    return loaded
