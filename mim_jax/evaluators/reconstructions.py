"""Reconstruction images of the pixel methods (MAE, Beyond Masking, CMAE): one row per evaluation
image with the COLUMNS original, masked input, reconstruction, reconstruction with the visible
patches pasted back. Written as a PNG by `python -m mim_jax.visualize` and as a TensorBoard image
at every evaluation step of a pre-training run (evaluators/periodic.py)."""
from __future__ import annotations

import jax
import numpy as np

from mim_jax import parallel
from mim_jax.data import pipeline
from mim_jax.errors import UserFacingError
from mim_jax.evaluators import views

COLUMNS = ("images", "masked", "reconstruction", "pasted")
PAD = 2   # pixels of white between cells and around the grid


class NoPixelsError(UserFacingError, ValueError):
    """The run's method predicts no pixels."""


def check_pixels(method) -> None:
    if method.reconstructions is None:
        raise NoPixelsError(f"{method.config.method.name} has no pixel decoder (it predicts features, not pixels), "
                            "so it has no reconstructions to show: mim_jax.visualize takes MAE, Beyond Masking "
                            "and CMAE runs.")


def eval_batch(method, num_images: int, data_dir: str | None = None) -> dict:
    """The first `num_images` images of the run's evaluation split at the size its train batches
    have (Beyond Masking's view), normalised, with their indices (which key the masks)."""
    inp = method.config.input
    split = views.split_names(inp, ("eval",))["eval"]
    source = pipeline.open_source(inp.dataset, split, data_dir or inp.data_dir, channels=inp.channels)
    size = method.batch_spec(1)["image"].shape[1]
    transform = pipeline.EvalTransform(size, inp.mean, inp.std)
    examples = [transform(source[i], None) for i in range(min(num_images, len(source)))]
    return {"image": np.stack([e["image"] for e in examples]).astype(np.float32),
            "label": np.asarray([e["label"] for e in examples], np.int32),
            "index": np.arange(len(examples), dtype=np.int32)}


def reconstructor(method, sharding: parallel.Sharding, seed: int):
    """params, batch -> host arrays of `method.reconstructions`. The params stay where they are
    (sharded over the mesh); the small batch and the outputs are replicated, so every process of a
    multi-host run can read them."""
    check_pixels(method)
    replicated = parallel.replicated(sharding.mesh)
    fn = sharding.jit(lambda p, b: method.reconstructions(p, b, jax.random.key(seed)), out_shardings=replicated)

    def reconstruct(params, batch: dict) -> dict:
        batch = {k: jax.device_put(v, replicated) for k, v in batch.items()}
        return jax.device_get(fn(params, batch))
    return reconstruct


def tile(columns, scale: int = 1) -> np.ndarray:
    """uint8 [rows * cell + pad, len(columns) * cell + pad, C] image of `columns` (each [B, S, S, C]
    in [0, 1]), cells enlarged `scale` times (nearest), PAD white pixels between and around them."""
    cols = [np.clip(np.asarray(col, np.float32), 0.0, 1.0) for col in columns]
    b, s, _, c = cols[0].shape
    cell = s * scale
    out = np.ones((b * (cell + PAD) + PAD, len(cols) * (cell + PAD) + PAD, c), np.float32)
    for j, col in enumerate(cols):
        big = col.repeat(scale, axis=1).repeat(scale, axis=2)
        for i in range(b):
            top, left = PAD + i * (cell + PAD), PAD + j * (cell + PAD)
            out[top:top + cell, left:left + cell] = big[i]
    return np.round(out * 255.0).astype(np.uint8)


def grid(columns: dict, scale: int = 1) -> np.ndarray:
    """The COLUMNS of a reconstruction as one image (`tile`)."""
    return tile([columns[k] for k in COLUMNS], scale)


def default_scale(size: int) -> int:
    """Cells of about 64 pixels: 28x28 Fashion-MNIST is unreadable at its own size."""
    return max(1, 64 // size)
