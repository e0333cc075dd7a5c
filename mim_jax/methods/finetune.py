"""Supervised fine-tuning of a pre-trained encoder (MAE/BEiT recipe): global-average-pooled tokens
-> LayerNorm (fc_norm) -> linear head; layer-wise lr decay, drop path, label smoothing, optional
mixup/cutmix, RandAugment and random erasing. It is a method like any other: the generic trainer runs it.

The encoder is warm-started from a pre-training workdir: the trainer loads `config.init`'s encoder
into the params when it creates the state (`config.init_keys`).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mim_jax import flops
from mim_jax.data import pipeline
from mim_jax.methods.base import Method
from mim_jax.models.layers import param_init, trunc_normal
from mim_jax.models.vit import vit_from_config


class ClassifierHead(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, pooled):
        x = nn.LayerNorm(epsilon=1e-6, name="fc_norm", scale_init=param_init(nn.initializers.ones, ("norm",)),
                         bias_init=param_init(nn.initializers.zeros, ("norm",)))(pooled.astype(jnp.float32))
        # MAE initialises the head with trunc_normal_(std=2e-5) (bounds +-2 absolute, so in effect
        # an untruncated normal) so fine-tuning starts near uniform.
        return nn.Dense(self.num_classes, name="head",
                        kernel_init=param_init(trunc_normal(2e-5), ("embed", None)),
                        bias_init=param_init(nn.initializers.zeros, (None,)))(x)


def mix_batch(key, images, labels, num_classes, *, mixup_alpha, cutmix_alpha, switch_prob=0.5, smoothing=0.1):
    """timm-style batch mixing: pair each example with the reversed batch; one lambda per batch.
    Returns mixed images and soft targets (label smoothing included)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
    if not (mixup_alpha or cutmix_alpha):
        return images, targets
    k_switch, k_mix, k_cut, k_box = jax.random.split(key, 4)
    use_cutmix = (jax.random.uniform(k_switch) < switch_prob) if (mixup_alpha and cutmix_alpha) else bool(cutmix_alpha)
    lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha else 1.0
    lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha else 1.0
    _, h, w, _ = images.shape
    cut_h, cut_w = (h * jnp.sqrt(1 - lam_cut)).astype(jnp.int32), (w * jnp.sqrt(1 - lam_cut)).astype(jnp.int32)
    ky, kx = jax.random.split(k_box)
    cy, cx = jax.random.randint(ky, (), 0, h), jax.random.randint(kx, (), 0, w)
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    box = ((rows >= cy - cut_h // 2) & (rows < cy + cut_h - cut_h // 2)
           & (cols >= cx - cut_w // 2) & (cols < cx + cut_w - cut_w // 2))
    lam_box = 1.0 - box.mean()          # the area actually pasted (box clipped at the border)
    flipped = images[::-1]
    cut = jnp.where(box[None, :, :, None], flipped, images)
    mixed = lam_mix * images + (1 - lam_mix) * flipped
    lam = jnp.where(use_cutmix, lam_box, lam_mix)
    return jnp.where(use_cutmix, cut, mixed), lam * targets + (1 - lam) * targets[::-1]


class Finetune(Method):

    def __init__(self, config, num_examples=None):
        super().__init__(config, num_examples)
        self.encoder = vit_from_config(config.model)
        self.head = ClassifierHead(config.method.num_classes)

    def train_transform(self, host_state=None):
        inp, cfg = self.config.input, self.config.method
        return pipeline.FinetuneTransform(
            image_size=inp.image_size, crop_scale=tuple(inp.crop_scale), crop_ratio=tuple(inp.crop_ratio),
            flip=inp.flip, mean=tuple(inp.mean), std=tuple(inp.std), rand_augment=tuple(cfg.rand_augment) or None,
            erase_prob=cfg.erase_prob)

    def init_params(self, rng, batch):
        k_enc, k_head = jax.random.split(rng)
        encoder = self.encoder.init(k_enc, batch["image"])["params"]
        _, out = self.encoder.apply({"params": nn.unbox(encoder)}, batch["image"])
        return {"encoder": encoder, "head": self.head.init(k_head, out["patch_mean"])["params"]}

    # -- step --------------------------------------------------------------------------------------
    def loss(self, params, extras, frozen, batch, rng, step):
        cfg = self.config.method
        key = jax.random.fold_in(rng, step)
        images, targets = mix_batch(jax.random.fold_in(key, 1), batch["image"], batch["label"], cfg.num_classes,
                                    mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, smoothing=cfg.label_smoothing)
        _, out = self.encoder.apply({"params": params["encoder"]}, images, train=True, rngs={"dropout": key})
        logits = self.head.apply({"params": params["head"]}, out["patch_mean"])
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
        return loss, {"ce_loss": loss, "train_accuracy": accuracy}

    def train_flops_per_example(self):
        enc = self.encoder
        patches = (self.config.input.image_size // enc.patch_size) ** 2
        forward = (flops.vit_forward(enc, patches, self.config.input.channels)
                   + flops.dense(1, enc.width, self.config.method.num_classes))
        return flops.TRAIN_MULTIPLIER * forward

    def encode(self, params, images):
        _, out = self.encoder.apply({"params": params["encoder"]}, images)
        out["logits"] = self.head.apply({"params": params["head"]}, out["patch_mean"])
        return out
