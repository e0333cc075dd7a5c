"""Methods by name. Adding one is a folder `methods/<name>/`, a `configs/<name>.py` and one line in
REGISTRY (plus, if its official code has a weight file format, a layout in `weights/`): never an
edit of the trainer, the evaluators or the checkpointing (docs/contributing.md, "Adding a method")."""
from __future__ import annotations

import copy
import importlib

from mim_jax.methods.base import Method

# name -> "module:Class", imported lazily so a method's optional dependencies load only when used.
REGISTRY = {
    "mae": "mim_jax.methods.mae.method:MAE",
    "finetune": "mim_jax.methods.finetune.method:Finetune",
    "cae_v2": "mim_jax.methods.cae_v2.method:CAEv2",
    "capi": "mim_jax.methods.capi.method:CAPI",
    "beyond_masking": "mim_jax.methods.beyond_masking.method:BeyondMasking",
    "cmae": "mim_jax.methods.cmae.method:CMAE",
}


def _method_class(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r} (config.method.name); available: {sorted(REGISTRY)}.")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def released_settings(name: str) -> dict:
    """A copy of `Method.released` of the method `name`: the settings its released weights were
    trained with."""
    released = _method_class(name).released
    if released is None:
        raise ValueError(f"The method {name!r} declares no released weights (Method.released).")
    return copy.deepcopy(released)


def resolve_config(config):
    """`config` with what its method reads from files resolved (`Method.resolve_config`): done once
    to a config built from a config file, before `get_method` and before a run saves it."""
    return _method_class(config.method.name).resolve_config(config)


def get_method(config, num_examples: int | None = None) -> Method:
    """The method `config.method.name` names; `num_examples` is the training set's size (for
    per-example state), None when no data is attached."""
    return _method_class(config.method.name)(config, num_examples=num_examples)
