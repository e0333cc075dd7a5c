"""MAE (He et al. 2021) pre-training, the baseline every method builds on.

Paper recipe (ImageNet-1k, ViT-B/16): 800 epochs, batch 4096, AdamW(0.9, 0.95) wd 0.05,
lr 1.5e-4 x batch/256, 40 warm-up epochs, cosine; random 75% masking; decoder 8 x 512 (16 heads);
per-patch normalised pixel loss; crops RandomResizedCrop(0.2, 1) + flip.

  python -m mim_jax.main --config=configs/mae.py --workdir=/tmp/mae_b16
  python -m mim_jax.main --config=configs/mae.py:variant=L/16 --workdir=/tmp/mae_l16
  python -m mim_jax.main --config=configs/mae.py:local --workdir=/tmp/mae_local    # CPU, Fashion-MNIST
  ... --config.total_steps=20       # any field can be overridden; durations are unit-free

Arguments: variant=Ti/16,S/16,B/16,L/16,H/14; dataset=<TFDS name>; res=<image size>; batch=<global
batch>; local (a CPU-sized run on Fashion-MNIST; dataset=, variant=, res=, batch= given with it win).
"""
from ml_collections.config_dict import placeholder

from configs import common
from mim_jax import config_defaults as defaults
from mim_jax.config_lib import given_args, parse_arg


def get_config(arg=None):
    given = given_args(arg)
    arg = parse_arg(arg, variant="B/16", dataset="imagenet2012", res=224, batch=4096, local=False)
    c = defaults.base_config(dataset=arg.dataset, image_size=arg.res, batch_size=arg.batch)
    c.total_epochs = 800.0
    c.model = defaults.vit_config(arg.variant)
    c.decoder = dict(width=512, depth=8, num_heads=16, mlp_dim=2048)
    c.method = dict(name="mae", norm_pix_loss=True,
                    mask=dict(type="random", ratio=0.75, num_masked=placeholder(int)))
    if arg.local:
        common.local_preset(c, given)
        c.decoder.update(width=128, depth=2, num_heads=4, mlp_dim=512)
    return c
