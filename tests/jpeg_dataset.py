"""A small TFDS data set of real-looking JPEGs (ImageNet-sized, ~500x375, smooth shading, edges
and texture, JPEG quality 90), prepared as array_record: what the input benchmark and the decode
tests read. Test data, written here; not a stand-in for a real data set in the main path.

  python tests/jpeg_dataset.py /tmp/tfds 512    # then --config.input.dataset=realistic_jpegs
                                                #      --config.input.data_dir=/tmp/tfds
"""
from __future__ import annotations

import sys

import numpy as np
import tensorflow_datasets as tfds


def realistic_image(index: int, height: int = 375, width: int = 500) -> np.ndarray:
    """Low-frequency colour fields, a few hard-edged shapes and fine texture: JPEG statistics
    close to photographs (flat noise would compress far worse, flat colour far better)."""
    rng = np.random.default_rng(index)
    coarse = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
    import cv2
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    for _ in range(6):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        axes = (int(rng.integers(15, 120)), int(rng.integers(15, 120)))
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    texture = cv2.GaussianBlur(rng.normal(0, 18, (height, width, 3)).astype(np.float32), (0, 0), 1.2)
    return np.clip(image + texture, 0, 255).astype(np.uint8)


class RealisticJpegs(tfds.core.GeneratorBasedBuilder):
    """realistic_jpegs: `num_examples` JPEG images with 10 labels."""
    VERSION = tfds.core.Version("1.0.0")
    num_examples = 64

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=10)}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(self.num_examples):
            yield i, {"image": realistic_image(i), "label": i % 10}


def prepare(data_dir, num_examples: int = 64) -> None:
    RealisticJpegs.num_examples = num_examples
    builder = RealisticJpegs(data_dir=str(data_dir), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))


if __name__ == "__main__":
    prepare(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 64)
