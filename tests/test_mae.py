"""MAE: the masked pixel loss and its targets against NumPy, and the analytic FLOPs against XLA (via the benchmark)."""
import jax
import jax.numpy as jnp
import numpy as np
from conftest import tiny_mae_config

from mim_jax import bench
from mim_jax.methods.mae import method as mae


def test_analytic_flops_match_xla_cost_analysis():
    config = tiny_mae_config()
    config.model.update(width=64, depth=3, mlp_dim=256)   # big enough that matmuls dominate
    config.decoder.update(width=64, depth=2, mlp_dim=256)
    config.input.batch_size = 32
    report = bench.benchmark(config, steps=1)
    ratio = report["analytic_tflops_per_step"] / report["xla_tflops_per_step"]
    # XLA also counts elementwise ops (norms, GELU, softmax, Adam), so it reads somewhat higher.
    assert 0.6 < ratio < 1.05, report
    assert report["images_per_s"] > 0 and report["ms_per_step"] > 0


def test_masked_mse_and_targets_against_numpy():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 8, 3))
    pred = rng.normal(size=(2, 4, 48))
    mask = np.array([[True, False, True, False], [False, False, True, True]])
    patches = images.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 48)
    target = (patches - patches.mean(-1, keepdims=True)) / np.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
    expected = ((pred - target) ** 2).mean(-1)[mask].mean()
    got = mae.masked_mse(jnp.asarray(pred, jnp.float32),
                         mae.normalized_pixel_targets(jnp.asarray(images, jnp.float32), 4, True), jnp.asarray(mask))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_mae_loss_ignores_visible_patches():
    """Changing only the pixels of visible patches leaves the target term of masked patches intact:
    the loss gradient w.r.t. the decoder output is zero on visible patches."""
    pred = jnp.zeros((1, 4, 3))
    target = jnp.ones((1, 4, 3))
    mask = jnp.array([[True, False, False, True]])
    grad = jax.grad(lambda p: mae.masked_mse(p, target, mask))(pred)
    assert np.all(np.asarray(grad[0, 1:3]) == 0) and np.all(np.asarray(grad[0, [0, 3]]) != 0)
