"""MAE (He et al. 2021): random 75% masking, encoder on visible patches only, a light decoder,
per-patch normalised pixel MSE on the masked patches. The baseline every other method builds on."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax import flops
from mim_jax.methods.base import Component
from mim_jax.methods.masked import MaskedEncoderMethod, dropout_key
from mim_jax.models.decoder import PixelDecoder
from mim_jax.models.layers import patchify, unpatchify


def patch_statistics(images, patch_size: int):
    """(patches [B, N, p*p*C], their means, their unbiased variances [B, N, 1]). The official code
    uses torch's unbiased variance (`target.var(dim=-1)`), kept here so losses are comparable to
    the paper's curves."""
    target = patchify(images.astype(jnp.float32), patch_size)
    return target, target.mean(-1, keepdims=True), target.var(-1, keepdims=True, ddof=1)


def normalized_pixel_targets(images, patch_size: int, normalize: bool):
    """Per-patch normalised pixels [B, N, p*p*C]."""
    if not normalize:
        return patchify(images.astype(jnp.float32), patch_size)
    target, mean, var = patch_statistics(images, patch_size)
    return (target - mean) / jnp.sqrt(var + 1e-6)


def masked_mse(pred, target, mask):
    """Mean over masked patches of the per-patch mean squared error. mask: [B, N] bool."""
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    mask = mask.astype(jnp.float32)
    return jnp.sum(per_patch * mask) / jnp.sum(mask)


class PixelReconstructions(Component):
    """`Method.reconstructions` of a pixel decoder: the eval-mode forward on one batch with the run's
    masks. A method whose encoder input or target is not the batch's image (Beyond Masking) overrides
    - `frames(batch, rng)`: (encoder input, normalised; the target image in the space the loss
      builds its targets in), for MAE and CMAE the normalised image twice;
    - `target_pixels(target)`: a target-space image -> [0, 1] pixels;
    - `denormalize(pred, target)`: predicted patches [B, N, p*p*C] -> target space."""

    def frames(self, batch, rng):
        return batch["image"], batch["image"]

    def input_pixels(self, inputs):
        """A normalised image -> [0, 1] pixels (with the data set's mean/std)."""
        inp = self.method.config.input
        return inputs * jnp.asarray(inp.std, jnp.float32) + jnp.asarray(inp.mean, jnp.float32)

    target_pixels = input_pixels

    def denormalize(self, pred, target):
        """With per-patch normalised targets (norm_pix_loss) each patch gets the mean and (unbiased,
        as the loss) variance of its own target patch back, as the official MAE visualisation does."""
        if not self.method.config.method.norm_pix_loss:
            return pred
        _, mean, var = patch_statistics(target, self.method.encoder.patch_size)
        return pred * jnp.sqrt(var + 1e-6) + mean

    def __call__(self, params, batch, rng):
        """`images`: the target; `masked`: the encoder input, masked patches grey; `reconstruction`:
        every patch predicted; `pasted`: the target's visible patches and the predicted masked ones."""
        p, c, n = self.method.encoder.patch_size, self.method.config.input.channels, self.method.num_patches
        masks, visible, masked = self.method.sample_masks(rng, batch)
        inputs, target = self.frames(batch, rng)
        tokens, _ = self.method.encoder.apply({"params": params["encoder"]}, inputs, visible)
        pred = self.method.decoder.apply({"params": params["decoder"]}, tokens, visible, masked)[:, -n:]
        pred = self.denormalize(pred.astype(jnp.float32), target)
        recon = self.target_pixels(unpatchify(pred, p, c))
        original = self.target_pixels(target.astype(jnp.float32))
        hidden = unpatchify(jnp.broadcast_to(masks[..., None], masks.shape + (p * p * c,)), p, c)
        return {"images": original, "masked": jnp.where(hidden, 0.5, self.input_pixels(inputs.astype(jnp.float32))),
                "reconstruction": recon, "pasted": jnp.where(hidden, recon, original), "mask": masks}


class MAE(MaskedEncoderMethod):
    weight_layout = "mae"
    released = dict(decoder=dict(width=512, depth=8, num_heads=16, mlp_dim=2048),
                    method=dict(name="mae", norm_pix_loss=True, mask=dict(type="random", ratio=0.75, num_masked=None)))

    def __init__(self, config, num_examples=None):
        super().__init__(config, num_examples)
        inp, dec = config.input, config.decoder
        p = self.encoder.patch_size
        self.decoder = PixelDecoder(
            grid=self.grid, out_dim=p * p * inp.channels, width=dec.width, depth=dec.depth,
            num_heads=dec.num_heads, mlp_dim=dec.mlp_dim, num_prefix_tokens=self.encoder.num_prefix_tokens,
            dtype=self.encoder.dtype, attention_impl=self.encoder.attention_impl, remat=self.encoder.remat,
            **{k: dec[k] for k in ("posemb", "embed_bias", "linear_init", "keep_prefix") if k in dec})
        self.reconstructions = PixelReconstructions(self)

    def init_params(self, rng, batch):
        enc_rng, dec_rng = jax.random.split(rng)
        images = batch["image"]
        _, visible, masked = self.sample_masks(rng, batch)
        enc_vars = self.encoder.init(enc_rng, images, visible)
        tokens, _ = self.encoder.apply(enc_vars, images, visible)
        dec_vars = self.decoder.init(dec_rng, tokens, visible, masked)
        return {"encoder": enc_vars["params"], "decoder": dec_vars["params"]}

    def reconstruct(self, params, images, visible, masked, rng, step):
        """Student encoder on the visible patches, then the decoder: predictions [B, N, p*p*C]."""
        tokens, _ = self.encode_visible(params, images, visible, rng, step)
        return self.decoder.apply({"params": params["decoder"]}, tokens, visible, masked, train=True,
                                  rngs={"dropout": dropout_key(rng, step, 1)})

    def loss(self, params, extras, frozen, batch, rng, step):
        images = batch["image"]
        masks, visible, masked = self.sample_masks(rng, batch)
        pred = self.reconstruct(params, images, visible, masked, rng, step)
        target = normalized_pixel_targets(images, self.encoder.patch_size, self.config.method.norm_pix_loss)
        loss = masked_mse(pred, target, masks)
        return loss, ({"mae_loss": loss}, extras)

    def decoder_flops(self) -> float:
        enc, dec = self.encoder, self.decoder
        patch_dim = enc.patch_size ** 2 * self.config.input.channels
        enc_tokens = self.num_visible + enc.num_prefix_tokens
        dec_tokens = self.num_patches + enc.num_prefix_tokens
        return (flops.dense(enc_tokens, enc.width, dec.width)
                + flops.transformer_forward(dec_tokens, dec.width, dec.depth, dec.mlp_dim)
                + flops.dense(self.num_patches, dec.width, patch_dim))

    def train_flops_per_example(self):
        return flops.TRAIN_MULTIPLIER * (self.encoder_flops(train=True) + self.decoder_flops())
