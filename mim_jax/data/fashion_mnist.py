"""Prepares TFDS's `fashion_mnist` (array_record) offline from the Debian package's files.

  apt-get install dataset-fashion-mnist           # the original files, in /usr/share/datasets/fashion-mnist
  python -m mim_jax.data.fashion_mnist [--data_dir=DIR]

TFDS's own builder is reused (same name, version, features and splits); only the place its raw
files come from changes. Debian recompressed the .gz files, so their bytes (and TFDS's registered
download checksums) differ from the originals while the decompressed contents are identical, which
is why this does not go through TFDS's manual-download path.
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
_FILES = {"train_data": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
          "test_data": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}


def _builder_class(source_dir: str):
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import mnist

    class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
        name = "fashion_mnist"

        def _split_generators(self, dl_manager):
            extracted = tempfile.mkdtemp(prefix="fashion_mnist_")
            self._extracted_dir = extracted
            paths = {}
            for key, filename in _FILES.items():
                paths[key] = os.path.join(extracted, filename[:-3])
                with gzip.open(os.path.join(source_dir, filename)) as src, open(paths[key], "wb") as dst:
                    shutil.copyfileobj(src, dst)
            return [
                tfds.core.SplitGenerator(name=split, gen_kwargs=dict(
                    num_examples=count, data_path=paths[f"{prefix}_data"], label_path=paths[f"{prefix}_labels"]))
                for split, prefix, count in ((tfds.Split.TRAIN, "train", 60_000), (tfds.Split.TEST, "test", 10_000))]

    return LocalFashionMNIST


def prepare_fashion_mnist(data_dir: str | None = None, source_dir: str = DEFAULT_SOURCE_DIR) -> str:
    """Builds `fashion_mnist` into `data_dir` (TFDS default if None); a no-op when already built.
    Returns the data set's directory."""
    missing = [f for f in _FILES.values() if not os.path.exists(os.path.join(source_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST source files {missing} not found in {source_dir}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or download the four original "
            "*-ubyte.gz files from github.com/zalandoresearch/fashion-mnist into a folder and pass "
            "--source_dir=FOLDER.")
    builder = _builder_class(source_dir)(data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        logging.info("fashion_mnist already prepared in %s", builder.data_dir)
        return str(builder.data_dir)
    try:
        builder.download_and_prepare()
    finally:
        shutil.rmtree(getattr(builder, "_extracted_dir", ""), ignore_errors=True)
    logging.info("Prepared fashion_mnist in %s", builder.data_dir)
    return str(builder.data_dir)


def main(argv):
    del argv
    from absl import flags
    print(prepare_fashion_mnist(flags.FLAGS.data_dir, flags.FLAGS.source_dir))


if __name__ == "__main__":
    from absl import app, flags
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: TFDS's, ~/tensorflow_datasets).")
    flags.DEFINE_string("source_dir", DEFAULT_SOURCE_DIR, "Folder with the four *-ubyte.gz files.")
    app.run(main)
