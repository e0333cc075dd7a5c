"""Attentive probe (CAPI / data2vec 2.0 protocol: one cross-attention block with a learned query
over the frozen patch tokens, then a linear classifier; AdamW, cosine) over a sweep of learning
rates trained at once on cached centre-view tokens; the best head is reported.

  python -m mim_jax.main --config=configs/attentive_probe.py:init=/tmp/mae_local --workdir=/tmp/att_mae_local

Arguments: init=<pre-training workdir>|<layout>:<weight file>|random|pixels; pretrain=<config>:<arg>.
"""
from configs import common
from mim_jax.config_lib import parse_arg


def get_config(arg=None):
    return common.eval_config(parse_arg(arg, init="", pretrain="mae:local", feature="", dataset=""), "attentive_probe")
