"""Data: process-count-invariant streams, determinism, resumption, transforms, real Fashion-MNIST."""
import gzip
import os
import time

import numpy as np
import pytest
from conftest import FASHION_MNIST_FILES

from mim_jax.data import pipeline, transforms

SOURCE = pipeline.SyntheticSource(50, image_shape=(12, 12, 3), num_classes=10, seed=0)
TRANSFORM = pipeline.PretrainTransform(8, (0.3, 1.0), (3 / 4, 4 / 3), True, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def make(process_index=0, process_count=1, source=SOURCE, transform=TRANSFORM, seed=3, **kw):
    return pipeline.train_iterator(source, global_batch_size=8, seed=seed, process_index=process_index,
                                   process_count=process_count, transform=transform, **kw)


def batches(process_index=0, process_count=1, n=3, **kw):
    it = make(process_index, process_count, **kw)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_deterministic_for_a_seed_and_batch_format():
    first, again = batches(), batches()
    for a, b in zip(first, again):
        assert_same(a, b)
    batch = first[0]
    assert batch["image"].shape == (8, 8, 8, 3) and batch["image"].dtype == np.uint8   # normalised on device
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["index"], np.arange(8))  # index = global stream position
    assert not np.array_equal(batch["image"], batches(seed=4, n=1)[0]["image"])  # the seed matters


@pytest.mark.parametrize("process_count", [2, 4])
def test_processes_read_disjoint_slices_that_concatenate_to_the_one_process_batch(process_count):
    whole = batches()
    parts = [batches(p, process_count) for p in range(process_count)]
    for step, full in enumerate(whole):
        for part in parts:
            assert part[step]["image"].shape[0] == 8 // process_count
        assert_same({k: np.concatenate([part[step][k] for part in parts]) for k in full}, full)
    indices = [set(np.concatenate([b["index"] for b in part]).tolist()) for part in parts]
    assert all(not (a & b) for i, a in enumerate(indices) for b in indices[i + 1:])


def test_batch_must_divide_by_process_count():
    with pytest.raises(ValueError, match="not divisible"):
        make(0, 3)


class Identity:
    """The record itself as float (uint8 values), so examples can be identified in batches."""

    def __call__(self, record, rng):
        return {"image": record["image"].astype(np.float32), "label": np.int32(record["label"])}


def test_every_epoch_is_a_fresh_permutation_of_the_source():
    source = pipeline.SyntheticSource(16, image_shape=(4, 4, 1), seed=1)
    it = make(source=source, transform=Identity())
    epochs = [np.concatenate([next(it)["image"] for _ in range(2)]) for _ in range(3)]
    originals = np.stack([source[i]["image"] for i in range(16)]).astype(np.float32)
    orders = []
    for images in epochs:  # each example exactly once per epoch
        order = [int(np.flatnonzero((originals == img).all(axis=(1, 2, 3)))[0]) for img in images]
        assert sorted(order) == list(range(16))
        orders.append(order)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    assert next(it)["index"].min() == 48  # positions keep counting across epochs


def test_state_resume_and_start_step_continue_exactly():
    it = make()
    next(it), next(it)
    state = it.get_state()
    assert state == {"next_step": 2}
    expected = [next(it) for _ in range(2)]
    fresh = make()
    fresh.set_state(state)
    for e in expected:
        assert_same(next(fresh), e)
    for start_step in (2, 3):  # start_step=k is the stream with k batches skipped
        assert_same(batches(start_step=start_step, n=1)[0], expected[start_step - 2])
    # A stream built at step 3 checkpoints absolute steps: restoring into a step-0 stream works.
    late = make(start_step=3)
    next(late)
    restored = make()
    restored.set_state(late.get_state())
    assert_same(next(restored), batches(start_step=4, n=1)[0])
    for i in (it, fresh, late, restored):
        i.close()


def test_resume_through_orbax_with_grain_checkpoint_handlers(tmp_path):
    import grain
    import orbax.checkpoint as ocp
    it = make()
    next(it)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        expected = next(it)
        fresh = make()
        manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_same(next(fresh), expected)
    it.close()
    fresh.close()


class BackendProbe:
    """TRANSFORM, plus whether this process has initialised a jax backend (grain imports jax)."""

    def __call__(self, record, rng):
        from jax._src import xla_bridge
        out = TRANSFORM(record, rng)
        out["jax_backend"] = np.bool_(xla_bridge.backends_are_initialized())
        out["pid"] = np.int32(os.getpid())
        return out


