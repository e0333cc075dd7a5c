"""Reconstructions (`Method.reconstructions`, `python -m mim_jax.visualize`): pasted visible patches,
de-normalisation of per-patch normalised predictions against numpy float64, the CLI's PNG on a tiny
real run, and the message for methods without pixels."""
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import synthetic_batches, tiny_mae_config

from configs import beyond_masking as bm_config, cae_v2 as cae_config, capi as capi_config
from mim_jax import visualize
from mim_jax.evaluators import reconstructions
from mim_jax.methods import get_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def setup(config, image_shape=(16, 16, 1)):
    method = get_method(config)
    batch = synthetic_batches(config, 1, image_shape=image_shape)[0]
    params = nn.unbox(method.init_params(jax.random.key(0), batch))
    return method, params, batch


def np_patchify(x, p):
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)


def np_unpatchify(x, p, c):
    b, n, _ = x.shape
    s = int(round(n ** 0.5))
    return x.reshape(b, s, s, p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, s * p, s * p, c)


def raw_prediction(method, params, batch):
    """The eval-mode decoder output on the run's masks, without any de-normalisation."""
    _, visible, masked = method.sample_masks(jax.random.key(0), batch)
    tokens, _ = method.encoder.apply({"params": params["encoder"]}, batch["image"], visible)
    return np.asarray(method.decoder.apply({"params": params["decoder"]}, tokens, visible, masked),
                      np.float64)[:, -method.num_patches:]


def test_pasted_column_is_the_original_on_visible_patches():
    config = tiny_mae_config()
    method, params, batch = setup(config)
    out = jax.device_get(method.reconstructions(params, batch, jax.random.key(0)))
    p, c = method.encoder.patch_size, config.input.channels
    hidden = np_unpatchify(np.repeat(out["mask"][..., None], p * p * c, -1), p, c)
    assert out["mask"].sum(1).tolist() == [method.num_masked] * len(out["mask"])
    for name in ("images", "masked", "reconstruction", "pasted"):
        assert out[name].shape == batch["image"].shape, name
    np.testing.assert_array_equal(out["pasted"][~hidden], out["images"][~hidden])
    np.testing.assert_array_equal(out["pasted"][hidden], out["reconstruction"][hidden])
    np.testing.assert_array_equal(out["masked"][hidden], 0.5)
    np.testing.assert_array_equal(out["masked"][~hidden], out["images"][~hidden])
    pixels = batch["image"] * np.asarray(config.input.std) + np.asarray(config.input.mean)
    np.testing.assert_allclose(out["images"], pixels, atol=1e-6)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_predictions_get_their_target_patch_statistics_back(norm_pix):
    config = tiny_mae_config(**{"method.norm_pix_loss": norm_pix})
    method, params, batch = setup(config)
    out = jax.device_get(method.reconstructions(params, batch, jax.random.key(0)))
    p, c = method.encoder.patch_size, config.input.channels
    pred = raw_prediction(method, params, batch)
    target = np_patchify(np.asarray(batch["image"], np.float64), p)
    if norm_pix:
        mean, var = target.mean(-1, keepdims=True), target.var(-1, ddof=1, keepdims=True)
        pred = pred * np.sqrt(var + 1e-6) + mean
    want = np_unpatchify(pred, p, c) * np.asarray(config.input.std) + np.asarray(config.input.mean)
    np.testing.assert_allclose(out["reconstruction"], want, rtol=1e-5, atol=1e-5)


def test_beyond_masking_predictions_get_their_patch_and_channel_statistics_back():
    c = bm_config.get_config("local,degradation=none")
    c.input.update(image_size=16, batch_size=8, num_workers=0)
    c.model.update(variant="Ti/4", width=32, depth=1, num_heads=2, mlp_dim=64)
    c.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    method, params, batch = setup(c)
    out = jax.device_get(method.reconstructions(params, batch, jax.random.key(0)))
    p, ch = method.encoder.patch_size, c.input.channels
    pixels = np.asarray(batch["image"], np.float64) * np.asarray(c.input.std) + np.asarray(c.input.mean)
    t = np_patchify(pixels, p).reshape(len(pixels), -1, p * p, ch)
    pred = raw_prediction(method, params, batch).reshape(t.shape)
    want = pred * (t.std(2, ddof=1, keepdims=True) + 1e-6) + t.mean(2, keepdims=True)
    np.testing.assert_allclose(out["reconstruction"], np_unpatchify(want.reshape(len(t), -1, p * p * ch), p, ch),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["images"], pixels, atol=1e-6)


def test_grid_layout():
    cols = {k: np.full((3, 5, 5, 1), v) for k, v in zip(reconstructions.COLUMNS, (0.0, 0.25, 0.5, 1.0))}
    image = reconstructions.grid(cols, scale=2)
    assert image.shape == (3 * 12 + 2, 4 * 12 + 2, 1) and image.dtype == np.uint8
    assert image[2, 2, 0] == 0 and image[2, 2 + 12, 0] == 64 and image[2, 2 + 24, 0] == 128
    assert image[0, 0, 0] == 255


@pytest.mark.parametrize("name,config", [("capi", lambda: capi_config.get_config("local")),
                                         ("cae_v2", lambda: cae_config.get_config("variant=Ti"))])
def test_methods_without_pixels_are_a_clear_error(name, config):
    method = get_method(config())
    with pytest.raises(reconstructions.NoPixelsError, match=f"{name} has no pixel decoder"):
        reconstructions.check_pixels(method)


@pytest.mark.slow
def test_cli_writes_the_grid_of_a_tiny_run(tmp_path, fashion_mnist_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    workdir = tmp_path / "w"
    tiny = ["--config.model.depth=1", "--config.model.width=32", "--config.model.num_heads=2",
            "--config.model.mlp_dim=64", "--config.decoder.depth=1", "--config.decoder.width=32",
            "--config.decoder.num_heads=2", "--config.decoder.mlp_dim=64", "--config.input.batch_size=16",
            "--config.total_steps=2", "--config.evals={}"]
    train = subprocess.run([sys.executable, "-m", "mim_jax.main", "--config=configs/mae.py:local",
                            f"--workdir={workdir}", f"--config.input.data_dir={fashion_mnist_dir}", *tiny],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-3000:]
    out = tmp_path / "grid.png"
    vis = subprocess.run([sys.executable, "-m", "mim_jax.visualize", str(workdir), "--num_images=3", "--scale=2",
                          f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert vis.returncode == 0, vis.stderr[-3000:]
    from PIL import Image
    with Image.open(out) as image:
        # 28-pixel Fashion-MNIST cells at scale 2 with 2-pixel gaps: 3 rows, 4 columns.
        assert image.size == (4 * 58 + 2, 3 * 58 + 2)
        assert image.mode == "L"
