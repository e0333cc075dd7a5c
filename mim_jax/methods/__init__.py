"""Pre-training methods by name. Adding one is a module here plus a config, never a trainer edit."""
from __future__ import annotations

import importlib

from mim_jax.methods.base import Method

# name -> "module:Class", imported lazily so a method's optional dependencies load only when used.
REGISTRY = {
    "mae": "mim_jax.methods.mae:MAE",
    "finetune": "mim_jax.methods.finetune:Finetune",
    "cae_v2": "mim_jax.methods.cae_v2:CAEv2",
    "capi": "mim_jax.methods.capi:CAPI",
    "beyond_masking": "mim_jax.methods.beyond_masking:BeyondMasking",
    "cmae": "mim_jax.methods.cmae:CMAE",
}


def get_method(config, num_examples: int | None = None) -> Method:
    """The method `config.method.name` names; `num_examples` is the training set's size (for
    per-example state), None when no data is attached."""
    name = config.method.name
    if name not in REGISTRY:
        raise ValueError(f"Unknown method {name!r} (config.method.name); available: {sorted(REGISTRY)}.")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(config, num_examples=num_examples)
