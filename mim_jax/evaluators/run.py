"""Runs an evaluation job (`config.evaluator`) on an encoder and writes its results."""
from __future__ import annotations

import json
import logging

import jax
from etils import epath

from mim_jax import parallel, pretrained
from mim_jax.data import catalog
from mim_jax.evaluators import common
from mim_jax.evaluators import encoder as encoder_lib
from mim_jax.evaluators import get as get_evaluator
from mim_jax.evaluators import views
from mim_jax.methods import resolve_config
from mim_jax.runtime import metrics


def _use_dataset(inp, dataset: str) -> None:
    """Evaluates on `dataset` with the encoder's own input normalisation (what it was trained on)."""
    split, channels, _, _ = catalog.DATASETS.get(dataset, ("train", inp.channels, None, None))
    if channels != inp.channels:
        raise ValueError(f"dataset={dataset} has {channels}-channel images; this encoder takes {inp.channels}.")
    inp.update(dataset=dataset, split=split, data_dir=None)


def features_and_labels(config, mesh, evaluator):
    """The encoder's features and labels of each split; the architecture and data come from the
    pre-training run (`init=<workdir>`), the weight file (`init=<layout>:<file>`) or from
    `config.pretrain_config` (`init=random|pixels`); `config.dataset` swaps the data set."""
    if config.init in ("random", "pixels"):
        base = resolve_config(config.pretrain_config)
    else:
        base = pretrained.read_config(config.init)   # saved resolved, or built from a weight file
    if config.dataset:
        _use_dataset(base.input, config.dataset)
    if config.data_dir:
        base.input.data_dir = config.data_dir
    encoder = encoder_lib.load(config.init, mesh, feature=config.feature, base_config=base)
    inp = base.input
    view = views.of(evaluator, config, inp, {"train": config.train_split, "eval": config.eval_split})
    out = {}
    for name, split in view.splits.items():
        source = view.open(name, inp.channels)
        limit = config[f"max_{name}_examples"]
        count = min(len(source), limit or len(source))
        logging.info("Extracting %s features of %s images of %s/%s.", config.feature, f"{count:,}", view.dataset, split)
        out[name] = encoder_lib.extract(encoder, source, mesh, batch_size=config.batch_size, transform=view.transform,
                                        max_examples=limit, what=f"{split} features")
    return out, view, encoder.description


def evaluate(config, workdir) -> dict:
    evaluator = get_evaluator(config.evaluator)
    mesh = parallel.make_mesh(config.mesh)
    feats, view, description = features_and_labels(config, mesh, evaluator)
    results = evaluator.evaluate(config, feats, view, mesh)
    logging.info("%s on %s: %s", config.evaluator, description, common.scalars(results))
    if jax.process_index() == 0:
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "results.json").write_text(json.dumps({"encoder": description, **results}, indent=1))
        writer = metrics.create_writer(workdir)
        writer.write_scalars(0, common.scalars(results))
        writer.flush()
    return results
