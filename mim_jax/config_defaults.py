"""The defaults of every config, in one place: the base block every recipe (configs/*.py) starts
from, the ViT block, the evaluators' protocols and the shared block of evaluation jobs. Read
sites read fields directly, so a field missing from a config is an error, never a second default.

Configs carry `config_version`, saved with them; `upgrade` brings a config saved by an older version
forward (checkpoint.Checkpointer.restore_config applies it wherever a run's config is read).
"""
from __future__ import annotations

import copy

import ml_collections
import numpy as np
from ml_collections.config_dict import placeholder

from mim_jax.data.catalog import DATASETS, IMAGENET_MEAN, IMAGENET_STD
from mim_jax.errors import UserFacingError

# One more whenever saved configs gain, lose or rename a field; `upgrade` then gets the step to it.
CONFIG_VERSION = 1

# Pure FSDP (MaxText's recommendation at ViT scale): weights sharded on their model dimension over
# `fsdp`, the batch over both axes, everything else replicated. Model code only names axes.
SHARDING_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("embed", "fsdp"), ("dec_embed", "fsdp"),
    ("mlp", None), ("qkv", None), ("patch", None), ("norm", None), ("layers", None),
    ("act_len", None), ("act_emb", None), ("act_mlp", None), ("act_heads", None), ("act_kv", None),
)
MESH = (("data", -1), ("fsdp", 1))   # a tuple: ml_collections overrides no list field from flags

# The evaluators' paper protocols (mim_jax/evaluators/<name>.py), the options of an evaluation job
# (configs/knn.py, ...) and of a periodic evaluation during pre-training (`periodic_eval`).
EVALUATORS = {
    "knn": dict(k=20, temperature=0.07, feature="cls"),     # DINO
    # sweep_extensions: rates added beyond an edge where the best sits (probes.sweep).
    "linear_probe": dict(learning_rates=(0.01, 0.03, 0.1, 0.3, 1.0), sweep_extensions=3, epochs=90,
                         probe_batch_size=1024, feature="cls"),
    "attentive_probe": dict(learning_rates=(1e-4, 3e-4, 1e-3, 3e-3), sweep_extensions=3, epochs=10,
                            probe_batch_size=256, weight_decay=0.05, num_heads=4, feature="patch_tokens"),
    "classification": dict(feature="logits"),
    # CAPI's eval_segmentation.py: kNN (k, distance) and L2 logistic regression (C: 10^-6 .. 10^5 in
    # 8 steps) chosen on 10 % of the training images. dense_dataset: None = the dense task of the
    # pre-training data (catalog.DENSE_TASK); mask_key/ignore_labels/num_classes/resolution: None =
    # the known data set's.
    "segmentation_probe": dict(
        feature="patch_tokens", dense_dataset=placeholder(str), mask_key=placeholder(str),
        ignore_labels=placeholder(tuple), num_classes=placeholder(int), resolution=placeholder(int),
        classifiers=("knn", "logreg"), knn_k=(1, 3, 10, 30), knn_distances=("cosine", "L2"),
        logreg_C=tuple(float(c) for c in 10 ** np.linspace(-6, 5, 8)), logreg_max_iter=1000, logreg_tol=1e-6,
        train_subsampling=1, val_fraction=0.1, upsample_logits=False),
}


def _process_fields() -> dict:
    """What every command reads before it knows whether it trains or evaluates (mim_jax.main)."""
    # Multi-process runs: a process silent this long is lost; the others name it and exit (0: only
    # JAX's own heartbeat check, which aborts after max(100, 2x this) s without naming the process).
    # compilation_cache_dir: the persistent XLA cache (None: $JAX_COMPILATION_CACHE_DIR or
    # WORKDIR/jax_cache; "": off; or a path, local or gs://).
    return dict(config_version=CONFIG_VERSION, seed=0, mesh=MESH, peer_timeout_s=60.0,
                compilation_cache_dir=placeholder(str))


