"""Gradient accumulation (config.grad_accum_steps=k): k micro-batches give the global batch's update
(MAE, Beyond Masking, CAE v2, fine-tuning), on any mesh; the split keeps every device busy without
communication; methods with global-batch operations (CAPI, CMAE) and bad batch sizes are refused
with clear errors.

Equality is tested with drop path off: its naive form draws one Bernoulli per example from the
step key (not from the example index), and each micro-batch draws its own (step * k + j), so with
drop path the accumulated update is the same method but not the same sample. Masks are keyed by
the example index and do not depend on the split. Adam's eps is raised to 1 so the first update is
close to linear in the gradient (with eps=1e-8 it is lr * sign(g), which turns the rounding noise of
gradients that are zero in exact arithmetic into steps of +-lr)."""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_mae_config

from configs import beyond_masking as bm_config
from configs import cmae as cmae_config
from mim_jax import parallel, pretrained
from mim_jax.methods import get_method, resolve_config
from mim_jax.methods.cae_v2 import teachers
from mim_jax.training import state as state_lib

B, K = 32, 4


def _exact_optimizer(c):
    c.optax.update(base_lr=0.5, lr_scale_batch=None, eps=1.0)
    c.input.batch_size = B
    return c


def _random_batch(method, seed=0):
    """A global batch of `method.batch_spec(B)`: normal images, labels, distinct example indices."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in method.batch_spec(B).items():
        if name == "index":
            out[name] = np.arange(1000, 1000 + B, dtype=np.int32)
        elif name == "label":
            out[name] = rng.integers(0, 10, B).astype(np.int32)
        else:
            out[name] = rng.normal(size=spec.shape).astype(np.float32)
    return out


def _one_step(config, mesh, batch, k, num_examples=None):
    """(initial params, params after one step, metrics) with grad_accum_steps=k."""
    config = config.copy_and_resolve_references()
    config.grad_accum_steps = k
    method = get_method(config, num_examples=num_examples)
    setup = state_lib.build(config, method, mesh, total_steps=10, warmup_steps=0,
                            global_batch_size=config.input.batch_size)
    state = setup.create(jax.random.key(0))
    before = jax.device_get(state.params)
    state, metrics = setup.train_step(state, setup.frozen, parallel.host_batch_to_global(batch, mesh))
    return before, jax.device_get(state.params), jax.device_get(metrics), jax.device_get(state.extras)


def _assert_same_update(config, mesh=None, metric_keys=(), num_examples=None):
    mesh = mesh or parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1])   # meshes: below
    batch = _random_batch(get_method(config, num_examples=num_examples))
    before, full, m_full, _ = _one_step(config, mesh, batch, 1, num_examples)
    _, accum, m_accum, _ = _one_step(config, mesh, batch, K, num_examples)
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), before, full))
    assert max(moved) > 1e-3                                   # the step did something
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), full, accum)
    for key in ("loss", "grad_norm", "update_norm", *metric_keys):
        np.testing.assert_allclose(m_accum[key], m_full[key], rtol=1e-5, err_msg=key)


# ---- the update equals the global batch's ----------------------------------------------------------

def test_mae_accumulated_update_equals_the_global_batch():
    _assert_same_update(_exact_optimizer(tiny_mae_config()), metric_keys=("mae_loss",))


@pytest.mark.slow   # the same check for MAE is in the default tier
def test_beyond_masking_accumulated_update_equals_the_global_batch():
    c = bm_config.get_config("local")        # zoom-in + 75% masking: per-example keys only
    c.input.update(num_workers=0)
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    c.evals = {}
    _assert_same_update(_exact_optimizer(c), metric_keys=("centre_loss", "edge_loss"))


def _fake_run_teacher(monkeypatch):
    """CAE v2's `run:` teacher without a pre-training run: the tiny MAE's config and seeded random
    encoder weights (frozen; equality needs only that they are fixed)."""
    monkeypatch.setattr(pretrained, "read_config", lambda workdir: tiny_mae_config())

    def load(self, abstract, shardings):
        leaves, tree = jax.tree.flatten(abstract)
        keys = jax.random.split(jax.random.key(7), len(leaves))
        values = [0.05 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
        return jax.device_put(jax.tree.unflatten(tree, values), shardings)
    monkeypatch.setattr(teachers.RunTeacher, "load", load)


@pytest.mark.slow   # the same check for MAE is in the default tier
def test_cae_v2_accumulated_update_equals_the_global_batch(monkeypatch):
    _fake_run_teacher(monkeypatch)
    from configs import cae_v2 as cae_v2_config
    c = cae_v2_config.get_config("local,teacher=run:/nowhere/mae")
    c.input.update(image_size=16, num_workers=0, crop_scale=(0.5, 1.0))
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, drop_path=0.0)
    c.regressor.update(width=16, num_heads=2, drop_path=0.0)
    c.method.mask.update(num_masked=5)
    c.evals = {}
    c = resolve_config(c)                            # the teacher's width, from the patched read_config
    assert c.optax.clip_norm > 0                     # clipping sees the accumulated (mean) gradient
    _assert_same_update(_exact_optimizer(c), metric_keys=("align_loss", "cos_masked"))


@pytest.mark.slow   # the same check for MAE is in the default tier
def test_finetune_accumulated_update_equals_the_global_batch():
    """Mixup/CutMix pair each example with the reversed batch under one lambda per step: with
    accumulation they pair within each micro-batch (as timm pairs within each GPU's batch), so they
    are off here, as is drop path; label smoothing stays."""
    from configs import finetune as finetune_config
    c = finetune_config.get_config("init=random,pretrain=mae:local,local")
    c.input.update(image_size=16, num_workers=0)
    c.model.update(width=32, num_heads=2, mlp_dim=64, drop_path=0.0)    # depth 4: the layer-decay groups
    c.method.update(mixup=0.0, cutmix=0.0)
    c.evals = {}
    _assert_same_update(_exact_optimizer(resolve_config(c)), metric_keys=("ce_loss", "train_accuracy"))


def test_accumulation_on_eight_devices_equals_one_device():
    config = _exact_optimizer(tiny_mae_config())
    batch = _random_batch(get_method(config))
    _, sharded, m_sharded, _ = _one_step(config, parallel.make_mesh([("data", 2), ("fsdp", 4)]), batch, K)
    one = parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1])
    _, single, m_single, _ = _one_step(config, one, batch, K)
    _, full, _, _ = _one_step(config, one, batch, 1)
    for other in (single, full):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), sharded, other)
    np.testing.assert_allclose(m_sharded["loss"], m_single["loss"], rtol=1e-5)


# ---- the split -------------------------------------------------------------------------------------

def test_micro_batches_stay_on_every_device_without_communication():
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    x = np.arange(B * 3, dtype=np.float32).reshape(B, 3)
    batch = parallel.host_batch_to_global({"image": x, "index": np.arange(B, dtype=np.int32)}, mesh)
    split = jax.jit(lambda b: state_lib.split_micro_batches(b, K, mesh))
    hlo = split.lower(batch).compile().as_text()
    assert not any(op in hlo for op in ("all-to-all", "all-gather", "collective-permute", "all-reduce")), hlo
    out = split(batch)
    np.testing.assert_array_equal(np.asarray(out["image"]), x.reshape(B // K, K, 3).transpose(1, 0, 2))
    np.testing.assert_array_equal(np.asarray(out["index"][1]), np.arange(1, B, K))    # micro-batch j: rows j::k
    by_device = {s.device: s for s in batch["image"].addressable_shards}
    for shard in out["image"].addressable_shards:
        assert shard.data.shape == (K, B // K // 8, 3)       # 1/8 of every micro-batch on every device
        own = np.asarray(by_device[shard.device].data)     # ... taken from the device's own rows
        np.testing.assert_array_equal(np.asarray(shard.data), own.reshape(-1, K, 3).transpose(1, 0, 2))


def test_distinct_per_step_randomness_per_micro_batch_and_unchanged_masks():
    """Drop path on: each micro-batch gets its own step (step * k + j), so the accumulated update
    differs from the global batch's (a different drop-path sample), yet stays finite."""
    config = _exact_optimizer(tiny_mae_config(**{"model.drop_path": 0.5}))
    batch = _random_batch(get_method(config))
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    _, full, m_full, _ = _one_step(config, mesh, batch, 1)
    _, accum, m_accum, _ = _one_step(config, mesh, batch, K)
    assert np.isfinite(m_accum["loss"]) and not np.allclose(m_accum["loss"], m_full["loss"], rtol=1e-5)


# ---- refusals --------------------------------------------------------------------------------------

def _capi_config():
    from configs import capi as capi_config
    c = capi_config.get_config("local")
    c.input.update(image_size=16, batch_size=B, num_workers=0)
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, num_registers=4)
    c.method.update(num_prototypes=64, sinkhorn_chunk=8)
    c.evals = {}
    return c


