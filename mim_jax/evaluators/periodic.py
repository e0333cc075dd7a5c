"""Evaluators run inside pre-training (`config.evals.<name>`), on the live encoder parameters.

  config.evals.knn = dict(type="knn", every_epochs=1.0, max_train_examples=10_000, ...)

Each entry takes the options of its evaluation config (configs/knn.py, linear_probe.py, ...) plus a
unit-free interval (`every_steps` or `every_epochs`). Results are logged as `eval/<name>/<metric>`;
at the same steps the patch features of `config.reconstruction_images` evaluation images are drawn
as the image `patch_pca`, and pixel methods add their reconstructions as `reconstructions`.
"""
from __future__ import annotations

import time

import jax
import numpy as np

from mim_jax import config_lib, parallel
from mim_jax.evaluators import common, encoder as encoder_lib, get as get_evaluator, patch_pca, reconstructions, views


class PeriodicEvals:

    def __init__(self, config, method, sharding, steps_per_epoch: float):
        self.config, self.method, self.sharding = config, method, sharding
        self.evals = {}
        for name, cfg in config.evals.items():
            every = config_lib.steps(cfg, "every", steps_per_epoch=steps_per_epoch)
            if not every:
                raise ValueError(f"config.evals.{name} needs every_steps or every_epochs.")
            self.evals[name] = (cfg, every, get_evaluator(cfg.type))
        self._encode = {}
        self._open = {}
        self._reconstruct = self._batch = self._tokens = self._images = None
        self._seconds = {}   # name -> how long its last run took

    def due(self, step: int, last: bool) -> list[str]:
        return [name for name, (_, every, _) in self.evals.items() if step % every == 0 or last]

    def estimate(self, names: list[str]) -> float | None:
        """Seconds these evaluations should take, as long as their last runs; None before each ran."""
        if not all(name in self._seconds for name in names):
            return None
        return sum(self._seconds[name] for name in names)

    def remaining(self, step: int, total: int) -> tuple[float, int]:
        """What the evaluations due at `step` (not run yet) and later, up to `total` (where every
        one runs), will cost: (seconds, as long as each one's last run took; how many runs of
        evaluations that have not run yet, so have no cost to go by)."""
        seconds, untimed = 0.0, 0
        for name, (_, every, _) in self.evals.items():
            runs = total // every - (step - 1) // every + (total % every != 0) if step <= total else 0
            if name in self._seconds:
                seconds += runs * self._seconds[name]
            else:
                untimed += runs
        return seconds, untimed

    def _source(self, view, split):
        key = (view.dataset, view.splits[split])
        if key not in self._open:
            self._open[key] = view.open(split, self.config.input.channels)
        return self._open[key]

    def run(self, names: list[str], params) -> dict:
        inp, scalars = self.config.input, {}
        for name in names:
            start = time.perf_counter()
            cfg, _, evaluator = self.evals[name]
            if cfg.feature not in self._encode:
                self._encode[cfg.feature] = self.sharding.jit(
                    lambda p, images, f=cfg.feature: encoder_lib.select(self.method.encode(p, images), f))
            encoder = encoder_lib.Encoder(lambda images, f=cfg.feature: self._encode[f](params, images),
                                          self.config, "live encoder")
            view = views.of(evaluator, cfg, inp)
            feats = {split: encoder_lib.extract(encoder, self._source(view, split), self.sharding.mesh,
                                                batch_size=cfg.batch_size, transform=view.transform,
                                                max_examples=cfg[f"max_{split}_examples"],
                                                what=f"{name}: {split} features")
                     for split in view.splits}
            results = evaluator.evaluate(cfg, feats, view, self.sharding.mesh)
            scalars.update({f"eval/{name}/{k}": v for k, v in common.scalars(results).items()})
            self._seconds[name] = time.perf_counter() - start
        return scalars

    def images(self, params) -> dict:
        """TensorBoard images of `config.reconstruction_images` evaluation images: `patch_pca` (the
        patch features' principal components beside the images, every method) and, for a pixel
        method, `reconstructions`; [1, H, W, C] uint8 grids, the same images at every step."""
        count = self.config.reconstruction_images
        if not count:
            return {}
        if self._batch is None:
            self._batch = reconstructions.eval_batch(self.method, count)
            # The small batch and the tokens are replicated, so every process of a multi-host run reads them.
            replicated = parallel.replicated(self.sharding.mesh)
            self._tokens = self.sharding.jit(lambda p, images: self.method.encode(p, images)["patch_tokens"],
                                             out_shardings=replicated)
            self._images = jax.device_put(self._batch["image"], replicated)
        inp, out = self.config.input, {}
        images = self._batch["image"]
        colours = patch_pca.pca_rgb(np.asarray(jax.device_get(self._tokens(params, self._images))))
        shown = images * np.asarray(inp.std) + np.asarray(inp.mean)
        out["patch_pca"] = patch_pca.picture(shown, colours, reconstructions.default_scale(images.shape[1]))[None]
        if self.method.reconstructions is not None:
            if self._reconstruct is None:   # the same images and masks at every step: progress shows
                self._reconstruct = reconstructions.reconstructor(self.method, self.sharding, self.config.seed)
            columns = self._reconstruct(params, self._batch)
            scale = reconstructions.default_scale(columns["images"].shape[1])
            out["reconstructions"] = reconstructions.grid(columns, scale)[None]
        return out
