"""Loading trained weights (mim_jax/pretrained.py): runs written by older versions of this project
restore and evaluate identically, resume training, and a checkpoint that does not fit its model
is an error that names what differs."""
import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

from configs import common
from mim_jax import config_defaults, parallel, pretrained
from mim_jax.data import pipeline
from mim_jax.errors import UserFacingError
from mim_jax.evaluators import encoder as encoder_lib
from mim_jax.methods import get_method
from mim_jax.runtime import checkpoint
from mim_jax.training import state as state_lib
from mim_jax.training import train

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "checkpoints_9ddba71"
RUNS = ("mae", "capi", "cae_v2", "finetune")


def _expected(run):
    return np.load(FIXTURES / run / "expected.npz")


@pytest.mark.parametrize("run", RUNS)
def test_a_run_written_by_an_older_version_restores_exactly_onto_an_fsdp_mesh(run):
    expected = _expected(run)
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    weights = pretrained.load(FIXTURES / run, mesh)
    assert weights.step == int(expected["step"]) == 2
    out = jax.jit(weights.method.encode)(weights.params, expected["images"])
    for name in ("cls", "patch_tokens", "logits"):
        if f"feature/{name}" in expected:
            np.testing.assert_allclose(out[name], expected[f"feature/{name}"], rtol=1e-5, atol=1e-6)
    # The evaluators read the same weights.
    features = encoder_lib.load(str(FIXTURES / run), mesh, feature="patch_tokens").features(expected["images"])
    np.testing.assert_allclose(features, expected["feature/patch_tokens"], rtol=1e-5, atol=1e-6)


def test_the_evaluators_encoder_runs_under_the_runs_sharding_rules():
    """Feature extraction jits through the run's `parallel.Sharding`, so the encoder's activation
    constraints are in its program (the features equal the older version's: the test above)."""
    images = _expected("mae")["images"]
    encoder = encoder_lib.load(str(FIXTURES / "mae"), parallel.make_mesh([("data", 2), ("fsdp", 4)]))
    assert "sharding_constraint" in jax.jit(encoder.features).lower(images).as_text()


@pytest.mark.parametrize("run", ("mae", "capi"))
def test_every_restored_leaf_equals_what_the_older_version_restored(run):
    expected = _expected(run)
    ckpt = checkpoint.Checkpointer(FIXTURES / run / "checkpoints", read_only=True)
    method = get_method(pretrained.read_config(FIXTURES / run))
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    variables = ckpt.restore_parts(2, pretrained.abstract_variables(method, mesh))
    flat = {"state" + jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(variables)[0]}
    stored = {k: expected[k] for k in expected.files if k.startswith("state[")}
    assert flat.keys() == stored.keys()
    for key, value in stored.items():
        np.testing.assert_array_equal(np.asarray(flat[key]), value, err_msg=key)


# The commands that wrote the fixture runs (their README), as today's config files build them.
COMMANDS = {"mae": "mae:local", "capi": "capi:local", "cae_v2": "cae_v2:local,teacher=run:/tmp/fixtures/mae",
            "finetune": "finetune:init=/tmp/fixtures/mae,local"}


def _field_names(config, prefix=""):
    """Every field's dotted name; optimizer groups are per-run data, one field."""
    for key, value in config.items():
        if hasattr(value, "items") and key != "groups":
            yield from _field_names(value, f"{prefix}{key}.")
        else:
            yield prefix + key


@pytest.mark.parametrize("run", RUNS)
def test_an_older_runs_config_is_upgraded_to_the_fields_of_a_fresh_one(run):
    """Saved before configs were versioned (version 0): `config_defaults.upgrade` fills what was added since."""
    saved = pretrained.read_config(FIXTURES / run)
    assert saved.config_version == config_defaults.CONFIG_VERSION
    assert sorted(_field_names(saved)) == sorted(_field_names(common.load_config(COMMANDS[run])))


