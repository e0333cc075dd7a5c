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
"""
import ml_collections

from configs import common
from mim_jax import pretrained
from mim_jax.config_lib import parse_arg
from mim_jax.models.vit import decode_variant

LAYER_DECAY = {"Ti": 0.75, "S": 0.75, "B": 0.65, "L": 0.75, "H": 0.75}  # MAE/BEiT choices by size


def get_config(arg=None):
    arg = parse_arg(arg, init="", pretrain="mae:local", dataset="", local=False)
    if not arg.init:
        raise ValueError("configs/finetune.py needs init=<pre-training workdir> (or init=random,pretrain=...).")
    # From random: the architecture of `pretrain`, built for `dataset` where one is given (its channels).
    pre = (common.pretrain_config(arg.pretrain, arg.dataset) if arg.init == "random"
           else pretrained.read_config(arg.init))
    variant = pre.model.variant
    depth = pre.model.depth or decode_variant(variant)["depth"]
    if pre.model.get("scan"):
        raise ValueError("Layer-wise lr decay selects blocks by name: fine-tune with model.scan=False "
                         "(a scanned run's params convert with models.layers.unstack_blocks).")

    # The pre-training data by default; `dataset=` fine-tunes on another with the encoder's own
    # input normalisation (released weights expect theirs).
    dataset = arg.dataset or pre.input.dataset
    c = common.base_config(dataset=dataset, image_size=pre.input.image_size, batch_size=1024)
    c.input.update(data_dir=pre.input.data_dir if not arg.dataset else None, channels=pre.input.channels,
                   mean=tuple(pre.input.mean), std=tuple(pre.input.std), crop_scale=(0.08, 1.0))
    c.model = ml_collections.ConfigDict(pre.model.to_dict())
    c.model.drop_path = 0.1
    c.total_epochs = 100.0
    c.init = None if arg.init == "random" else arg.init
    c.method = dict(name="finetune", num_classes=common.NUM_CLASSES.get(dataset, 1000),
                    label_smoothing=0.1, mixup=0.8, cutmix=1.0, rand_augment=(2, 9.0, 0.5), erase_prob=0.25)
    c.optax.update(base_lr=5e-4, b2=0.999, weight_decay=0.05, warmup_epochs=5.0, min_lr=1e-6)
    decay = LAYER_DECAY.get(variant.split("/")[0], 0.75)
    # Layer-wise lr decay (BEiT/MAE `param_groups_lrd`): patch embedding and tokens are layer 0,
    # block i is layer i + 1, the final norm and the head layer depth + 1.
    c.optax.groups = {f"layer_{i}": dict(lr_mult=decay ** (depth + 1 - i)) for i in range(depth + 2)}
    c.optax.param_groups = ((r"head/.*|encoder/encoder_norm/.*", f"layer_{depth + 1}"),
                            *((rf"encoder/encoder/block_{i}/.*", f"layer_{i + 1}") for i in range(depth)),
                            (".*", "layer_0"))
    c.evals.accuracy = common.periodic_eval("classification", every_epochs=10.0, feature="logits")
    if arg.local:
        c.input.update(batch_size=128, num_workers=2)
        c.total_epochs = 1.0
        c.log_steps = 20
        c.optax.update(warmup_epochs=0.1, base_lr=1e-3)
        c.evals.accuracy.every_epochs = 0.5
    return c
