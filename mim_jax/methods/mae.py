"""MAE (He et al. 2021): random 75% masking, encoder on visible patches only, a light decoder,
per-patch normalised pixel MSE on the masked patches. The baseline every other method builds on."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax import flops, masking
from mim_jax.methods.base import Method
from mim_jax.models.decoder import PixelDecoder
from mim_jax.models.vit import patchify, vit_from_config


def normalized_pixel_targets(images, patch_size: int, normalize: bool):
    """Per-patch normalised pixels [B, N, p*p*C]. The official code uses torch's unbiased variance
    (`target.var(dim=-1)`), kept here so losses are comparable to the paper's curves."""
    target = patchify(images.astype(jnp.float32), patch_size)
    if not normalize:
        return target
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)
    return (target - mean) / jnp.sqrt(var + 1e-6)


def masked_mse(pred, target, mask):
    """Mean over masked patches of the per-patch mean squared error. mask: [B, N] bool."""
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class MAE(Method):

    def __init__(self, config):
        super().__init__(config)
        inp, dec = config.input, config.decoder
        self.encoder = vit_from_config(config.model)
        p = self.encoder.patch_size
        self.grid = (inp.image_size // p, inp.image_size // p)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_masked = masking.num_masked_from_config(config.method.mask, self.num_patches)
        self.num_visible = self.num_patches - self.num_masked
        self.sampler = masking.sampler_from_config(config.method.mask, self.grid)
        self.decoder = PixelDecoder(
            grid=self.grid, out_dim=p * p * inp.channels, width=dec.width, depth=dec.depth,
            num_heads=dec.num_heads, mlp_dim=dec.mlp_dim, num_prefix_tokens=self.encoder.num_prefix_tokens,
            dtype=self.encoder.dtype, attention_impl=self.encoder.attention_impl, remat=self.encoder.remat,
            **{k: dec[k] for k in ("posemb", "embed_bias", "linear_init") if k in dec})

    def _masks(self, rng, batch):
        masks = jax.vmap(self.sampler)(self.example_keys(rng, batch))
        visible, masked = jax.vmap(lambda m: masking.mask_indices(m, self.num_masked))(masks)
        return masks, visible, masked

    def init_params(self, rng, batch):
        enc_rng, dec_rng = jax.random.split(rng)
        images = batch["image"]
        _, visible, masked = self._masks(rng, batch)
        enc_vars = self.encoder.init(enc_rng, images, visible)
        tokens, _ = self.encoder.apply(enc_vars, images, visible)
        dec_vars = self.decoder.init(dec_rng, tokens, visible, masked)
        return {"encoder": enc_vars["params"], "decoder": dec_vars["params"]}

    def loss(self, params, extras, frozen, batch, rng, step):
        images = batch["image"]
        masks, visible, masked = self._masks(rng, batch)
        dropout = jax.random.fold_in(rng, step)
        tokens, _ = self.encoder.apply({"params": params["encoder"]}, images, visible, train=True,
                                       rngs={"dropout": dropout})
        pred = self.decoder.apply({"params": params["decoder"]}, tokens, visible, masked, train=True,
                                  rngs={"dropout": jax.random.fold_in(dropout, 1)})
        target = normalized_pixel_targets(images, self.encoder.patch_size, self.config.method.norm_pix_loss)
        loss = masked_mse(pred, target, masks)
        return loss, {"mae_loss": loss}

    def train_flops_per_example(self):
        enc, dec = self.encoder, self.decoder
        patch_dim = enc.patch_size ** 2 * self.config.input.channels
        enc_tokens = self.num_visible + enc.num_prefix_tokens
        dec_tokens = self.num_patches + enc.num_prefix_tokens
        forward = (flops.dense(self.num_visible, patch_dim, enc.width)
                   + flops.transformer_forward(enc_tokens, enc.width, enc.depth, enc.mlp_dim)
                   + flops.dense(enc_tokens, enc.width, dec.width)
                   + flops.transformer_forward(dec_tokens, dec.width, dec.depth, dec.mlp_dim)
                   + flops.dense(self.num_patches, dec.width, patch_dim))
        return flops.TRAIN_MULTIPLIER * forward

    def encode(self, params, images):
        _, out = self.encoder.apply({"params": params["encoder"]}, images)
        return out
