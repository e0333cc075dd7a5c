"""CMAE: frozen patch embedding, the momentum head's EMA, BatchNorm state, sharding invariance,
ContrastiveCrop's box updates (schedule, values, resume) and the two-view host transform."""
import functools
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import cmae as cmae_config
from mim_jax import flops, parallel
from mim_jax.data import pipeline
from mim_jax.methods import get_method
from mim_jax.methods.cmae import contrastive, views
from mim_jax.methods.cmae import method as cmae
from mim_jax.runtime import checkpoint, console
from mim_jax.training import state as state_lib
from mim_jax.training import train

NUM_EXAMPLES = 48


def tiny_config(**overrides):
    c = cmae_config.get_config("local")
    c.input.update(image_size=16, batch_size=16, num_workers=0, crop_scale=(0.5, 1.0))
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.decoder.update(width=32, num_heads=2, mlp_dim=64)
    c.contrastive.update(hidden_dim=64, dim=32)
    c.method.ccrop.batch_size = 16
    c.total_steps, c.log_steps, c.ckpt_steps = 6, 1, 3
    c.optax.warmup_steps = 1
    c.evals = {}
    c.update_from_flattened_dict(overrides)
    return c


def _source():
    return pipeline.SyntheticSource(NUM_EXAMPLES, image_shape=(16, 16, 1), num_classes=10, seed=0)


def _setup(config, mesh):
    return state_lib.build(config, get_method(config, num_examples=NUM_EXAMPLES), mesh, total_steps=10,
                           warmup_steps=1, global_batch_size=config.input.batch_size)


def _batches(config, n):
    it = pipeline.train_iterator(_source(), global_batch_size=config.input.batch_size, seed=0, process_index=0,
                                 process_count=1, transform=get_method(config, NUM_EXAMPLES).train_transform())
    return [next(it) for _ in range(n)]


def _steps(config, mesh, batches):
    """Host copies of the state before and after each step (the step donates its input)."""
    setup = _setup(config, mesh)
    state = setup.create(jax.random.key(0))
    states, history = [jax.device_get(state)], []
    for b in batches:
        state, m = setup.train_step(state, setup.frozen, parallel.host_batch_to_global(b, mesh))
        states.append(jax.device_get(state))
        history.append(jax.device_get(m))
    return states, history


@pytest.fixture(scope="module")
def three_steps():
    config = tiny_config()
    states, history = _steps(config, parallel.make_mesh([("data", 2), ("fsdp", 4)]), _batches(config, 3))
    return config, states, history


def test_patch_embedding_is_frozen_and_everything_else_trains(three_steps):
    _, states, _ = three_steps
    first, last = states[0].params, states[-1].params
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(last["encoder"]["embedding"][name], first["encoder"]["embedding"][name])
    for path in (("encoder", "cls"), ("decoder", "mask_token"), ("position", "linear_1", "kernel"),
                 ("contrastive", "block_0", "attn", "qkv", "kernel"), ("predictor", "linear_1", "kernel")):
        a, b = first, last
        for key in path:
            a, b = a[key], b[key]
        assert not np.array_equal(a, b), path


def test_momentum_head_follows_the_ema_of_the_online_head_before_the_step(three_steps):
    """Each step first advances the momentum head with the online head as it was BEFORE that
    step's update (SDMAE's order), then computes the keys."""
    config, states, _ = three_steps
    m = config.contrastive.momentum
    for before, after in zip(states[:-1], states[1:]):
        expected = jax.tree.map(lambda t, o: m * t + (1 - m) * o, before.extras["momentum"], before.params["contrastive"])
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), after.extras["momentum"],
                     expected)
    # It starts as a copy of the online head (MoCo), then lags behind it.
    jax.tree.map(np.testing.assert_array_equal, states[0].extras["momentum"], states[0].params["contrastive"])


def test_batch_norm_statistics_move_by_pytorch_momentum(three_steps):
    _, states, _ = three_steps
    for head in ("contrastive", "predictor", "momentum"):
        mean0 = jax.tree.leaves(states[0].extras["batch_stats"][head])
        mean3 = jax.tree.leaves(states[-1].extras["batch_stats"][head])
        assert all(np.all(a == 0) or np.all(a == 1) for a in mean0)           # fresh: mean 0, var 1
        assert any(not np.allclose(a, b) for a, b in zip(mean0, mean3)), head
        assert all(np.all(np.isfinite(b)) for b in mean3)


def test_loss_is_the_sum_of_its_terms(three_steps):
    config, _, history = three_steps
    for m in history:
        expected = m["reconstruction_loss"] + m["position_loss"] + config.contrastive.weight * m["contrastive_loss"]
        np.testing.assert_allclose(m["loss"], expected, rtol=1e-5)
        assert 0 <= m["contrastive_accuracy"] <= 1


