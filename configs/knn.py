"""kNN evaluation (DINO protocol: k=20, T=0.07, cosine on L2-normalised features) of an encoder.

  python -m mim_jax.main --config=configs/knn.py:init=/tmp/mae_local --workdir=/tmp/knn_mae_local
  python -m mim_jax.main --config=configs/knn.py:init=random,pretrain=mae:local --workdir=/tmp/knn_random
  python -m mim_jax.main --config=configs/knn.py:init=pixels,pretrain=mae:local --workdir=/tmp/knn_pixels

Arguments: init=<pre-training workdir>|<layout>:<weight file>|random|pixels; pretrain=<config>:<arg> (the architecture and
data for random/pixels); feature=cls|patch_mean|cls+patch_mean; dataset=<TFDS name> (default: the
pre-training data; the encoder's own normalisation is kept; with init=random|pixels it is passed to
the `pretrain=` config as its dataset=, so the baseline is built for its channels).
"""
from configs import common
from mim_jax.config_lib import parse_arg


def get_config(arg=None):
    return common.eval_config(parse_arg(arg, init="", pretrain="mae:local", feature="", dataset=""), "knn")
