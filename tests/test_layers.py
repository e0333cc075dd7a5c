"""Shared transformer layers against independent NumPy computations; the scanned block stack
against the loop."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import layers, vit


def test_patchify_matches_numpy_loop():
    images = np.random.RandomState(0).randn(2, 8, 12, 3).astype(np.float32)
    out = np.asarray(layers.patchify(jnp.asarray(images), 4))
    assert out.shape == (2, 6, 48)
    for r in range(2):
        for c in range(3):
            np.testing.assert_array_equal(out[:, r * 3 + c], images[:, 4 * r:4 * r + 4, 4 * c:4 * c + 4].reshape(2, -1))


def test_sincos_matches_closed_form():
    width, gh, gw = 16, 3, 5
    pos = layers.sincos_2d(gh, gw, width)
    i, j = 1, 4  # row 1, column 4 -> raster index 9
    freqs = 1.0 / 10000 ** (np.arange(4) / 4)
    expected = np.concatenate([np.sin(j * freqs), np.cos(j * freqs), np.sin(i * freqs), np.cos(i * freqs)])
    np.testing.assert_allclose(pos[i * gw + j], expected, rtol=1e-6)


def test_attention_matches_numpy_and_padding_is_exact():
    rng = np.random.RandomState(1)
    q, k, v = (rng.randn(2, 13, 2, 8).astype(np.float32) for _ in range(3))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = np.einsum("bhqk,bkhd->bqhd", weights, v)
    np.testing.assert_allclose(layers.attention(q, k, v, None), expected, atol=1e-5)
    # The cuDNN path pads to a multiple of 64 with true lengths; same maths on the XLA kernel.
    np.testing.assert_allclose(layers.attention(q, k, v, "xla", pad_multiple=64), expected, atol=1e-5)


def test_per_projection_init_draws_each_slice_like_its_own_linear():
    """A fused [D, 3D] qkv initialised per projection has the statistics of three xavier [D, D]
    kernels (bound sqrt(6 / 2D)), not of one xavier [D, 3D] (bound sqrt(6 / 4D))."""
    d = 256
    kernel = layers.per_projection_init(nn.initializers.xavier_uniform())(jax.random.key(0), (d, 3 * d))
    for part in np.split(np.asarray(kernel), 3, axis=1):
        assert np.abs(part).max() <= np.sqrt(6 / (2 * d)) and np.abs(part).max() > 0.99 * np.sqrt(6 / (2 * d))
        np.testing.assert_allclose(part.std(), np.sqrt(6 / (2 * d)) / np.sqrt(3), rtol=0.02)
    fused = np.asarray(nn.initializers.xavier_uniform()(jax.random.key(0), (d, 3 * d)))
    assert np.abs(fused).max() <= np.sqrt(6 / (4 * d))
    # Independent slices: not the same draw repeated.
    assert not np.allclose(kernel[:, :d], kernel[:, d:2 * d])


def test_cls_attention_matches_numpy():
    rng = np.random.RandomState(2)
    q, k = rng.randn(2, 5, 3, 4).astype(np.float32), rng.randn(2, 5, 3, 4).astype(np.float32)
    logits = np.einsum("bhd,bthd->bht", q[:, 0], k) / 2.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    expected = (weights / weights.sum(-1, keepdims=True)).mean(1)
    np.testing.assert_allclose(layers.cls_attention(q, k), expected, rtol=1e-5)


SMALL = dict(patch_size=4, width=32, depth=3, mlp_dim=64, num_heads=2, layerscale=0.1)


def _loop_and_scan(**overrides):
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    loop = vit.ViT(**SMALL, **overrides)
    scan = loop.clone(scan=True)
    params = nn.unbox(loop.init(jax.random.key(1), images))
    return images, loop, scan, params


def test_scanned_blocks_equal_the_loop_after_stacking_params():
    images, loop, scan, params = _loop_and_scan(drop_path=0.0)
    stacked = layers.stack_blocks(params, depth=3)
    assert set(stacked["params"]["encoder"]) == {"blocks"}
    assert stacked["params"]["encoder"]["blocks"]["block"]["attn"]["qkv"]["kernel"].shape == (3, 32, 96)
    # The scanned module initialises to exactly this tree structure and these shapes.
    fresh = nn.unbox(scan.init(jax.random.key(1), images))
    assert jax.tree.structure(fresh) == jax.tree.structure(stacked)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)
    ref, ref_out = loop.apply(params, images)
    got, got_out = scan.apply(stacked, images)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(got_out["patch_tokens"], ref_out["patch_tokens"], atol=1e-5)
    # Training mode (no drop path) and gradients agree too, after the same conversion.
    # A fixed linear read-out: well conditioned, so float32 reassociation stays at rounding level.
    weights = jax.random.normal(jax.random.key(5), (2, 5, 32))
    loss = lambda model, p: jnp.sum(model.apply(p, images, train=True)[0] * weights)  # noqa: E731
    g_loop = layers.stack_blocks(jax.grad(lambda p: loss(loop, p))(params), depth=3)
    g_scan = jax.grad(lambda p: loss(scan, p))(stacked)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_scan, g_loop)
    # The mapping is exact both ways.
    jax.tree.map(np.testing.assert_array_equal, layers.unstack_blocks(stacked), params)


@pytest.mark.parametrize("policy", [None, "dots_saveable"])
def test_scan_with_remat_gives_the_same_gradients(policy):
    images, _, scan, params = _loop_and_scan()
    stacked = layers.stack_blocks(params, depth=3)
    remat = scan.clone(remat=True, remat_policy=policy)
    # A fixed linear read-out: well conditioned, so float32 reassociation stays at rounding level.
    weights = jax.random.normal(jax.random.key(5), (2, 5, 32))
    loss = lambda model, p: jnp.sum(model.apply(p, images, train=True)[0] * weights)  # noqa: E731
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.grad(lambda p: loss(remat, p))(stacked), jax.grad(lambda p: loss(scan, p))(stacked))


def test_scanned_drop_path_is_per_layer_and_off_at_evaluation():
    images, _, scan, params = _loop_and_scan(drop_path=0.5)
    stacked = layers.stack_blocks(params, depth=3)
    a, _ = scan.apply(stacked, images, train=True, rngs={"dropout": jax.random.key(1)})
    b, _ = scan.apply(stacked, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)
    np.testing.assert_allclose(scan.apply(stacked, images)[0], scan.apply(stacked, images)[0])
    # The first block's rate is 0 in the linear ramp: with one block the output is deterministic.
    one = vit.ViT(**dict(SMALL, depth=1), drop_path=0.5, scan=True)
    p1 = one.init(jax.random.key(1), images)
    np.testing.assert_array_equal(one.apply(p1, images, train=True, rngs={"dropout": jax.random.key(1)})[0],
                                  one.apply(p1, images, train=True, rngs={"dropout": jax.random.key(2)})[0])


def test_unknown_remat_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown remat_policy 'everything'"):
        layers.remat_policy("everything")


def test_attention_is_chosen_automatically_cudnn_on_gpus_where_it_applies(monkeypatch):
    import jax
    import jax.numpy as jnp

    from mim_jax.models import layers
    choose = layers.attention_implementation
    assert choose(None, jnp.bfloat16, 64) == "xla"                     # this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert choose(None, jnp.bfloat16, 64) == choose("auto", jnp.float16, 128) == "cudnn"
    assert choose(None, jnp.float32, 64) == "xla"                      # cuDNN's kernel has no fp32
    assert choose(None, jnp.bfloat16, 160) == choose(None, jnp.bfloat16, 60) == "xla"
    assert choose("xla", jnp.bfloat16, 64) == "xla" and choose("cudnn", jnp.float32, 64) == "cudnn"
    with pytest.raises(ValueError, match="attention_impl"):
        choose("flash", jnp.bfloat16, 64)
