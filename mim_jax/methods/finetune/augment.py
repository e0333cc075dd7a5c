"""Fine-tuning's host transform (`FinetuneTransform`): RandAugment (timm's `rand-m9-mstd0.5-inc1`,
used by MAE/BEiT fine-tuning) and random erasing, in NumPy/OpenCV for HWC uint8 images with 1 or 3
channels. Runs in Grain workers: no jax here.

Magnitudes follow timm's increasing variant: every op gets stronger with the magnitude m in
[0, 10], which is drawn per op as N(m, std) and clipped; geometric ops and signed enhancements flip
their sign with probability 1/2; each op is applied with probability 0.5.
"""
from __future__ import annotations

import cv2
import numpy as np

from mim_jax.data import transforms
from mim_jax.data.pipeline import PretrainTransform

_MAX = 10.0


def _affine(img, matrix):
    h, w = img.shape[:2]
    out = cv2.warpAffine(img, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=(128,) * 3)
    return out.reshape(img.shape)


def _blend(img, other, factor):
    return np.clip(other + factor * (img.astype(np.float32) - other), 0, 255).astype(np.uint8)


def _gray(img):
    return img.astype(np.float32).mean(axis=2, keepdims=True) if img.shape[2] == 3 else img.astype(np.float32)


def _equalize(img):
    return np.stack([cv2.equalizeHist(np.ascontiguousarray(img[..., c])) for c in range(img.shape[2])], -1)


def _autocontrast(img):
    lo = img.min(axis=(0, 1), keepdims=True).astype(np.float32)
    hi = img.max(axis=(0, 1), keepdims=True).astype(np.float32)
    scale = np.where(hi > lo, 255.0 / np.maximum(hi - lo, 1), 1.0)
    return np.clip((img - lo) * scale, 0, 255).astype(np.uint8)


def _sharpen_base(img):
    smooth = cv2.filter2D(img, -1, np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13).reshape(img.shape)
    out = smooth.astype(np.float32)
    out[0], out[-1], out[:, 0], out[:, -1] = img[0], img[-1], img[:, 0], img[:, -1]  # PIL keeps the border
    return out


# name -> fn(img, level in [0, 1], sign in {-1, 1})
OPS = {
    "AutoContrast": lambda img, v, s: _autocontrast(img),
    "Equalize": lambda img, v, s: _equalize(img),
    "Invert": lambda img, v, s: 255 - img,
    "Rotate": lambda img, v, s: _affine(img, cv2.getRotationMatrix2D(
        (img.shape[1] / 2, img.shape[0] / 2), s * 30 * v, 1.0)),
    # Keep 4 - int(4v) high bits (timm's increasing posterize): mask = 0xFF << (8 - bits).
    "Posterize": lambda img, v, s: img & np.uint8((0xFF << (4 + int(4 * v))) & 0xFF),
    "Solarize": lambda img, v, s: np.where(img < 256 - 256 * v, img, 255 - img).astype(np.uint8),
    "SolarizeAdd": lambda img, v, s: np.where(img < 128, np.minimum(img.astype(np.int32) + int(110 * v), 255),
                                              img).astype(np.uint8),
    "Color": lambda img, v, s: _blend(img, _gray(img), 1 + s * 0.9 * v),
    "Contrast": lambda img, v, s: _blend(img, _gray(img).mean(), 1 + s * 0.9 * v),
    "Brightness": lambda img, v, s: _blend(img, 0.0, 1 + s * 0.9 * v),
    "Sharpness": lambda img, v, s: _blend(img, _sharpen_base(img), 1 + s * 0.9 * v),
    "ShearX": lambda img, v, s: _affine(img, np.float32([[1, s * 0.3 * v, 0], [0, 1, 0]])),
    "ShearY": lambda img, v, s: _affine(img, np.float32([[1, 0, 0], [s * 0.3 * v, 1, 0]])),
    "TranslateX": lambda img, v, s: _affine(img, np.float32([[1, 0, s * 0.45 * v * img.shape[1]], [0, 1, 0]])),
    "TranslateY": lambda img, v, s: _affine(img, np.float32([[1, 0, 0], [0, 1, s * 0.45 * v * img.shape[0]]])),
}


def rand_augment(img: np.ndarray, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5) -> np.ndarray:
    for name in rng.choice(list(OPS), size=num_ops):
        if rng.random() > prob:
            continue
        m = float(np.clip(rng.normal(magnitude, magnitude_std) if magnitude_std else magnitude, 0, _MAX))
        img = OPS[name](img, m / _MAX, 1 if rng.random() < 0.5 else -1).reshape(img.shape)
    return img


def random_erasing(img: np.ndarray, rng: np.random.Generator, prob: float = 0.25, scale=(0.02, 1 / 3),
                   ratio=(0.3, 3.3)) -> np.ndarray:
    """timm's RandomErasing(mode='pixel') on a normalised float image: a random box of N(0, 1) noise."""
    if rng.random() >= prob:
        return img
    h, w, c = img.shape
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        eh, ew = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
        if eh < h and ew < w:
            top, left = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
            img = img.copy()
            img[top:top + eh, left:left + ew] = rng.normal(size=(eh, ew, c)).astype(img.dtype)
            return img
    return img


class FinetuneTransform(PretrainTransform):
    """Pre-training crops + RandAugment before normalising + random erasing after (MAE fine-tuning)."""

    def __init__(self, image_size, crop_scale, crop_ratio, flip, mean, std, rand_augment=(2, 9.0, 0.5),
                 erase_prob=0.25):
        super().__init__(image_size, crop_scale, crop_ratio, flip, mean, std)
        self.rand_augment, self.erase_prob = rand_augment, erase_prob

    def __call__(self, record, rng):
        image = self.crop_and_flip(record, rng)
        if self.rand_augment:
            num_ops, magnitude, std = self.rand_augment
            image = rand_augment(image, rng, int(num_ops), magnitude, std)
        image = random_erasing(transforms.normalize(image, self.mean, self.std), rng, self.erase_prob)
        return {"image": image, "label": np.int32(record["label"])}
