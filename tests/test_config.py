"""Configs: argument parsing, unit-free durations, clear errors on unknown keys and bad values;
building a config reads no file, what depends on files is resolved when the run starts."""
import json
import pathlib
import re
import subprocess
import sys

import pytest
from absl import flags

from configs import common, mae
from mim_jax import config_lib, export, parallel, pretrained
from mim_jax.data.catalog import DATASETS
from mim_jax.errors import UserFacingError
from mim_jax.evaluators import run
from mim_jax.methods import resolve_config
from mim_jax.models.vit import vit_from_config
from mim_jax.training import optim, train
from mim_jax.weights import clip as clip_weights

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "checkpoints_9ddba71"


def test_parse_arg_types_flags_and_unknown_names():
    arg = config_lib.parse_arg("variant=L/16,local,res=448", variant="B/16", local=False, res=224)
    assert (arg.variant, arg.local, arg.res) == ("L/16", True, 448)
    with pytest.raises(ValueError, match="Unknown config argument 'varaint'"):
        config_lib.parse_arg("varaint=L/16", variant="B/16")
    with pytest.raises(ValueError, match="'res' expects int"):
        config_lib.parse_arg("res=big", res=224)


@pytest.mark.parametrize("variant,width,depth", [("Ti/16", 192, 12), ("S/16", 384, 12), ("B/16", 768, 12),
                                                 ("L/16", 1024, 24), ("H/14", 1280, 32)])
def test_mae_variants_build(variant, width, depth):
    c = mae.get_config(f"variant={variant}")
    model = vit_from_config(c.model)
    assert (model.width, model.depth, model.patch_size) == (width, depth, int(variant.split("/")[1]))


def test_paper_recipe_and_local_preset():
    c = mae.get_config()
    assert c.total_epochs == 800 and c.input.batch_size == 4096 and c.input.dataset == "imagenet2012"
    assert optim.learning_rate(c.optax, 4096) == pytest.approx(1.5e-4 * 16)
    assert c.method.mask.ratio == 0.75 and (c.decoder.depth, c.decoder.width) == (8, 512)
    local = mae.get_config("local")
    assert local.input.dataset == "fashion_mnist" and local.input.channels == 1


LOCAL_PRESETS = ("mae", "cae_v2", "capi", "beyond_masking", "cmae")


def _pretraining_config(name: str, arg: str):
    return common.load_config(f"{name}:{arg}")


@pytest.mark.parametrize("name", LOCAL_PRESETS)
def test_data_arguments_given_with_local_win_over_the_preset(name):
    c = _pretraining_config(name, "local,dataset=cifar10,res=32,batch=64")
    assert (c.input.dataset, c.input.channels, c.input.image_size, c.input.batch_size) == ("cifar10", 3, 32, 64)
    assert tuple(c.input.mean) == DATASETS["cifar10"][2] and tuple(c.input.std) == DATASETS["cifar10"][3]
    # What was not given is still the preset's: the 4-block Ti/4, 2 epochs, float32.
    assert (c.model.variant, c.model.depth, c.total_epochs, c.model.dtype) == ("Ti/4", 4, 2.0, "float32")
    # A misspelled name is kept, so training stops at the data set (pipeline.open_source), not on Fashion-MNIST.
    assert _pretraining_config(name, "local,dataset=fashionmnist").input.dataset == "fashionmnist"
    assert _pretraining_config(name, "local").input.dataset == "fashion_mnist"


@pytest.mark.parametrize("name, arg, variant", [
    ("mae", "variant=S/4", "S/4"), ("cae_v2", "variant=S,res=32", "S/16"), ("capi", "variant=S/14", "S/14"),
    ("beyond_masking", "variant=L/16,res=32", "L/16"), ("cmae", "variant=S/16,res=32", "S/16")])
def test_a_variant_given_with_local_keeps_its_size(name, arg, variant):
    c = _pretraining_config(name, f"local,{arg}")
    assert c.model.variant == variant and c.model.depth is None     # the variant's own depth
    assert c.input.dataset == "fashion_mnist" and c.total_epochs == 2.0
    vit_from_config(c.model)


@pytest.mark.parametrize("arg, fix", [("variant=B/16", "give res=<a multiple of 16> too"),
                                      ("res=30", "give res=<a multiple of 4>."),
                                      ("variant=B/16,res=40", "or a variant whose patch size divides 40")])
def test_local_refuses_a_variant_and_res_whose_patches_do_not_tile(arg, fix):
    with pytest.raises(ValueError, match="do not split into") as error:
        mae.get_config(f"local,{arg}")
    assert fix in str(error.value)


def test_capis_steps_given_with_local_win():
    assert _pretraining_config("capi", "local").total_steps is None        # the preset's 2 epochs
    assert _pretraining_config("capi", "local,steps=300").total_steps == 300


