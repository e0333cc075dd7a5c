"""Evaluation of pre-trained encoders. Each evaluator is a module here that declares the `SPLITS`
it reads ('train' and/or 'eval') and `evaluate(config, feats, view, mesh) -> dict` (`views.View`: what
was read, its class count); one that reads other data than the encoder's centre views defines
`view(config, inp, split_overrides)`; its
options' defaults (the paper protocol) are `config_defaults.EVALUATORS[name]`; `get(name)` finds it
by name."""
from __future__ import annotations

import importlib
import types

EVALUATORS = ("knn", "linear_probe", "attentive_probe", "classification", "segmentation_probe")


def get(name: str) -> types.ModuleType:
    if name not in EVALUATORS:
        raise ValueError(f"Unknown evaluator {name!r}; available: {list(EVALUATORS)}.")
    return importlib.import_module(f"mim_jax.evaluators.{name}")
