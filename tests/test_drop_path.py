"""CAPI's efficient ("subset") drop path against the naive form and a NumPy index_add: the same
expected forward and gradient, per-device draws, no cross-device traffic."""
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mim_jax import flops, parallel
from mim_jax.methods.capi import heads as capi_models
from mim_jax.models import layers, vit


def test_subset_residual_matches_numpy_index_add():
    rng = np.random.RandomState(0)
    x, w = rng.randn(6, 3, 4), rng.randn(4, 4)
    extra = rng.randn(6, 3, 4)
    indices = np.array([[2, 0], [1, 2]])        # two groups of 3 rows, 2 kept in each
    out = layers.subset_residual(jnp.asarray(x, jnp.float32), lambda h, e: jnp.tanh(h @ w) * e,
                                 jnp.asarray(indices), jnp.asarray(extra, jnp.float32))
    expected = x.copy()
    for g, rows in enumerate(indices):
        for r in rows:
            i = 3 * g + r
            expected[i] += 1.5 * np.tanh(x[i] @ w) * extra[i]      # scale local / n_keep = 3 / 2
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_subset_draws_are_distinct_rows_within_each_group_and_uniform():
    draw = jax.jit(lambda k: layers.draw_subsets(k, 12, 0.25, 3))
    first = np.asarray(draw(jax.random.key(0)))
    assert first.shape == (3, 3)                                  # int(4 * 0.75) of each group of 4
    assert all(len(set(row)) == 3 and set(row) <= set(range(4)) for row in first)
    counts = np.zeros((3, 4))
    for k in jax.random.split(jax.random.key(1), 2000):
        for g, row in enumerate(np.asarray(draw(k))):
            counts[g, row] += 1
    np.testing.assert_allclose(counts / 2000, 0.75, atol=0.04)     # each row kept with p = n_keep / local
    assert layers.subset_size(512, 0.2) == 409 and layers.subset_size(1, 0.9) == 1   # the official int()


def _exact_expectations(monkeypatch, apply, params, batch: int, rate: float):
    """E[loss] and E[grad] under both forms, by enumerating every draw of two residuals (loss a sum
    of per-example terms, so the naive form's expectation is over per-example mask pairs)."""
    keep = 1.0 - rate
    n_keep = layers.subset_size(batch, rate)
    assert n_keep == keep * batch, "the forms agree only where (1 - rate) * b is whole"

    def value_and_grad(form, draws, patch_name):
        queue = iter(draws)
        monkeypatch.setattr(layers, patch_name, lambda *a, **k: next(queue))
        return jax.value_and_grad(lambda p: apply(p, form))(params)

    naive, subset = [], []
    for d1, d2 in itertools.product((0.0, 1.0), repeat=2):
        weight = (keep if d1 else 1 - keep) * (keep if d2 else 1 - keep)
        masks = [jnp.full((batch, 1, 1), d, bool) for d in (d1, d2)]
        naive.append((weight, value_and_grad("naive", masks, "draw_keep_mask")))
    subsets = [np.array([[i for i in range(batch) if i != left_out]]) for left_out in range(batch)]
    for s1, s2 in itertools.product(subsets, repeat=2):
        subset.append((1 / len(subsets) ** 2, value_and_grad("subset", [jnp.asarray(s1), jnp.asarray(s2)],
                                                             "draw_subsets")))
    mean = lambda pairs: jax.tree.map(lambda *xs: sum(w * x for w, x in zip([p[0] for p in pairs], xs)),  # noqa: E731
                                      *[p[1] for p in pairs])
    return mean(naive), mean(subset)


def _assert_trees_close(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-6)


def test_self_attention_block_expected_update_equals_the_naive_forms(monkeypatch):
    rng = np.random.RandomState(1)
    x = jnp.asarray(rng.randn(5, 7, 16), jnp.float32)
    coords = jnp.asarray(rng.rand(5, 7, 2), jnp.float32)     # per-example RoPE coordinates are subset too
    weights = jnp.asarray(rng.randn(5, 7, 16), jnp.float32)
    block = lambda form: layers.Block(num_heads=2, mlp_dim=32, norm="rmsnorm", use_bias=False, layerscale=0.5,  # noqa: E731
                                      drop_path=0.2, rope="capi", drop_path_form=form)
    params = block("naive").init(jax.random.key(0), x, True, coords)

    def apply(p, form):
        out = block(form).apply(p, x, False, coords, rngs={"dropout": jax.random.key(1)})
        return jnp.sum(jnp.tanh(out) * weights)

    naive, subset = _exact_expectations(monkeypatch, apply, params, batch=5, rate=0.2)
    _assert_trees_close(naive, subset)
    deterministic = jnp.sum(jnp.tanh(block("naive").apply(params, x, True, coords)) * weights)
    assert abs(float(naive[0]) - float(deterministic)) > 1e-3   # the draws matter: the test can fail