def test_a_config_saved_by_a_newer_version_is_refused_with_one_message(tmp_path):
    shutil.copytree(FIXTURES / "mae", tmp_path / "mae")
    path = tmp_path / "mae" / "checkpoints" / "2" / "config" / "metadata"
    version = config_defaults.CONFIG_VERSION
    path.write_text(json.dumps(dict(json.loads(path.read_text()), config_version=version + 1)))
    message = (rf"^This config was saved by a newer mim_jax \(config_version {version + 1}; this one reads up to "
               rf"{version}\): read it with that version or a later one\.$")
    with pytest.raises(UserFacingError, match=message):
        pretrained.read_config(tmp_path / "mae")


def _same_command_config(run):
    """The config the fixture's command line builds with today's config files."""
    from configs import capi, mae
    c = {"mae": mae, "capi": capi}[run].get_config("local")
    c.update_from_flattened_dict({
        "total_steps": 3, "ckpt_steps": 3, "log_steps": 1, "input.batch_size": 16, "input.num_workers": 0,
        "model.width": 32, "model.depth": 2, "model.mlp_dim": 64, "model.num_heads": 2})
    if run == "mae":
        c.decoder.update(width=32, depth=1, num_heads=2, mlp_dim=64)
    else:
        c.model.num_registers = 4
        c.predictor.depth = 1
        c.method.num_prototypes = 64
    c.evals = {}
    return c


@pytest.mark.parametrize("run", ("mae", pytest.param("capi", marks=pytest.mark.slow)))   # CAPI's takes 25 s
def test_rerunning_the_same_command_resumes_an_older_run(run, tmp_path, monkeypatch):
    """Same train state tree, optimizer state included: the resumed run continues from step 2."""
    workdir = tmp_path / run
    shutil.copytree(FIXTURES / run, workdir)
    source = pipeline.SyntheticSource(60_000, image_shape=(28, 28, 1), num_classes=10, seed=0)
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: source)
    state = train.train_and_evaluate(_same_command_config(run), str(workdir))
    assert int(state.step) == 3
    expected = _expected(run)
    moved = np.asarray(state.params["encoder"]["embedding"]["kernel"])
    before = expected["state['params']['encoder']['embedding']['kernel']"]
    assert moved.shape == before.shape and not np.array_equal(moved, before)



def test_a_resume_with_another_batch_size_or_width_is_refused_naming_what_differs(tmp_path, monkeypatch):
    workdir = tmp_path / "mae"
    shutil.copytree(FIXTURES / "mae", workdir)
    source = pipeline.SyntheticSource(60_000, image_shape=(28, 28, 1), num_classes=10, seed=0)
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: source)

    def resume(**changes):
        config = _same_command_config("mae")
        config.update_from_flattened_dict(changes)
        with pytest.raises(checkpoint.CheckpointError) as error:
            train.train_and_evaluate(config, str(workdir))
        assert "\n" not in str(error.value) and "strict" not in str(error.value)
        return str(error.value)

    assert re.search(r"trained with config.input.batch_size=16, this command gives 32: .* Resume with "
                     r"--config.input.batch_size=16", resume(**{"input.batch_size": 32}))
    message = resume(**{"model.width": 48, "total_steps": 5})
    assert "differ from the checkpoint's saved config: model.width: 32 in the checkpoint, 48 here." in message
    assert "total_steps" not in message
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]   # nothing moved aside

def _tiny_mae(**model):
    from conftest import tiny_mae_config
    config = tiny_mae_config()
    config.model.update(model)
    return config


