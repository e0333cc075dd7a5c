"""Runs an evaluation job (`config.evaluator`) on an encoder and writes its results."""
from __future__ import annotations

import json
import logging

import jax
from etils import epath

from mim_jax import parallel, pretrained
from mim_jax.data import catalog, pipeline
from mim_jax.evaluators import common
from mim_jax.evaluators import encoder as encoder_lib
from mim_jax.evaluators import get as get_evaluator
from mim_jax.methods import resolve_config
from mim_jax.runtime import metrics


def split_names(data_config, splits, *, train_split: str | None = None, eval_split: str | None = None) -> dict:
    """{'train': ..., 'eval': ...} TFDS split names of the splits an evaluator reads: by default the
    pre-training split and the data set's evaluation split (EVAL_SPLITS, else "test")."""
    names = {"train": train_split or data_config.split,
             "eval": eval_split or catalog.EVAL_SPLITS.get(data_config.dataset, "test")}
    return {split: names[split] for split in splits}


def num_classes_of(data_config, feats) -> int:
    return catalog.NUM_CLASSES.get(data_config.dataset) or int(feats["eval"][1].max() + 1)


def _use_dataset(inp, dataset: str) -> None:
    """Evaluates on `dataset` with the encoder's own input normalisation (what it was trained on)."""
    split, channels, _, _ = catalog.DATASETS.get(dataset, ("train", inp.channels, None, None))
    if channels != inp.channels:
        raise ValueError(f"dataset={dataset} has {channels}-channel images; this encoder takes {inp.channels}.")
    inp.update(dataset=dataset, split=split, data_dir=None)


def features_and_labels(config, mesh, splits):
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
    out = {}
    for name, split in split_names(inp, splits, train_split=config.train_split, eval_split=config.eval_split).items():
        source = pipeline.open_source(inp.dataset, split, inp.data_dir, channels=inp.channels)
        limit = config[f"max_{name}_examples"]
        count = min(len(source), limit or len(source))
        logging.info("Extracting %s features of %s images of %s/%s.", config.feature, f"{count:,}", inp.dataset, split)
        out[name] = encoder_lib.extract(encoder, source, mesh, batch_size=config.batch_size,
                                        image_size=inp.image_size, mean=inp.mean, std=inp.std,
                                        max_examples=limit, what=f"{split} features")
    return out, num_classes_of(inp, out), encoder.description


def evaluate(config, workdir) -> dict:
    evaluator = get_evaluator(config.evaluator)
    mesh = parallel.make_mesh(config.mesh)
    feats, num_classes, description = features_and_labels(config, mesh, evaluator.SPLITS)
    results = evaluator.evaluate(config, feats, num_classes, mesh)
    logging.info("%s on %s: %s", config.evaluator, description, common.scalars(results))
    if jax.process_index() == 0:
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "results.json").write_text(json.dumps({"encoder": description, **results}, indent=1))
        writer = metrics.create_writer(workdir)
        writer.write_scalars(0, common.scalars(results))
        writer.flush()
    return results
