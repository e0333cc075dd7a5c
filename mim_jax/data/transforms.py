"""Image augmentations in NumPy/OpenCV. They run in Grain worker processes: never import jax here.

Images are HWC uint8 with C = 1 or 3; the channel axis is kept even when C = 1 (cv2 drops it).
Randomness comes only from the numpy Generator passed in, so a crop is a function of its seed.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from mim_jax.data import decode


def resize(image: np.ndarray, size: int, interpolation: str = "auto") -> np.ndarray:
    """'auto': area averaging when shrinking (no aliasing), bilinear when enlarging; 'bicubic' as
    the BEiT/CAE recipes (torchvision's bicubic, values clipped back to uint8); 'nearest' for
    label maps (the source pixel at floor(i * scale), as torchvision's)."""
    if interpolation == "bicubic":
        flag = cv2.INTER_CUBIC
    elif interpolation == "nearest":
        flag = cv2.INTER_NEAREST
    elif interpolation == "auto":
        flag = cv2.INTER_AREA if image.shape[0] > size or image.shape[1] > size else cv2.INTER_LINEAR
    else:
        raise ValueError(f"Unknown interpolation {interpolation!r}: use 'auto', 'bicubic' or 'nearest'.")
    out = cv2.resize(image, (size, size), interpolation=flag)
    return out.reshape(size, size, image.shape[2])  # cv2 drops a single channel axis


def sample_crop_box(height: int, width: int, rng: np.random.Generator, scale, ratio):
    """torchvision's RandomResizedCrop box: 10 tries at a random area fraction and log-uniform
    aspect ratio, else a centre crop clamped to the ratio range. Returns (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "auto") -> np.ndarray:
    top, left, h, w = sample_crop_box(image.shape[0], image.shape[1], rng, scale, ratio)
    return resize(image[top:top + h, left:left + w], size, interpolation)


def random_resized_crop_encoded(record_image, rng: np.random.Generator, size: int, channels: int,
                                scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), interpolation: str = "auto",
                                max_reduction: int = 8) -> np.ndarray:
    """`random_resized_crop` of a record's image that may still be encoded: the same box (drawn
    from the header's size with the same random stream), the JPEG decoded at reduced scale when
    the box allows (`decode.crop_region`; max_reduction=1 always decodes at full size)."""
    if not decode.is_encoded(record_image):
        return random_resized_crop(record_image, rng, size, scale, ratio, interpolation)
    known = decode.header(record_image)
    box = sample_crop_box(known[0], known[1], rng, scale, ratio)
    return resize(decode.crop_region(record_image, box, size, channels, max_reduction, known), size, interpolation)


def _grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma as torchvision/PIL, [H, W, 1] float."""
    if image.shape[2] == 1:
        return image.astype(np.float32)
    return (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def _adjust_hue(image: np.ndarray, factor: float) -> np.ndarray:
    """torchvision adjust_hue on a float [0, 255] image: the HSV hue shifted by `factor` turns
    (mod 1). Grey levels carry no hue, so 1-channel images are returned unchanged."""
    if image.shape[2] == 1:
        return image
    hsv = cv2.cvtColor(image / np.float32(255), cv2.COLOR_RGB2HSV)   # float input: H in degrees
    hsv[..., 0] = np.mod(hsv[..., 0] + np.float32(360 * factor), np.float32(360))
    return np.clip(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB) * np.float32(255), 0, 255)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness: float = 0.4,
                 contrast: float = 0.4, saturation: float = 0.4, hue: float = 0.0) -> np.ndarray:
    """torchvision ColorJitter(b, c, s, hue): each factor uniform in [max(0, 1-x), 1+x], the
    adjustments in a random order, each blending with a reference and clipping to [0, 255]:
    black (brightness), the mean grey level (contrast), the grey image (saturation); hue shifts
    by a factor uniform in [-hue, hue] (of a full turn). Hue joins the permutation only when it is
    non-zero, so hue=0 keeps the three-op random stream of the version without hue."""
    if not 0 <= hue <= 0.5:
        raise ValueError(f"hue must lie in [0, 0.5], got {hue}.")
    out = image.astype(np.float32)
    strengths = (brightness, contrast, saturation) + ((hue,) if hue else ())
    for op in rng.permutation(len(strengths)):
        strength = strengths[op]
        if not strength:
            continue
        if op == 3:
            out = _adjust_hue(out, rng.uniform(-hue, hue))
            continue
        factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
        if op == 0:
            reference = 0.0
        elif op == 1:
            reference = float(np.round(_grayscale(out).mean()))
        else:
            reference = _grayscale(out)
        out = np.clip(factor * out + (1 - factor) * reference, 0, 255)
    return np.round(out).astype(np.uint8)


def horizontal_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    return image[:, ::-1] if rng.random() < p else image


def center_crop_resize(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
    """Evaluation view: central crop of `crop_fraction` of the shorter side, resized to `size`."""
    h, w = image.shape[:2]
    side = int(round(min(h, w) * crop_fraction))
    top, left = (h - side) // 2, (w - side) // 2
    return resize(image[top:top + side, left:left + side], size)


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    """uint8 HWC -> float32, per-channel (x/255 - mean) / std."""
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    return (image.astype(np.float32) / 255.0 - mean) / std