@pytest.mark.parametrize("name", ["knn", "linear_probe", "attentive_probe", "finetune"])
def test_the_dataset_of_a_random_or_pixel_baseline_reaches_its_pretrain_config(name):
    """init=random|pixels builds the `pretrain=` architecture for the data set given (its channels), not for
    the pre-training config's own (Fashion-MNIST under `local`)."""
    c = common.load_config(f"{name}:init=random,pretrain=mae:local,dataset=cifar10")
    built = c.input if name == "finetune" else c.pretrain_config.input
    assert (built.dataset, built.channels, built.image_size) == ("cifar10", 3, 28)
    default = common.load_config(f"{name}:init=random,pretrain=mae:local")
    assert (default.input if name == "finetune" else default.pretrain_config.input).dataset == "fashion_mnist"


def test_a_missing_config_and_a_missing_module_inside_one_are_told_apart(tmp_path, monkeypatch):
    import configs
    (tmp_path / "needs_a_missing_module.py").write_text("import a_module_that_is_not_installed\n")
    monkeypatch.setattr(configs, "__path__", [*configs.__path__, str(tmp_path)])
    with pytest.raises(ModuleNotFoundError, match="'a_module_that_is_not_installed'"):
        common.load_config("needs_a_missing_module:local")
    with pytest.raises(ValueError, match="there is no configs/maee.py"):
        common.load_config("maee:local")


def test_unit_free_durations():
    c = mae.get_config("local")
    assert config_lib.steps(c, "total", steps_per_epoch=100) == 200            # total_epochs=2
    c.total_steps = 20
    assert config_lib.steps(c, "total", steps_per_epoch=100) == 20             # steps win
    assert config_lib.steps(c.optax, "warmup", steps_per_epoch=100, total_steps=20) == 50
    c.optax.warmup_epochs = None
    c.optax.warmup_percent = 0.1
    assert config_lib.steps(c.optax, "warmup", steps_per_epoch=100, total_steps=20) == 2


def test_warmup_cosine_schedule_shape():
    c = mae.get_config("local")
    lr = optim.schedule(c.optax, 1.0, total_steps=100, warmup_steps=10)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5) and float(lr(10)) == pytest.approx(1.0)
    assert float(lr(55)) == pytest.approx(0.5, abs=1e-6) and float(lr(100)) == pytest.approx(0.0, abs=1e-6)


def _main(*args):
    return subprocess.run([sys.executable, "-m", "mim_jax.main", "--workdir=/tmp/unused", *args],
                          capture_output=True, text=True, timeout=120)


def test_unknown_override_key_is_a_clear_error():
    out = _main("--config=configs/mae.py:local", "--config.totl_steps=3")
    assert out.returncode != 0 and "totl_steps" in out.stderr


def test_bad_override_value_is_a_clear_error():
    out = _main("--config=configs/mae.py:local", "--config.total_steps=many")
    assert out.returncode != 0 and "total_steps" in out.stderr


def test_unknown_config_argument_is_a_clear_error():
    out = _main("--config=configs/mae.py:lcoal")
    assert out.returncode != 0 and "Unknown config argument 'lcoal'" in out.stderr


def _parse(args, monkeypatch):
    """The config of a `python -m mim_jax.main` command line, parsed as main() receives it."""
    from mim_jax import main
    fv = flags.FlagValues()
    main.define_flags(flag_values=fv)
    argv = ["mim_jax.main", "--workdir=/tmp/unused", *args]
    monkeypatch.setattr(sys, "argv", argv)     # config_flags reads the overrides from there
    monkeypatch.chdir(ROOT)
    fv(argv)
    return fv.config


@pytest.mark.parametrize("override", ['(("data",-1),("fsdp",2))', '[("data",-1),("fsdp",2)]'])
def test_the_mesh_is_overridden_from_the_command_line(override, monkeypatch):
    """A tuple field (ml_collections refuses to override a list one); launch/tpu_pod.sh's list
    literal becomes the same tuple."""
    config = _parse(["--config=configs/mae.py:local", f"--config.mesh={override}"], monkeypatch)
    assert config.mesh == (("data", -1), ("fsdp", 2))
    assert dict(parallel.make_mesh(config.mesh).shape) == {"data": 4, "fsdp": 2}


# ---- configs are plain data: what they name is read when the run starts ----------------------------

@pytest.mark.parametrize("spec,unresolved", [
    ("finetune:init=/nonexistent,local", "model.variant"), ("finetune:init=mae:/nonexistent/mae.pth", "input.mean"),
    ("cae_v2:teacher=/nonexistent/ViT-B-16.pt", "teacher.dim"), ("cae_v2:local", "teacher.dim"),
    ("linear_probe:init=random,pretrain=cae_v2:local", "pretrain_config.teacher.dim")])
def test_configs_build_without_reading_the_files_they_name(spec, unresolved, monkeypatch):
    def reading(*args, **kwargs):
        raise AssertionError(f"{spec} read {args} while it was built")
    monkeypatch.setattr(pretrained, "read_config", reading)
    monkeypatch.setattr(clip_weights, "read_config", reading)
    config = common.load_config(spec)
    for key in unresolved.split("."):
        config = config[key]
    assert config is None