@pytest.mark.slow   # the self-attention block's check is in the default tier
def test_cross_attention_block_subsets_queries_context_and_coordinates_alike(monkeypatch):
    rng = np.random.RandomState(2)
    queries = jnp.asarray(rng.randn(5, 3, 16), jnp.float32)
    context = jnp.asarray(rng.randn(5, 6, 16), jnp.float32)
    q_coords, k_coords = (jnp.asarray(rng.rand(5, n, 2), jnp.float32) for n in (3, 6))
    weights = jnp.asarray(rng.randn(5, 3, 16), jnp.float32)
    block = lambda form: capi_models.CrossAttentionBlock(num_heads=2, mlp_dim=32, drop_path=0.2,  # noqa: E731
                                                         drop_path_form=form)
    params = block("naive").init(jax.random.key(0), queries, context, q_coords, k_coords, True)

    def apply(p, form):
        out = block(form).apply(p, queries, context, q_coords, k_coords, False, rngs={"dropout": jax.random.key(1)})
        return jnp.sum(jnp.tanh(out) * weights)

    naive, subset = _exact_expectations(monkeypatch, apply, params, batch=5, rate=0.2)
    _assert_trees_close(naive, subset)


def test_subset_runs_on_each_devices_own_examples_without_collectives():
    mesh = parallel.make_mesh([("data", 8), ("fsdp", 1)])
    model = vit.ViT(patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, cls_token=False, num_registers=4,
                    norm="rmsnorm", posemb="rope", drop_path=0.25, drop_path_uniform=True, drop_path_form="subset")
    images = jnp.zeros((32, 16, 16, 1))
    params = model.init(jax.random.key(0), images[:1])
    forward = parallel.Sharding(mesh=mesh, rules=()).jit(
        lambda p, im: model.apply(p, im, train=True, rngs={"dropout": jax.random.key(1)})[0],
        in_shardings=(parallel.replicated(mesh), NamedSharding(mesh, P(("data", "fsdp")))))
    hlo = forward.lower(params, images).compile().as_text()
    for collective in ("all-gather", "all-to-all", "collective-permute", "all-reduce"):
        assert collective not in hlo, collective


def test_subset_form_is_checked():
    x = jnp.zeros((4, 16, 16, 1))
    ramp = vit.ViT(patch_size=4, width=32, depth=2, mlp_dim=64, num_heads=2, drop_path=0.2, scan=True,
                   drop_path_form="subset")
    params = ramp.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="drop_path_uniform=True"):
        ramp.apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
    with pytest.raises(ValueError, match="Unknown drop_path_form 'efficient'"):
        vit.ViT(patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2, drop_path_form="efficient").init(
            jax.random.key(0), x)
    # Uniform rates scan: a fixed number of examples per block, the loop's parameters.
    uniform = ramp.clone(drop_path_uniform=True)
    out, _ = uniform.apply(params, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert out.shape == (4, 17, 32) and np.all(np.isfinite(out))
    evaluated, _ = uniform.apply(params, x)            # evaluation: every branch on every example
    expected, _ = ramp.clone(drop_path_form="naive").apply(params, x)
    np.testing.assert_array_equal(evaluated, expected)


def test_capi_recipe_uses_the_subset_form_and_counts_its_flops():
    from configs import capi as capi_config
    from mim_jax.methods import get_method
    recipe = capi_config.get_config("variant=B/14,batch=64")
    assert recipe.model.drop_path_form == "subset"
    naive = recipe.copy_and_resolve_references()
    naive.model.drop_path_form = "naive"
    subset_method, naive_method = get_method(recipe, num_examples=1000), get_method(naive, num_examples=1000)
    assert subset_method.predictor.drop_path_form == "subset"
    saved = naive_method.train_flops_per_example() - subset_method.train_flops_per_example()
    enc, m = naive_method.encoder, naive_method
    d, q, ctx, mlp = enc.width, m.num_predict, m.num_visible + enc.num_registers, m.predictor.mlp_dim
    student_blocks = flops.transformer_forward(m.num_visible + enc.num_registers, d, enc.depth, enc.mlp_dim)
    predictor = m.predictor.depth * (4 * q * d * d + 4 * ctx * d * d + 4 * q * ctx * d + 4 * q * d * mlp)
    np.testing.assert_allclose(saved, 0.2 * 3 * (student_blocks + predictor), rtol=1e-9)   # forward + backward
