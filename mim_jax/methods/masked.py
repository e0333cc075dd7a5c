"""The base of the masked-encoder methods (MAE, Beyond Masking, CAE v2, CAPI, CMAE): a ViT student
that sees the visible patches of a mask sampled inside the step.

It owns what they share: the encoder built from `config.model`, the patch grid, the mask plan
(`config.method.mask`: counts and sampler), the per-example mask keys, the student's training
forward with its per-step drop-path key, the analytic FLOPs of that forward and the evaluation
features (the encoder on full images).
"""
from __future__ import annotations

import jax

from mim_jax import flops, masking
from mim_jax.methods.base import Method
from mim_jax.models.vit import vit_from_config


def dropout_key(rng: jax.Array, step: jax.Array, module: int = 0) -> jax.Array:
    """Drop-path key of one module of the student in this step: the encoder is module 0, the next
    module (decoder, regressor, predictor) 1, ... Keyed by the step only, so it does not depend on
    the mesh."""
    key = jax.random.fold_in(rng, step)
    return key if module == 0 else jax.random.fold_in(key, module)


class MaskedEncoderMethod(Method):

    def __init__(self, config, num_examples=None):
        super().__init__(config, num_examples)
        self.encoder = vit_from_config(config.model)
        p = self.encoder.patch_size
        self.grid = (config.input.image_size // p, config.input.image_size // p)
        self.mask_plan = masking.MaskPlan.from_config(config.method.mask, self.grid)

    @property
    def sampler(self) -> masking.Sampler:
        return self.mask_plan.sampler

    @property
    def num_patches(self) -> int:
        return self.mask_plan.num_patches

    @property
    def num_masked(self) -> int:
        return self.mask_plan.num_masked

    @property
    def num_visible(self) -> int:
        return self.mask_plan.num_visible

    def sample_masks(self, rng, batch):
        """(masks [B, N], visible_idx [B, N-K], masked_idx [B, K]) of this batch, one per example
        from its global stream index."""
        return self.mask_plan.sample(self.example_keys(rng, batch))

    def encode_visible(self, params, images, visible_idx, rng, step):
        """The student encoder's training forward on the visible patches: (tokens, out)."""
        return self.encoder.apply({"params": params["encoder"]}, images, visible_idx, train=True,
                                  rngs={"dropout": dropout_key(rng, step)})

    def encoder_flops(self, num_patches: int | None = None, *, train: bool = False) -> float:
        """Forward FLOPs per example of the encoder on `num_patches` patches (default: the visible
        ones); `train`: as the training forward runs it (the subset drop path skips examples)."""
        n = self.num_visible if num_patches is None else num_patches
        return flops.vit_forward(self.encoder, n, self.config.input.channels,
                                 block_fraction=self.branch_fraction(self.encoder.drop_path) if train else 1.0)

    def branch_fraction(self, rate: float) -> float:
        """The share of examples a residual branch runs on in training: 1 - rate for the subset
        drop path (rounding of int((1 - rate) * b) aside), 1 for the naive form."""
        return 1.0 - rate if self.encoder.drop_path_form == "subset" else 1.0

    def encode(self, params, images):
        _, out = self.encoder.apply({"params": params["encoder"]}, images)
        return out