@pytest.mark.slow   # the same property for MAE (tests/test_train.py) is in the default tier
def test_sharded_step_equals_single_device(three_steps):
    config, sharded_states, sharded = three_steps
    single_states, single = _steps(config, parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]),
                                   _batches(config, 3))
    for a, b in zip(sharded, single):
        for key in ("loss", "reconstruction_loss", "position_loss", "contrastive_loss", "grad_norm"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)
    # Some gradients are exactly zero in exact arithmetic (k biases under softmax; a bias before a
    # BatchNorm): Adam turns their rounding noise into steps of +-lr, so parameters agree to a few lr.
    lr = config.optax.base_lr * config.input.batch_size / config.optax.lr_scale_batch
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3 * lr),
                 single_states[-1].params, sharded_states[-1].params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=3 * lr),
                 single_states[-1].extras, sharded_states[-1].extras)


def test_per_device_negatives_group_the_batch_by_its_shards():
    config = tiny_config(**{"contrastive.negatives": "device"})
    method = get_method(config, NUM_EXAMPLES)
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    assert parallel.Sharding.of(config, mesh).traced(method._negative_groups)() == 8
    assert get_method(tiny_config(), NUM_EXAMPLES)._negative_groups() == 1


@pytest.mark.slow   # two gradient programs of the whole model (about 25 s)
def test_the_contrastive_loss_reaches_the_encoder_through_the_decoder():
    config = tiny_config(**{"method.position_weight": 0.0})
    method = get_method(config, NUM_EXAMPLES)
    setup = _setup(config, parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]))
    state = setup.create(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, _batches(config, 1)[0])

    def contrastive_only(params):
        _, (metrics, _) = method.loss(params, state.extras, {}, batch, jax.random.key(0), 0)
        return metrics["contrastive_loss"]

    grads = jax.jit(jax.grad(contrastive_only))(state.params)
    for part in ("encoder", "decoder", "contrastive", "predictor"):
        assert optax_norm(grads[part]) > 0, part
    assert optax_norm(grads["position"]) == 0


def optax_norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


def test_refresh_computes_one_box_per_example_from_the_heat_maps(monkeypatch, caplog):
    """The sharded, padded pass over the source equals the heat-map boxes of each image alone."""
    config = tiny_config()
    config.method.ccrop.update(batch_size=32, threshold=0.5)    # 48 examples: the last batch is padded
    method = get_method(config, NUM_EXAMPLES)
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    state = _setup(config, mesh).create(jax.random.key(0))
    monkeypatch.setattr(console, "Progress", functools.partial(console.Progress, every_s=0.0))   # every tenth
    with caplog.at_level(logging.INFO):
        extras, logs = method.refresh.run(state.params, state.extras, _source(), parallel.Sharding.of(config, mesh))
    # The pass says what it does and how far it is (it takes minutes on a CPU).
    assert caplog.messages[0] == ("Refreshing the ContrastiveCrop boxes: heat maps of the current encoder for 48 "
                                  "training images.")
    assert caplog.messages[1].startswith("ContrastiveCrop boxes: 32/48 images (66%), ")
    assert extras["boxes"].shape == (NUM_EXAMPLES, 4) and int(extras["box_updates"]) == 1
    view = views.ResizeTransform(16, config.input.mean, config.input.std)
    images = np.stack([view(_source()[i], None)["image"] for i in range(NUM_EXAMPLES)])
    params = jax.device_get(state.params["encoder"])
    heat = method.heat_maps(params, jnp.asarray(images))
    np.testing.assert_allclose(extras["boxes"], contrastive.heatmap_boxes(heat, 16, 0.5), atol=1e-6)
    np.testing.assert_allclose(logs["box_area_mean"], cmae.box_areas(extras["boxes"]).mean(), rtol=1e-6)
    assert logs["box_area"].shape == (NUM_EXAMPLES,)
    # Before any refresh the host pipeline draws plain random-resized crops; afterwards it reads the boxes.
    assert method.host_state.read(state.extras) is None
    np.testing.assert_array_equal(method.host_state.read(parallel.place(extras, _setup(config, mesh).shardings.extras)),
                                  extras["boxes"])


def test_cls_attention_heat_map_sums_to_the_patch_share_of_attention():
    config = tiny_config()
    method = get_method(config, NUM_EXAMPLES)
    state = _setup(config, parallel.make_mesh([("data", -1), ("fsdp", 1)])).create(jax.random.key(0))
    images = jax.random.normal(jax.random.key(1), (4, 16, 16, 1))
    heat = method.heat_maps(jax.device_get(state.params["encoder"]), images)
    assert heat.shape == (4, 4, 4)
    assert np.all(np.asarray(heat) > 0) and np.all(np.asarray(heat).sum((1, 2)) < 1)


