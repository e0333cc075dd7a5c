"""The generic trainer on MAE: sharding invariance, resume equality, checkpoint portability."""
import os
import signal

import jax
import numpy as np
import pytest
from conftest import run_steps, synthetic_batches, tiny_mae_config

from mim_jax import flops, parallel
from mim_jax.data import pipeline
from mim_jax.methods import get_method
from mim_jax.runtime import checkpoint
from mim_jax.training import state as state_lib
from mim_jax.training import train


@pytest.fixture
def synthetic_data(monkeypatch):
    """Unit tests train on a synthetic source; the real data path has its own end-to-end tests."""
    source = pipeline.SyntheticSource(256, image_shape=(16, 16, 1), num_classes=10, seed=0)
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: source)
    return source


def _run_steps(config, mesh, batches):
    state, history = run_steps(config, mesh, batches)
    return state, [float(m["loss"]) for m in history]


def test_sharded_step_matches_single_device():
    config = tiny_mae_config()
    batches = synthetic_batches(config, 3)
    config.mesh = [("data", 2), ("fsdp", 4)]
    sharded, sharded_losses = _run_steps(config, parallel.make_mesh(config.mesh), batches)
    single, single_losses = _run_steps(config, parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]), batches)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    # Reduction order differs across meshes; Adam normalises near-zero gradients (fresh biases) to
    # O(lr) steps, so allow 1e-5 absolute: under 10% of one step's lr, far below 3 steps' movement.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), sharded.params, single.params)
    # FSDP really shards: a kernel with an 'embed' dim is split over the fsdp axis.
    kernel = sharded.params["encoder"]["encoder"]["block_0"]["mlp"]["fc1"]["kernel"]
    assert kernel.sharding.spec[0] == "fsdp" and len(kernel.addressable_shards[0].data) == 32 // 4


def test_resume_after_sigterm_matches_uninterrupted_run(tmp_path, synthetic_data, monkeypatch):
    config = tiny_mae_config()
    reference = train.train_and_evaluate(config, str(tmp_path / "uninterrupted"))

    calls = {"n": 0}
    original = flops.Throughput.add_step

    def add_step_then_preempt(self, data_wait):
        calls["n"] += 1
        if calls["n"] == 4:  # SIGTERM during step 4 (not a checkpoint step): save there and stop.
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, data_wait)

    monkeypatch.setattr(flops.Throughput, "add_step", add_step_then_preempt)
    interrupted = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(interrupted.step) == 4
    monkeypatch.setattr(flops.Throughput, "add_step", original)
    resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))
    assert int(resumed.step) == 6
    jax.tree.map(np.testing.assert_array_equal, resumed.params, reference.params)
    # Metrics went to TensorBoard and the JSON-lines file.
    assert list((tmp_path / "resumed").glob("events.out.tfevents*"))
    assert (tmp_path / "resumed" / "metrics.jsonl").read_text().count('"loss"') >= 3


def test_a_finished_run_run_again_says_it_is_complete(tmp_path, synthetic_data, monkeypatch, caplog):
    config = tiny_mae_config()
    with caplog.at_level("INFO"):
        finished = train.train_and_evaluate(config, str(tmp_path))
    # A fresh run says what it compiles before its first progress line.
    first = [m for m in caplog.messages if m.startswith(("Initialising the model", "Compiling the train step",
                                                         "First step done in", "step 2/6"))]
    assert first[0] == "Initialising the model (compiling its initialisation)."
    cache = jax.config.jax_compilation_cache_dir   # the test session's (conftest.py)
    assert first[1] == "Compiling the train step: the first step waits for it" + (
        f"; restarts take it from the compilation cache in {cache}." if cache else ".")
    assert first[2].startswith("First step done in ") and first[2].endswith(" (compilation included).")
    assert first[3].startswith("step 2/6  loss ")
    caplog.clear()

    def no_data(*args, **kwargs):
        raise AssertionError("a finished run starts no data pipeline")
    monkeypatch.setattr(pipeline, "train_iterator", no_data)
    with caplog.at_level("INFO"):
        again = train.train_and_evaluate(config, str(tmp_path))
    assert int(again.step) == 6
    jax.tree.map(np.testing.assert_array_equal, again.params, finished.params)
    assert (f"The run in {tmp_path} is already complete (step 6 of 6): nothing to train. Its checkpoints are in "
            f"{tmp_path / 'checkpoints'}") in caplog.text
    assert "--config.total_steps=N (N > 6); to start anew, give another --workdir." in caplog.text
    assert "Resumed from step" not in caplog.text


def test_checkpoint_written_on_8_devices_restores_on_2(tmp_path):
    config = tiny_mae_config()
    method = get_method(config)

    def setup_on(devices, mesh_config):
        mesh = parallel.make_mesh(mesh_config, devices)
        return state_lib.build(config, method, mesh, total_steps=10, warmup_steps=2, global_batch_size=16)

    big = setup_on(jax.devices(), [("data", 2), ("fsdp", 4)])
    state = big.create(jax.random.key(3))
    ckpt = checkpoint.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1)
    ckpt.save(7, state, force=True)
    ckpt.wait()
    small = setup_on(jax.devices()[:2], [("data", 1), ("fsdp", 2)])
    step, restored, _ = checkpoint.Checkpointer(tmp_path, save_interval_steps=1, max_to_keep=1).restore(small.abstract)
    assert step == 7
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    assert all(len(x.sharding.device_set) == 2 for x in jax.tree.leaves(restored.params))


