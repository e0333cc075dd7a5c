"""Beyond Masking (Tian et al., "Beyond Masking: Demystifying Token-Based Pre-Training for Vision
Transformers", arXiv 2203.14313), following the official code (sunsmarterjie/beyond_masking;
docs/methods/beyond_masking.md).

MAE's encoder/decoder, fed a degraded image and asked for the pixels of the undegraded one,
normalised per patch AND per channel. The paper's best practice, and the default here, is masking
plus spatial misalignment ("zoomed-in", the `zoomed-in/` folder with mask ratio 0.75):

    view  = random-resized crop at V = S * 288/224, flipped           (host pipeline)
    input = the centre S x S of the view; 75% of its patches masked  (in the jitted step)
    prediction = the whole view resampled to S x S: token j predicts cell j of the WIDER frame
    loss  = 0.8 * masked-token MSE inside the centre + 0.2 * MSE on the out-of-view ring

The five degradations of the paper are options (`method.degradation`): zoom_in, zoom_out,
distort, blur, decolorize ("none" = masking alone with this architecture). Per the author
(issue #1) the single degradations were run without masking, so the config sets the mask ratio
to 0 for them; masks combine with any of them.

All degradations run on device, inside the step: shapes are static and randomness comes from the
run key, per example (`example_keys`) or, where the official code draws once per batch (the
zoom-out offset, the de-colourisation mix), per step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mim_jax.methods.beyond_masking import degradations
from mim_jax.methods.mae.method import MAE, PixelReconstructions, masked_mse
from mim_jax.models.layers import patchify, unpatchify

DEGRADATIONS = ("none", "zoom_in", "zoom_out", "distort", "blur", "decolorize")


def ring_mse(pred, target, border: int):
    """The zoom-in edge loss: the sum of the mean squared errors of the four strips outside the
    centre crop (top and bottom full width, left and right between them), as the official code
    adds four `MSELoss`es. pred/target [B, V, V, C]."""
    b = border
    strips = (lambda x: x[:, :b], lambda x: x[:, -b:], lambda x: x[:, b:-b, :b], lambda x: x[:, b:-b, -b:])
    return sum(jnp.mean(jnp.square(s(pred) - s(target))) for s in strips)


class DegradedReconstructions(PixelReconstructions):
    """MAE's reconstructions of a degraded input, against the undegraded view on the token grid."""

    def frames(self, batch, rng):
        """(degraded input; the target in [0, 1] pixels: the view at the input's resolution, for
        zoom-in/out the wider/narrower view the tokens predict, else the undegraded image)."""
        method, view = self.method, batch["image"]
        inputs, _ = method.degrade(view, batch, rng, 0)    # step 0's per-batch draws, at every evaluation
        pixels = view * method.std + method.mean
        size = method.config.input.image_size
        return inputs, (pixels if pixels.shape[1] == size else degradations.area_resize(pixels, size))

    def target_pixels(self, target):
        return target

    def denormalize(self, pred, target):
        """Each patch AND channel gets its target's mean and (unbiased std + 1e-6) back, the
        inverse of `degradations.patch_channel_normalize`."""
        t, mean, std = degradations.patch_channel_statistics(target, self.method.encoder.patch_size)
        return (pred.reshape(t.shape) * (std + 1e-6) + mean).reshape(pred.shape)