def test_refresh_schedule_is_the_warm_up_then_every_interval():
    method = get_method(cmae_config.get_config(""), NUM_EXAMPLES)
    assert method.refresh.steps(1000) == (200, 400, 600, 800)
    off = get_method(tiny_config(**{"method.ccrop.enabled": False}), NUM_EXAMPLES)
    assert off.refresh.steps(1000) == ()


def test_runs_of_an_epoch_or_more_refresh_as_before_and_shorter_ones_not_at_all():
    """Each refresh is a pass over the whole training set: a run that trains on fewer images than
    that (a 5-step local run: 640 of 60,000) has none."""
    recipe = get_method(cmae_config.get_config(""), 1_281_167)       # ImageNet, batch 4096, 300 epochs
    total = 300 * 1_281_167 // 4096
    assert recipe.refresh.steps(total) == tuple(range(int(round(0.2 * total)), total, int(round(0.2 * total))))
    local = get_method(cmae_config.get_config("local"), 60_000)      # 938 steps of 128: 2 epochs
    assert local.refresh.steps(938) == (188, 376, 564, 752)
    assert local.refresh.steps(469) == (94, 188, 282, 376)            # one epoch (60,032 images)
    assert local.refresh.steps(468) == () and local.refresh.steps(5) == ()
    assert get_method(cmae_config.get_config("local")).refresh.steps(5) == (1, 2, 3, 4)   # no data attached


def _train(config, workdir, monkeypatch):
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: _source())
    return train.train_and_evaluate(config, str(workdir))


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow   # end-to-end: three runs of the trainer
def test_a_run_killed_after_a_box_update_resumes_bit_identically(tmp_path, monkeypatch):
    """Compressed schedule: boxes at steps 2 and 4 of 6. SIGTERM during step 3 (after the first
    update, before the second) saves there; the resumed run ends bit-identical, boxes included."""
    config = tiny_config(**{"method.ccrop.warmup_percent": 1 / 3, "method.ccrop.interval_percent": 1 / 3})
    reference = _train(config, tmp_path / "uninterrupted", monkeypatch)
    rows = _rows(tmp_path / "uninterrupted")
    assert [r["step"] for r in rows if "refresh/box_area_mean" in r] == [2, 4]
    assert int(reference.extras["box_updates"]) == 2

    calls = {"n": 0}
    original = flops.Throughput.add_step

    def preempt_in_step_3(self, data_wait):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, data_wait)

    monkeypatch.setattr(flops.Throughput, "add_step", preempt_in_step_3)
    interrupted = _train(config, tmp_path / "resumed", monkeypatch)
    assert int(interrupted.step) == 3 and int(interrupted.extras["box_updates"]) == 1
    monkeypatch.setattr(flops.Throughput, "add_step", original)
    resumed = _train(config, tmp_path / "resumed", monkeypatch)
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(reference.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.extras), jax.device_get(reference.extras))


@pytest.mark.slow   # end-to-end: three runs of the trainer
def test_a_sigterm_during_a_refresh_stops_it_and_the_resume_redoes_it(tmp_path, monkeypatch, caplog):
    """Compressed schedule: boxes after steps 2 and 4 of 6, each a pass of 3 batches over 48 examples.
    SIGTERM after the first batch of step 2's pass: the pass stops, step 2 is saved without it and
    the run exits; the resumed run redoes it and ends bit-identical to an uninterrupted one."""
    config = tiny_config(**{"method.ccrop.warmup_percent": 1 / 3, "method.ccrop.interval_percent": 1 / 3})
    reference = _train(config, tmp_path / "uninterrupted", monkeypatch)

    original, sent = console.Progress.update, []

    def preempt_in_the_first_refresh(self, done):
        if self.what == "ContrastiveCrop boxes" and not sent:
            sent.append(done)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, done)

    monkeypatch.setattr(console.Progress, "update", preempt_in_the_first_refresh)
    with caplog.at_level(logging.INFO):
        interrupted = _train(config, tmp_path / "resumed", monkeypatch)
    assert int(interrupted.step) == 2 and int(interrupted.extras["box_updates"]) == 0
    assert ("The refresh after step 2 stopped at 16 of 48 examples for the preemption notice: step 2 is saved "
            "without it, and resuming redoes it.") in caplog.messages
    assert checkpoint.Checkpointer(tmp_path / "resumed" / "checkpoints").all_steps() == [2]
    assert not [r for r in _rows(tmp_path / "resumed") if "refresh/box_area_mean" in r]

    monkeypatch.setattr(console.Progress, "update", original)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        resumed = _train(config, tmp_path / "resumed", monkeypatch)
    assert "Step 2's refresh was stopped by a preemption before its checkpoint: doing it now." in caplog.messages
    assert int(resumed.step) == 6 and int(resumed.extras["box_updates"]) == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params), jax.device_get(reference.params))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.extras), jax.device_get(reference.extras))
    assert [r["step"] for r in _rows(tmp_path / "resumed") if "refresh/box_area_mean" in r] == [2, 4]


