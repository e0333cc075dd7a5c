"""CAPI pre-training (official recipe: facebookresearch/capi `default_pretrain_config.yaml`, paper
Tables 6 and 8; docs/methods/capi.md §4).

ViT-L/14 at 224 (16x16 patches): RMSNorm (eps 1e-5), no biases, no LayerScale, 16 registers, no
[CLS], 2-D RoPE in [0, 1] coordinates; a 12-block cross-attention predictor; K = 16384
prototypes; temperatures 0.06 (Sinkhorn targets) / 0.12 (student and clustering predictions);
inverse block masking of 65% with roll, 5% of the masked positions predicted; AdamW (0.9, 0.95),
lr 1e-3 (no batch scaling), 10% warm-up, cosine truncated at 80% of its half period, weight
decay 0.1 (norm weights 0.01, biases 0), patch embedding at 0.2x lr; clustering head lr x0.5 and
weight decay 0.01; EMA momentum 1 - lr; drop path 0.2 in every block; random-resized crop
(0.6, 1) bicubic + flip; batch 16384 for 500k steps; bf16.

  python -m mim_jax.main --config=configs/capi.py --workdir=/tmp/capi_l14
  python -m mim_jax.main --config=configs/capi.py:variant=B/14 --workdir=/tmp/capi_b14
  python -m mim_jax.main --config=configs/capi.py:local --workdir=/tmp/capi_local    # CPU, Fashion-MNIST

Arguments: variant=S/14,B/14,L/14; rope=capi|axial; dataset=<TFDS name>; batch=<global batch>;
steps=<total steps>; local (dataset=, variant=, res=, batch=, steps= given with it win).
"""
from ml_collections.config_dict import placeholder

from configs import common
from mim_jax import config_defaults as defaults
from mim_jax.config_lib import given_args, parse_arg

# Paper Table 8: predictor depth, peak lr (the EMA momentum base is 1 - lr). Heads give head dim
# 64 (S and B heads are not stated; RoPE needs head_dim % 4 == 0).
SIZES = {"S": dict(num_heads=6, predictor_depth=6, lr=2e-3),
         "B": dict(num_heads=12, predictor_depth=6, lr=1e-3),
         "L": dict(num_heads=16, predictor_depth=12, lr=1e-3)}


def get_config(arg=None):
    given = given_args(arg)
    arg = parse_arg(arg, variant="L/14", rope="capi", dataset="imagenet2012", res=224, batch=16384,
                    steps=500_000, local=False)
    size_name = arg.variant.split("/")[0]
    if size_name not in SIZES:
        raise ValueError(f"configs/capi.py: variant={arg.variant!r}; use S/14, B/14 or L/14.")
    if arg.rope not in ("capi", "axial"):
        raise ValueError(f"configs/capi.py: rope={arg.rope!r}; use capi (official formula) or axial.")
    size = SIZES[size_name]
    c = defaults.base_config(dataset=arg.dataset, image_size=arg.res, batch_size=arg.batch)
    c.total_steps = arg.steps
    c.input.update(crop_scale=(0.6, 1.0), interpolation="bicubic")

    c.model = defaults.vit_config(arg.variant, num_heads=size["num_heads"], cls_token=False, num_registers=16,
                                  norm="rmsnorm", norm_eps=1e-5, final_norm_affine=False, use_bias=False,
                                  posemb="rope" if arg.rope == "capi" else "rope_axial", drop_path=0.2,
                                  drop_path_uniform=True, qkv_init="per_projection",   # official: separate q, k, v
                                  # official drop_path_type "efficient": each branch on 80% of the
                                  # device's batch (the predictor too, it reads the same setting)
                                  drop_path_form="subset")
    c.predictor = dict(depth=size["predictor_depth"], num_heads=placeholder(int), mlp_ratio=4.0,
                       drop_path=0.2)
    c.method = dict(
        name="capi", num_prototypes=16384, target_temp=0.06, student_temp=0.12, clustering_temp=0.12,
        sinkhorn_iterations=3, sinkhorn_chunk=32, prediction_subsampling=0.05, ema_lr_scale=1.0,
        mask=dict(type="inverse_block", ratio=0.65, num_masked=placeholder(int), aspect=(0.5, 2.0),
                  roll=True))

    c.optax.update(base_lr=size["lr"], lr_scale_batch=None, min_lr=0.0, b1=0.9, b2=0.95, weight_decay=0.1,
                   decay_rule="not_1d", clip_norm=0.0, warmup_epochs=None, warmup_percent=0.1,
                   cosine_truncation=0.8)
    c.optax.groups = dict(
        clustering=dict(lr_mult=0.5, weight_decay=0.01, decay_rule="all"),   # torch AdamW default wd
        patch_embed=dict(lr_mult=0.2),
        norms=dict(weight_decay=0.01, decay_rule="all"))
    c.optax.param_groups = (("clustering/.*", "clustering"), ("encoder/embedding/.*", "patch_embed"),
                            (".*norm.*/scale", "norms"))   # the norm weights (RMSNorm scales)

    if arg.local:
        common.local_preset(c, given)
        c.total_steps = arg.steps if "steps" in given else None
        c.input.crop_scale = (0.6, 1.0)
        if "variant" not in given:   # head dim 64
            c.model.update(num_heads=3)
        # the naive drop path, with which docs/evaluation.md's Fashion-MNIST rows were measured
        c.model.update(num_registers=4, drop_path=0.1, drop_path_form="naive")
        c.predictor.update(depth=2, drop_path=0.1)
        # 7x7 patches: 31 masked, 7 of them predicted; 1024 prototypes keep the CPU step short; the
        # teacher follows 10x faster (momentum 1 - 10 lr) so it moves within 2 epochs.
        c.method.update(num_prototypes=1024, prediction_subsampling=0.25, sinkhorn_chunk=49, ema_lr_scale=10.0)
        c.optax.update(base_lr=1e-3, warmup_epochs=None, warmup_percent=0.1)
    return c
