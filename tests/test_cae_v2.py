"""CAE v2: loss, target order, mask counts, regressor and BEiT-style encoder options against
independent NumPy computations; a tiny end-to-end run distilling a MAE run of this project."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_steps, synthetic_batches, tiny_mae_config

from configs import cae_v2 as cae_v2_config
from mim_jax import masking, parallel, pretrained
from mim_jax.data import pipeline, transforms
from mim_jax.errors import WeightsNotFoundError
from mim_jax.methods import get_method, resolve_config
from mim_jax.methods.cae_v2 import method as cae_v2
from mim_jax.methods.cae_v2 import regressor
from mim_jax.models import layers, vit
from mim_jax.training import optim, train
from mim_jax.training import state as state_lib

# ---- reference helpers (float64 NumPy) --------------------------------------------------------

def np_layernorm(x, p, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_gelu(x):
    from scipy.special import erf
    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


def np_attention(q, k, v, heads):
    b, tq, d = q.shape
    hd = d // heads
    q, k, v = (x.reshape(b, -1, heads, hd).transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return (w @ v).transpose(0, 2, 1, 3).reshape(b, tq, d)


def as64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(tree))


# ---- masks and configs ----------------------------------------------------------------------------

@pytest.mark.parametrize("variant,expected", [("Ti", 30), ("S", 49), ("B", 98), ("L", 98)])
def test_mask_count_grows_with_model_size(variant, expected):
    config = cae_v2_config.get_config(f"variant={variant}")
    method = get_method(config)
    assert method.num_masked == expected and method.grid == (14, 14)
    masks = jax.jit(jax.vmap(method.sampler))(jax.random.split(jax.random.key(0), 16))
    np.testing.assert_array_equal(np.asarray(masks).sum(1), expected)


def test_recipe_sizes_match_the_official_scripts():
    tiny = cae_v2_config.get_config("variant=Ti")
    assert (tiny.model.num_heads, tiny.regressor.width, tiny.regressor.depth, tiny.regressor.num_heads) == (12, 96, 1, 12)
    base = cae_v2_config.get_config("variant=B")
    assert (base.regressor.width, base.regressor.depth) == (768, 4)
    assert (base.optax.base_lr, base.optax.lr_scale_batch, base.optax.b2, base.optax.clip_norm) == (1.5e-3, None, 0.999, 3.0)
    assert base.teacher.source == "openai/clip-vit-base-patch16" and base.teacher.dim is None   # until the run starts
    assert resolve_config(base).teacher.dim == 512    # a known CLIP: no hub request
    assert base.input.batch_size == 2048 and base.total_epochs == 300 and tuple(base.input.crop_scale) == (0.4, 1.0)


# ---- loss ----------------------------------------------------------------------------------------

def test_alignment_loss_matches_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 2, 7, 5))
    weights = np.array([1, 1, 1, 0, 0, 1, 1], np.float32)
    loss, _ = cae_v2.alignment_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32),
                                    jnp.asarray(weights))
    cos = (pred * target).sum(-1) / np.linalg.norm(pred, axis=-1) / np.linalg.norm(target, axis=-1)
    expected = ((1 - cos) * weights).sum() / (weights.sum() * 2)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_targets_are_ordered_cls_visible_masked():
    target = np.arange(2 * 5 * 1, dtype=np.float32).reshape(2, 5, 1)   # cls + 4 patches
    visible = np.array([[0, 2], [1, 3]])
    masked = np.array([[1, 3], [0, 2]])
    out = np.asarray(cae_v2.arrange_targets(jnp.asarray(target), jnp.asarray(visible), jnp.asarray(masked), True))
    for b in range(2):
        expected = [target[b, 0, 0]] + [target[b, 1 + i, 0] for i in [*visible[b], *masked[b]]]
        np.testing.assert_array_equal(out[b, :, 0], expected)
    no_cls = np.asarray(cae_v2.arrange_targets(jnp.asarray(target[:, 1:]), jnp.asarray(visible), jnp.asarray(masked), False))
    np.testing.assert_array_equal(no_cls, out[:, 1:])


@pytest.mark.parametrize("supervise,expected", [("all", [1, 1, 1, 1]), ("visible", [1, 1, 0, 0]), ("masked", [0, 0, 1, 1])])
def test_supervised_positions(supervise, expected):
    config = _tiny_config("openai/clip-vit-base-patch16")   # never resolved: weighing needs no weights
    config.method.supervise = supervise
    method = get_method(config)
    weights = np.asarray(method.token_weights())
    assert weights.shape == (1 + method.num_patches,)
    # [cls, visible..., masked...]
    np.testing.assert_array_equal([weights[0], weights[method.num_visible], weights[-method.num_masked], weights[-1]],
                                  expected)


# ---- regressor ------------------------------------------------------------------------------------

def test_regressor_block_matches_numpy_reference():
    """The official block: x = q + g1*CrossAttn(LN_q(q+p_q), LN_k(kv+p_kv), LN_v(kv)); x = LN_2(x);
    x = x + g2*MLP(x); keys/values = [visible; queries]; q and v biases, no k bias."""
    width, heads = 16, 4
    rng = np.random.default_rng(1)
    visible, pos_v = rng.normal(size=(2, 2, 6, width)).astype(np.float32)
    pos_m = rng.normal(size=(2, 3, width)).astype(np.float32)
    model = regressor.LatentRegressor(depth=1, num_heads=heads, mlp_dim=32, layerscale=0.5)
    params = model.init(jax.random.key(0), visible, pos_v, pos_m)["params"]
    # Randomise every parameter (zeros/ones would hide mistakes in biases and norms).
    leaves, tree = jax.tree.flatten(nn.unbox(params))
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(k, x.shape) + (x if x.ndim == 1 else 0)
                                       for k, x in zip(keys, leaves)])
    out = np.asarray(model.apply({"params": params}, visible, pos_v, pos_m))

    p = as64(params)
    b = p["block_0"]
    x = np.broadcast_to(p["mask_token"], pos_m.shape).astype(np.float64)
    kv = np.concatenate([visible, x], 1)
    pos_kv = np.concatenate([pos_v, pos_m], 1)
    a = b["cross_attn"]
    q = np_layernorm(x + pos_m, b["norm_q"]) @ a["q"]["kernel"] + a["q_bias"]
    k = np_layernorm(kv + pos_kv, b["norm_k"]) @ a["k"]["kernel"]
    v = np_layernorm(kv, b["norm_v"]) @ a["v"]["kernel"] + a["v_bias"]
    attn = np_attention(q, k, v, heads) @ a["out"]["kernel"] + a["out"]["bias"]
    x = np_layernorm(x + b["attn_scale"] * attn, b["norm_mlp"])
    m = b["mlp"]
    x = x + b["mlp_scale"] * (np_gelu(x @ m["fc1"]["kernel"] + m["fc1"]["bias"]) @ m["fc2"]["kernel"] + m["fc2"]["bias"])
    np.testing.assert_allclose(out, x, atol=2e-5)


def test_regressor_drop_path_is_linear_from_zero():
    model = regressor.LatentRegressor(depth=1, num_heads=2, mlp_dim=8, drop_path=0.1)
    x = jnp.ones((2, 3, 8))
    pm = jnp.ones((2, 2, 8))
    params = model.init(jax.random.key(0), x, x, pm)
    # A single block gets rate linspace(0, 0.1, 1) = [0]: training output == inference output.
    np.testing.assert_array_equal(model.apply(params, x, x, pm, train=True, rngs={"dropout": jax.random.key(1)}),
                                  model.apply(params, x, x, pm))


# ---- BEiT/CAE encoder options ---------------------------------------------------------------------

def test_row_first_sincos_matches_the_cae_formula():
    grid, width = 5, 16
    pos = layers.sincos_2d(grid, grid, width, row_first=True)
    omega = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4))
    for token in (0, 3, 7, 24):
        r, c = divmod(token, grid)
        expected = np.concatenate([np.sin(r * omega), np.cos(r * omega), np.sin(c * omega), np.cos(c * omega)])
        np.testing.assert_allclose(pos[token], expected, atol=1e-6)
    # MAE's layout is the same with the halves swapped.
    np.testing.assert_array_equal(layers.sincos_2d(grid, grid, width), np.concatenate([pos[:, 8:], pos[:, :8]], 1))


def test_qv_bias_attention_matches_numpy():
    width, heads = 16, 2
    model = layers.Attention(num_heads=heads, qkv_bias="qv")
    x = np.random.default_rng(2).normal(size=(2, 5, width)).astype(np.float32)
    params = nn.unbox(model.init(jax.random.key(0), x)["params"])
    assert "bias" not in params["qkv"] and params["q_bias"].shape == (width,)
    params = dict(params, q_bias=jnp.linspace(-1, 1, width), v_bias=jnp.linspace(1, 2, width))
    out = np.asarray(model.apply({"params": params}, x))
    p = as64(params)
    w = p["qkv"]["kernel"]
    q = x @ w[:, :width] + p["q_bias"]
    k = x @ w[:, width:2 * width]
    v = x @ w[:, 2 * width:] + p["v_bias"]
    expected = np_attention(q, k, v, heads) @ p["out"]["kernel"] + p["out"]["bias"]
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_beit_init_of_encoder_tokens_and_kernels():
    """CAE's init: patch embedding and CLS ~ N(0, 0.02) cut at +-1 std; every Linear xavier over
    its built shape (the fused qkv as one [D, 3D] matrix)."""
    model = vit.ViT(patch_size=4, width=64, depth=1, mlp_dim=128, num_heads=4, init_style="beit", qkv_bias="qv")
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"])
    embed = np.asarray(params["embedding"]["kernel"])
    assert np.abs(embed).max() <= 0.02 and 0.008 < embed.std() < 0.013   # truncated normal: 0.538 sigma
    assert np.abs(np.asarray(params["cls"])).max() <= 0.02
    qkv = np.asarray(params["encoder"]["block_0"]["attn"]["qkv"]["kernel"])
    bound = math.sqrt(6 / (64 + 3 * 64))
    assert np.abs(qkv).max() <= bound and np.abs(qkv).max() > 0.9 * bound


def test_not_1d_weight_decay_decays_tokens_but_not_biases_or_norms():
    params = {"cls": jnp.zeros((1, 1, 4)), "mask_token": jnp.zeros((1, 1, 4)), "q_bias": jnp.zeros(4),
              "dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}, "norm": {"scale": jnp.zeros(4)}}
    mask = optim.weight_decay_mask(params, "not_1d")
    assert mask["cls"] and mask["mask_token"] and mask["dense"]["kernel"]
    assert not (mask["q_bias"] or mask["dense"]["bias"] or mask["norm"]["scale"])
    kernels_only = optim.weight_decay_mask(params)
    assert not kernels_only["cls"] and kernels_only["dense"]["kernel"]


def test_color_jitter_brightness_and_identity():
    image = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    np.testing.assert_array_equal(transforms.color_jitter(image, np.random.default_rng(0), 0, 0, 0), image)
    rng = np.random.default_rng(5)
    out = transforms.color_jitter(image, rng, 0.4, 0, 0)
    replay = np.random.default_rng(5)
    replay.permutation(3)
    factor = replay.uniform(0.6, 1.4)
    np.testing.assert_array_equal(out, np.round(np.clip(image * factor, 0, 255)).astype(np.uint8))


# ---- end to end -------------------------------------------------------------------------------------

def _tiny_config(teacher: str):
    c = cae_v2_config.get_config(f"local,teacher={teacher}")
    c.input.update(image_size=16, batch_size=16, num_workers=0, crop_scale=(0.5, 1.0))
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.regressor.update(width=16, num_heads=2)
    c.method.mask.update(num_masked=5)
    c.total_steps, c.log_steps, c.ckpt_steps = 6, 2, 3
    c.optax.warmup_steps = 2
    c.evals = {}
    return c


@pytest.fixture(scope="module")
def mae_teacher_dir(tmp_path_factory):
    """A tiny MAE pre-training run of this project, to distil from."""
    source = pipeline.SyntheticSource(256, image_shape=(16, 16, 1), num_classes=10, seed=0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "open_source", lambda *a, **k: source)
        workdir = str(tmp_path_factory.mktemp("mae_teacher"))
        train.train_and_evaluate(tiny_mae_config(), workdir)
    return workdir


@pytest.mark.slow   # trains a teacher run, then the student (about 45 s)
def test_distils_a_run_teacher_and_matches_its_features(mae_teacher_dir, monkeypatch, tmp_path):
    source = pipeline.SyntheticSource(256, image_shape=(16, 16, 1), num_classes=10, seed=0)
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: source)
    config = resolve_config(_tiny_config(f"run:{mae_teacher_dir}"))
    assert config.teacher.dim == 32
    method = get_method(config)
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    setup = state_lib.build(config, method, mesh, total_steps=6, warmup_steps=2, global_batch_size=16)
    # The teacher's targets are the MAE encoder's tokens on the student's own crop.
    mae_params = pretrained.load(mae_teacher_dir, mesh).params
    images = jax.random.normal(jax.random.key(0), (16, 16, 16, 1))
    _, out = get_method(tiny_mae_config()).encoder.apply({"params": mae_params["encoder"]}, images)
    tokens = method.teacher(setup.frozen["teacher"], images)
    np.testing.assert_allclose(tokens, np.concatenate([out["cls"][:, None], out["patch_tokens"]], 1), atol=1e-5)

    # The trainer resolves the command line's config and saves the result: the run's model
    # rebuilds from its checkpoints without the teacher.
    history = train.train_and_evaluate(_tiny_config(f"run:{mae_teacher_dir}"), str(tmp_path / "cae"))
    del history
    assert pretrained.read_config(tmp_path / "cae").teacher.dim == 32
    rows = [r for r in map(__import__("json").loads, open(tmp_path / "cae" / "metrics.jsonl")) if "align_loss" in r]
    assert rows[-1]["align_loss"] < rows[0]["align_loss"]
    assert 0 <= rows[-1]["align_loss"] <= 2


@pytest.mark.slow   # the same property for MAE (tests/test_train.py) is in the default tier
def test_sharded_cae_step_matches_single_device(mae_teacher_dir):
    config = resolve_config(_tiny_config(f"run:{mae_teacher_dir}"))
    batches = synthetic_batches(config, 2, num_examples=64)
    _, sharded = run_steps(config, parallel.make_mesh([("data", 2), ("fsdp", 4)]), batches)
    _, single = run_steps(config, parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]), batches)
    np.testing.assert_allclose([m["loss"] for m in sharded], [m["loss"] for m in single], rtol=1e-5)


def test_missing_run_teacher_is_a_clear_error(tmp_path):
    # Reported when the run starts (the teacher's width is read from the run's config there), not
    # when the config is built.
    config = _tiny_config(f"run:{tmp_path}/nowhere")
    with pytest.raises(WeightsNotFoundError, match="No pre-training checkpoint"):
        train.train_and_evaluate(config, str(tmp_path / "cae"))


def test_block_mask_exact_for_the_local_grid():
    masks = jax.vmap(lambda k: masking.block_mask(k, (7, 7), 15, min_block=4))(jax.random.split(jax.random.key(0), 64))
    np.testing.assert_array_equal(np.asarray(masks).sum(1), 15)


@pytest.mark.slow   # the same check for MAE (tests/test_mae.py) is in the default tier
def test_analytic_flops_match_xla_cost_analysis(mae_teacher_dir):
    from mim_jax import bench
    config = _tiny_config(f"run:{mae_teacher_dir}")
    config.model.update(width=64, depth=3, mlp_dim=256, num_heads=4)   # big enough that matmuls dominate
    config.regressor.update(width=64, depth=2, num_heads=4)
    config.input.batch_size = 32
    report = bench.benchmark(config, steps=1)
    ratio = report["analytic_tflops_per_step"] / report["xla_tflops_per_step"]
    assert 0.6 < ratio < 1.05, report
