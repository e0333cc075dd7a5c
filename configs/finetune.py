"""Fine-tuning of a pre-trained encoder (MAE/BEiT recipe, ViT-B defaults): 100 epochs, batch 1024,
AdamW(0.9, 0.999) wd 0.05, lr 5e-4 x batch/256, layer-wise lr decay 0.65, 5 warm-up epochs,
drop path 0.1, label smoothing 0.1, mixup 0.8 / cutmix 1.0, random-resized crop (0.08, 1) + flip,
RandAugment (2 ops, magnitude 9, std 0.5) and random erasing 0.25.

  python -m mim_jax.main --config=configs/finetune.py:init=/tmp/mae_b16 --workdir=/tmp/ft_b16
  python -m mim_jax.main --config=configs/finetune.py:init=/tmp/mae_local,local --workdir=/tmp/ft_local
  python -m mim_jax.main --config=configs/finetune.py:init=mae:/ckpt/mae_pretrain_vit_base.pth --workdir=/tmp/ft

Arguments: init=<pre-training workdir> (architecture and data come from its config),
init=<layout>:<weight file> (a released checkpoint: architecture from the file, ImageNet data) or
init=random,pretrain=<config>:<arg>; dataset=<TFDS name> (another data set, with the encoder's
input normalisation; from random, the `pretrain=` config's dataset=); local (1 epoch, small batch, CPU-sized).

Building the config reads no file: what comes from init= (config.model, config.input's data, size,
channels and normalisation) is unset here and resolved when the run starts, with the split, the
number of classes and the layer-wise lr decay groups that follow from it (Finetune.resolve_config),
then saved with the run config. A field given on the command line (--config.model.drop_path=0.2,
--config.optax.layer_decay=0.75) keeps its value.
"""
from ml_collections.config_dict import placeholder

from configs import common
from mim_jax import config_defaults as defaults
from mim_jax.config_lib import parse_arg
from mim_jax.methods.finetune import method as finetune


def get_config(arg=None):
    arg = parse_arg(arg, init="", pretrain="mae:local", dataset="", local=False)
    if not arg.init:
        raise ValueError("configs/finetune.py needs init=<pre-training workdir> (or init=random,pretrain=...).")
    # The pre-training data by default; `dataset=` fine-tunes on another with the encoder's own
    # input normalisation (released weights expect theirs).
    c = defaults.base_config(dataset=arg.dataset, image_size=0, batch_size=1024)
    c.input.update(defaults.unset(c.input, "split", "image_size", "channels", "mean", "std",
                                  *(() if arg.dataset else ("dataset",))))
    c.input.crop_scale = (0.08, 1.0)
    c.model = defaults.unset(defaults.vit_config("B/16"))   # every ViT field, each one init's unless given
    c.model.drop_path = 0.1
    c.total_epochs = 100.0
    c.init = None if arg.init == "random" else arg.init
    c.method = dict(name="finetune", num_classes=placeholder(int),
                    label_smoothing=0.1, mixup=0.8, cutmix=1.0, rand_augment=(2, 9.0, 0.5), erase_prob=0.25)
    # Layer-wise lr decay (default by the encoder's size, finetune.LAYER_DECAY): config.optax.groups
    # and param_groups are built from it and the encoder's depth unless given.
    c.optax.update(base_lr=5e-4, b2=0.999, weight_decay=0.05, warmup_epochs=5.0, min_lr=1e-6,
                   layer_decay=placeholder(float))
    c.evals.accuracy = defaults.periodic_eval("classification", every_epochs=10.0, feature="logits")
    if arg.init == "random":   # the architecture of `pretrain`, built for `dataset` where one is given
        finetune.from_pretraining(c, common.pretrain_config(arg.pretrain, arg.dataset))
    if arg.local:
        c.input.update(batch_size=128, num_workers=2)
        c.total_epochs = 1.0
        c.log_steps = 20
        c.optax.update(warmup_epochs=0.1, base_lr=1e-3)
        c.evals.accuracy.every_epochs = 0.5
    return c
