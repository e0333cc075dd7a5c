"""CMAE pre-training (Mao et al., arXiv 2205.10546; no official code: the recipe of the authors'
SDMAE code, Talented-Q/SDMAE, plus ContrastiveCrop views, xyupeng/ContrastiveCrop).

ViT-B/16 MAE encoder (fixed 2-D sin-cos, [CLS], frozen patch embedding), 75 % random masking with
one mask shared by both views, a 1-block 128-wide decoder (16 heads) reconstructing unnormalised
pixels of both views, a contrastive branch on the decoder's [CLS] output (2 blocks, 3-layer MLP
with BatchNorm, predictor, momentum head EMA 0.999; symmetrised InfoNCE, T = 1, x2T, weight 0.1,
global-batch negatives), token-position prediction (MSE against one-hot) on the visible tokens of
both views; ContrastiveCrop boxes from the last block's [CLS] attention after 20 % of training and
every 20 % (k = 0.3, Beta(0.6, 0.6); each refresh is a pass over the whole training set, so a run
shorter than one epoch, e.g. --config.total_steps=5, has none); AdamW (0.9, 0.95), wd 0.05 (not on
1-D params), lr 1e-3 x batch/256, 40 warm-up epochs then a half-cosine over the remaining 260 (300
in total).

  python -m mim_jax.main --config=configs/cmae.py --workdir=/tmp/cmae_b16
  python -m mim_jax.main --config=configs/cmae.py:local --workdir=/tmp/cmae_local    # CPU, Fashion-MNIST

Arguments: variant=Ti/16,S/16,B/16,L/16; dataset=<TFDS name>; res=<image size>; batch=<global
batch>; local (dataset=, variant=, res=, batch= given with it win).
"""
from ml_collections.config_dict import placeholder

from configs import common
from mim_jax import config_defaults as defaults
from mim_jax.config_lib import given_args, parse_arg

VARIANTS = ("Ti/16", "S/16", "B/16", "L/16")


def get_config(arg=None):
    given = given_args(arg)
    arg = parse_arg(arg, variant="B/16", dataset="imagenet2012", res=224, batch=4096, local=False)
    if arg.variant not in VARIANTS:
        raise ValueError(f"configs/cmae.py: variant={arg.variant!r}; use one of {VARIANTS}.")
    c = defaults.base_config(dataset=arg.dataset, image_size=arg.res, batch_size=arg.batch)
    c.total_epochs = 300.0
    # Crops come from ContrastiveCrop (both views); view 1 is not flipped, view 2 is (method.view2).
    c.input.update(crop_scale=(0.2, 1.0), interpolation="bicubic", flip=False)
    c.model = defaults.vit_config(arg.variant)
    # The decoder's [CLS] output feeds the contrastive head (keep_prefix).
    c.decoder = dict(width=128, depth=1, num_heads=16, mlp_dim=512, keep_prefix=True)
    c.contrastive = dict(
        depth=2, num_heads=placeholder(int), hidden_dim=4096,
        dim=placeholder(int),        # output width; None: the encoder's (768 at B, as SDMAE)
        temperature=1.0, weight=0.1, momentum=0.999,
        momentum_init="copy",               # or "independent" (what SDMAE's code ends up doing)
        negatives="global")                 # or "device": each device's own batch (SDMAE on one GPU)
    c.method = dict(
        name="cmae", norm_pix_loss=False, position_loss="mse", position_weight=1.0,
        mask=dict(type="random", ratio=0.75, num_masked=placeholder(int)),
        ccrop=dict(enabled=True, warmup_percent=0.2, interval_percent=0.2, threshold=0.3, alpha=0.6,
                   heatmap="cls_attention", batch_size=256),
        view2=dict(flip=True, jitter=(0.4, 0.4, 0.2, 0.1), jitter_prob=0.8, gray_prob=0.2))
    c.optax.update(base_lr=1e-3, b1=0.9, b2=0.95, weight_decay=0.05, decay_rule="not_1d", min_lr=0.0,
                   warmup_epochs=40.0)
    # The frozen patch embedding (MoCo v3's trick): no updates, no weight decay.
    c.optax.param_groups = (("encoder/embedding/.*", "frozen"),)

    if arg.local:
        common.local_preset(c, given)
        c.input.flip = False
        # 7x7 patches of 16 values: the decoder's outputs are projected to the encoder's 192
        # before the contrastive blocks; narrower MLPs keep the CPU step short.
        c.contrastive.update(hidden_dim=1024, dim=256)
        c.method.ccrop.update(batch_size=512)
    return c
