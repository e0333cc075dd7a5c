"""RandAugment ops and random erasing against direct NumPy expectations."""
import numpy as np
import pytest

from mim_jax.methods.finetune import augment as ra

IMG = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(ra.OPS))
@pytest.mark.parametrize("channels", [1, 3])
def test_every_op_keeps_shape_and_dtype(name, channels):
    img = IMG[..., :channels]
    out = ra.OPS[name](img, 0.9, -1)
    assert out.shape == img.shape and out.dtype == np.uint8


def test_ops_against_numpy():
    np.testing.assert_array_equal(ra.OPS["Invert"](IMG, 0.5, 1), 255 - IMG)
    np.testing.assert_array_equal(ra.OPS["Posterize"](IMG, 0.0, 1), IMG & 0xF0)         # 4 bits at level 0
    np.testing.assert_array_equal(ra.OPS["Solarize"](IMG, 0.5, 1), np.where(IMG < 128, IMG, 255 - IMG))
    np.testing.assert_array_equal(ra.OPS["Brightness"](IMG, 0.0, 1), IMG)               # factor 1: identity
    np.testing.assert_array_equal(ra.OPS["Rotate"](IMG, 0.0, 1), IMG)
    shifted = ra.OPS["TranslateX"](IMG, 4 / (0.45 * 16), 1)                              # 4 pixels right
    np.testing.assert_array_equal(shifted[:, 4:], IMG[:, :-4])
    assert (shifted[:, :4] == 128).all()


def test_rand_augment_is_deterministic_per_seed_and_changes_images():
    a = ra.rand_augment(IMG, np.random.default_rng(1))
    b = ra.rand_augment(IMG, np.random.default_rng(1))
    np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(ra.rand_augment(IMG, np.random.default_rng(s)), IMG) for s in range(5))


def test_random_erasing_replaces_one_box():
    img = np.zeros((32, 32, 3), np.float32)
    out = ra.random_erasing(img, np.random.default_rng(0), prob=1.0)
    rows, cols = np.where((out != 0).any(-1))
    assert len(rows) > 0 and (out[rows.min():rows.max() + 1, cols.min():cols.max() + 1] != 0).mean() > 0.99
    assert np.array_equal(ra.random_erasing(img, np.random.default_rng(0), prob=0.0), img)
