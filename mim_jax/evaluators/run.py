"""Runs an evaluation job (`config.evaluator`) on an encoder and writes its results."""
from __future__ import annotations

import importlib
import json
import logging

import jax
import numpy as np
from etils import epath

from mim_jax import metrics, parallel
from mim_jax.data import catalog, pipeline
from mim_jax.evaluators import encoder as encoder_lib, knn, probes


def pretrain_config(name_and_arg: str):
    name, _, arg = name_and_arg.partition(":")
    return importlib.import_module(f"configs.{name}").get_config(arg or None)


def features_and_labels(config, mesh):
    if config.init in ("random", "pixels"):
        base = pretrain_config(config.pretrain)
    else:
        base = encoder_lib.pretrain_config_of(config.init)
    if config.data_dir:
        base.input.data_dir = config.data_dir
    encoder = encoder_lib.load(config.init, mesh, feature=config.feature, base_config=base)
    inp = base.input
    splits = {"train": config.train_split or inp.split,
              "eval": config.eval_split or catalog.EVAL_SPLITS.get(inp.dataset, "test")}
    if config.evaluator in EVAL_SPLIT_ONLY:
        del splits["train"]
    out = {}
    for name, split in splits.items():
        source = pipeline.open_source(inp.dataset, split, inp.data_dir)
        out[name] = encoder_lib.extract(encoder, source, mesh, batch_size=config.batch_size,
                                        image_size=inp.image_size, mean=inp.mean, std=inp.std,
                                        max_examples=config.get(f"max_{name}_examples"))
    num_classes = catalog.NUM_CLASSES.get(inp.dataset) or int(out["eval"][1].max() + 1)
    return out, num_classes, encoder.description


def run_knn(config, feats, num_classes, mesh) -> dict:
    (bank, bank_labels), (queries, labels) = feats["train"], feats["eval"]
    classifier = knn.KnnClassifier(bank, bank_labels, num_classes=num_classes, mesh=mesh, k=config.k, temperature=config.temperature)
    scores = np.concatenate([np.asarray(classifier.predict(queries[i:i + 1024])) for i in range(0, len(queries), 1024)])
    return {f"knn_{k}": v for k, v in knn.topk_accuracy(scores, labels).items()}


def run_linear_probe(config, feats, num_classes, mesh) -> dict:
    (x, y), (x_eval, y_eval) = feats["train"], feats["eval"]
    x, x_eval = probes.standardize(x, x_eval)
    results = probes.train_probes(probes.LinearHead(num_classes), (x, y), (x_eval, y_eval),
                                  learning_rates=tuple(config.learning_rates), epochs=config.epochs,
                                  batch_size=config.probe_batch_size, optimizer="sgd", seed=config.seed)
    return probes.best(results, "linear")


def run_attentive_probe(config, feats, num_classes, mesh) -> dict:
    (x, y), (x_eval, y_eval) = feats["train"], feats["eval"]
    results = probes.train_probes(probes.AttentiveHead(num_classes, config.num_heads), (x, y), (x_eval, y_eval),
                                  learning_rates=tuple(config.learning_rates), epochs=config.epochs,
                                  batch_size=config.probe_batch_size, optimizer="adamw",
                                  weight_decay=config.weight_decay, seed=config.seed)
    return probes.best(results, "attentive")


def run_classification(config, feats, num_classes, mesh) -> dict:
    """Accuracy of a classifier's own logits (feature='logits', e.g. a fine-tuned model)."""
    logits, labels = feats["eval"]
    return {f"classification_{k}": v for k, v in knn.topk_accuracy(logits, labels).items()}


# Evaluators that read only the evaluation split.
EVAL_SPLIT_ONLY = {"classification"}
EVALUATORS = {"knn": run_knn, "classification": run_classification, "linear_probe": run_linear_probe, "attentive_probe": run_attentive_probe}


def evaluate(config, workdir) -> dict:
    if config.evaluator not in EVALUATORS:
        raise ValueError(f"Unknown evaluator {config.evaluator!r}; available: {sorted(EVALUATORS)}.")
    mesh = parallel.make_mesh(config.mesh)
    feats, num_classes, description = features_and_labels(config, mesh)
    results = EVALUATORS[config.evaluator](config, feats, num_classes, mesh)
    logging.info("%s on %s: %s", config.evaluator, description, results)
    if jax.process_index() == 0:
        workdir = epath.Path(workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "results.json").write_text(json.dumps({"encoder": description, **results}, indent=1))
        writer = metrics.create_writer(workdir)
        writer.write_scalars(0, results)
        writer.flush()
    return results
