"""Images reach the transforms encoded and are decoded in the workers: PNGs exactly as TFDS decodes
them, JPEGs at reduced scale when the crop allows, covering the same pixels as a full decode; the
input benchmark runs on a real TFDS data set of JPEGs."""
import cv2
import numpy as np
import pytest

from mim_jax.data import decode, pipeline, transforms
from tests import jpeg_dataset


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    jpeg_dataset.prepare(data_dir, num_examples=24)
    return str(data_dir)


def test_training_sources_keep_images_encoded_and_png_decodes_as_tfds_does(fashion_mnist_dir):
    import tensorflow_datasets as tfds
    encoded = pipeline.open_source("fashion_mnist", "test", fashion_mnist_dir)
    decoded = tfds.data_source("fashion_mnist", split="test", data_dir=fashion_mnist_dir, download=False)
    for i in (0, 1, 777):
        assert decode.is_encoded(encoded[i]["image"])
        np.testing.assert_array_equal(decode.image(encoded[i]["image"], 1), decoded[i]["image"])


def test_the_jpeg_data_set_is_real_jpegs_of_imagenet_size(jpegs):
    source = pipeline.open_source("realistic_jpegs", "train", jpegs)
    record = source[3]["image"]
    assert decode.header(record) == (375, 500, "JPEG")
    assert 20_000 < len(record) < 200_000          # photograph-like compression, not flat colour


@pytest.mark.parametrize("factor", [2, 4])
def test_reduced_decoding_covers_the_same_pixels_up_to_resampling(jpegs, factor):
    record = pipeline.open_source("realistic_jpegs", "train", jpegs)[5]["image"]
    full = decode.image(record, 3)
    size = 56
    box = (40, 61, factor * size + 17, factor * size + 33)     # a box that allows exactly `factor`
    assert decode.reduction(box[2], box[3], size) == factor
    top, left, h, w = box
    reference = transforms.resize(full[top:top + h, left:left + w], size)
    reduced = transforms.resize(decode.crop_region(record, box, size, 3), size)
    error = np.abs(reduced.astype(np.float32) - reference).mean()
    assert error < 3.0, error                                 # out of 255; a box off by a few pixels is > 10
    shifted = transforms.resize(full[top + 8:top + h + 8, left + 8:left + w + 8], size)
    assert np.abs(shifted.astype(np.float32) - reference).mean() > 3 * error


def test_the_crop_box_and_random_stream_do_not_depend_on_the_decode(jpegs):
    record = pipeline.open_source("realistic_jpegs", "train", jpegs)[7]["image"]
    full = decode.image(record, 3)
    for seed in range(5):
        direct = transforms.random_resized_crop(full, np.random.default_rng(seed), 64)
        encoded = transforms.random_resized_crop_encoded(record, np.random.default_rng(seed), 64, 3, max_reduction=1)
        np.testing.assert_array_equal(encoded, direct)
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        transforms.random_resized_crop(full, rng_a, 64)
        transforms.random_resized_crop_encoded(record, rng_b, 64, 3)       # reduced where allowed
        assert rng_a.random() == rng_b.random()                           # the same draws were made


def test_a_corrupt_image_names_the_fix():
    with pytest.raises(ValueError, match="re-prepare the data set"):
        decode.image(b"\x89PNG not really", 3)
    ok, png = cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))
    assert decode.image(png.tobytes(), 3).shape == (4, 4, 3)


def test_the_input_benchmark_runs_the_methods_pipeline_on_tfds_jpegs(jpegs):
    from configs import mae
    from mim_jax import bench
    config = mae.get_config(None)
    config.input.update(dataset="realistic_jpegs", data_dir=jpegs, batch_size=8, num_workers=0)
    report = bench.input_benchmark(config, batches=2)
    assert report["cores"] == 1 and report["images_per_s"] > 0 and report["bare_loop_images_per_s_one_core"] > 0