def test_the_abstract_state_is_built_without_running_anything_on_a_device():
    """`state.build` takes shapes and shardings from `jax.eval_shape` alone (no PRNG key or array on
    a device: it serves devices that cannot run code), and they are the created state's."""
    config = tiny_mae_config()
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    with jax.transfer_guard("disallow"):   # any array put on a device would raise
        setup = state_lib.build(config, get_method(config), mesh, total_steps=10, warmup_steps=2,
                                global_batch_size=16)

    def described(tree):
        return [(jax.tree_util.keystr(path), x.shape, x.dtype, x.sharding)
                for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert described(setup.abstract) == described(setup.create(jax.random.key(0)))
    assert any("fsdp" in x.sharding.spec for x in jax.tree.leaves(setup.abstract.params))


@pytest.mark.slow   # a profiled run (about 15 s)
def test_profiling_on_request_writes_a_trace(tmp_path, synthetic_data):
    config = tiny_mae_config(profile_steps=2)
    train.train_and_evaluate(config, str(tmp_path))
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))


@pytest.mark.slow   # the unscanned encoder's sharded step is in the default tier; tests/test_layers.py checks scan against the loop
def test_scanned_encoder_trains_sharded_like_single_device():
    """config.model.scan: the stacked block params carry a 'layers' axis that the sharding rules
    leave unsharded; FSDP still shards their model dimension."""
    config = tiny_mae_config()
    config.model.update(scan=True, remat=True, remat_policy="dots_saveable")
    batches = synthetic_batches(config, 2)
    sharded, sharded_losses = _run_steps(config, parallel.make_mesh([("data", 2), ("fsdp", 4)]), batches)
    _, single_losses = _run_steps(config, parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]), batches)
    np.testing.assert_allclose(sharded_losses, single_losses, rtol=1e-5)
    kernel = sharded.params["encoder"]["encoder"]["blocks"]["block"]["mlp"]["fc1"]["kernel"]
    assert kernel.shape == (2, 32, 64) and kernel.sharding.spec[:2] == (None, "fsdp")


def test_evaluation_steps_write_the_reconstructions_and_patch_features_as_tensorboard_images(tmp_path, synthetic_data, caplog):
    """At each step config.evals runs, a pixel method's reconstructions of the first evaluation
    images go to TensorBoard: at the last step, the grid of the returned (sharded) params, computed
    here on the host."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing import event_accumulator

    from mim_jax.config_defaults import periodic_eval
    from mim_jax.evaluators import reconstructions
    config = tiny_mae_config(reconstruction_images=3)
    config.evals = {"knn": periodic_eval("knn", every_epochs=0.0, every_steps=3, max_train_examples=64,
                                         max_eval_examples=32, k=2)}
    with caplog.at_level("INFO"):
        state = train.train_and_evaluate(config, str(tmp_path))
    # The console says when evaluations run; the ETA counts them (by their count until one has run).
    lines = [m for m in caplog.messages if m.startswith(("step 2/6", "step 3:", "step 4/6", "step 6:"))]
    assert lines[0].startswith("step 2/6  loss ") and lines[0].endswith(" + 2 evaluations")
    assert lines[1] == "step 3: evaluating knn."
    assert "evaluation" not in lines[2].split("ETA ")[1]
    assert lines[3].startswith("step 6: evaluating knn (about ") and lines[3].endswith(", as the last time).")
    events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    # clu's TF2 summaries: an image is a tensor of [width, height, png] strings.
    stored = {e.step: e.tensor_proto.string_val[2] for e in events.Tensors("reconstructions")}
    assert sorted(stored) == [3, 6]
    method = get_method(config)
    batch = reconstructions.eval_batch(method, 3)
    host = jax.device_get(method.reconstructions(jax.device_get(state.params), batch, jax.random.key(config.seed)))
    want = reconstructions.grid(host, reconstructions.default_scale(16))
    got = np.asarray(Image.open(io.BytesIO(stored[6])))
    assert got.shape[:2] == want.shape[:2] == (3 * (64 + 2) + 2, 4 * (64 + 2) + 2)
    np.testing.assert_allclose(got.reshape(want.shape).astype(int), want.astype(int), atol=1)
    assert not np.array_equal(np.asarray(Image.open(io.BytesIO(stored[3]))).reshape(want.shape), want)
    # Every method's patch features, drawn at the same steps from the same images.
    from mim_jax.evaluators import patch_pca
    pictures = {e.step: e.tensor_proto.string_val[2] for e in events.Tensors("patch_pca")}
    assert sorted(pictures) == [3, 6]
    tokens = jax.device_get(method.encode(jax.device_get(state.params), batch["image"])["patch_tokens"])
    shown = batch["image"] * np.asarray(config.input.std) + np.asarray(config.input.mean)
    want = patch_pca.picture(shown, patch_pca.pca_rgb(np.asarray(tokens)), reconstructions.default_scale(16))
    got = np.asarray(Image.open(io.BytesIO(pictures[6])))
    np.testing.assert_allclose(got.reshape(want.shape).astype(int), want.astype(int), atol=1)