class BeyondMasking(MAE):
    weight_layout = "beyond_masking"
    # Without a degradation: an evaluation needs none, and any resolution fits it.
    released = dict(
        model=dict(init_style="torch", linear_init="trunc_normal"),
        decoder=dict(width=384, depth=4, num_heads=6, mlp_dim=1536, posemb="sincos1d", embed_bias=False,
                     linear_init="trunc_normal"),
        method=dict(name="beyond_masking", degradation="none", norm_pix_loss=True,
                    mask=dict(type="random", ratio=0.75, num_masked=None), zoom_in_view=288 / 224,
                    centre_weight=0.8, edge_weight=0.2, zoom_out_view=160 / 224, distort_magnitude=(0.15, 0.25),
                    blur_kernel=7, blur_std=0.02, decolorize_max=0.667))

    def __init__(self, config, num_examples=None):
        super().__init__(config, num_examples)
        cfg, size = config.method, config.input.image_size
        self.degradation = cfg.degradation
        if self.degradation not in DEGRADATIONS:
            raise ValueError(f"Unknown method.degradation {self.degradation!r}: use one of {DEGRADATIONS}.")
        self.channels = config.input.channels
        self.mean = jnp.asarray(config.input.mean, jnp.float32)
        self.std = jnp.asarray(config.input.std, jnp.float32)
        self.reconstructions = DegradedReconstructions(self)
        self.view_size = size
        if self.degradation == "zoom_in":
            self.view_size = int(round(size * cfg.zoom_in_view))
            if (self.view_size - size) % 2 or self.view_size <= size:
                raise ValueError(f"method.zoom_in_view={cfg.zoom_in_view} gives a {self.view_size}-pixel view "
                                 f"around a {size}-pixel input: the ring must be a positive whole number of "
                                 "pixels on each side (288/224 at 224; 36/28 at 28).")
        elif self.degradation == "zoom_out":
            self.view_size = int(round(size * cfg.zoom_out_view))
            if not size / 2 <= self.view_size < size:
                raise ValueError(f"method.zoom_out_view={cfg.zoom_out_view} must give a view between half the "
                                 f"input and the input ({size}), got {self.view_size} (160/224 at 224).")

    # -- host side: the pipeline delivers the view the degradation starts from -------------------
    def batch_spec(self, global_batch_size: int) -> dict:
        spec = super().batch_spec(global_batch_size)
        v = self.view_size
        spec["image"] = jax.ShapeDtypeStruct((global_batch_size, v, v, self.channels), jnp.float32)
        return spec

    # -- step ------------------------------------------------------------------------------------
    @staticmethod
    def batch_key(rng, step):
        """The key of choices the official code draws once per batch."""
        return jax.random.fold_in(jax.random.fold_in(rng, step), 7)

    def zoom_out_offset(self, key):
        """(top, left) of the zoomed-out view on the canvas, each uniform in [0, S - view)."""
        return jax.random.randint(key, (2,), 0, self.config.input.image_size - self.view_size)

    def degrade(self, view, batch, rng, step):
        """view [B, V, V, C] (normalised) -> (encoder input [B, S, S, C], loss function of
        (pred [B, N, p*p*C], per-token weights [B, N]) -> (loss, metrics))."""
        cfg, p, size = self.config.method, self.encoder.patch_size, self.config.input.image_size
        pixels = view * self.std + self.mean           # the targets are built from [0, 1] pixels
        per_batch = self.batch_key(rng, step)
        per_example = self.example_keys(rng, batch, purpose=2)

        def token_loss(target):
            def loss(pred, weights):
                value = masked_mse(pred, target, weights)
                return value, {"pixel_loss": value}
            return loss

        if self.degradation == "zoom_in":
            b = (self.view_size - size) // 2
            inputs = view[:, b:b + size, b:b + size]
            centre_target = degradations.patch_channel_normalize(pixels[:, b:b + size, b:b + size], p)
            # The whole view at the input's resolution, normalised on that grid, back at the view's.
            full_target = degradations.area_resize(unpatchify(
                degradations.patch_channel_normalize(degradations.area_resize(pixels, size), p), p, self.channels),
                self.view_size)

            def zoom_in_loss(pred, weights):
                pred_view = degradations.area_resize(unpatchify(pred, p, self.channels), self.view_size)
                centre = masked_mse(patchify(pred_view[:, b:b + size, b:b + size], p), centre_target, weights)
                edge = ring_mse(pred_view, full_target, b)
                return (cfg.centre_weight * centre + cfg.edge_weight * edge,
                        {"centre_loss": centre, "edge_loss": edge})
            return inputs, zoom_in_loss

        if self.degradation == "zoom_out":
            # The view sits at a random offset of a mirror-padded canvas; the prediction (the view
            # enlarged to the canvas) and the target are mapped back to that canvas for the loss.
            top, left = self.zoom_out_offset(per_batch)
            place = lambda x: degradations.symmetric_place(x, size, top, left)   # noqa: E731
            to_input_frame = lambda x: patchify(place(degradations.area_resize(x, self.view_size)), p)  # noqa: E731
            target = to_input_frame(unpatchify(
                degradations.patch_channel_normalize(degradations.area_resize(pixels, size), p), p, self.channels))

            def zoom_out_loss(pred, weights):
                value = masked_mse(to_input_frame(unpatchify(pred, p, self.channels)), target, weights)
                return value, {"pixel_loss": value}
            return place(view), zoom_out_loss

        target = token_loss(degradations.patch_channel_normalize(pixels, p))
        if self.degradation == "distort":
            k_center, k_mag = jax.vmap(lambda k: jax.random.split(k), out_axes=1)(per_example)
            centers = jax.vmap(lambda k: jax.random.uniform(k, (2,), minval=-1.0, maxval=1.0))(k_center)
            mags = jax.vmap(lambda k: jax.random.uniform(k, (), minval=cfg.distort_magnitude[0],
                                                          maxval=cfg.distort_magnitude[1]))(k_mag)
            grids = jax.vmap(lambda c, m: degradations.fisheye_grid(size, c, m))(centers, mags)
            return jax.vmap(degradations.grid_sample)(view, grids), target
        if self.degradation == "blur":
            # docs/methods/beyond_masking.md §3: the released line is a broken 1x1 3->7 conv; its
            # evident intent is a 7x7 kernel with weights ~ N(1/49, 0.02), redrawn per image, mixing
            # channels.
            k = cfg.blur_kernel
            kernels = jax.vmap(lambda key: 1.0 / k ** 2 + cfg.blur_std * jax.random.normal(
                key, (k, k, self.channels, self.channels)))(per_example)
            return jax.vmap(degradations.conv_same)(view, kernels), target
        if self.degradation == "decolorize":
            # One random mix a*R + b*G + c*B per batch (a, b, c ~ U(0, 0.667)) of the normalised
            # image. The official encoder takes it as 1 channel; it is repeated over the channels
            # here, so the encoder stays the colour one (a 1-channel embedding = the kernel summed).
            weights = jax.random.uniform(per_batch, (self.channels,), maxval=cfg.decolorize_max)
            gray = jnp.sum(view * weights, axis=-1, keepdims=True)
            return jnp.broadcast_to(gray, view.shape), target
        return view, target

    def loss(self, params, extras, frozen, batch, rng, step):
        masks, visible, masked = self.sample_masks(rng, batch)
        inputs, loss_fn = self.degrade(batch["image"], batch, rng, step)
        pred = self.reconstruct(params, inputs, visible, masked, rng, step)
        # Masked tokens when masking; every token for the unmasked single degradations.
        weights = masks if self.num_masked else jnp.ones_like(masks)
        loss, metrics = loss_fn(pred, weights)
        return loss, (metrics, extras)

    def init_params(self, rng, batch):
        # Parameter shapes depend only on the encoder's input size, not on the view's.
        size, b = self.config.input.image_size, batch["image"].shape[0]
        return super().init_params(rng, dict(batch, image=jnp.zeros((b, size, size, self.channels))))

    def encode(self, params, images):
        out = super().encode(params, images)
        # No [CLS] in pre-training: the global feature is the mean patch token.
        out.setdefault("cls", out["patch_mean"])
        return out
