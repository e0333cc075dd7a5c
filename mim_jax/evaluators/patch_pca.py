"""Pictures of patch features: the first principal components of the patch tokens of a few images,
fitted jointly over those images, as RGB beside the images (CAPI's `eval_visualizations.py` joint
PCA, DINOv2's figures). Written by `python -m mim_jax.visualize --pca` and, for every method, as
the TensorBoard image `patch_pca` at every evaluation step of a pre-training run.

Each component's sign makes its skew positive and all are divided by the first one's standard
deviation (as CAPI); RGB maps [-2.3, 2.3] to [0, 1]. With `background`, the first component
separates foreground from background (`foreground`: the side of each image's border patches is
background, drawn black) and the colours come from a second PCA of the foreground patches only,
as DINOv2 does.
"""
from __future__ import annotations

import numpy as np

from mim_jax.evaluators.reconstructions import tile

RANGE = 2.3   # CAPI's colour range, in units of the first component's standard deviation


def principal_components(x: np.ndarray, k: int) -> np.ndarray:
    """[n, D] -> [n, k] projections on the first k principal components (float64 SVD of the
    centred rows), signs set so each has a positive skew, divided by the first one's std."""
    x = np.asarray(x, np.float64)
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:k].T
    projected *= np.where((projected ** 3).mean(0) < 0, -1.0, 1.0)
    return projected / max(projected[:, 0].std(), 1e-12)


def _border(grid: int) -> np.ndarray:
    edge = np.zeros((grid, grid), bool)
    edge[0, :] = edge[-1, :] = edge[:, 0] = edge[:, -1] = True
    return edge.ravel()


def foreground(tokens: np.ndarray) -> np.ndarray:
    """[B, N] mask of each image's foreground patches: the first component (fitted over all the
    images) is split, per image, halfway between the mean of the image's border patches and the
    mean of the others; the border's side is background. Joint PCA's first component may separate
    images (shoes from shirts) rather than objects from background, which one threshold for all
    images would turn into black images."""
    b, n, _ = tokens.shape
    first = principal_components(tokens.reshape(b * n, -1), 1)[:, 0].reshape(b, n)
    border = _border(int(round(n ** 0.5)))
    outer, inner = first[:, border].mean(1, keepdims=True), first[:, ~border].mean(1, keepdims=True)
    return np.abs(first - inner) < np.abs(first - outer)


def pca_rgb(tokens: np.ndarray, *, background: bool = True) -> np.ndarray:
    """Patch tokens [B, N, D] of a square grid -> [B, g, g, 3] colours in [0, 1]."""
    b, n, d = tokens.shape
    grid = int(round(n ** 0.5))
    keep = foreground(tokens) if background else np.ones((b, n), bool)
    if keep.sum() < 3:            # nothing (or too little) on the foreground side: colour every patch
        keep = np.ones((b, n), bool)
    colours = np.zeros((b, n, 3))
    colours[keep] = (principal_components(tokens[keep], 3) + RANGE) / (2 * RANGE)
    return np.clip(colours, 0.0, 1.0).reshape(b, grid, grid, 3)


def picture(images: np.ndarray, colours: np.ndarray, scale: int = 1) -> np.ndarray:
    """uint8 grid of two columns: each image (in [0, 1], grey or RGB) beside its PCA colours
    enlarged to the image's size (nearest)."""
    s = images.shape[1]
    images = np.broadcast_to(images, images.shape[:3] + (3,)) if images.shape[-1] == 1 else images
    colours = colours.repeat(s // colours.shape[1], axis=1).repeat(s // colours.shape[2], axis=2)
    return tile([images, colours], scale)
