"""Prepares TFDS's `fashion_mnist` (array_record) offline from the Debian package's files.

  apt-get install dataset-fashion-mnist           # the original files, in /usr/share/datasets/fashion-mnist
  python -m mim_jax.data.fashion_mnist [--data_dir=DIR] [--source_dir=DIR]

TFDS's own builder class is reused (same name, version 3.0.1, features, splits and example
generator); only `_split_generators` changes, to point at local files instead of downloading. The
TFDS manual-download route does not fit: Debian recompressed the .gz files, so their bytes (and
sha256) differ from the checksums TFDS registers for the original URLs, although the decompressed
contents are identical. Afterwards `tfds.data_source('fashion_mnist', data_dir=...)` reads it like
any TFDS-built data set (dataset_info.json names this module as the builder's, the only trace).
"""
from __future__ import annotations

import gzip
import logging
import os
import shutil
import tempfile

DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
# gen_kwargs of TFDS's MNIST._generate_examples -> file name in the original release.
_FILES = {"train_data": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
          "test_data": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz"}
SPLIT_SIZES = {"train": 60_000, "test": 10_000}


def _local_builder(data_dir: str | None):
    """An instance of TFDS's FashionMNIST builder that reads `self.raw_files` instead of downloading."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.image_classification import mnist

    # skip_registration: TFDS's registered `fashion_mnist` stays the class tfds.builder() returns.
    class LocalFashionMNIST(mnist.FashionMNIST, skip_registration=True):
        name = "fashion_mnist"  # the folder and file names TFDS's readers look for
        raw_files: dict[str, str] = {}

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return [tfds.core.SplitGenerator(name=split, gen_kwargs=dict(
                num_examples=count, data_path=self.raw_files[f"{split}_data"],
                label_path=self.raw_files[f"{split}_labels"])) for split, count in SPLIT_SIZES.items()]

    return LocalFashionMNIST(data_dir=data_dir)


def _decompress(source_dir: str, out_dir: str) -> dict[str, str]:
    # TFDS's example generator reads raw idx files (it expects its download manager to have
    # extracted them), so decompress rather than re-implement the generator.
    paths = {}
    for key, filename in _FILES.items():
        paths[key] = os.path.join(out_dir, filename[:-len(".gz")])
        with gzip.open(os.path.join(source_dir, filename)) as src, open(paths[key], "wb") as dst:
            shutil.copyfileobj(src, dst)
    return paths


def prepare_fashion_mnist(data_dir: str | None = None, source_dir: str = DEFAULT_SOURCE_DIR) -> str:
    """Builds `fashion_mnist` as array_record into `data_dir` (TFDS's default data dir if None:
    $TFDS_DATA_DIR or ~/tensorflow_datasets). A no-op when already prepared. Never downloads.
    Returns the prepared version's directory."""
    import tensorflow_datasets as tfds
    builder = _local_builder(data_dir)
    if builder.is_prepared():
        fmt = builder.info.file_format
        if fmt is not None and fmt.value != "array_record" and "array_record" not in builder.info.alternative_file_formats:
            # A `tfds.load` elsewhere may have built it as tfrecord; Grain needs random access.
            raise RuntimeError(
                f"fashion_mnist is already prepared in {builder.data_dir} as {fmt.value}, but random access "
                "(Grain) needs array_record. Delete that folder and run this again, or pass another --data_dir.")
        logging.info("fashion_mnist already prepared in %s", builder.data_dir)
        return str(builder.data_dir)
    missing = [f for f in _FILES.values() if not os.path.exists(os.path.join(source_dir, f))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST source files {missing} not found in {source_dir}. Install them with "
            "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the four original "
            "*-ubyte.gz files from github.com/zalandoresearch/fashion-mnist into a folder and pass "
            "--source_dir=FOLDER.")
    with tempfile.TemporaryDirectory(prefix="fashion_mnist_") as raw_dir:
        builder.raw_files = _decompress(source_dir, raw_dir)
        # try_download_gcs=False: never look for a pre-built copy on GCS (no network at all).
        builder.download_and_prepare(file_format="array_record",
                                     download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    logging.info("Prepared fashion_mnist in %s", builder.data_dir)
    return str(builder.data_dir)


def main(argv):
    del argv
    from absl import flags
    print(prepare_fashion_mnist(flags.FLAGS.data_dir, flags.FLAGS.source_dir))


def define_flags(flag_values=None):
    """Called only when run as a command, so importing this module never adds absl flags
    (flag_values: absl's global FLAGS by default; tests/test_docs.py passes a fresh one)."""
    from absl import flags
    flag_values = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
                        flag_values=flag_values)
    flags.DEFINE_string("source_dir", DEFAULT_SOURCE_DIR, "Folder with the four *-ubyte.gz files.",
                        flag_values=flag_values)


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
