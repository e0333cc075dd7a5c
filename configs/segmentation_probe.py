"""Segmentation probe (CAPI protocol: kNN and L2 logistic regression on the frozen encoder's patch
tokens, chosen on 10 % of the training images, mIoU and pixel accuracy) of an encoder.

  python -m mim_jax.data.fashion_mnist_mosaic      # once: the embedded dense task
  python -m mim_jax.main --config=configs/segmentation_probe.py:init=/tmp/mae_local,local --workdir=/tmp/seg_mae_local
  python -m mim_jax.main --config=configs/segmentation_probe.py:init=random,pretrain=mae:local,local --workdir=/tmp/seg_random
  python -m mim_jax.main --config=configs/segmentation_probe.py:init=pixels,pretrain=mae:local,local --workdir=/tmp/seg_pixels
  python -m mim_jax.main --config=configs/segmentation_probe.py:init=capi:/ckpt/capi_vitl14.pth,dense=scene_parse150,resolution=448 --workdir=/tmp/seg_capi

Arguments: init=<pre-training workdir>|<layout>:<weight file>|random|pixels; pretrain=<config>:<arg>
(the architecture and data for random/pixels); dense=<TFDS name> (default: the dense task of the
pre-training data: fashion_mnist_mosaic for Fashion-MNIST, scene_parse150 (ADE20K) for ImageNet);
resolution=<pixels> (default: the data set's, 224 for ADE20K); local: the embedded task's sizes for
a CPU (1,000 training and 250 evaluation mosaics, every 8th training patch).
"""
from configs import common
from mim_jax.config_lib import parse_arg


def get_config(arg=None):
    arg = parse_arg(arg, init="", pretrain="mae:local", feature="", dataset="", dense="", resolution=0, local=False)
    c = common.eval_config(arg, "segmentation_probe")
    c.dense_dataset = arg.dense or None
    c.resolution = arg.resolution or None
    if arg.local:
        c.max_train_examples, c.max_eval_examples, c.train_subsampling = 1000, 250, 8
    return c
