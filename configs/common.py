"""What the recipes (configs/*.py) share beyond the library's defaults (mim_jax/config_defaults.py):
the `local` preset, and the configs of other recipes that an evaluation or fine-tuning builds on."""
from __future__ import annotations

import importlib

import ml_collections

from mim_jax import config_defaults as defaults
from mim_jax.data.catalog import DATASETS
from mim_jax.models.vit import decode_variant

# The config arguments `local` replaces, and with what; an argument given explicitly keeps its value.
LOCAL_DATA, LOCAL_VARIANT, LOCAL_RES, LOCAL_BATCH = "fashion_mnist", "Ti/4", 28, 128


def local_preset(c: ml_collections.ConfigDict, given: frozenset[str] = frozenset()) -> None:
    """Shrinks a recipe to a CPU-sized run (minutes): a 4-block ViT-Ti/4 on the embedded
    Fashion-MNIST at 28x28, batch 128, for 2 epochs with periodic probes. The config arguments in
    `given` (`config_lib.given_args`: dataset=, variant=, res=, batch=) were set explicitly and win
    over the preset's choice for them; the schedule, float32 and the probes stay the preset's."""
    if "dataset" not in given:
        split, channels, mean, std = DATASETS[LOCAL_DATA]
        c.input.update(dataset=LOCAL_DATA, split=split, channels=channels, mean=mean, std=std)
    if "res" not in given:
        c.input.image_size = LOCAL_RES
    if "batch" not in given:
        c.input.batch_size = LOCAL_BATCH
    if "variant" not in given:   # an explicit variant keeps its own size (depth included)
        c.model.update(variant=LOCAL_VARIANT, depth=4)
    _check_patches_tile(c, given)
    c.input.update(num_workers=2, crop_scale=(0.35, 1.0))
    c.model.dtype = "float32"
    c.total_epochs = 2.0
    c.log_steps = 20
    c.ckpt_epochs = 1.0
    c.optax.update(warmup_epochs=0.5, base_lr=1e-3)
    # Probe accuracy during pre-training (a 10k-image bank/train set keeps each under a minute).
    c.evals.knn = defaults.periodic_eval("knn", every_epochs=0.5, max_train_examples=10_000)
    c.evals.linear = defaults.periodic_eval("linear_probe", every_epochs=0.5, max_train_examples=10_000, epochs=30)


def _check_patches_tile(c: ml_collections.ConfigDict, given: frozenset[str]) -> None:
    """An explicit variant or res that the preset's other choice does not fit is refused with the
    fix, rather than failing later in the model's patch embedding."""
    patch, size = decode_variant(c.model.variant)["patch_size"], c.input.image_size
    if size % patch == 0:
        return
    fix = f"give res=<a multiple of {patch}>" + (" too" if "res" not in given else "")
    if "variant" in given and "res" in given:
        fix += f", or a variant whose patch size divides {size}"
    raise ValueError(f"local with variant {c.model.variant} at res {size}: {size}x{size} images do not split "
                     f"into {patch}x{patch} patches; {fix}.")


def grid_cells(c: ml_collections.ConfigDict) -> int:
    """Patches per image (the local preset's 28x28 images at patch 4: 49)."""
    return (c.input.image_size // decode_variant(c.model.variant)["patch_size"]) ** 2


def pretrain_config(name_and_arg: str, dataset: str = "") -> ml_collections.ConfigDict:
    """'mae:local' -> configs/mae.py's get_config('local'): the architecture and data of an
    untrained or pixel baseline (evaluations with init=random|pixels, fine-tuning from random).
    `dataset`: the data set given to the evaluation or fine-tuning, passed on as the pre-training
    config's own dataset= argument (so it wins over a `local` preset, with its channels and
    normalisation)."""
    if dataset:
        name, _, arg = name_and_arg.partition(":")
        name_and_arg = f"{name}:{arg},dataset={dataset}" if arg else f"{name}:dataset={dataset}"
    return load_config(name_and_arg)


def load_config(name_and_arg: str) -> ml_collections.ConfigDict:
    """'mae:local' -> configs/mae.py's get_config('local')."""
    name, _, arg = name_and_arg.partition(":")
    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"configs.{name}":   # the config is there; something it imports is not
            raise
        raise ValueError(f"{name_and_arg!r}: there is no configs/{name}.py.") from e
    return module.get_config(arg or None)


def eval_config(arg, evaluator: str) -> ml_collections.ConfigDict:
    """An evaluation job; for init=random|pixels with the architecture and data of `pretrain=`."""
    if not arg.init:
        raise ValueError("Evaluation configs need init=<pre-training workdir>|<layout>:<weight file>|random|pixels.")
    c = defaults.evaluation(evaluator, init=arg.init, pretrain=arg.pretrain, dataset=arg.dataset, feature=arg.feature)
    if arg.init in ("random", "pixels"):
        c.pretrain_config = pretrain_config(arg.pretrain, arg.dataset)
    return c
