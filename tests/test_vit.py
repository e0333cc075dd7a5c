"""The ViT encoder: visible-patch subsets, outputs, drop path, bf16 and remat."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax.models import vit


def test_decode_variant_and_errors():
    assert vit.decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12, patch_size=16)
    with pytest.raises(ValueError, match="Unknown ViT variant"):
        vit.decode_variant("Q/16")


def test_visible_subset_equals_gathering_tokens_of_a_full_pass_without_attention_mixing():
    """With depth 0 the encoder is embed + pos: running on visible indices must equal gathering
    those positions from the full pass (checks index handling of patches and positions)."""
    model = vit.ViT(patch_size=4, width=32, depth=0, mlp_dim=64, num_heads=2, cls_token=True)
    images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    params = model.init(jax.random.key(1), images)
    full, _ = model.apply(params, images)
    idx = jnp.array([[0, 3, 7, 15], [1, 2, 8, 9]])
    part, out = model.apply(params, images, idx)
    np.testing.assert_allclose(part[:, 1:], jnp.take_along_axis(full[:, 1:], idx[..., None], 1), atol=1e-5)
    assert out["patch_tokens"].shape == (2, 4, 32) and out["cls"].shape == (2, 32)


def test_vit_outputs_and_drop_path():
    model = vit.ViT(patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, num_registers=2,
                    drop_path=0.5, layerscale=0.1, norm="rmsnorm")
    images = jnp.ones((4, 8, 8, 1))
    params = model.init(jax.random.key(0), images)
    x, out = model.apply(params, images)
    assert x.shape == (4, 1 + 2 + 4, 32)
    assert set(out) >= {"block_0", "block_1", "encoded", "cls", "patch_tokens", "patch_mean"}
    a, _ = model.apply(params, images, train=True, rngs={"dropout": jax.random.key(1)})
    b, _ = model.apply(params, images, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, b)  # drop path is active in training ...
    np.testing.assert_allclose(model.apply(params, images)[0], x)  # ... and off at evaluation


def test_bf16_compute_keeps_fp32_params_and_remat_changes_nothing():
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    ref = vit.ViT(patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2)
    params = nn.unbox(ref.init(jax.random.key(1), images))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x32, _ = ref.apply(params, images)
    x16, _ = ref.clone(dtype=jnp.bfloat16).apply(params, images)
    assert x16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(x16, np.float32), x32, atol=0.1)
    remat = ref.clone(remat=True)

    def loss(model, p):
        return jnp.sum(model.apply(p, images, train=True, rngs={"dropout": jax.random.key(2)})[0] ** 2)

    np.testing.assert_allclose(jax.grad(lambda p: loss(remat, p))(params)["params"]["embedding"]["kernel"],
                               jax.grad(lambda p: loss(ref, p))(params)["params"]["embedding"]["kernel"], rtol=1e-5)