def test_a_checkpoint_that_does_not_fit_its_model_names_what_differs(tmp_path, monkeypatch):
    source = pipeline.SyntheticSource(64, image_shape=(16, 16, 1), seed=0)
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: source)
    train.train_and_evaluate(_tiny_mae(), str(tmp_path))
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True)
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])

    def restore_into(**model):
        return ckpt.restore_parts(6, pretrained.abstract_variables(get_method(_tiny_mae(**model)), mesh))

    with pytest.raises(checkpoint.CheckpointError, match=r"its 'params' do not match .* 6 wrong shape: "
                                                         r"\['encoder'\]\['encoder'\]\['block_0'\]\['mlp'\]\['fc1'\]"
                                                         r"\['bias'\]: stored \(64,\), expected \(48,\)"):
        restore_into(mlp_dim=48)
    with pytest.raises(checkpoint.CheckpointError, match=r"missing: \['encoder'\]\['encoder'\]\['block_2'\]"):
        restore_into(depth=3)
    with pytest.raises(checkpoint.CheckpointError, match=r"unexpected: \['encoder'\]\['encoder'\]\['block_1'\]"):
        restore_into(depth=1)
    with pytest.raises(checkpoint.CheckpointError, match=r"1 unexpected: \['encoder'\]\['cls'\]"):
        restore_into(cls_token=False)
    restore_into()   # the right model restores


def test_random_init_is_the_trainers_initial_state(tmp_path):
    config = _tiny_mae()
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    weights = pretrained.random_init(config, mesh)
    created = state_lib.build(config, get_method(config), mesh, total_steps=2, warmup_steps=1,
                              global_batch_size=16).create(jax.random.key(config.seed))
    jax.tree.map(np.testing.assert_array_equal, weights.params, created.params)
    assert weights.step is None and weights.description == "random init"


def test_a_workdir_without_checkpoints_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="No pre-training checkpoint in .*nowhere/checkpoints"):
        pretrained.load(tmp_path / "nowhere", parallel.make_mesh([("data", -1)]))
    assert not (tmp_path / "nowhere").exists()      # nothing is created at a mistyped path


@pytest.mark.parametrize("run", ("mae", "capi"))
def test_loading_only_the_encoder_reads_only_the_encoder(run):
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    everything = pretrained.load(FIXTURES / run, mesh)
    encoder = pretrained.load(FIXTURES / run, mesh, keys=("encoder",))
    assert "decoder" not in encoder.params and "clustering" not in encoder.params
    jax.tree.map(np.testing.assert_array_equal, encoder.params["encoder"], everything.params["encoder"])
    with pytest.raises(ValueError, match=r"has no params \['regressor'\]"):
        pretrained.load(FIXTURES / run, mesh, keys=("regressor",))


def test_a_chosen_step_restores_and_a_missing_one_names_the_steps_there():
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    newest = pretrained.load(FIXTURES / "mae", mesh)
    chosen = pretrained.load(FIXTURES / "mae", mesh, step=2)
    assert chosen.step == 2
    jax.tree.map(np.testing.assert_array_equal, chosen.params, newest.params)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint at step 5 in .*: it has steps \[2\]"):
        pretrained.load(FIXTURES / "mae", mesh, step=5)


def _truncate_largest_chunk(step_dir: pathlib.Path):
    chunk = max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _listing(folder: pathlib.Path) -> dict:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_reader_falls_back_past_a_truncated_newest_step_and_changes_nothing(tmp_path, caplog):
    """Evaluators, warm starts, run teachers and export all read a run through pretrained.load."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "mae", run)
    shutil.copytree(run / "checkpoints" / "2", run / "checkpoints" / "4")   # a newer step, then torn
    _truncate_largest_chunk(run / "checkpoints" / "4")
    before = _listing(run)
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 1)])
    assert pretrained.read_config(run).method.name == "mae"
    weights = pretrained.load(run, mesh)
    assert weights.step == 2 and weights.description.endswith("@ step 2")
    assert any("Using checkpoint step 2" in r.getMessage() and "[4]" in r.getMessage() for r in caplog.records)
    features = encoder_lib.load(str(run), mesh, feature="patch_tokens").features(_expected("mae")["images"])
    np.testing.assert_allclose(features, _expected("mae")["feature/patch_tokens"], rtol=1e-5, atol=1e-6)
    assert _listing(run) == before   # nothing moved, written or deleted

    _truncate_largest_chunk(run / "checkpoints" / "2")
    with pytest.raises(checkpoint.CheckpointError, match=r"No readable checkpoint in .*step 4: .*step 2: .*"
                                                         r"resume its training") as error:
        pretrained.load(run, mesh)
    assert "\n" not in str(error.value)
