"""Data: process-count-invariant streams, determinism, resumption, transforms, real Fashion-MNIST."""
import gzip
import os

import numpy as np
import pytest
from conftest import FASHION_MNIST_FILES

from mim_jax.data import pipeline, transforms

SOURCE = pipeline.SyntheticSource(50, image_shape=(12, 12, 3), num_classes=10, seed=0)
TRANSFORM = pipeline.pretrain_transform(8, (0.3, 1.0), (3 / 4, 4 / 3), True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def batches(process_index=0, process_count=1, n=3, source=SOURCE, **kw):
    it = pipeline.train_iterator(source, global_batch_size=8, seed=3, process_index=process_index,
                                 process_count=process_count, transform=TRANSFORM, **kw)
    return [next(it) for _ in range(n)]


def test_deterministic_for_a_seed():
    for a, b in zip(batches(), batches()):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_slices_that_concatenate_to_the_one_process_batch(process_count):
    whole = batches()
    parts = [batches(p, process_count) for p in range(process_count)]
    for step, full in enumerate(whole):
        for key in full:
            np.testing.assert_array_equal(np.concatenate([part[step][key] for part in parts]), full[key])
    indices = [set(np.concatenate([b["index"] for b in part])) for part in parts]
    assert all(not (a & b) for i, a in enumerate(indices) for b in indices[i + 1:])


def test_every_epoch_is_a_fresh_permutation_of_the_source():
    source = pipeline.SyntheticSource(16, image_shape=(4, 4, 1), seed=1)
    ident = pipeline.pretrain_transform(4, (1.0, 1.0), (1.0, 1.0), False, (0.0,), (1 / 255,))
    it = pipeline.train_iterator(source, global_batch_size=8, seed=0, process_index=0, process_count=1, transform=ident)
    epochs = [np.concatenate([next(it)["image"] for _ in range(2)]) for _ in range(2)]
    originals = np.stack([source[i]["image"] for i in range(16)]).astype(np.float32)
    for images in epochs:  # each example exactly once per epoch
        order = [int(np.flatnonzero(np.isclose(originals, img, atol=1e-3).all(axis=(1, 2, 3)))[0]) for img in images]
        assert sorted(order) == list(range(16))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled


def test_state_resume_and_start_step_continue_exactly():
    it = pipeline.train_iterator(SOURCE, global_batch_size=8, seed=3, process_index=0, process_count=1, transform=TRANSFORM)
    next(it), next(it)
    state = it.get_state()
    expected = next(it)
    fresh = pipeline.train_iterator(SOURCE, global_batch_size=8, seed=3, process_index=0, process_count=1, transform=TRANSFORM)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["image"], expected["image"])
    skipped = batches(start_step=2, n=1)[0]
    np.testing.assert_array_equal(skipped["image"], expected["image"])
    np.testing.assert_array_equal(skipped["index"], expected["index"])


def test_worker_processes_give_identical_batches():
    for a, b in zip(batches(n=2), batches(n=2, num_workers=2)):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_eval_iterator_pads_the_last_batch_with_a_mask():
    source = pipeline.SyntheticSource(13, image_shape=(8, 8, 3))
    tf = pipeline.EvalTransform(8, (0.5,) * 3, (0.25,) * 3)
    out = [list(pipeline.eval_iterator(source, global_batch_size=8, process_index=p, process_count=2, transform=tf))
           for p in range(2)]
    assert len(out[0]) == len(out[1]) == 2  # same number of steps on every process
    masks = np.concatenate([np.concatenate([b["_mask"] for b in step]) for step in zip(*out)])
    assert masks.sum() == 13 and masks[:13].all()


def test_random_resized_crop_against_independent_checks():
    rng = np.random.default_rng(0)
    constant = np.full((20, 30, 3), 77, np.uint8)
    out = transforms.random_resized_crop(constant, rng, 16)
    assert out.shape == (16, 16, 3) and (out == 77).all()
    gray = rng.integers(0, 256, (24, 24, 1), dtype=np.uint8)
    full = transforms.random_resized_crop(gray, rng, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    # The whole image, area-resized 2x: each output pixel is the mean of a 2x2 block.
    expected = gray[:, :, 0].reshape(12, 2, 12, 2).astype(np.float64).mean(axis=(1, 3))
    assert full.shape == (12, 12, 1)
    np.testing.assert_allclose(full[:, :, 0], expected, atol=1.0)
    for _ in range(100):
        top, left, h, w = transforms.sample_crop_box(20, 30, rng, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30
        assert 0.2 * 600 * 0.8 <= h * w <= 600


def test_missing_dataset_error_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m mim_jax.data.fashion_mnist"):
        pipeline.open_source("fashion_mnist", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="downloads/manual"):
        pipeline.open_source("imagenet2012", "train", str(tmp_path))


def test_fashion_mnist_prepared_offline_matches_the_original_files(fashion_mnist_dir):
    import tensorflow_datasets as tfds
    train = tfds.data_source("fashion_mnist", split="train", data_dir=fashion_mnist_dir)
    test = tfds.data_source("fashion_mnist", split="test", data_dir=fashion_mnist_dir)
    assert len(train) == 60_000 and len(test) == 10_000
    with gzip.open(os.path.join(FASHION_MNIST_FILES, "train-images-idx3-ubyte.gz")) as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28, 1)
    with gzip.open(os.path.join(FASHION_MNIST_FILES, "train-labels-idx1-ubyte.gz")) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    # TFDS keys examples by file position, but stores them shuffled: match by content.
    for i in (0, 1234, 59_999):
        record = train[i]
        assert record["image"].shape == (28, 28, 1) and record["image"].dtype == np.uint8
        matches = np.flatnonzero((raw == record["image"]).all(axis=(1, 2, 3)))
        assert len(matches) >= 1 and labels[matches[0]] == record["label"]
    info = tfds.builder("fashion_mnist", data_dir=fashion_mnist_dir).info
    assert info.features["label"].names[0] == "T-shirt/top"


def test_fashion_mnist_missing_sources_is_a_clear_error(tmp_path):
    from mim_jax.data.fashion_mnist import prepare_fashion_mnist
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(str(tmp_path / "tfds"), source_dir=str(tmp_path))