def test_worker_processes_give_identical_batches_and_states():
    it = make(num_workers=2, transform=BackendProbe())
    seen = [next(it) for _ in range(3)]
    for a, b in zip(batches(n=3), seen):
        assert_same(a, {k: b[k] for k in a})
    assert not any(b["pid"][0] == os.getpid() for b in seen)  # really produced in other processes
    assert not any(b["jax_backend"].any() for b in seen)  # and no worker touched an accelerator
    # A state saved with 2 workers resumes exactly with 0 workers.
    plain = make()
    plain.set_state(it.get_state())
    expected = next(it)
    assert_same(next(plain), {k: expected[k] for k in ("image", "label", "index")})
    it.close()
    plain.close()


def test_eval_iterator_pads_the_last_batch_with_a_mask():
    source = pipeline.SyntheticSource(13, image_shape=(8, 8, 3))
    tf = pipeline.EvalTransform(8, (0.5,) * 3, (0.25,) * 3)
    out = [list(pipeline.eval_iterator(source, global_batch_size=8, process_index=p, process_count=2, transform=tf))
           for p in range(2)]
    assert len(out[0]) == len(out[1]) == 2  # same number of steps on every process
    steps = [{k: np.concatenate([b[k] for b in step]) for k in step[0]} for step in zip(*out)]
    mask = np.concatenate([s["_mask"] for s in steps])
    assert mask.dtype == bool and mask.sum() == 13 and mask[:13].all()
    index = np.concatenate([s["index"] for s in steps])[:13]
    np.testing.assert_array_equal(index, np.arange(13))  # in order
    expected = tf(source[12], None)["image"]
    np.testing.assert_array_equal(steps[1]["image"][4], expected)


def test_to_global_batch_shards_the_leading_axis():
    import jax
    from jax.sharding import AxisType
    batch = batches(n=1)[0]
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
    out = pipeline.to_global_batch(batch, mesh)
    for key in batch:
        assert out[key].shape == batch[key].shape and out[key].sharding.spec[0] == ("data", "fsdp")
        assert len(out[key].addressable_shards) == 8 and out[key].addressable_shards[0].data.shape[0] == 1
        np.testing.assert_array_equal(np.asarray(out[key]), batch[key])
    data_only = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    assert pipeline.to_global_batch(batch, data_only)["image"].addressable_shards[0].data.shape[0] == 1
    with pytest.raises(ValueError, match="none of the batch axes"):
        pipeline.to_global_batch(batch, jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,)))


# ----- transforms -------------------------------------------------------------------------------

