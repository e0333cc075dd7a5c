"""Blocks shared by every method's `get_config(arg)`: data, model, optimizer, mesh and sharding."""
from __future__ import annotations

import ml_collections
from ml_collections.config_dict import placeholder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Known data sets: (split, channels, mean, std). Any other TFDS image data set works with
# dataset=NAME: then channels/mean/std default to RGB ImageNet statistics (override as needed).
DATASETS = {
    "imagenet2012": ("train", 3, IMAGENET_MEAN, IMAGENET_STD),
    "fashion_mnist": ("train", 1, (0.2860,), (0.3530,)),
    "mnist": ("train", 1, (0.1307,), (0.3081,)),
    "cifar10": ("train", 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
# Held-out split used by evaluators (TFDS names).
EVAL_SPLITS = {"imagenet2012": "validation"}
NUM_CLASSES = {"imagenet2012": 1000, "fashion_mnist": 10, "mnist": 10, "cifar10": 10}

# Pure FSDP (MaxText's recommendation at ViT scale): weights sharded on their model dimension over
# `fsdp`, the batch over both axes, everything else replicated. Model code only names axes.
SHARDING_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("embed", "fsdp"), ("dec_embed", "fsdp"),
    ("mlp", None), ("qkv", None), ("patch", None), ("norm", None),
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
    c.profile_steps = 0          # >0: trace that many steps (after warm-up) into the workdir
    c.peak_flops = placeholder(float)   # per-device peak for MFU where the device is not known

    split, channels, mean, std = DATASETS.get(dataset, ("train", 3, IMAGENET_MEAN, IMAGENET_STD))
    c.input = ml_collections.ConfigDict(dict(
        dataset=dataset, split=split, data_dir=placeholder(str), batch_size=batch_size,
        image_size=image_size, channels=channels, mean=mean, std=std,
        crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), flip=True, num_workers=8, prefetch_buffer=2))

    c.optax = ml_collections.ConfigDict(dict(
        base_lr=1.5e-4, lr_scale_batch=256, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-8,
        weight_decay=0.05, clip_norm=0.0, warmup_steps=placeholder(int), warmup_epochs=40.0,
        warmup_percent=placeholder(float), decay_percent=1.0, groups=ml_collections.ConfigDict()))

    c.mesh = [("data", -1), ("fsdp", 1)]
    c.sharding_rules = SHARDING_RULES
    return c


def vit_config(variant: str, **overrides) -> ml_collections.ConfigDict:
    """Encoder block; the width/depth/... placeholders override the variant's sizes when set."""
    model = dict(variant=variant, posemb="sincos2d", cls_token=True, num_registers=0, norm="layernorm",
                 use_bias=True, layerscale=placeholder(float), drop_path=0.0, dtype="bfloat16",
                 attention_impl=placeholder(str), remat=False, width=placeholder(int),
                 depth=placeholder(int), mlp_dim=placeholder(int), num_heads=placeholder(int))
    model.update(overrides)
    return ml_collections.ConfigDict(model)


def local_preset(c: ml_collections.ConfigDict) -> None:
    """Shrinks a recipe to a CPU-sized run on the embedded Fashion-MNIST data set (minutes)."""
    split, channels, mean, std = DATASETS["fashion_mnist"]
    c.input.update(dataset="fashion_mnist", split=split, channels=channels, mean=mean, std=std,
                   image_size=28, batch_size=128, num_workers=2, crop_scale=(0.35, 1.0))
    c.model.update(variant="Ti/4", depth=4, dtype="float32")
    c.total_epochs = 2.0
    c.log_steps = 20
    c.ckpt_epochs = 1.0
    c.optax.update(warmup_epochs=0.5, base_lr=1e-3)


def eval_config(arg, evaluator: str, **options) -> ml_collections.ConfigDict:
    """Shared block of evaluation jobs: which encoder, which features, which data."""
    if not arg.init:
        raise ValueError("Evaluation configs need init=<pre-training workdir>|random|pixels.")
    c = ml_collections.ConfigDict()
    c.evaluator = evaluator
    c.init = arg.init
    c.pretrain = arg.pretrain       # config (file:arg) giving architecture and data for random/pixels
    c.feature = arg.feature
    c.seed = 0
    c.batch_size = 256
    c.data_dir = placeholder(str)   # overrides the pre-training config's input.data_dir
    c.train_split = placeholder(str)  # default: the pre-training split
    c.eval_split = placeholder(str)   # default: EVAL_SPLITS or "test"
    c.max_train_examples = placeholder(int)
    c.mesh = [("data", -1), ("fsdp", 1)]
    c.update(options)
    return c
