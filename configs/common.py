"""Blocks shared by every method's `get_config(arg)`: data, model, optimizer, mesh and sharding."""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

from mim_jax import config_lib, evaluators
from mim_jax.data.catalog import DATASETS, EVAL_SPLITS, IMAGENET_MEAN, IMAGENET_STD, NUM_CLASSES  # noqa: F401
from mim_jax.models.vit import decode_variant

# Pure FSDP (MaxText's recommendation at ViT scale): weights sharded on their model dimension over
# `fsdp`, the batch over both axes, everything else replicated. Model code only names axes.
SHARDING_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("embed", "fsdp"), ("dec_embed", "fsdp"),
    ("mlp", None), ("qkv", None), ("patch", None), ("norm", None), ("layers", None),
    ("act_len", None), ("act_emb", None), ("act_mlp", None), ("act_heads", None), ("act_kv", None),
)


def base_config(*, dataset: str, image_size: int, batch_size: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Durations are unit-free: the first of *_steps, *_epochs (or *_percent) that is set wins.
    c.total_steps = placeholder(int)
    c.total_epochs = 1.0
    c.log_steps = 50
    c.ckpt_steps = placeholder(int)
    c.ckpt_epochs = 1.0
    c.keep_ckpts = 3
    c.async_ckpt = True
    c.resume_step = placeholder(int)   # restore this checkpoint, not the newest; later ones are deleted
    c.max_loss_ratio = 1e3       # a loss over this x the run's first loss is divergence (0: off)
    # Multi-process runs: a process silent this long is lost; the others name it and exit (0: only
    # JAX's own heartbeat check, which aborts after max(100, 2x this) s without naming the process).
    c.peer_timeout_s = 60.0
    # Persistent XLA compilation cache (None: WORKDIR/jax_cache; "": off; or a path, local or gs://).
    c.compilation_cache_dir = placeholder(str)
    c.evals = ml_collections.ConfigDict()   # name -> periodic_eval(...), run during pre-training
    # Pixel methods: this many evaluation images' reconstructions as a TensorBoard image at every
    # step config.evals runs (0: none).
    c.reconstruction_images = 8
    c.profile_steps = 0          # >0: trace that many steps (after warm-up) into the workdir
    c.peak_flops = placeholder(float)   # per-device peak for MFU where the device is not known
    # Warm start: a new run (not a resume) takes these params from a pre-training workdir.
    c.init = placeholder(str)
    c.init_keys = ("encoder",)
    # Gradient accumulation: the global batch (input.batch_size) as k micro-batches in one step,
    # the same update with 1/k of the activation memory (divisible by k x the batch's devices).
    # Methods whose loss reads the whole batch (CAPI, CMAE) refuse k > 1 unless
    # allow_inexact_accumulation (then it warns what changes).
    c.grad_accum_steps = 1
    c.allow_inexact_accumulation = False

    split, channels, mean, std = DATASETS.get(dataset, ("train", 3, IMAGENET_MEAN, IMAGENET_STD))
    c.input = ml_collections.ConfigDict(dict(
        dataset=dataset, split=split, data_dir=placeholder(str), batch_size=batch_size,
        image_size=image_size, channels=channels, mean=mean, std=std,
        crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, color_jitter=0.0, interpolation="auto",
        num_workers=8, prefetch_buffer=2,
        # A JPEG whose crop is >= 2x/4x/8x the output on both sides is decoded at that reduced
        # scale (data/decode.py); 1 always decodes at full size.
        max_decode_reduction=8))

    c.optax = ml_collections.ConfigDict(dict(
        base_lr=1.5e-4, lr_scale_batch=256, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.05, decay_rule="kernels", cosine_truncation=1.0, clip_norm=0.0,
        warmup_steps=placeholder(int), warmup_epochs=40.0,
        warmup_percent=placeholder(float), decay_percent=1.0,
        # Optimizer groups: (regex over the parameter path, group), first full match wins, the rest
        # is 'default'; each group's settings override these (lr_mult scales the lr); 'frozen'
        # gets no updates.
        param_groups=(), groups=ml_collections.ConfigDict()))

    c.mesh = (("data", -1), ("fsdp", 1))   # a tuple: ml_collections overrides no list field from flags
    c.sharding_rules = SHARDING_RULES
    return c


def vit_config(variant: str, **overrides) -> ml_collections.ConfigDict:
    """Encoder block; the width/depth/... placeholders override the variant's sizes when set."""
    model = dict(variant=variant, posemb="sincos2d", cls_token=True, num_registers=0, norm="layernorm",
                 use_bias=True, qkv_bias="dense", init_style="mae", layerscale=placeholder(float),
                 drop_path=0.0, drop_path_form="naive", dtype="bfloat16", attention_impl=placeholder(str), remat=False,
                 remat_policy=placeholder(str), scan=False, qkv_init="fused", width=placeholder(int),
                 depth=placeholder(int), mlp_dim=placeholder(int), num_heads=placeholder(int))
    model.update(overrides)
    return ml_collections.ConfigDict(model)


def unset(block: ml_collections.ConfigDict, *keys: str) -> ml_collections.ConfigDict:
    """Fields `keys` of `block` (all by default) as placeholders of their types: left for the run to
    resolve (`Method.resolve_config`), and still overridable from the command line."""
    return ml_collections.ConfigDict({k: placeholder(block.get_type(k)) for k in keys or block})


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
    c.evals.knn = periodic_eval("knn", every_epochs=0.5, max_train_examples=10_000)
    c.evals.linear = periodic_eval("linear_probe", every_epochs=0.5, max_train_examples=10_000, epochs=30)


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
    return config_lib.load_config(name_and_arg)


def periodic_eval(evaluator: str, every_epochs: float, **options) -> ml_collections.ConfigDict:
    """An entry of config.evals: run `evaluator` every `every_epochs` during pre-training, with
    the evaluator's own defaults (its paper protocol) unless overridden."""
    c = dict(type=evaluator, every_epochs=every_epochs, every_steps=placeholder(int), batch_size=256, seed=0,
             max_train_examples=placeholder(int), max_eval_examples=placeholder(int),
             **evaluators.get(evaluator).DEFAULTS)
    c.update(options)
    return ml_collections.ConfigDict(c)


def eval_config(arg, evaluator: str, **options) -> ml_collections.ConfigDict:
    """Shared block of evaluation jobs: which encoder, which features, which data. For
    init=random|pixels the architecture and data config (`pretrain=`) is resolved here."""
    if not arg.init:
        raise ValueError("Evaluation configs need init=<pre-training workdir>|<layout>:<weight file>|random|pixels.")
    c = ml_collections.ConfigDict()
    c.evaluator = evaluator
    c.init = arg.init
    c.pretrain = arg.pretrain       # config (file:arg) giving architecture and data for random/pixels
    c.pretrain_config = (pretrain_config(arg.pretrain, arg.get("dataset", "")) if arg.init in ("random", "pixels")
                         else ml_collections.ConfigDict())
    c.seed = 0
    c.batch_size = 256
    c.dataset = arg.get("dataset") or placeholder(str)   # another data set than the pre-training one
    c.data_dir = placeholder(str)   # overrides the pre-training config's input.data_dir
    c.train_split = placeholder(str)  # default: the pre-training split
    c.eval_split = placeholder(str)   # default: EVAL_SPLITS or "test"
    c.max_train_examples = placeholder(int)
    c.max_eval_examples = placeholder(int)
    c.mesh = (("data", -1), ("fsdp", 1))
    c.update(evaluators.get(evaluator).DEFAULTS)
    c.feature = arg.feature or c.feature
    c.update(options)
    return c
