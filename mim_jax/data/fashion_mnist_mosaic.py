"""The embedded dense task: `fashion_mnist_mosaic`, a TFDS data set (array_record) built offline from
the prepared `fashion_mnist`.

  python -m mim_jax.data.fashion_mnist            # once: the Fashion-MNIST files -> TFDS
  python -m mim_jax.data.fashion_mnist_mosaic [--data_dir=DIR] [--train_size=10000] [--test_size=2000]

Each example is a 2x2 mosaic (56x56, one channel) of four items drawn at random with replacement
(train mosaics from the train split, test mosaics from the test split, seeded). Its per-pixel
label `segmentation` is 1 + the item's class where the item's pixel is brighter than
`THRESHOLD`, and 0 (background) elsewhere: 11 classes. Which class a pixel belongs to depends on
the shape of the item around it, so a classifier of patch features needs features that carry it:
raw pixels of a 4x4 patch barely do.
"""
from __future__ import annotations

import logging

import numpy as np

from mim_jax.data import decode, pipeline

NAME = "fashion_mnist_mosaic"
DATA_VERSION = "1.0.0"
THRESHOLD = 32          # of 255: the items' dark fringe counts as background
ITEM = 28
SIZES = {"train": 10_000, "test": 2_000}
SEEDS = {"train": 0, "test": 1}          # train mosaics from the train split, test from test


def mosaic(items: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Four [28, 28] uint8 items (row-major: top-left, top-right, bottom-left, bottom-right) and
    their classes -> ([56, 56, 1] image, [56, 56, 1] label map)."""
    image = items.reshape(2, 2, ITEM, ITEM).transpose(0, 2, 1, 3).reshape(2 * ITEM, 2 * ITEM)
    classes = np.broadcast_to((np.asarray(labels) + 1).reshape(2, 2, 1, 1), (2, 2, ITEM, ITEM))
    classes = classes.transpose(0, 2, 1, 3).reshape(2 * ITEM, 2 * ITEM)
    segmentation = np.where(image > THRESHOLD, classes, 0).astype(np.uint8)
    return image[..., None].astype(np.uint8), segmentation[..., None]


def _builder(data_dir: str | None, sources: dict, sizes: dict):
    import tensorflow_datasets as tfds

    class FashionMnistMosaic(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(DATA_VERSION)
        RELEASE_NOTES = {DATA_VERSION: "Built by mim_jax.data.fashion_mnist_mosaic."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description="2x2 mosaics of Fashion-MNIST items with per-pixel labels "
                "(0 background, 1 + the item's class where its pixel is brighter than 32).",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(2 * ITEM, 2 * ITEM, 1)),
                    "segmentation": tfds.features.Image(shape=(2 * ITEM, 2 * ITEM, 1))}))

        def _split_generators(self, dl_manager):
            del dl_manager   # built from the prepared fashion_mnist: nothing to download
            return {split: self._generate_examples(split) for split in sizes}

        def _generate_examples(self, split):
            source, rng = sources[split], np.random.default_rng(SEEDS[split])
            for i in range(sizes[split]):
                records = [source[int(j)] for j in rng.integers(0, len(source), 4)]
                items = np.stack([decode.image(r["image"], 1).reshape(ITEM, ITEM) for r in records])
                image, segmentation = mosaic(items, [int(r["label"]) for r in records])
                yield i, {"image": image, "segmentation": segmentation}

    FashionMnistMosaic.name = NAME
    return FashionMnistMosaic(data_dir=data_dir, file_format="array_record")


def prepare(data_dir: str | None = None, train_size: int | None = None, test_size: int | None = None) -> str:
    """Builds the mosaics into `data_dir` (TFDS's default data dir if None) from the `fashion_mnist`
    prepared there; a no-op when already built. Returns the data set's directory."""
    sizes = {"train": train_size or SIZES["train"], "test": test_size or SIZES["test"]}
    sources = {split: pipeline.open_source("fashion_mnist", split, data_dir, channels=1) for split in sizes}
    builder = _builder(data_dir, sources, sizes)
    if builder.is_prepared():
        logging.info("%s already prepared in %s", NAME, builder.data_dir)
        return str(builder.data_dir)
    builder.download_and_prepare(file_format="array_record")
    logging.info("Prepared %s in %s", NAME, builder.data_dir)
    return str(builder.data_dir)


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    print(prepare(f.data_dir, f.train_size, f.test_size))


def define_flags(flag_values=None):
    """Called only when run as a command (see fashion_mnist.define_flags)."""
    from absl import flags
    flag_values = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
                        flag_values=flag_values)
    flags.DEFINE_integer("train_size", None, f"Train mosaics (default {SIZES['train']}).", flag_values=flag_values)
    flags.DEFINE_integer("test_size", None, f"Test mosaics (default {SIZES['test']}).", flag_values=flag_values)


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
