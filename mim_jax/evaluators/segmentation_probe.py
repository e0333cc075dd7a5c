"""Segmentation probe on frozen patch features (CAPI's protocol, facebookresearch/capi
`eval_segmentation.py`; docs/evaluation.md says where this differs).

Images are resized to `resolution` (bicubic), their label maps nearest; the encoder's patch tokens
are the features, standardised with the training patches' statistics. Each training patch carries
the labels of its p x p pixels; its label is their mode, and patches whose mode is an ignored label
are left out of fitting. Two classifiers:
- kNN (k in `knn_k`, cosine and L2): each pixel of a query patch takes the mode, over the k
  nearest training patches, of their labels at that pixel;
- multinomial logistic regression with L2 (`logistic.py`, C over `logreg_C`): the patch's class for
  all its pixels (or, with `upsample_logits`, bilinearly upsampled logits per pixel).
Hyper-parameters are chosen by mIoU on `val_fraction` of the training images (seeded), then each
classifier is refitted on all training images and scored on the evaluation split: mIoU (macro
Jaccard over the classes present in the labels or the predictions, ignored pixels left out,
`common.mean_iou`) and pixel accuracy.
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.data import catalog, pipeline
from mim_jax.errors import UserFacingError
from mim_jax.evaluators import common, logistic, probes, views
from mim_jax.evaluators.knn import nearest, shard_rows
from mim_jax.models.layers import l2_normalize

SPLITS = ("train", "eval")


def dense_data(config, inp) -> tuple[str, catalog.DenseData]:
    """The dense data set an encoder trained on `inp` is probed on, and what is known of it."""
    name = config.dense_dataset or catalog.DENSE_TASK.get(inp.dataset)
    if not name:
        raise UserFacingError(f"The segmentation probe needs a data set with per-pixel labels: set dense_dataset= "
                              f"(known: {sorted(catalog.DENSE)}; any TFDS data set with an image and a label "
                              "map works with mask_key= and num_classes=).")
    known = catalog.DENSE.get(name)
    dense = catalog.DenseData(
        image_key=known.image_key if known else "image",
        mask_key=config.mask_key or (known.mask_key if known else "segmentation"),
        ignore_labels=tuple(config.ignore_labels if config.ignore_labels is not None else
                            (known.ignore_labels if known else (255,))),
        num_classes=config.num_classes or (known.num_classes if known else 0),
        resolution=config.resolution or (known.resolution if known else 224))
    if not dense.num_classes:
        raise UserFacingError(f"{name!r} is not a known dense data set: set num_classes= (and mask_key=, "
                              "ignore_labels= if they are not 'segmentation' and (255,)).")
    channels = catalog.DATASETS[name][1] if name in catalog.DATASETS else inp.channels   # else TFDS checks
    if channels != inp.channels:
        raise UserFacingError(f"{name} has {channels}-channel images; this encoder takes {inp.channels}.")
    return name, dense


def view(config, inp, split_overrides=None) -> views.View:
    name, dense = dense_data(config, inp)
    overrides = split_overrides or {}
    splits = {"train": overrides.get("train") or "train",
              "eval": overrides.get("eval") or catalog.EVAL_SPLITS.get(name, "test")}
    transform = pipeline.DenseTransform(resolution=dense.resolution, mean=inp.mean, std=inp.std,
                                        image_key=dense.image_key, mask_key=dense.mask_key)
    return views.View(dataset=name, data_dir=inp.data_dir, splits=splits, transform=transform,
                      num_classes=dense.num_classes, ignore_labels=dense.ignore_labels)


def patch_pixels(label_maps: np.ndarray, grid: int) -> np.ndarray:
    """[n, R, R] label maps -> [n * grid * grid, p * p]: each patch's pixel labels, patches in
    raster order as the encoder's tokens, pixels in raster order within the patch."""
    n, r, _ = label_maps.shape
    p = r // grid
    x = label_maps.reshape(n, grid, p, grid, p).transpose(0, 1, 3, 2, 4)
    return x.reshape(n * grid * grid, p * p)


def mode(labels: np.ndarray, num_values: int, chunk: int = 65536) -> np.ndarray:
    """The most frequent value of each row of `labels` [n, m] (ties: the smallest)."""
    out = np.empty(len(labels), np.int32)
    for s in range(0, len(labels), chunk):
        rows = labels[s:s + chunk].astype(np.int64)
        offsets = rows + num_values * np.arange(len(rows))[:, None]
        out[s:s + chunk] = np.bincount(offsets.ravel(), minlength=len(rows) * num_values).reshape(
            len(rows), num_values).argmax(axis=1)
    return out


