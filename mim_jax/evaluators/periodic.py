"""Evaluators run inside pre-training (`config.evals.<name>`), on the live encoder parameters.

  config.evals.knn = dict(type="knn", every_epochs=1.0, max_train_examples=10_000, ...)

Each entry takes the options of its evaluation config (configs/knn.py, linear_probe.py, ...) plus a
unit-free interval (`every_steps` or `every_epochs`). Results are logged as `eval/<name>/<metric>`.
"""
from __future__ import annotations

import jax

from mim_jax import config_lib
from mim_jax.data import catalog, pipeline
from mim_jax.evaluators import encoder as encoder_lib, run


class PeriodicEvals:

    def __init__(self, config, method, mesh, steps_per_epoch: float):
        self.config, self.method, self.mesh = config, method, mesh
        self.evals = {}
        for name, cfg in config.get("evals", {}).items():
            every = config_lib.steps(cfg, "every", steps_per_epoch=steps_per_epoch)
            if not every:
                raise ValueError(f"config.evals.{name} needs every_steps or every_epochs.")
            if cfg.type not in run.EVALUATORS:
                raise ValueError(f"config.evals.{name}.type={cfg.type!r}; available: {sorted(run.EVALUATORS)}.")
            self.evals[name] = (cfg, every)
        self._encode = {}
        self._sources = None

    def due(self, step: int, last: bool) -> list[str]:
        return [name for name, (_, every) in self.evals.items() if step % every == 0 or last]

    def _splits(self):
        if self._sources is None:
            inp = self.config.input
            self._sources = {
                "train": pipeline.open_source(inp.dataset, inp.split, inp.data_dir),
                "eval": pipeline.open_source(inp.dataset, catalog.EVAL_SPLITS.get(inp.dataset, "test"), inp.data_dir)}
        return self._sources

    def run(self, names: list[str], params) -> dict:
        inp, scalars = self.config.input, {}
        for name in names:
            cfg, _ = self.evals[name]
            if cfg.feature not in self._encode:
                self._encode[cfg.feature] = jax.jit(
                    lambda p, images, f=cfg.feature: encoder_lib.select(self.method.encode(p, images), f))
            encoder = encoder_lib.Encoder(lambda images, f=cfg.feature: self._encode[f](params, images),
                                          self.config, "live encoder")
            feats = {split: encoder_lib.extract(encoder, source, self.mesh, batch_size=cfg.batch_size,
                                                image_size=inp.image_size, mean=inp.mean, std=inp.std,
                                                max_examples=cfg.get(f"max_{split}_examples"))
                     for split, source in self._splits().items()
                     if split == "eval" or cfg.type not in run.EVAL_SPLIT_ONLY}
            num_classes = catalog.NUM_CLASSES.get(inp.dataset) or int(feats["eval"][1].max() + 1)
            results = run.EVALUATORS[cfg.type](cfg, feats, num_classes, self.mesh)
            scalars.update({f"eval/{name}/{k}": v for k, v in results.items()})
        return scalars