@pytest.mark.parametrize("spec,override,message", [
    ("finetune:init=/nonexistent,local", {}, "No pre-training checkpoint in /nonexistent/checkpoints"),
    ("cae_v2:teacher=/nonexistent/ViT-B-16.pt", {}, "OpenAI CLIP weights /nonexistent/ViT-B-16.pt do not exist"),
    ("linear_probe:init=random,pretrain=cae_v2:local", {"pretrain_config.teacher.source": "run:/nonexistent"},
     "No pre-training checkpoint in /nonexistent/checkpoints")])
def test_a_missing_file_is_one_clear_error_when_the_run_starts(spec, override, message, tmp_path):
    config = common.load_config(spec)
    config.update_from_flattened_dict(override)
    start = run.evaluate if config.get("evaluator") else train.train_and_evaluate
    with pytest.raises(UserFacingError, match=re.escape(message)):
        start(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()     # before anything is written


def test_the_command_prints_a_missing_teacher_in_one_line():
    out = _main("--config=configs/cae_v2.py:teacher=/nonexistent/ViT-B-16.pt")
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "OpenAI CLIP weights /nonexistent/ViT-B-16.pt do not exist" in out.stderr


# Written by configs/*.py:get_config at commit 90388da, when configs read these files while they
# were built ({fixtures}, {timm}, {clip} stand for the files that `reference_files` makes again).
REFERENCE = json.loads((ROOT / "tests" / "fixtures" / "resolved_configs_90388da.json").read_text())
NEW_FIELDS = {"finetune": ("optax.layer_decay",)}     # knobs added since, set to what was used
# What the fixture runs' configs (saved before configs were versioned) lack and `config_defaults.upgrade`
# gives them, with the values those runs used; fine-tuning copies their model.
UPGRADED = {"model.drop_path_form": "naive", "model.qkv_init": "fused", "model.remat_policy": None,
            "model.scan": False}


@pytest.fixture(scope="module")
def reference_files(tmp_path_factory):
    """The fixture MAE run exported as a timm file, and a CLIP config.json beside a .safetensors
    file (all a teacher's width needs)."""
    folder = tmp_path_factory.mktemp("reference")
    weights = pretrained.load(FIXTURES / "mae", parallel.make_mesh([("data", -1), ("fsdp", 1)]))
    for name in ("timm", "clip"):
        (folder / name).mkdir()
    export.export_timm(weights, folder / "timm")
    (folder / "clip" / "model.safetensors").write_bytes(b"")
    vision = dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96, patch_size=4,
                  image_size=28, projection_dim=24)
    (folder / "clip" / "config.json").write_text(json.dumps({"projection_dim": 24, "vision_config": vision}))
    return {"{fixtures}": str(FIXTURES), "{timm}": str(folder / "timm" / "model.safetensors"),
            "{clip}": str(folder / "clip" / "model.safetensors")}


@pytest.mark.parametrize("case", sorted(REFERENCE))
def test_a_resolved_config_equals_what_the_config_file_once_built(case, reference_files):
    spec = case
    for token, path in reference_files.items():
        spec = spec.replace(token, path)
    text = json.dumps(resolve_config(common.load_config(spec)).to_dict())
    for token, path in reference_files.items():
        text = text.replace(path, token)
    resolved = json.loads(text)
    del resolved["config_version"]
    for field in NEW_FIELDS.get(case.partition(":")[0], ()):
        block, _, key = field.rpartition(".")
        del resolved[block][key]
    if case.startswith("finetune:init={fixtures}"):
        for field, used in UPGRADED.items():
            block, _, key = field.rpartition(".")
            assert resolved[block].pop(key) == used, field
    assert resolved == REFERENCE[case]


def test_command_line_overrides_win_over_resolved_fields(monkeypatch):
    config = resolve_config(_parse([
        f"--config=configs/finetune.py:init={FIXTURES / 'mae'},local", "--config.model.drop_path=0.2",
        "--config.optax.base_lr=0.01", "--config.optax.layer_decay=0.5", "--config.input.mean=(0.5,)"], monkeypatch))
    assert (config.model.drop_path, config.model.width, config.model.depth) == (0.2, 32, 2)   # the run's size
    assert (config.optax.base_lr, config.input.mean, config.input.std) == (0.01, (0.5,), (0.353,))
    assert config.optax.groups.layer_0.lr_mult == 0.5 ** 3
    # The layer-decay groups follow the depth given.
    config = resolve_config(_parse(["--config=configs/finetune.py:init=random,pretrain=mae:local",
                                    "--config.model.depth=1"], monkeypatch))
    assert config.optax.param_groups == ((r"head/.*|encoder/encoder_norm/.*", "layer_2"),
                                         (r"encoder/encoder/block_0/.*", "layer_1"), (".*", "layer_0"))
    assert config.optax.groups.to_dict() == {f"layer_{i}": {"lr_mult": 0.75 ** (2 - i)} for i in range(3)}
    # A width given is not read from the teacher, which need not exist.
    config = resolve_config(_parse(["--config=configs/cae_v2.py:teacher=/nonexistent/ViT-B-16.pt",
                                    "--config.teacher.dim=768"], monkeypatch))
    assert config.teacher.dim == 768
