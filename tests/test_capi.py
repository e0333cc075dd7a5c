"""CAPI: Sinkhorn-Knopp, RoPE, heads, EMA schedule, masks and the step against independent
computations; sharded == single device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import run_steps, synthetic_batches
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import capi as capi_config
from mim_jax import parallel
from mim_jax.methods import get_method
from mim_jax.methods.capi import heads as capi_models
from mim_jax.methods.capi import method as capi
from mim_jax.methods.capi import sinkhorn
from mim_jax.models import rope
from mim_jax.training import optim
from mim_jax.training import state as state_lib

# ---- Sinkhorn-Knopp ----------------------------------------------------------------------------

def np_sinkhorn(scores, iterations=3, eps=1e-8):
    """The official algorithm in float64: [..., B, K], columns (over the batch) then rows."""
    q = np.exp(scores - scores.max(axis=-2, keepdims=True) + 50.0)
    for _ in range(iterations):
        q = q / (q.sum(-2, keepdims=True) + eps)
        q = q / (q.sum(-1, keepdims=True) + eps)
    return q


def test_sinkhorn_matches_float64_reference_and_balances():
    scores = np.random.default_rng(0).normal(size=(3, 16, 12)) * 5      # [P, B, K]
    got = np.asarray(sinkhorn.sinkhorn_knopp(jnp.asarray(scores, jnp.float32)))
    np.testing.assert_allclose(got, np_sinkhorn(scores), rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)            # rows: one unit of mass per token
    many = np.asarray(sinkhorn.sinkhorn_knopp(jnp.asarray(scores, jnp.float32), iterations=50))
    np.testing.assert_allclose(many.sum(-2), 16 / 12, rtol=1e-3)       # columns: B/K each, per position


def test_sinkhorn_sharded_over_the_batch_equals_the_gathered_computation():
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    scores = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32, 24)) * 3, jnp.float32)   # [P, B, K]
    sharded = jax.device_put(scores, NamedSharding(mesh, P(None, "batch", None)))
    assert len(sharded.addressable_shards[0].data[0]) == 4         # 8 devices x 4 examples
    out = jax.jit(sinkhorn.sinkhorn_knopp)(sharded)
    single = jax.jit(sinkhorn.sinkhorn_knopp)(jax.device_put(scores, jax.devices()[0]))
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-6, atol=1e-9)


def _head(num_prototypes=20, width=8):
    head = capi_models.ClusteringHead(num_prototypes)
    params = nn.unbox(head.init(jax.random.key(0), jnp.zeros((1, 1, width))))["params"]
    return head, params


def test_clustering_targets_chunked_equal_unchunked_and_match_numpy():
    head, params = _head()
    tokens = jax.random.normal(jax.random.key(1), (6, 8, 8))             # [B, P, D]
    predict = jnp.asarray(np.random.default_rng(2).integers(0, 8, (6, 3)), jnp.int32)
    fn = lambda p, z: head.apply({"params": p}, z)                       # noqa: E731

    def run(chunk):
        (loss, (targets, stats)), grads = jax.value_and_grad(
            lambda p: (lambda l, t, s: (l, (t, s)))(*sinkhorn.clustering_targets(fn, p, tokens, predict, chunk=chunk)),
            has_aux=True)(params)
        return loss, targets, stats, grads

    full, chunked = run(None), run(2)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(chunked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    loss, targets, stats, _ = full
    z = np.asarray(tokens, np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    logits = z @ np.asarray(params["prototypes"]["kernel"], np.float64) + np.asarray(params["prototypes"]["bias"])
    q = np_sinkhorn(logits.transpose(1, 0, 2) / 0.06).transpose(1, 0, 2)   # positionwise over the batch
    log_p = logits / 0.12 - np.log(np.exp(logits / 0.12).sum(-1, keepdims=True))
    np.testing.assert_allclose(float(loss), -(q * log_p).sum(-1).mean(), rtol=1e-4)
    np.testing.assert_allclose(np.asarray(targets), np.take_along_axis(q, np.asarray(predict)[..., None], 1),
                               rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(float(stats["target_entropy"]), -(q * np.log(q + 1e-12)).sum(-1).mean(), rtol=1e-3)
    assert float(stats["assignment_histogram"].sum()) == 6 * 8


def test_clustering_gradient_equals_autodiff_and_numpy_and_costs_two_matmuls():
    """The gradient computed in the forward pass equals autodiff of the plain (unchunked) loss and
    the float64 formula, and the step needs only the head's forward and weight-gradient matmuls
    (autodiff through the old rematerialised chunks needed a third, and Sinkhorn twice)."""
    b, p, d, k = 16, 8, 256, 256
    head = capi_models.ClusteringHead(k)
    tokens = jax.random.normal(jax.random.key(1), (b, p, d))
    params = nn.unbox(head.init(jax.random.key(0), tokens[:, :1])["params"])
    predict = jnp.zeros((b, 2), jnp.int32)
    fn = lambda prm, z: head.apply({"params": prm}, z)                    # noqa: E731

    def plain(prm):
        logits = fn(prm, tokens)
        q = jax.lax.stop_gradient(sinkhorn.sinkhorn_knopp(logits.transpose(1, 0, 2) / 0.06).transpose(1, 0, 2))
        return jnp.mean(sinkhorn.soft_cross_entropy(q, logits, 0.12))

    expected = jax.grad(plain)(params)
    for chunk in (None, 2):
        got = jax.jit(jax.grad(lambda prm: sinkhorn.clustering_targets(fn, prm, tokens, predict, chunk=chunk)[0]))(params)
        for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5 * float(jnp.abs(e).max()))

    z = np.asarray(tokens, np.float64)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    logits = z @ np.asarray(params["prototypes"]["kernel"], np.float64) + np.asarray(params["prototypes"]["bias"])
    q = np_sinkhorn(logits.transpose(1, 0, 2) / 0.06).transpose(1, 0, 2)
    soft = np.exp(logits / 0.12 - logits.max(-1, keepdims=True) / 0.12)
    soft /= soft.sum(-1, keepdims=True)
    d_logits = (soft * q.sum(-1, keepdims=True) - q) / (0.12 * b * p)
    np.testing.assert_allclose(expected["prototypes"]["kernel"], np.einsum("bpd,bpk->dk", z, d_logits),
                               rtol=2e-3, atol=1e-6)

    step = jax.jit(jax.value_and_grad(lambda prm: sinkhorn.clustering_targets(fn, prm, tokens, predict)[0]))
    cost = step.lower(params).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    matmul = 2.0 * b * p * d * k
    assert cost["flops"] / matmul < 2.3, cost["flops"] / matmul       # the old form: 3.1


# ---- RoPE and coordinates --------------------------------------------------------------------

def test_rope_official_formula_against_numpy():
    """docs/methods/capi.md §1.2: f = 7 * 1e4^linspace(0, -1, d/4) * 2pi tiled; channels < d/2
    turn with the row coordinate, the rest with the column; out = x cos(a) + rotate_half(x) sin(a)
    over the head."""
    d = 16
    x = np.random.default_rng(0).normal(size=(2, 5, 3, d))
    coords = np.random.default_rng(1).uniform(size=(2, 5, 2))
    f = 7 * 1e4 ** np.linspace(0, -1, d // 4) * 2 * np.pi
    angle = np.concatenate([coords[..., :1] * np.tile(f, 2), coords[..., 1:] * np.tile(f, 2)], -1)[:, :, None]
    rotated = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
    expected = x * np.cos(angle) + rotated * np.sin(angle)
    np.testing.assert_allclose(rope.apply_rope(jnp.asarray(x, jnp.float32), coords), expected, atol=1e-4)


def test_axial_rope_depends_only_on_coordinate_differences():
    d = 16
    q, k = (jnp.asarray(np.random.default_rng(s).normal(size=(1, 1, 1, d)), jnp.float32) for s in (0, 1))

    def score(cq, ck):
        return float(jnp.sum(rope.apply_rope(q, jnp.asarray([[cq]]), "axial")
                             * rope.apply_rope(k, jnp.asarray([[ck]]), "axial")))

    np.testing.assert_allclose(score((0.2, 0.7), (0.5, 0.1)), score((0.4, 0.3), (0.7, -0.3)), rtol=1e-4)
    # The official formula is not a rotation: the same shift changes the score.
    qc, kc = rope.apply_rope(q, jnp.asarray([[(0.2, 0.7)]])), rope.apply_rope(k, jnp.asarray([[(0.5, 0.1)]]))
    qs, ks = rope.apply_rope(q, jnp.asarray([[(0.4, 0.3)]])), rope.apply_rope(k, jnp.asarray([[(0.7, -0.3)]]))
    assert abs(float(jnp.sum(qc * kc)) - float(jnp.sum(qs * ks))) > 1e-3


def test_register_coordinates_go_round_the_visible_bounding_box():
    edge = rope.edge_register_coords(8)
    np.testing.assert_allclose(edge, [[0, 0], [0.5, 0], [1, 0], [1, 0.5], [1, 1], [0.5, 1], [0, 1], [0, 0.5]])
    coords = jnp.asarray([[[0.2, 0.4], [0.6, 0.4], [0.2, 1.0]]])
    scaled = np.asarray(rope.scale_to_bbox(edge, coords))[0]
    assert scaled[:, 0].min() == pytest.approx(0.2) and scaled[:, 0].max() == pytest.approx(0.6)
    assert scaled[:, 1].min() == pytest.approx(0.4) and scaled[:, 1].max() == pytest.approx(1.0)
    np.testing.assert_allclose(rope.grid_coords(2, 3), [[0, 0], [0, .5], [0, 1], [1, 0], [1, .5], [1, 1]])


# ---- heads and predictor ---------------------------------------------------------------------

def test_weight_norm_head_against_numpy():
    head = capi_models.WeightNormHead(6)
    x = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    params = nn.unbox(head.init(jax.random.key(0), x))["params"]
    params = dict(params, g=jnp.linspace(0.5, 2.0, 6)[None])
    v = np.asarray(params["v"], np.float64)
    expected = (x / np.linalg.norm(x, axis=-1, keepdims=True)) @ (v / np.linalg.norm(v, axis=0)) * np.linspace(0.5, 2, 6)
    np.testing.assert_allclose(head.apply({"params": params}, x), expected, rtol=1e-5)
    # Scaling the prototypes changes nothing: only their directions and the gains matter.
    np.testing.assert_allclose(head.apply({"params": dict(params, v=3 * params["v"])}, x), expected, rtol=1e-5)


def test_predictor_queries_are_independent():
    predictor = capi_models.Predictor(depth=2, num_heads=2, mlp_dim=32)
    context = jax.random.normal(jax.random.key(0), (1, 6, 16))
    ctx_coords = jax.random.uniform(jax.random.key(1), (1, 6, 2))
    queries = jnp.asarray([[[0.1, 0.2], [0.5, 0.5], [0.9, 0.3]]])
    params = predictor.init(jax.random.key(2), context, ctx_coords, queries)
    out = predictor.apply(params, context, ctx_coords, queries)[-1]
    moved = predictor.apply(params, context, ctx_coords, queries.at[0, 2].set(jnp.asarray([0.0, 0.0])))[-1]
    np.testing.assert_allclose(out[0, :2], moved[0, :2], atol=1e-6)      # other queries unaffected
    assert not np.allclose(out[0, 2], moved[0, 2])
    alone = predictor.apply(params, context, ctx_coords, queries[:, 1:2])[-1]
    np.testing.assert_allclose(alone[0, 0], out[0, 1], atol=1e-5)


# ---- schedules, masks, groups -----------------------------------------------------------------

def test_ema_momentum_is_one_minus_the_truncated_cosine_lr():
    config = capi_config.get_config("")
    total, warmup, peak = 1000, 100, 1e-3
    lr = optim.schedule(config.optax, peak, total, warmup)
    for t in (0, 50, 100, 400, 999, 1500):
        if t < warmup:
            expected = peak * t / warmup
        else:
            expected = 0.5 * peak * (1 + np.cos(0.8 * np.pi * min(t - warmup, total - warmup) / (total - warmup)))
        np.testing.assert_allclose(float(capi.ema_momentum(lr(t))), 1 - expected, rtol=0, atol=1e-7)   # float32
    assert float(lr(total)) == pytest.approx(0.5 * peak * (1 + np.cos(0.8 * np.pi)), rel=1e-4)   # ~9.5e-5, then flat


def test_official_mask_and_prediction_counts():
    method = get_method(capi_config.get_config("variant=L/14"))
    assert (method.grid, method.num_masked, method.num_predict) == ((16, 16), 166, 8)
    batch = {"index": jnp.arange(32, dtype=jnp.int32)}
    visible, predict = jax.jit(lambda b: method.masks_and_queries(jax.random.key(0), b))(batch)
    assert visible.shape == (32, 90) and predict.shape == (32, 8)
    for v, p in zip(np.asarray(visible), np.asarray(predict)):
        assert len(set(p)) == 8 and not set(p) & set(v)                 # distinct, all masked


def _tiny_config():
    c = capi_config.get_config("local")
    c.input.update(image_size=16, batch_size=16, num_workers=0, crop_scale=(0.5, 1.0))
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, num_registers=4)
    c.method.update(num_prototypes=64, sinkhorn_chunk=8)
    c.total_steps, c.log_steps, c.ckpt_steps = 6, 2, 3
    c.optax.warmup_steps = 2
    c.evals = {}
    return c


def test_parameter_groups_follow_the_official_optimizers():
    config = _tiny_config()
    method = get_method(config)
    params = jax.eval_shape(method.init_params, jax.random.key(0), method.batch_spec(8))
    labels = traverse = jax.tree_util.tree_flatten_with_path(optim.param_labels(nn.unbox(params), config.optax))[0]
    by_path = {"/".join(k.key for k in path): label for path, label in traverse}
    assert by_path["clustering/prototypes/kernel"] == by_path["clustering/prototypes/bias"] == "clustering"
    assert by_path["encoder/embedding/kernel"] == "patch_embed"
    assert by_path["encoder/encoder/block_0/norm1/scale"] == "norms"
    assert by_path["head/g"] == by_path["encoder/registers"] == by_path["predictor/mask_token"] == "default"
    assert labels
    groups = config.optax.groups
    assert (groups.clustering.lr_mult, groups.clustering.weight_decay, groups.patch_embed.lr_mult) == (0.5, 0.01, 0.2)


# ---- the step ----------------------------------------------------------------------------------

@pytest.mark.slow   # compiles CAPI's step on two meshes (about 1 min); the same property for MAE (tests/test_train.py) is in the default tier
def test_sharded_step_equals_single_device_and_ema_follows_one_minus_lr():
    config = _tiny_config()
    batches = synthetic_batches(config, 2, num_examples=64)
    sharded_state, sharded = run_steps(config, parallel.make_mesh([("data", 2), ("fsdp", 4)]), batches)
    single_state, single = run_steps(config, parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]), batches)
    for key in ("capi_loss", "clustering_loss", "target_entropy", "prototypes_in_use"):
        np.testing.assert_allclose([m[key] for m in sharded], [m[key] for m in single], rtol=2e-5)
    assert set(sharded_state.extras["ema"]) == {"encoder", "predictor", "head"}    # not the clustering head

    # One more step by hand: ema' = m ema + (1 - m) student', with m = 1 - 10 lr (local preset).
    method = get_method(config)
    mesh = parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1])
    setup = state_lib.build(config, method, mesh, total_steps=10, warmup_steps=2, global_batch_size=16)
    state = setup.create(jax.random.key(0))
    state, _ = setup.train_step(state, setup.frozen, parallel.host_batch_to_global(batches[0], mesh))
    before = jax.device_get(state.extras["ema"])
    state, _ = setup.train_step(state, setup.frozen, parallel.host_batch_to_global(batches[1], mesh))
    m = 1 - 10 * float(setup.lr_schedule(1))
    leaf = lambda tree: np.asarray(tree["predictor"]["mask_token"])        # noqa: E731
    np.testing.assert_allclose(leaf(state.extras["ema"]), m * leaf(before) + (1 - m) * leaf(jax.device_get(state.params)),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.slow   # three gradient programs of the whole model (about 40 s)
def test_each_loss_reaches_only_its_own_parameters():
    config = _tiny_config()
    method = get_method(config)
    batch = {k: jnp.asarray(v) for k, v in synthetic_batches(config, 1, num_examples=64)[0].items() if not k.startswith("_")}
    params = nn.unbox(method.init_params(jax.random.key(0), batch))
    extras = method.init_extras(jax.random.key(1), params, batch)

    def grads(term):
        return jax.grad(lambda p: method.loss(p, extras, {}, batch, jax.random.key(2), jnp.int32(0))[1][0][term])(params)

    capi_grads, clustering_grads = grads("capi_loss"), grads("clustering_loss")
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(capi_grads["clustering"]))
    for part in ("encoder", "predictor", "head"):
        assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(clustering_grads[part]))
    assert any(np.any(np.asarray(g) != 0) for g in jax.tree.leaves(clustering_grads["clustering"]))


@pytest.mark.slow   # the same check for MAE (tests/test_mae.py) is in the default tier
def test_analytic_flops_match_xla_cost_analysis():
    from mim_jax import bench
    config = _tiny_config()
    config.model.update(width=64, depth=3, mlp_dim=256, num_heads=4)   # matmuls dominate
    config.input.batch_size = 32
    report = bench.benchmark(config, steps=1)
    ratio = report["analytic_tflops_per_step"] / report["xla_tflops_per_step"]
    assert 0.6 < ratio < 1.05, report


def test_encode_gives_predictor_pooling_and_patch_tokens():
    config = _tiny_config()
    method = get_method(config)
    images = jnp.zeros((2, 16, 16, 1))
    params = nn.unbox(method.init_params(jax.random.key(0), {"image": images, "index": jnp.arange(2)}))
    out = method.encode(params, images)
    assert out["cls"].shape == (2, 32) and out["patch_tokens"].shape == (2, 16, 32)
    assert out["registers"].shape == (2, 4, 32)


def test_encode_queries_the_grid_of_its_input_not_of_the_config():
    """Features at another resolution (the paper evaluates at 448): one predictor query per patch
    of the input, at that grid's coordinates, pooled from block 0."""
    config = _tiny_config()
    method = get_method(config)
    small = jnp.zeros((2, 16, 16, 1))
    params = nn.unbox(method.init_params(jax.random.key(0), {"image": small, "index": jnp.arange(2)}))
    images = jax.random.normal(jax.random.key(1), (2, 32, 32, 1))     # 8 x 8 patches, config says 4 x 4
    out = method.encode(params, images)
    tokens, enc = method.encoder.apply({"params": params["encoder"]}, images)
    queries = jnp.broadcast_to(jnp.asarray(rope.grid_coords(8, 8))[None], (2, 64, 2))
    blocks = method.predictor.apply({"params": params["predictor"]}, tokens, enc["coords"], queries)
    np.testing.assert_allclose(out["cls"], blocks[0].mean(axis=1), rtol=1e-5, atol=1e-6)
    assert out["patch_tokens"].shape == (2, 64, 32)


