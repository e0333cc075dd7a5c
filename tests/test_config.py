"""Configs: argument parsing, unit-free durations, clear errors on unknown keys and bad values."""
import pathlib
import subprocess
import sys

import pytest
from absl import flags

from configs import mae
from mim_jax import config_lib, optim
from mim_jax.data.catalog import DATASETS
from mim_jax.models.vit import vit_from_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
    return config_lib.load_config(f"{name}:{arg}")


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
    c = config_lib.load_config(f"{name}:init=random,pretrain=mae:local,dataset=cifar10")
    built = c.input if name == "finetune" else c.pretrain_config.input
    assert (built.dataset, built.channels, built.image_size) == ("cifar10", 3, 28)
    default = config_lib.load_config(f"{name}:init=random,pretrain=mae:local")
    assert (default.input if name == "finetune" else default.pretrain_config.input).dataset == "fashion_mnist"


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


@pytest.mark.parametrize("override", ['(("data",-1),("fsdp",2))', '[("data",-1),("fsdp",2)]'])
def test_the_mesh_is_overridden_from_the_command_line(override, monkeypatch):
    """A tuple field (ml_collections refuses to override a list one); launch/tpu_pod.sh's list
    literal becomes the same tuple."""
    from mim_jax import main, parallel
    fv = flags.FlagValues()
    main.define_flags(flag_values=fv)
    argv = ["mim_jax.main", "--config=configs/mae.py:local", "--workdir=/tmp/unused", f"--config.mesh={override}"]
    monkeypatch.setattr(sys, "argv", argv)     # config_flags reads the overrides from there
    monkeypatch.chdir(ROOT)
    fv(argv)
    assert fv.config.mesh == (("data", -1), ("fsdp", 2))
    assert dict(parallel.make_mesh(fv.config.mesh).shape) == {"data": 4, "fsdp": 2}