def base_config(*, dataset: str, image_size: int, batch_size: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict(_process_fields())
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


def _evaluator_options(evaluator: str) -> dict:
    if evaluator not in EVALUATORS:
        raise ValueError(f"Unknown evaluator {evaluator!r}; available: {list(EVALUATORS)}.")
    return dict(EVALUATORS[evaluator])


def periodic_eval(evaluator: str, every_epochs: float, **options) -> ml_collections.ConfigDict:
    """An entry of config.evals: run `evaluator` every `every_epochs` during pre-training, with
    the evaluator's own defaults (its paper protocol) unless overridden."""
    c = dict(type=evaluator, every_epochs=every_epochs, every_steps=placeholder(int), batch_size=256, seed=0,
             max_train_examples=placeholder(int), max_eval_examples=placeholder(int),
             **_evaluator_options(evaluator))
    c.update(options)
    return ml_collections.ConfigDict(c)


def evaluation(evaluator: str, *, init: str, pretrain: str, dataset: str, feature: str) -> ml_collections.ConfigDict:
    """The block of an evaluation job: which encoder, which features, which data. `pretrain_config`
    (the architecture and data of init=random|pixels) is the recipe's to fill."""
    c = ml_collections.ConfigDict(_process_fields())
    c.evaluator = evaluator
    c.init = init
    c.pretrain = pretrain           # config (file:arg) giving architecture and data for random/pixels
    c.pretrain_config = ml_collections.ConfigDict()
    c.batch_size = 256
    c.dataset = dataset or placeholder(str)   # another data set than the pre-training one
    c.data_dir = placeholder(str)   # overrides the pre-training config's input.data_dir
    c.train_split = placeholder(str)  # default: the pre-training split
    c.eval_split = placeholder(str)   # default: EVAL_SPLITS or "test"
    c.max_train_examples = placeholder(int)
    c.max_eval_examples = placeholder(int)
    c.update(_evaluator_options(evaluator))
    c.feature = feature or c.feature
    return c


# Version 0 is every config saved before configs were versioned. What they may lack, with the value
# the code assumed while it read them without (so reading them behaves as it did): for fine-tuning
# runs also `init` (then `method.init`; "random" is None now) and the knobs added to its recipe.
_ADDED_IN_1 = dict(
    init=None, init_keys=("encoder",), resume_step=None, max_loss_ratio=0.0, grad_accum_steps=1,
    allow_inexact_accumulation=False, peer_timeout_s=60.0, compilation_cache_dir=None, reconstruction_images=0,
    evals={}, input=dict(color_jitter=0.0, interpolation="auto", max_decode_reduction=8),
    model=dict(init_style="mae", qkv_bias="dense", qkv_init="fused", remat_policy=None, scan=False,
               drop_path_form="naive"),
    optax=dict(decay_rule="kernels", cosine_truncation=1.0, param_groups=(), groups={}))
_FINETUNE_ADDED_IN_1 = dict(method=dict(rand_augment=(), erase_prob=0.0), optax=dict(layer_decay=None))


def _fill(block, added: dict) -> None:
    for key, value in added.items():
        if key not in block:
            block[key] = copy.deepcopy(value)
        elif isinstance(value, dict):
            _fill(block[key], value)


def _to_version_1(c: ml_collections.ConfigDict) -> None:
    if c.method.name == "finetune":
        if "init" in c.method:
            init = c.method.init
            del c.method["init"]
            c.init = None if init == "random" else init
        _fill(c, _FINETUNE_ADDED_IN_1)
    _fill(c, _ADDED_IN_1)
    for entry in c.evals.values():
        if entry.type in ("linear_probe", "attentive_probe"):
            _fill(entry, dict(sweep_extensions=0))   # the sweep was not widened then


_UPGRADES = (_to_version_1,)   # _UPGRADES[v] brings version v to v + 1


def upgrade(config) -> ml_collections.ConfigDict:
    """A saved config (a dict or ConfigDict) as this version's fields, in a copy; one saved by a
    newer version is refused (its fields may mean what this version cannot know)."""
    c = ml_collections.ConfigDict(copy.deepcopy(config.to_dict() if hasattr(config, "to_dict") else config))
    version = c.config_version if "config_version" in c else 0
    if version > CONFIG_VERSION:
        raise UserFacingError(f"This config was saved by a newer mim_jax (config_version {version}; this one "
                              f"reads up to {CONFIG_VERSION}): read it with that version or a later one.")
    for step in _UPGRADES[version:]:
        step(c)
    c.config_version = CONFIG_VERSION
    return c
