"""Fine-tuning: warm start from a pre-training run, layer-wise lr decay groups, batch mixing."""
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_mae_config

from mim_jax import parallel, pretrained
from mim_jax.data import pipeline
from mim_jax.methods import get_method, resolve_config
from mim_jax.methods.finetune import method as finetune
from mim_jax.training import optim, train
from mim_jax.training import state as state_lib


def test_mix_batch_targets_are_soft_labels_matching_the_pasted_area():
    images = jnp.stack([jnp.zeros((8, 8, 1)), jnp.ones((8, 8, 1))])
    labels = jnp.array([0, 1])
    plain, targets = finetune.mix_batch(jax.random.key(0), images, labels, 2, mixup_alpha=0.0, cutmix_alpha=0.0,
                                        smoothing=0.1)
    np.testing.assert_allclose(targets, [[0.95, 0.05], [0.05, 0.95]])
    for seed in range(5):
        mixed, soft = finetune.mix_batch(jax.random.key(seed), images, labels, 2, mixup_alpha=0.0,
                                         cutmix_alpha=1.0, smoothing=0.0)
        pasted = float(mixed[0].mean())          # image 0 is zeros: the mean is the pasted area of image 1
        np.testing.assert_allclose(soft[0], [1 - pasted, pasted], atol=1e-6)
        np.testing.assert_allclose(soft.sum(-1), 1.0, atol=1e-6)


@pytest.fixture
def synthetic_data(monkeypatch):
    source = pipeline.SyntheticSource(64, image_shape=(16, 16, 1), seed=0)
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: source)


def test_finetune_warm_starts_from_the_pretrained_encoder_with_layer_decay(tmp_path, synthetic_data):
    pre = train.train_and_evaluate(tiny_mae_config(total_steps=2, ckpt_steps=2), str(tmp_path / "pre"))

    from configs import finetune as finetune_config
    config = resolve_config(finetune_config.get_config(f"init={tmp_path / 'pre'},local"))
    config.input.batch_size = 16
    config.evals = {}
    method = get_method(config)
    setup = state_lib.build(config, method, parallel.make_mesh(config.mesh), total_steps=4, warmup_steps=1,
                            global_batch_size=16)
    state = setup.create(jax.random.key(0))
    jax.tree.map(np.testing.assert_array_equal, state.params["encoder"], pre.params["encoder"])
    labels = optim.param_labels(state.params, config.optax)
    assert labels["encoder"]["embedding"]["kernel"] == "layer_0"
    assert labels["encoder"]["encoder"]["block_1"]["mlp"]["fc1"]["kernel"] == "layer_2"
    assert labels["head"]["head"]["kernel"] == "layer_3"  # depth 2 -> head at depth + 1
    assert config.optax.groups.layer_0.lr_mult < config.optax.groups.layer_3.lr_mult == 1.0
    # One real step runs and changes the encoder.
    batch = {"image": jnp.asarray(np.random.default_rng(0).normal(size=(16, 16, 16, 1)), jnp.float32),
             "label": jnp.arange(16, dtype=jnp.int32) % 10, "index": jnp.arange(16, dtype=jnp.int32)}
    new_state, metrics = setup.train_step(state, setup.frozen, parallel.host_batch_to_global(batch, setup.shardings.step.mesh))
    assert np.isfinite(float(metrics["loss"]))

    # Another architecture cannot start from these weights: the error names what does not fit.
    config.model.mlp_dim = 96
    setup = state_lib.build(config, get_method(config), parallel.make_mesh(config.mesh), total_steps=4,
                            warmup_steps=1, global_batch_size=16)
    with pytest.raises(ValueError, match=r"The 'encoder' weights in .*pre \(mae, Ti/4\) do not fit this model: "
                                         r"6 wrong shape: \['encoder'\]\['block_0'\]\['mlp'\]\['fc1'\]\['bias'\]: "
                                         r"stored \(64,\), expected \(96,\)"):
        setup.create(jax.random.key(0))


def test_a_run_saves_the_resolved_config_and_rebuilds_without_its_init(tmp_path, synthetic_data):
    train.train_and_evaluate(tiny_mae_config(total_steps=2, ckpt_steps=2), str(tmp_path / "pre"))
    from configs import finetune as finetune_config
    config = finetune_config.get_config(f"init={tmp_path / 'pre'},local")    # as the command line gives it
    config.update_from_flattened_dict({"input.batch_size": 16, "input.num_workers": 0, "total_steps": 1,
                                       "ckpt_steps": 1})
    config.evals = {}
    train.train_and_evaluate(config, str(tmp_path / "ft"))
    shutil.rmtree(tmp_path / "pre")
    saved = pretrained.read_config(tmp_path / "ft")
    assert (saved.model.variant, saved.model.width, saved.input.image_size) == ("Ti/4", 32, 16)
    assert saved.method.num_classes == 10
    assert len(saved.optax.groups) == 4 and saved.optax.param_groups[0][1] == "layer_3"
    weights = pretrained.load(tmp_path / "ft", parallel.make_mesh(saved.mesh))
    assert weights.step == 1 and weights.method.encoder.depth == 2


def test_head_starts_as_maes_untruncated_normal_of_std_2e5():
    """MAE's trunc_normal_(head.weight, std=2e-5) has absolute bounds +-2: a plain normal."""
    from scipy import stats
    kernel = finetune.ClassifierHead(1000).init(jax.random.key(0), jnp.ones((1, 256)))["params"]["head"]["kernel"]
    kernel = np.asarray(nn.unbox(kernel)).reshape(-1)
    assert stats.kstest(kernel / 2e-5, "norm").pvalue > 1e-3 and np.abs(kernel).max() > 4 * 2e-5