def test_boxes_restore_onto_another_device_count(tmp_path):
    config = tiny_config()
    method = get_method(config, NUM_EXAMPLES)
    big = _setup(config, parallel.make_mesh([("data", 2), ("fsdp", 4)]))
    state = big.create(jax.random.key(0))
    boxes = np.random.default_rng(0).uniform(size=(NUM_EXAMPLES, 4)).astype(np.float32)
    extras = dict(jax.device_get(state.extras), boxes=boxes, box_updates=np.int32(1))
    state = state.replace(extras=parallel.place(extras, big.shardings.extras))
    ckpt = checkpoint.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1)
    ckpt.save(5, state, force=True)
    ckpt.wait()
    small = _setup(config, parallel.make_mesh([("data", 2), ("fsdp", 1)], jax.devices()[:2]))
    _, restored, _ = checkpoint.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1).restore(small.abstract)
    np.testing.assert_array_equal(method.host_state.read(restored.extras), boxes)


def test_views_are_drawn_from_each_examples_own_box():
    """A ramp image (pixel = its row) and two boxes: example 0's in the top rows, example 1's in the
    bottom rows. Small crops centred in the box show it: view means follow the box."""
    rows = np.repeat(np.arange(64, dtype=np.uint8)[:, None], 64, axis=1)[..., None] * 4
    boxes = np.array([[0.0, 0.0, 0.1, 1.0], [0.9, 0.0, 1.0, 1.0]], np.float32)
    view = views.ContrastiveViewsTransform(image_size=8, crop_scale=(0.01, 0.02), crop_ratio=(1.0, 1.0),
                                              mean=(0.0,), std=(1.0,), boxes=boxes, alpha=1.0, jitter_prob=0.0)
    for index, (lo, hi) in ((0, (0, 0.3)), (1, (0.7, 1.0))):
        for seed in range(20):
            out = view({"image": rows, "label": 0, pipeline.SOURCE_INDEX: index}, np.random.default_rng(seed))
            assert set(out) == {"image", "image2", "label"} and out["image"].shape == (8, 8, 1)
            for v in ("image", "image2"):      # uint8 views (normalised on the device)
                assert lo <= out[v].mean() / 255 <= hi, (index, seed, v, out[v].mean())
    # Before the first update (no boxes): plain random-resized crops anywhere in the image.
    plain = views.ContrastiveViewsTransform(image_size=8, crop_scale=(0.01, 0.02), crop_ratio=(1.0, 1.0),
                                               mean=(0.0,), std=(1.0,), jitter_prob=0.0)
    means = [plain({"image": rows, "label": 0, pipeline.SOURCE_INDEX: 0}, np.random.default_rng(s))["image"].mean() / 255
             for s in range(40)]
    assert min(means) < 0.3 and max(means) > 0.7


@pytest.mark.slow   # the same check for MAE (tests/test_mae.py) is in the default tier
def test_analytic_flops_match_xla_cost_analysis():
    from mim_jax import bench
    config = tiny_config()
    config.model.update(width=64, depth=3, mlp_dim=256, num_heads=4)    # big enough that matmuls dominate
    config.decoder.update(width=64, mlp_dim=256)
    config.contrastive.update(hidden_dim=256, dim=64)
    config.input.batch_size = 32
    report = bench.benchmark(config, steps=1)
    ratio = report["analytic_tflops_per_step"] / report["xla_tflops_per_step"]
    assert 0.6 < ratio < 1.05, report



@pytest.mark.parametrize("variant,width", [("Ti/16", 192), ("S/16", 384), ("B/16", 768), ("L/16", 1024)])
def test_every_size_builds_and_only_b16_needs_no_projection(variant, width):
    """The contrastive blocks run at the encoder's width; the decoder outputs 16*16*3 = 768 pixel
    values per token, so every size but B/16 projects them first (SDMAE's L/16 would not run)."""
    config = cmae_config.get_config(f"variant={variant}")
    method = get_method(config, NUM_EXAMPLES)
    params = jax.eval_shape(method.init_params, jax.random.key(0), method.batch_spec(2))
    head = params["contrastive"]
    assert ("input_proj" in head) == (width != 768)
    assert head["block_0"]["attn"]["qkv"]["kernel"].value.shape == (width, 3 * width)
    assert head["mlp"]["linear_2"]["kernel"].value.shape == (4096, width)       # output at the encoder's width
    assert params["decoder"]["embed"]["kernel"].value.shape == (width, 128)
    assert params["position"]["linear_1"]["kernel"].value.shape == (width // 2, 196)