def test_random_resized_crop_against_independent_checks():
    rng = np.random.default_rng(0)
    constant = np.full((20, 30, 3), 77, np.uint8)
    for size in (16, 40):  # shrinking (area) and enlarging (bilinear)
        out = transforms.random_resized_crop(constant, rng, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8 and (out == 77).all()
    gray = rng.integers(0, 256, (24, 24, 1), dtype=np.uint8)
    full = transforms.random_resized_crop(gray, rng, 12, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    # The whole image, area-resized 2x: each output pixel is the mean of a 2x2 block.
    expected = gray[:, :, 0].reshape(12, 2, 12, 2).astype(np.float64).mean(axis=(1, 3))
    assert full.shape == (12, 12, 1)  # channel axis kept although cv2 drops it
    np.testing.assert_allclose(full[:, :, 0], expected, atol=1.0)
    # Unreachable scale: all 10 tries fail -> centre crop at the closest allowed ratio (20x20 of 20x30).
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    fallback = transforms.random_resized_crop(image, rng, 10, scale=(2.0, 3.0), ratio=(1.0, 1.0))
    block = image[:, 5:25].reshape(10, 2, 10, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(fallback, block, atol=1.0)
    for _ in range(100):
        top, left, h, w = transforms.sample_crop_box(20, 30, rng, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= 20 and 0 <= left and left + w <= 30
        assert 0.2 * 600 * 0.8 <= h * w <= 600


def test_flip_normalize_and_center_crop():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 10, 1), dtype=np.uint8)
    np.testing.assert_array_equal(transforms.horizontal_flip(image, rng, p=1.0), image[:, ::-1])
    assert transforms.horizontal_flip(image, rng, p=0.0) is image
    flips = [transforms.horizontal_flip(image, rng)[0, 0, 0] == image[0, -1, 0] for _ in range(200)]
    assert 60 < sum(flips) < 140
    norm = transforms.normalize(image, (0.5,), (0.25,))
    assert norm.dtype == np.float32 and norm.shape == image.shape
    np.testing.assert_allclose(norm, (image / 255.0 - 0.5) / 0.25, atol=1e-6)  # float32
    center = transforms.center_crop_resize(image, 3)
    block = image[:, 2:8].reshape(3, 2, 3, 2, 1).astype(np.float64).mean(axis=(1, 3))
    assert center.shape == (3, 3, 1)
    np.testing.assert_allclose(center, block, atol=1.0)


# ----- sources ----------------------------------------------------------------------------------

def test_missing_dataset_error_says_how_to_prepare(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m mim_jax.data.fashion_mnist"):
        pipeline.open_source("fashion_mnist", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/downloads/manual/.*tfds build imagenet2012"):
        pipeline.open_source("imagenet2012", "train", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds build cifar10 --file_format=array_record"):
        pipeline.open_source("cifar10", "train", str(tmp_path))
    assert not any(tmp_path.iterdir())  # nothing downloaded or created


def test_a_misspelled_dataset_is_one_paragraph_naming_the_likely_one(tmp_path):
    """TFDS's own error lists its ~460 data sets, as a traceback."""
    with pytest.raises(pipeline.DataNotFoundError) as error:
        pipeline.open_source("fashionmnist", "train", str(tmp_path), channels=1)
    message = str(error.value)
    assert message.startswith(f"TFDS data set 'fashionmnist' is not prepared in {tmp_path}, and TFDS has no")
    assert f"Did you mean 'fashion_mnist'? Prepare that with: python -m mim_jax.data.fashion_mnist --data_dir={tmp_path}" in message
    assert len(message.splitlines()) == 1 and "mnist\n" not in message
    with pytest.raises(pipeline.DataNotFoundError, match="Check the spelling"):
        pipeline.open_source("qqqqzzzz", "train", str(tmp_path))


def _read_idx(name, offset, shape):
    with gzip.open(os.path.join(FASHION_MNIST_FILES, name)) as f:
        return np.frombuffer(f.read(), np.uint8, offset=offset).reshape(shape)


def test_fashion_mnist_prepared_offline_matches_the_original_files(fashion_mnist_dir):
    import tensorflow_datasets as tfds

    from mim_jax.data.fashion_mnist import prepare_fashion_mnist
    train = pipeline.open_source("fashion_mnist", "train", fashion_mnist_dir)
    assert len(train) == 60_000 and len(tfds.data_source("fashion_mnist", split="test", data_dir=fashion_mnist_dir)) == 10_000
    records = train.__getitems__(range(len(train)))
    from mim_jax.data import decode  # sources keep images encoded; the workers decode them
    images = np.stack([decode.image(r["image"], 1) for r in records])
    labels = np.array([r["label"] for r in records])
    assert images.shape == (60_000, 28, 28, 1) and images.dtype == np.uint8
    assert labels.min() == 0 and labels.max() == 9
    # Independent check: decode the gz files with numpy (idx headers are 16 and 8 bytes).
    raw_images = _read_idx("train-images-idx3-ubyte.gz", 16, (60_000, 28, 28, 1))
    raw_labels = _read_idx("train-labels-idx1-ubyte.gz", 8, (60_000,))
    # TFDS stores examples in a hashed order: the file's first image is in there, with its label ...
    first = np.flatnonzero((images == raw_images[0]).all(axis=(1, 2, 3)))
    assert len(first) >= 1 and labels[first[0]] == raw_labels[0]
    # ... and the whole split is the same multiset of (image, label) pairs.
    def pairs(im, lab):
        return sorted(image.tobytes() + bytes([int(label)]) for image, label in zip(im, lab))
    assert pairs(images, labels) == pairs(raw_images, raw_labels)
    info = tfds.builder("fashion_mnist", data_dir=fashion_mnist_dir).info
    assert info.version == "3.0.1" and info.features["label"].names[0] == "T-shirt/top"
    start = time.perf_counter()
    assert prepare_fashion_mnist(fashion_mnist_dir).endswith(os.path.join("fashion_mnist", "3.0.1"))
    assert time.perf_counter() - start < 5  # idempotent: prepared data is reused


def test_fashion_mnist_missing_sources_is_a_clear_error(tmp_path):
    from mim_jax.data.fashion_mnist import prepare_fashion_mnist
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(str(tmp_path / "tfds"), source_dir=str(tmp_path))


def test_the_train_step_normalises_the_workers_uint8_images_as_the_host_did():
    import jax.numpy as jnp

    from mim_jax.training.state import normalize_images
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    on_device = normalize_images({"image": jnp.asarray(images), "label": jnp.zeros(4, jnp.int32)}, mean, std)
    host = transforms.normalize(images, mean, std)
    np.testing.assert_allclose(np.asarray(on_device["image"]), host, rtol=1e-6, atol=1e-6)   # float32 rounding
    assert on_device["label"].dtype == jnp.int32 and on_device["image"].dtype == jnp.float32