def _cmae_config():
    c = cmae_config.get_config("local")
    c.input.update(image_size=16, batch_size=B, num_workers=0)
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    c.decoder.update(width=32, num_heads=2, mlp_dim=64)
    c.contrastive.update(hidden_dim=64, dim=32)
    c.evals = {}
    return c


@pytest.mark.parametrize("make_config, message", [
    (_capi_config, r"CAPI's Sinkhorn-Knopp normalises .* over the batch .*grad_accum_steps=4 each normalisation "
                   r"would see 1/4 of it \(8 of 32 images\).*set config.grad_accum_steps=1 .*"
                   r"config.allow_inexact_accumulation=True"),
    (_cmae_config, r"CMAE's InfoNCE takes its negatives from the batch and its heads' BatchNorm \(SyncBN\) "
                   r"normalises over it; with grad_accum_steps=4 both would see 1/4 of it \(8 of 32 images\).*"
                   r"set config.grad_accum_steps=1"),
])
def test_global_batch_methods_refuse_accumulation(make_config, message, caplog):
    config = make_config()
    config.grad_accum_steps = K
    method = get_method(config, num_examples=64)
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    with pytest.raises(ValueError, match=message):
        state_lib.build(config, method, mesh, total_steps=10, warmup_steps=0, global_batch_size=B)
    # The explicit override runs it, with a warning naming what changes.
    config.allow_inexact_accumulation = True
    with caplog.at_level(logging.WARNING):
        assert state_lib.accumulation_steps(config, method, mesh, B) == K
    assert "allow_inexact_accumulation=True" in caplog.text and "1/4" in caplog.text
    config.grad_accum_steps = 1                               # k=1 is never refused
    config.allow_inexact_accumulation = False
    assert state_lib.accumulation_steps(config, method, mesh, B) == 1


def test_batch_not_divisible_by_micro_batches_times_devices_is_a_clear_error():
    config = tiny_mae_config(grad_accum_steps=4)              # batch 16, 8 devices: needs a multiple of 32
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    with pytest.raises(ValueError, match=r"config.input.batch_size=16 must be divisible by "
                                         r"config.grad_accum_steps=4 x the 8 devices that share the batch \(= 32\)"):
        state_lib.build(config, get_method(config), mesh, total_steps=10, warmup_steps=0, global_batch_size=16)
    for bad in (0, -2):
        config.grad_accum_steps = bad
        with pytest.raises(ValueError, match="must be a positive integer"):
            state_lib.accumulation_steps(config, get_method(config), mesh, 16)
