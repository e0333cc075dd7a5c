"""Beyond Masking: image operations against PyTorch (the official code's own ops), the zoom-in and
zoom-out losses against a transcription of the official `forward_loss`, recipe numbers, and the
sharded step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_steps, synthetic_batches

from configs import beyond_masking as bm_config
from mim_jax import parallel
from mim_jax.methods import get_method
from mim_jax.methods.beyond_masking import degradations
from mim_jax.methods.beyond_masking import method as beyond_masking
from mim_jax.models import layers
from mim_jax.training import optim

torch = pytest.importorskip("torch")
F = torch.nn.functional

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def nchw(x):
    return torch.from_numpy(np.asarray(x, np.float64).transpose(0, 3, 1, 2).copy())


def nhwc(t):
    return t.numpy().transpose(0, 2, 3, 1)


# ---- image operations ------------------------------------------------------------------------

@pytest.mark.parametrize("n_in,n_out", [(36, 28), (28, 36), (288, 224), (224, 288), (20, 28), (28, 20), (7, 7)])
def test_area_resize_matches_torch_area_interpolation(n_in, n_out):
    x = np.random.default_rng(0).normal(size=(2, n_in, n_in, 3))
    got = np.asarray(degradations.area_resize(jnp.asarray(x, jnp.float32), n_out))
    want = nhwc(F.interpolate(nchw(x), (n_out, n_out), mode="area"))
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_patch_channel_normalize_matches_the_official_rearrange():
    x = np.random.default_rng(1).uniform(size=(2, 8, 8, 3))
    got = np.asarray(degradations.patch_channel_normalize(jnp.asarray(x, jnp.float32), 4))
    # 'b c (h p1) (w p2) -> b (h w) (p1 p2) c', normalise over the pixels, '-> b n (p c)'.
    sq = x.reshape(2, 2, 4, 2, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 4, 16, 3)
    want = (sq - sq.mean(2, keepdims=True)) / (sq.std(2, ddof=1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(got, want.reshape(2, 4, 48), atol=1e-5)
    # Each channel of each patch on its own: mean 0, unbiased std 1.
    per = got.reshape(2, 4, 16, 3)
    np.testing.assert_allclose(per.mean(2), 0, atol=1e-5)
    np.testing.assert_allclose(per.std(2, ddof=1), 1, atol=1e-4)


def test_unpatchify_inverts_patchify():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 12, 12, 3)), jnp.float32)
    np.testing.assert_array_equal(layers.unpatchify(layers.patchify(x, 4), 4, 3), x)


def official_mirror(x, size, left, top):
    """`zoomed-out/modeling_pretrain.py` `resize`, transcribed (NCHW torch)."""
    pad = size - x.shape[-1]
    right, bottom = pad - left, pad - top
    y = torch.zeros(x.shape[0], x.shape[1], size, size, dtype=x.dtype)
    y[:, :, top:size - bottom, :left] = torch.flip(x[:, :, :, :left], [3])
    y[:, :, :top, :left] = torch.flip(x[:, :, :top, :left], [2, 3])
    y[:, :, :top, left:size - right] = torch.flip(x[:, :, :top, :], [2])
    y[:, :, :top, size - right:] = torch.flip(x[:, :, :top, x.shape[-1] - right:], [2, 3])
    y[:, :, top:size - bottom, size - right:] = torch.flip(x[:, :, :, x.shape[-1] - right:], [3])
    y[:, :, size - bottom:, size - right:] = torch.flip(x[:, :, x.shape[-2] - bottom:, x.shape[-1] - right:], [2, 3])
    y[:, :, size - bottom:, left:size - right] = torch.flip(x[:, :, x.shape[-2] - bottom:, :], [2])
    y[:, :, size - bottom:, :left] = torch.flip(x[:, :, x.shape[-2] - bottom:, :left], [2, 3])
    y[:, :, top:size - bottom, left:size - right] = x
    return y


@pytest.mark.parametrize("top,left", [(0, 0), (3, 5), (7, 1), (4, 7)])
def test_symmetric_place_matches_the_official_mirror_padding(top, left):
    x = np.random.default_rng(3).normal(size=(2, 20, 20, 3))
    got = np.asarray(degradations.symmetric_place(jnp.asarray(x, jnp.float32), 28, jnp.int32(top), jnp.int32(left)))
    np.testing.assert_allclose(got, nhwc(official_mirror(nchw(x), 28, left, top)), atol=1e-6)


def official_fisheye(size, center, magnitude):
    xx, yy = torch.linspace(-1, 1, size, dtype=torch.float64), torch.linspace(-1, 1, size, dtype=torch.float64)
    gridy, gridx = torch.meshgrid(yy, xx, indexing="ij")
    grid = torch.stack([gridx, gridy], dim=-1)
    d = torch.tensor(center, dtype=torch.float64) - grid
    return (grid + d * torch.sqrt((d ** 2).sum(-1)).unsqueeze(-1) * magnitude).unsqueeze(0)


@pytest.mark.parametrize("center,magnitude", [((0.3, -0.6), 0.2), ((-0.9, 0.95), 0.25), ((0.0, 0.0), 0.15)])
def test_fisheye_distortion_matches_torch_grid_sample(center, magnitude):
    x = np.random.default_rng(4).normal(size=(1, 28, 28, 3))
    grid = degradations.fisheye_grid(28, jnp.asarray(center, jnp.float32), magnitude)
    got = np.asarray(degradations.grid_sample(jnp.asarray(x[0], jnp.float32), grid))
    want = F.grid_sample(nchw(x), official_fisheye(28, center, magnitude), mode="bilinear",
                         padding_mode="zeros", align_corners=True)
    np.testing.assert_allclose(got, nhwc(want)[0], atol=1e-5)


def test_blur_conv_matches_torch_conv2d():
    rng = np.random.default_rng(5)
    x, kernel = rng.normal(size=(1, 14, 14, 3)), 1 / 49 + 0.02 * rng.normal(size=(7, 7, 3, 3))
    got = np.asarray(degradations.conv_same(jnp.asarray(x[0], jnp.float32), jnp.asarray(kernel, jnp.float32)))
    want = F.conv2d(nchw(x), torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()), padding=3)
    np.testing.assert_allclose(got, nhwc(want)[0], atol=1e-5)


def test_sincos_1d_is_the_transformer_table():
    table = layers.sincos_1d(196, 384)
    pos, j = 17, np.arange(384)
    angle = pos / np.power(10000, 2 * (j // 2) / 384)
    np.testing.assert_allclose(table[pos], np.where(j % 2 == 0, np.sin(angle), np.cos(angle)), atol=1e-6)


# ---- losses against the official forward_loss -------------------------------------------------

def _torch_patchify(imgs, p):
    b, c, h, w = imgs.shape
    return imgs.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def _torch_unpatchify(x, p, c):
    b, n, _ = x.shape
    h = int(n ** 0.5)
    return x.reshape(b, h, h, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h * p, h * p)


def _torch_patch_norm(unnorm, p):
    b, c, h, w = unnorm.shape
    sq = unnorm.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p, c)
    sq = (sq - sq.mean(dim=-2, keepdim=True)) / (sq.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6)
    return sq.reshape(b, sq.shape[1], -1)


def official_zoom_in_loss(imgs_inp, imgs_ori, pred_x, mask, p, view, size):
    """`zoomed-in/modeling_pretrain.py` `forward_loss`, transcribed with sizes as arguments."""
    mean, std = torch.tensor(MEAN)[None, :, None, None], torch.tensor(STD)[None, :, None, None]
    b = (view - size) // 2
    area = lambda x, n: F.interpolate(x, (n, n), mode="area")   # noqa: E731
    target_center = _torch_patch_norm(imgs_inp * std + mean, p)
    pred_imgs = _torch_unpatchify(pred_x, p, 3)
    pred_center = _torch_patchify(area(pred_imgs, view)[:, :, b:-b, b:-b], p)
    loss_mae = ((pred_center - target_center) ** 2).mean(-1)
    loss_mae = (loss_mae * mask).sum() / mask.sum()
    target_overall = area(_torch_unpatchify(_torch_patch_norm(area(imgs_ori, size) * std + mean, p), p, 3), view)
    pred_imgs = area(pred_imgs, view)
    mse = lambda a, t: ((a - t) ** 2).mean()   # noqa: E731
    loss_edge = (mse(pred_imgs[:, :, :b, :], target_overall[:, :, :b, :])
                 + mse(pred_imgs[:, :, -b:, :], target_overall[:, :, -b:, :])
                 + mse(pred_imgs[:, :, b:-b, :b], target_overall[:, :, b:-b, :b])
                 + mse(pred_imgs[:, :, b:-b, -b:], target_overall[:, :, b:-b, -b:]))
    return float(loss_mae), float(loss_edge)


def _method(degradation, image_size=28, patch=4, **method):
    c = bm_config.get_config(f"local,degradation={degradation}")
    c.input.update(image_size=image_size, channels=3, mean=tuple(MEAN), std=tuple(STD))
    c.model.update(variant=f"Ti/{patch}", width=32, depth=1, num_heads=2, mlp_dim=64)
    c.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.method.update(method)
    return get_method(c)


def _batch(method, b=2, seed=0):
    spec = method.batch_spec(b)
    return {"image": jnp.asarray(np.random.default_rng(seed).normal(size=spec["image"].shape), jnp.float32),
            "label": jnp.zeros(b, jnp.int32), "index": jnp.arange(b, dtype=jnp.int32)}


def test_zoom_in_geometry_and_loss_match_the_official_code():
    method = _method("zoom_in")
    assert method.view_size == 36 and method.num_masked == 36      # 28 * 288/224; int(49 * 0.75)
    batch = _batch(method)
    inputs, loss_fn = method.degrade(batch["image"], batch, jax.random.key(0), jnp.int32(0))
    np.testing.assert_array_equal(inputs, batch["image"][:, 4:32, 4:32])        # the centre crop
    pred = np.random.default_rng(6).normal(size=(2, 49, 48))
    mask = np.random.default_rng(7).permutation(np.tile(np.arange(49) < 36, (2, 1)).T).T
    loss, metrics = loss_fn(jnp.asarray(pred, jnp.float32), jnp.asarray(mask))
    centre, edge = official_zoom_in_loss(nchw(inputs), nchw(batch["image"]), torch.from_numpy(pred),
                                         torch.from_numpy(mask.astype(np.float64)), 4, 36, 28)
    np.testing.assert_allclose([metrics["centre_loss"], metrics["edge_loss"]], [centre, edge], rtol=1e-4)
    np.testing.assert_allclose(loss, 0.8 * centre + 0.2 * edge, rtol=1e-4)


def test_zoom_out_loss_matches_the_official_code():
    method = _method("zoom_out")
    assert method.view_size == 20 and method.num_masked == 0         # 28 * 160/224; unmasked by default
    batch = _batch(method)
    rng, step = jax.random.key(0), jnp.int32(3)
    inputs, loss_fn = method.degrade(batch["image"], batch, rng, step)
    top, left = (int(v) for v in method.zoom_out_offset(method.batch_key(rng, step)))
    assert 0 <= top < 8 and 0 <= left < 8
    np.testing.assert_allclose(inputs, nhwc(official_mirror(nchw(batch["image"]), 28, left, top)), atol=1e-6)

    pred = np.random.default_rng(8).normal(size=(2, 49, 48))
    loss, _ = loss_fn(jnp.asarray(pred, jnp.float32), jnp.ones((2, 49), bool))
    # zoomed-out `forward_loss`: the target normalised on the input grid, then both mapped back.
    mean, std = torch.tensor(MEAN)[None, :, None, None], torch.tensor(STD)[None, :, None, None]
    area = lambda x, n: F.interpolate(x, (n, n), mode="area")   # noqa: E731
    target = _torch_unpatchify(_torch_patch_norm(area(nchw(batch["image"]) * std + mean, 28), 4), 4, 3)
    target = _torch_patchify(official_mirror(area(target, 20), 28, left, top), 4)
    mapped = _torch_patchify(official_mirror(area(_torch_unpatchify(torch.from_numpy(pred), 4, 3), 20), 28, left, top), 4)
    np.testing.assert_allclose(loss, float(((mapped - target) ** 2).mean()), rtol=1e-4)


def test_single_degradations_change_the_input_and_target_the_clean_image():
    for degradation in ("distort", "blur", "decolorize"):
        method = _method(degradation)
        assert method.num_masked == 0                     # as the author ran them (issue #1)
        batch = _batch(method, b=4)
        inputs, loss_fn = method.degrade(batch["image"], batch, jax.random.key(0), jnp.int32(0))
        assert inputs.shape == batch["image"].shape
        assert not np.allclose(inputs, batch["image"], atol=0.1), degradation
        clean = degradations.patch_channel_normalize(batch["image"] * method.std + method.mean, 4)
        loss, _ = loss_fn(clean, jnp.ones((4, 49), bool))
        assert float(loss) < 1e-8, degradation               # predicting the clean image costs nothing
    # De-colourisation: all channels equal one mix a*R + b*G + c*B, weights in [0, 0.667).
    gray = np.asarray(inputs)
    np.testing.assert_allclose(gray[..., 0], gray[..., 2], atol=1e-6)
    weights = np.linalg.lstsq(np.asarray(batch["image"]).reshape(-1, 3), gray[..., 0].reshape(-1), rcond=None)[0]
    assert np.all((weights >= 0) & (weights < 0.667)), weights


def test_distortion_is_drawn_per_image_with_the_official_magnitudes():
    method = _method("distort")
    batch = _batch(method, b=4)
    batch["image"] = jnp.broadcast_to(batch["image"][:1], batch["image"].shape)    # the same image 4 times
    inputs, _ = method.degrade(batch["image"], batch, jax.random.key(0), jnp.int32(0))
    assert not np.allclose(inputs[0], inputs[1])


@pytest.mark.parametrize("degradation", beyond_masking.DEGRADATIONS)
def test_every_degradation_trains_the_encoder(degradation):
    method = _method(degradation)
    batch = _batch(method, b=4)
    params = nn.unbox(method.init_params(jax.random.key(0), batch))
    (loss, (metrics, _)), grads = jax.jit(jax.value_and_grad(
        lambda p: method.loss(p, {}, {}, batch, jax.random.key(1), jnp.int32(0)), has_aux=True))(params)
    assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    assert float(jnp.abs(grads["encoder"]["embedding"]["kernel"]).sum()) > 0


def test_recipe_matches_the_official_scripts():
    c = bm_config.get_config("")
    method = get_method(c)
    assert method.view_size == 288 and method.num_masked == 147 and method.num_visible == 49
    assert (c.decoder.width, c.decoder.depth, c.decoder.num_heads) == (384, 4, 6)
    assert c.method.centre_weight == 0.8 and c.method.edge_weight == 0.2
    assert optim.learning_rate(c.optax, c.input.batch_size) == pytest.approx(1.2e-3)
    assert (c.optax.b1, c.optax.b2, c.optax.weight_decay, c.optax.warmup_epochs) == (0.9, 0.95, 0.05, 20.0)
    assert get_method(bm_config.get_config("degradation=zoom_out")).view_size == 160
    assert get_method(bm_config.get_config("degradation=blur")).num_masked == 0
    assert get_method(bm_config.get_config("degradation=blur,mask=0.75")).num_masked == 147
    with pytest.raises(ValueError, match="degradation"):
        get_method(bm_config.get_config("degradation=rotate"))


def test_init_decay_and_architecture_follow_mae_pytorch():
    method = _method("zoom_in")
    batch = _batch(method)
    params = nn.unbox(method.init_params(jax.random.key(0), batch))
    enc, dec = params["encoder"], params["decoder"]
    assert "cls" not in enc and "bias" not in dec["embed"]             # no [CLS]; bias-free decoder input
    qkv = np.asarray(enc["encoder"]["block_0"]["attn"]["qkv"]["kernel"])
    assert np.abs(qkv).max() <= 0.02 and 0.008 < qkv.std() < 0.013    # trunc-normal(0.02, +-1 std)
    embed = np.asarray(enc["embedding"]["kernel"])                     # torch Conv2d default
    assert np.abs(embed).max() <= 1 / np.sqrt(embed.shape[0]) and embed.std() > 0.5 / np.sqrt(3 * embed.shape[0])
    decay = optim.weight_decay_mask(params, "kernels")
    assert not decay["decoder"]["mask_token"] and not decay["encoder"]["encoder"]["block_0"]["attn"]["q_bias"]
    assert decay["encoder"]["embedding"]["kernel"] and decay["decoder"]["pred"]["kernel"]
    out = method.encode(params, batch["image"][:, :28, :28])
    np.testing.assert_array_equal(out["cls"], out["patch_mean"])


# ---- the step ----------------------------------------------------------------------------------

@pytest.mark.slow   # the same property for MAE (tests/test_train.py) is in the default tier
def test_sharded_step_equals_single_device():
    config = bm_config.get_config("local")
    config.input.update(batch_size=16, num_workers=0)
    config.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    config.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    batches = synthetic_batches(config, 2, image_shape=(28, 28, 1), num_examples=64)
    view = get_method(config).view_size
    assert batches[0]["image"].shape == (16, view, view, 1)     # the host delivers the wider view
    _, sharded = run_steps(config, parallel.make_mesh([("data", 2), ("fsdp", 4)]), batches)
    _, single = run_steps(config, parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]), batches)
    for key in ("loss", "centre_loss", "edge_loss"):
        np.testing.assert_allclose([m[key] for m in sharded], [m[key] for m in single], rtol=1e-5)


@pytest.mark.slow   # the same check for MAE (tests/test_mae.py) is in the default tier
def test_analytic_flops_match_xla_cost_analysis():
    from mim_jax import bench
    config = bm_config.get_config("local")
    config.input.update(batch_size=32, num_workers=0)
    config.model.update(width=64, depth=3, mlp_dim=256, num_heads=4)
    config.decoder.update(width=64, depth=2, mlp_dim=256, num_heads=4)
    report = bench.benchmark(config, steps=1)
    ratio = report["analytic_tflops_per_step"] / report["xla_tflops_per_step"]
    assert 0.6 < ratio < 1.05, report


def test_ring_mse_is_the_sum_of_four_strip_means():
    pred, target = np.zeros((1, 6, 6, 1)), np.zeros((1, 6, 6, 1))
    pred[0, 0, :, 0] = 1.0                       # top strip (1 x 6) all wrong by 1
    got = float(beyond_masking.ring_mse(jnp.asarray(pred), jnp.asarray(target), 1))
    assert got == pytest.approx(1.0)             # that strip's mean, the other three are 0
