"""TFDS array_record sources -> Grain MapDataset pipelines with process-count-invariant streams.

The global training stream is one seeded shuffle of the source per epoch, repeated forever.
Global batch s is stream positions [s*B, (s+1)*B); process p of P reads the contiguous slice
[s*B + p*b, s*B + (p+1)*b) with b = B/P. This is the only place data is split between processes
(no split_for_jax_process, no ShardByJaxProcess on top), so concatenating the processes' batches
gives exactly the one-process batch, and augmentations are seeded by stream position: the same
example gets the same crop on any number of hosts, workers or after a resume.
"""
from __future__ import annotations

import sys
from typing import Callable

import grain
import numpy as np

from mim_jax.data import randaugment, transforms

INT32_MAX = 2**31 - 1


def open_source(name: str, split: str, data_dir: str | None = None):
    """A random-access TFDS source (array_record). Never downloads: a missing data set is an error
    that says how to prepare it."""
    import tensorflow_datasets as tfds
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises several types (not found, wrong format, bad split).
        if name == "fashion_mnist":
            how = "python -m mim_jax.data.fashion_mnist" + (f" --data_dir={data_dir}" if data_dir else "")
        elif name.startswith("imagenet2012"):
            how = ("download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org into "
                   "<data_dir>/downloads/manual/, then `tfds build imagenet2012 --file_format=array_record"
                   + (f" --data_dir={data_dir}" if data_dir else "") + "`")
        else:
            how = (f"`tfds build {name} --file_format=array_record` (or `tfds convert_format` an existing "
                   "tfrecord copy to array_record)")
        raise FileNotFoundError(
            f"TFDS data set {name!r} (split {split!r}) is not available as array_record in "
            f"{data_dir or 'the default TFDS data dir'}: {type(e).__name__}: {e}\nPrepare it with: {how}") from e


class SyntheticSource:
    """Random images in the TFDS record format. FOR UNIT TESTS ONLY."""

    def __init__(self, num_examples: int, image_shape=(32, 32, 3), num_classes: int = 10, seed: int = 0):
        self.num_examples, self.image_shape, self.num_classes, self.seed = num_examples, image_shape, num_classes, seed

    def __len__(self):
        return self.num_examples

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, int(index)])
        return {"image": rng.integers(0, 256, self.image_shape, dtype=np.uint8),
                "label": int(rng.integers(self.num_classes))}


class PretrainTransform:
    """record, rng -> {'image': float32 HWC, 'label': int32}: random-resized crop, flip, normalise."""

    def __init__(self, image_size, crop_scale, crop_ratio, flip, mean, std):
        self.image_size, self.crop_scale, self.crop_ratio = image_size, crop_scale, crop_ratio
        self.flip, self.mean, self.std = flip, mean, std

    def crop_and_flip(self, record, rng):
        image = transforms.random_resized_crop(record["image"], rng, self.image_size, self.crop_scale, self.crop_ratio)
        return transforms.horizontal_flip(image, rng) if self.flip else image

    def __call__(self, record, rng):
        image = self.crop_and_flip(record, rng)
        return {"image": transforms.normalize(image, self.mean, self.std), "label": np.int32(record["label"])}


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
            image = randaugment.rand_augment(image, rng, int(num_ops), magnitude, std)
        image = randaugment.random_erasing(transforms.normalize(image, self.mean, self.std), rng, self.erase_prob)
        return {"image": image, "label": np.int32(record["label"])}


def pretrain_transform(image_size, crop_scale, crop_ratio, flip, mean, std) -> PretrainTransform:
    return PretrainTransform(image_size, crop_scale, crop_ratio, flip, mean, std)


class EvalTransform:
    """Deterministic view: centre crop + resize + normalise."""

    def __init__(self, image_size, mean, std, crop_fraction=1.0):
        self.image_size, self.mean, self.std, self.crop_fraction = image_size, mean, std, crop_fraction

    def __call__(self, record, rng):
        del rng
        image = transforms.center_crop_resize(record["image"], self.image_size, self.crop_fraction)
        return {"image": transforms.normalize(image, self.mean, self.std), "label": np.int32(record["label"])}


class _LoadLocal:
    """Local element i of process p -> the transformed example at its global stream position."""

    def __init__(self, source, order, transform, seed, local_batch, global_batch, process_index, num_real=None):
        self.source, self.order, self.transform, self.seed = source, order, transform, seed
        self.b, self.B, self.p, self.num_real = local_batch, global_batch, process_index, num_real

    def __call__(self, i):
        position = (i // self.b) * self.B + self.p * self.b + i % self.b
        real = self.num_real is None or position < self.num_real
        record = self.source[self.order[position] if real else 0]
        out = self.transform(record, np.random.default_rng([self.seed, position]))
        out["index"] = np.int32(position % INT32_MAX)
        if self.num_real is not None:
            out["_mask"] = np.bool_(real)
        return out


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(f"Global batch {global_batch_size} is not divisible by {process_count} processes.")
    return global_batch_size // process_count


def _iterate(dataset, local_batch, num_workers, prefetch_buffer):
    dataset = dataset.batch(local_batch, drop_remainder=True)
    # Reader threads build whole batches; worker processes (mp_prefetch) parallelise further.
    threads = 2 if num_workers else 4
    iterator = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                         prefetch_buffer_size=max(prefetch_buffer, threads)))
    if num_workers:
        iterator = iterator.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return iter(iterator)


def train_iterator(source, *, global_batch_size: int, seed: int, process_index: int, process_count: int,
                   transform: Callable, start_step: int = 0, num_workers: int = 0, prefetch_buffer: int = 2):
    """Infinite iterator of local batches {'image', 'label', 'index'}; checkpointable with
    grain.checkpoint. `start_step` starts at that global batch (a resume on another process count)."""
    b = _local_batch(global_batch_size, process_count)
    # Reshuffled every epoch (repeat re-seeds the shuffle per epoch).
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed % 2**32).repeat()
    load = _LoadLocal(source, order, transform, seed, b, global_batch_size, process_index)
    local = grain.MapDataset.range(start_step * b, sys.maxsize).map(load)
    return _iterate(local, b, num_workers, prefetch_buffer)


def eval_iterator(source, *, global_batch_size: int, process_index: int, process_count: int,
                  transform: Callable, num_workers: int = 0, prefetch_buffer: int = 2):
    """One ordered pass; the last global batch is padded and padding has `_mask` False, so every
    process runs the same number of steps (uneven counts would hang collectives)."""
    b = _local_batch(global_batch_size, process_count)
    steps = -(-len(source) // global_batch_size)
    order = grain.MapDataset.range(len(source))
    load = _LoadLocal(source, order, transform, 0, b, global_batch_size, process_index, num_real=len(source))
    return _iterate(grain.MapDataset.range(steps * b).map(load), b, num_workers, prefetch_buffer)
