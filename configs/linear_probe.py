"""Linear probe (MAE protocol: BatchNorm without affine + linear layer on the frozen encoder's
features; SGD momentum 0.9, no weight decay, cosine) over a sweep of learning rates trained at once
on cached centre-view features; the best head is reported.

  python -m mim_jax.main --config=configs/linear_probe.py:init=/tmp/mae_local --workdir=/tmp/lin_mae_local
  python -m mim_jax.main --config=configs/linear_probe.py:init=random,pretrain=mae:local --workdir=/tmp/lin_random

Arguments: init=<pre-training workdir>|<layout>:<weight file>|random|pixels; pretrain=<config>:<arg>;
feature=cls|patch_mean|cls+patch_mean; dataset=<TFDS name> (default: the
pre-training data; the encoder's own normalisation is kept; with init=random|pixels it is passed to
the `pretrain=` config as its dataset=, so the baseline is built for its channels).
"""
from configs import common
from mim_jax.config_lib import parse_arg


def get_config(arg=None):
    return common.eval_config(parse_arg(arg, init="", pretrain="mae:local", feature="", dataset=""), "linear_probe")
