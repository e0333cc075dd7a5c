"""Supervised fine-tuning of a pre-trained encoder (MAE/BEiT recipe): global-average-pooled tokens
-> LayerNorm (fc_norm) -> linear head; layer-wise lr decay, drop path, label smoothing, optional
mixup/cutmix, RandAugment and random erasing. It is a method like any other: the generic trainer runs it.

The encoder is warm-started from a pre-training workdir: the trainer loads `config.init`'s encoder
into the params when it creates the state (`config.init_keys`). Its architecture and input data
come from that run's config (or weight file), read when the run starts (`Finetune.resolve_config`).
"""
from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mim_jax import flops, pretrained
from mim_jax.data import catalog
from mim_jax.methods.base import Method
from mim_jax.methods.finetune.augment import FinetuneTransform
from mim_jax.models.layers import param_init, trunc_normal
from mim_jax.models.vit import decode_variant, vit_from_config

LAYER_DECAY = {"Ti": 0.75, "S": 0.75, "B": 0.65, "L": 0.75, "H": 0.75}  # MAE/BEiT choices by size


def from_pretraining(config, pre) -> None:
    """Fills the unset fields of a fine-tuning config from `pre`, the config of the encoder's
    pre-training (or of a weight file, or the `pretrain=` config of a random init): its
    architecture, input size, channels and normalisation (which released weights expect), and its
    data unless `config.input.dataset` names another."""
    inp = config.input
    if inp.dataset is None:
        inp.dataset = pre.input.dataset
        if inp.data_dir is None:
            inp.data_dir = pre.input.data_dir
    for key in ("image_size", "channels"):
        if inp[key] is None:
            inp[key] = pre.input[key]
    for key in ("mean", "std"):
        if inp[key] is None:
            inp[key] = tuple(pre.input[key])
    for key, value in pre.model.items():   # the recipe's own ViT options too (CAPI's norm_eps, ...)
        if key not in config.model or config.model[key] is None:
            config.model[key] = value


def _layer_decay_groups(depth: int, decay: float) -> tuple[dict, tuple]:
    """(config.optax.groups, config.optax.param_groups) of layer-wise lr decay (BEiT/MAE
    `param_groups_lrd`): patch embedding and tokens are layer 0, block i is layer i + 1, the final
    norm and the head layer depth + 1."""
    groups = {f"layer_{i}": dict(lr_mult=decay ** (depth + 1 - i)) for i in range(depth + 2)}
    param_groups = ((r"head/.*|encoder/encoder_norm/.*", f"layer_{depth + 1}"),
                    *((rf"encoder/encoder/block_{i}/.*", f"layer_{i + 1}") for i in range(depth)),
                    (".*", "layer_0"))
    return groups, param_groups


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

    @classmethod
    def resolve_config(cls, config):
        """Architecture and data from `config.init`'s config, then what follows from them where
        unset: the split, the number of classes and the layer-decay groups (from the depth)."""
        config = copy.deepcopy(config)
        with config.unlocked():
            if config.init:
                from_pretraining(config, pretrained.read_config(config.init))
            inp, model, opt = config.input, config.model, config.optax
            if model.scan:
                raise ValueError("Layer-wise lr decay selects blocks by name: fine-tune with model.scan=False "
                                 "(a scanned run's params convert with models.layers.unstack_blocks).")
            if inp.split is None:
                inp.split = catalog.DATASETS.get(inp.dataset, ("train",))[0]
            if config.method.num_classes is None:
                config.method.num_classes = catalog.NUM_CLASSES.get(inp.dataset, 1000)
            if opt.layer_decay is None:
                opt.layer_decay = LAYER_DECAY.get(model.variant.split("/")[0], 0.75)
            if not opt.groups and not opt.param_groups:
                depth = model.depth or decode_variant(model.variant)["depth"]
                opt.groups, opt.param_groups = _layer_decay_groups(depth, opt.layer_decay)
        return config

    def __init__(self, config, num_examples=None):
        super().__init__(config, num_examples)
        self.encoder = vit_from_config(config.model)
        self.head = ClassifierHead(config.method.num_classes)

    def train_transform(self, host_state=None):
        inp, cfg = self.config.input, self.config.method
        return FinetuneTransform(
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
        return loss, ({"ce_loss": loss, "train_accuracy": accuracy}, extras)

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
