"""CMAE's host transforms (Grain workers: never import jax here): the two augmented views of a
training image, and the whole-image view of ContrastiveCrop's localisation pass."""
from __future__ import annotations

import numpy as np

from mim_jax.data import decode, transforms
from mim_jax.data.pipeline import SOURCE_INDEX
from mim_jax.methods.cmae import contrastive_crop


class ContrastiveViewsTransform:
    """record, rng -> {'image', 'image2': uint8 HWC (normalised on the device), 'label'}: CMAE's
    two views of one image.

    Both views are drawn independently by ContrastiveCrop from the record's box (`boxes[index]`,
    normalised (h_min, w_min, h_max, w_max), keyed by the stable source index), or, before the
    first box update (`boxes` None), by the plain random-resized crop ContrastiveCrop's warm-up
    uses. View 1 is only cropped (and flipped if `flip`); view 2 is flipped, colour-jittered with
    probability `jitter_prob` (brightness, contrast, saturation, hue) and greyed with
    `gray_prob`, as SDMAE's second view."""

    def __init__(self, *, image_size, crop_scale, crop_ratio, mean, std, boxes=None, alpha=0.6,
                 interpolation="auto", flip=False, view2_flip=True, jitter=(0.4, 0.4, 0.2, 0.1),
                 jitter_prob=0.8, gray_prob=0.2):
        self.image_size, self.crop_scale, self.crop_ratio = image_size, tuple(crop_scale), tuple(crop_ratio)
        self.mean, self.std, self.alpha, self.interpolation = mean, std, alpha, interpolation
        self.boxes = None if boxes is None else np.asarray(boxes, np.float32)
        self.flip, self.view2_flip, self.jitter = flip, view2_flip, tuple(jitter)
        self.jitter_prob, self.gray_prob = jitter_prob, gray_prob

    def crop(self, image, index, rng):
        if self.boxes is None:
            return transforms.random_resized_crop(image, rng, self.image_size, self.crop_scale, self.crop_ratio,
                                                  self.interpolation)
        return contrastive_crop.contrastive_crop(image, rng, self.boxes[index], self.image_size, scale=self.crop_scale,
                                                 ratio=self.crop_ratio, alpha=self.alpha,
                                                 interpolation=self.interpolation)

    def __call__(self, record, rng):
        image, index = decode.image(record["image"], len(self.mean)), record[SOURCE_INDEX]
        view1 = self.crop(image, index, rng)
        view1 = transforms.horizontal_flip(view1, rng) if self.flip else view1
        view2 = self.crop(image, index, rng)
        if self.view2_flip:
            view2 = transforms.horizontal_flip(view2, rng)
        brightness, contrast, saturation, hue = self.jitter
        view2 = contrastive_crop.random_color_jitter(view2, rng, p=self.jitter_prob, brightness=brightness,
                                                     contrast=contrast, saturation=saturation, hue=hue)
        view2 = contrastive_crop.random_grayscale(view2, rng, p=self.gray_prob)
        return {"image": np.ascontiguousarray(view1), "image2": np.ascontiguousarray(view2),
                "label": np.int32(record["label"])}


class ResizeTransform:
    """Deterministic whole-image view: resized to image_size x image_size without keeping the
    aspect ratio (ContrastiveCrop's localisation pass, whose boxes are fractions of the whole
    image), normalised."""

    def __init__(self, image_size, mean, std):
        self.image_size, self.mean, self.std = image_size, mean, std

    def __call__(self, record, rng):
        del rng
        image = transforms.resize(decode.image(record["image"], len(self.mean)), self.image_size)
        return {"image": transforms.normalize(image, self.mean, self.std), "label": np.int32(record["label"])}