def test_qkv_starts_as_three_separate_xavier_projections():
    """The official encoder has separate q, k, v Linears, each xavier-uniform over [D, D]: every
    third of the fused kernel has bound sqrt(6 / 2D), not xavier's sqrt(6 / 4D) over [D, 3D]."""
    config = capi_config.get_config("local")
    config.model.update(width=128, depth=1, num_heads=2)
    method = get_method(config)
    params = jax.jit(lambda: nn.unbox(method.init_params(jax.random.key(0), jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype), method.batch_spec(8)))))()
    kernel = np.asarray(params["encoder"]["encoder"]["block_0"]["attn"]["qkv"]["kernel"])
    bound = np.sqrt(6 / (2 * 128))
    for part in np.split(kernel, 3, axis=1):
        assert 0.98 * bound < np.abs(part).max() <= bound
        np.testing.assert_allclose(part.std(), bound / np.sqrt(3), rtol=0.03)


def test_student_head_prototypes_start_untruncated_with_std_002():
    """trunc_normal_(std=0.02) with its default absolute bounds +-2 is a plain N(0, 0.02): flax's
    truncated_normal(0.02) would cut at +-0.04 and leave std 0.0176."""
    v = np.asarray(nn.unbox(capi_models.WeightNormHead(4096).init(jax.random.key(0), jnp.ones((1, 64))))["params"]["v"])
    from scipy import stats
    assert stats.kstest(v.reshape(-1) / 0.02, "norm").pvalue > 1e-3
    assert np.abs(v).max() > 0.08          # 4+ std occur in 262k draws; a 2-std cut would forbid them