@functools.partial(jax.jit, static_argnames=("ks", "num_values", "mesh", "axes"))
def _knn_pixels(queries, bank, bank_labels, valid, *, ks, num_values, mesh, axes):
    """Per k in `ks`: [q, p*p] labels, each pixel the mode of the k nearest patches' labels there."""
    _, labels = nearest(queries, bank, bank_labels, valid, k=max(ks), mesh=mesh, axes=axes)   # sorted, best first
    out = []
    for k in ks:
        counts = jax.nn.one_hot(labels[:, :k], num_values, dtype=jnp.int32).sum(axis=1)   # [q, p*p, V]
        out.append(counts.argmax(axis=-1))
    return jnp.stack(out)


class PatchKnn:
    """The kNN of the protocol on one training bank: predictions for every k of `ks` at once."""

    def __init__(self, x, pixel_labels, *, distance: str, ks, num_values: int, mesh):
        self.distance, self.ks, self.num_values, self.mesh = distance, tuple(ks), num_values, mesh
        self.axes = tuple(mesh.axis_names)
        bank = self._keys(np.asarray(x, np.float32))
        self.bank, self.labels, self.valid = shard_rows(mesh, bank, np.asarray(pixel_labels, np.int32))
        # Enough queries per call for the device, few enough that the one-hot vote stays ~256 MB.
        self.chunk = max(1, min(4096, 2 ** 26 // (max(ks) * pixel_labels.shape[1] * num_values)))

    def _keys(self, x):
        if self.distance == "cosine":
            return np.asarray(l2_normalize(jnp.asarray(x)))
        # L2: argmax of q.b - |b|^2 / 2 is the argmin of |q - b|^2; the query side gets a 1.
        return np.concatenate([x, -0.5 * (x.astype(np.float64) ** 2).sum(1, keepdims=True).astype(np.float32)], 1)

    def _queries(self, x):
        if self.distance == "cosine":
            return l2_normalize(jnp.asarray(x))
        return jnp.concatenate([jnp.asarray(x), jnp.ones((len(x), 1), jnp.float32)], 1)

    def predict(self, x) -> dict:
        """{k: [n, p*p] pixel labels} for query patches `x` [n, D]."""
        parts = [np.asarray(_knn_pixels(self._queries(np.asarray(x[s:s + self.chunk], np.float32)), self.bank,
                                        self.labels, self.valid, ks=self.ks, num_values=self.num_values,
                                        mesh=self.mesh, axes=self.axes))
                 for s in range(0, len(x), self.chunk)]
        stacked = np.concatenate(parts, axis=1)
        return {k: stacked[i] for i, k in enumerate(self.ks)}


def _upsampled(logits: np.ndarray, grid: int, resolution: int) -> np.ndarray:
    """Patch logits [n * grid^2, K] -> [n * grid^2, p*p] labels from logits bilinearly upsampled to
    the pixels (half-pixel centres, as torch's align_corners=False), in `patch_pixels` order."""
    n = len(logits) // (grid * grid)
    maps = jnp.asarray(logits).reshape(n, grid, grid, -1)
    up = jax.image.resize(maps, (n, resolution, resolution, maps.shape[-1]), "bilinear", antialias=False)
    return patch_pixels(np.asarray(up.argmax(-1)), grid)


class Probe:
    """The protocol on one data set's patch features: fitting, the hyper-parameter search, scores."""

    def __init__(self, config, *, grid: int, resolution: int, num_classes: int, ignore, mesh):
        self.config, self.grid, self.resolution, self.mesh = config, grid, resolution, mesh
        self.num_classes, self.ignore = num_classes, tuple(ignore)

    def training_rows(self, x, pixels):
        """Every `train_subsampling`-th patch, without those whose mode is an ignored label:
        (features, pixel labels, patch labels)."""
        step = self.config.train_subsampling
        x, pixels = x[::step], pixels[::step]
        labels = mode(pixels, self.num_values(pixels))
        keep = ~np.isin(labels, self.ignore)
        return x[keep], pixels[keep], labels[keep]

    @staticmethod
    def num_values(*label_arrays) -> int:
        return int(max(a.max() for a in label_arrays)) + 1

    def knn(self, train, queries, only=None) -> dict:
        """{(k, distance): [n, p*p] predictions} for every point of the grid (or `only` that one)."""
        x, pixels, _ = self.training_rows(*train)
        values = self.num_values(pixels, np.asarray([self.num_classes - 1]))
        ks, distances = ((only[0],), (only[1],)) if only else (self.config.knn_k, self.config.knn_distances)
        out = {}
        for distance in distances:
            knn = PatchKnn(x, pixels, distance=distance, ks=ks, num_values=values, mesh=self.mesh)
            out.update({(k, distance): p for k, p in knn.predict(queries).items()})
        return out

    def logreg(self, train, queries, only=None) -> dict:
        """{C: [n, p*p] predictions} for every C of the grid (or `only` that one)."""
        x, _, labels = self.training_rows(*train)
        out, fit = {}, None
        for C in (only,) if only else sorted(self.config.logreg_C):
            fit = logistic.fit(x, labels, num_classes=self.num_classes, C=C, mesh=self.mesh,
                               max_iter=self.config.logreg_max_iter, tol=self.config.logreg_tol, start=fit)
            logging.info("segmentation probe: logistic regression C=%.3g: %d L-BFGS steps, gradient norm %.2g",
                         C, fit.iterations, fit.grad_norm)
            logits = fit.logits(queries)
            if self.config.upsample_logits:
                out[C] = _upsampled(logits, self.grid, self.resolution)
            else:
                out[C] = np.repeat(logits.argmax(1)[:, None], (self.resolution // self.grid) ** 2, axis=1)
        return out

    def scores(self, truth, predicted) -> dict:
        return {"miou": common.mean_iou(truth, predicted, self.ignore),
                "acc": common.pixel_accuracy(truth, predicted, self.ignore)}


def _grid_name(params) -> str:
    return f"k={params[0]},{params[1]}" if isinstance(params, tuple) else f"C={params:.3g}"


def evaluate(config, feats, view, mesh) -> dict:
    (x, maps), (x_test, maps_test) = feats["train"], feats["eval"]
    n, tokens, _ = x.shape
    grid, resolution = int(round(tokens ** 0.5)), maps.shape[1]
    if grid * grid != tokens or resolution % grid:
        raise UserFacingError(f"The segmentation probe needs a square grid of patch tokens dividing the "
                              f"{resolution}-pixel label maps; got {tokens} tokens.")
    probe = Probe(config, grid=grid, resolution=resolution, num_classes=view.classes(feats),
                  ignore=view.ignore_labels, mesh=mesh)
    flat_x, test_x = probes.standardize(x.reshape(n * tokens, -1), x_test.reshape(-1, x.shape[-1]))
    pixels, test_pixels = patch_pixels(maps, grid), patch_pixels(maps_test, grid)
    # Hyper-parameters are chosen on held-out training images, as the official random 10 % split.
    order = np.random.default_rng(config.seed).permutation(n)
    held_out = max(1, int(round(n * config.val_fraction)))
    rows = lambda images: (images[:, None] * tokens + np.arange(tokens)).ravel()  # noqa: E731
    fit_rows, val_rows = rows(order[held_out:]), rows(order[:held_out])

    searches = {"knn": probe.knn, "logreg": probe.logreg}
    unknown = set(config.classifiers) - set(searches)
    if unknown:
        raise UserFacingError(f"--config.classifiers: unknown {sorted(unknown)}; the probe has {sorted(searches)}.")
    results = {}
    for name in config.classifiers:
        search = searches[name]
        sweep = {point: probe.scores(pixels[val_rows], predicted)["miou"]
                 for point, predicted in search((flat_x[fit_rows], pixels[fit_rows]), flat_x[val_rows]).items()}
        best = max(sweep, key=sweep.get)
        logging.info("segmentation probe: %s, best on the held-out images: %s (mIoU %.4f)", name,
                     _grid_name(best), sweep[best])
        predicted = search((flat_x, pixels), test_x, only=best)[best]
        results.update({f"seg_{name}_{metric}": value for metric, value in probe.scores(test_pixels, predicted).items()})
        results[f"seg_{name}_best"] = _grid_name(best)
        results[f"seg_{name}_sweep"] = {_grid_name(point): value for point, value in sweep.items()}
    return results
