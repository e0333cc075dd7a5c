"""ContrastiveCrop's center-suppressed crops and CMAE's second-view colour augmentations (docs/methods/cmae.md
§2.3, §1.5), in NumPy/OpenCV. They run in Grain worker processes: never import jax here.

Images are HWC uint8 with C = 1 or 3, as in `transforms`. Randomness comes only from the numpy
Generator passed in. Boxes are normalised (h_min, w_min, h_max, w_max), as produced by
`mim_jax.methods.cmae.contrastive.heatmap_boxes` and stored per example index.

Reference: xyupeng/ContrastiveCrop `datasets/transforms/ContrastiveCrop.py`
(`ContrastiveCrop.get_params`); the draws come in the same order as there (area fraction, log
aspect ratio per try; then the row Beta, then the column Beta), from numpy instead of torch, so the
crops are equal in distribution, not bit-for-bit.
"""
from __future__ import annotations

import math

import numpy as np

from mim_jax.data.transforms import color_jitter, resize


def _confined_start(size: int, crop: int, lo: float, hi: float, u: float) -> int:
    """Top (or left) offset whose crop centre, offset + crop // 2, lies in [int(size*lo),
    int(size*hi)] as far as keeping the crop inside the image allows.

    `int(size * lo)` is a float64 product of the stored box value, truncated, as in the official
    code (its boxes come through `.float().tolist()`): with float32 boxes of the form k/size this
    sometimes yields k - 1, and we keep that rather than "fixing" it."""
    c0 = min(max(int(size * lo) - crop // 2, 0), size - crop)
    c1 = min(max(int(size * hi) - crop // 2, 0), size - crop)
    return c0 + int((c1 - c0) * u)


def _central_crop(height: int, width: int, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop's fallback: the whole image, trimmed to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def sample_box_crop(height: int, width: int, rng: np.random.Generator, box, scale=(0.2, 1.0),
                    ratio=(3 / 4, 4 / 3), alpha: float = 0.6) -> tuple[int, int, int, int]:
    """ContrastiveCrop.get_params: RandomResizedCrop's size, with the crop centre placed in `box`.

    Up to 10 tries of an area fraction ~ U(scale) and a log-uniform aspect ratio; the first size
    that fits is placed with independent Beta(alpha, alpha) draws for the row and the column
    (alpha < 1 favours the box edges, which pushes two views of one image apart). The crop itself
    may extend past the box; only its centre is confined, and the centre is clipped where the box
    lies closer to the border than half the crop. If no size fits: the central crop.
    Returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    h_min, w_min, h_max, w_max = (float(v) for v in box)
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            # Two separate draws, rows first, as the official code samples its Beta twice.
            top = _confined_start(height, h, lo=h_min, hi=h_max, u=float(rng.beta(alpha, alpha)))
            left = _confined_start(width, w, lo=w_min, hi=w_max, u=float(rng.beta(alpha, alpha)))
            return top, left, h, w
    return _central_crop(height, width, ratio)


def contrastive_crop(image: np.ndarray, rng: np.random.Generator, box, size: int, scale=(0.2, 1.0),
                     ratio=(3 / 4, 4 / 3), alpha: float = 0.6, interpolation: str = "auto") -> np.ndarray:
    """The ContrastiveCrop transform: `sample_box_crop` on the original image, resized to size x size."""
    top, left, h, w = sample_box_crop(image.shape[0], image.shape[1], rng, box=box, scale=scale, ratio=ratio,
                                      alpha=alpha)
    return resize(image[top:top + h, left:left + w], size, interpolation)


def random_color_jitter(image: np.ndarray, rng: np.random.Generator, p: float = 0.8, brightness: float = 0.4,
                        contrast: float = 0.4, saturation: float = 0.2, hue: float = 0.1) -> np.ndarray:
    """torchvision RandomApply([ColorJitter(b, c, s, hue)], p); the defaults are SDMAE's second view."""
    # RandomApply skips when p < u, so u == p still applies.
    if p < rng.random():
        return image
    return color_jitter(image, rng, brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)


def random_grayscale(image: np.ndarray, rng: np.random.Generator, p: float = 0.2) -> np.ndarray:
    """torchvision RandomGrayscale(p) on a PIL image: ITU-R 601 luma copied to every channel.

    The luma is PIL's `convert('L')` fixed-point rounding, (19595 R + 38470 G + 7471 B + 2^15) >> 16,
    since SDMAE applies this transform to PIL images. One uniform is drawn whatever the channel
    count, so the random stream does not depend on it; a 1-channel image is returned unchanged."""
    if not rng.random() < p or image.shape[2] == 1:
        return image
    rgb = image.astype(np.uint32)
    luma = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
    return np.repeat(luma.astype(np.uint8)[..., None], image.shape[2], axis=2)
