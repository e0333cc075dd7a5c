"""CAE v2 (Zhang et al., arXiv 2211.09799; TMLR 2023 "Context Autoencoder with CLIP Latent
Alignment"), following the official code (Atten4Vis/CAE, `--model_type caev2`; docs/methods/cae_v2.md).

Student: a BEiT-style ViT (q/v biases, LayerScale, fixed row-first sin-cos positions) sees [CLS]
and the visible patches of a block-wise mask with an exact, size-dependent count. A latent
regressor (cross-attention only) predicts the masked latents from the visible ones. One shared
LayerNorm + Linear maps [CLS], visible and predicted latents to the teacher space, where each
token is L2-normalised and aligned with the frozen teacher's token at the same position (CLIP
ViT-B/16 after ln_post and proj, 512-d) by a cosine loss, equally weighted over all 1 + N tokens.
"""
from __future__ import annotations

import copy

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import flops
from mim_jax.methods.base import Component
from mim_jax.methods.cae_v2 import teachers
from mim_jax.methods.cae_v2.regressor import LatentRegressor
from mim_jax.methods.masked import MaskedEncoderMethod, dropout_key
from mim_jax.models.layers import Dtype, l2_normalize, make_norm, param_init, sincos_2d

SUPERVISE = ("all", "visible", "masked")


def arrange_targets(target, visible_idx, masked_idx, has_cls: bool):
    """Teacher tokens [B, (1+)N, D] -> the prediction order [cls, visible..., masked...]."""
    patches = target[:, 1:] if has_cls else target
    take = lambda idx: jnp.take_along_axis(patches, idx[..., None], axis=1)  # noqa: E731
    parts = ([target[:, :1]] if has_cls else []) + [take(visible_idx), take(masked_idx)]
    return jnp.concatenate(parts, axis=1)


def alignment_loss(pred, target, weights):
    """Weighted mean over tokens of 1 - cos(pred, target); pred/target [B, T, D], weights [T]."""
    cos = jnp.sum(l2_normalize(pred.astype(jnp.float32)) * l2_normalize(target.astype(jnp.float32)), axis=-1)
    return jnp.sum((1.0 - cos) * weights) / (jnp.sum(weights) * cos.shape[0]), cos


class LatentPredictor(nn.Module):
    """Encoder tokens -> L2-normalised teacher-space predictions [B, 1+N, out_dim], ordered
    [cls, visible (ascending), masked (ascending)]."""
    grid: tuple[int, int]
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    out_dim: int
    layerscale: float = 0.1
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, encoded, visible_idx, masked_idx, *, train: bool = False):
        x = encoded
        if x.shape[-1] != self.width:  # Tiny: 192 -> 96, with a LayerNorm (borrowed from MAE)
            x = nn.Dense(self.width, dtype=self.dtype, name="encoder_to_regressor",
                         kernel_init=param_init(nn.initializers.xavier_uniform(), ("embed", "dec_embed")),
                         bias_init=param_init(nn.initializers.zeros, ("dec_embed",)))(x)
            x = make_norm("layernorm", self.dtype, "encoder_to_regressor_norm")(x)
        cls, visible = x[:, :1], x[:, 1:]
        pos = jnp.broadcast_to(jnp.asarray(sincos_2d(*self.grid, self.width, row_first=True))[None],
                               (x.shape[0], self.grid[0] * self.grid[1], self.width))
        take = lambda idx: jnp.take_along_axis(pos, idx[..., None], axis=1)  # noqa: E731
        predicted = LatentRegressor(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                                    layerscale=self.layerscale, drop_path=self.drop_path, dtype=self.dtype,
                                    attention_impl=self.attention_impl, name="regressor")(
            visible, take(visible_idx), take(masked_idx), train=train)
        # One LayerNorm and Linear shared by every token (the official "decoder" of depth 0).
        tokens = make_norm("layernorm", self.dtype, "head_norm")(jnp.concatenate([cls, visible, predicted], axis=1))
        out = nn.Dense(self.out_dim, dtype=self.dtype, name="head",
                       kernel_init=param_init(nn.initializers.xavier_uniform(), ("dec_embed", None)),
                       bias_init=param_init(nn.initializers.zeros, (None,)))(tokens)
        return l2_normalize(out.astype(jnp.float32))


class FrozenTeacher(Component):
    """`Method.frozen`: the teacher's weights, as `frozen["teacher"]`."""

    def template(self, rng, batch):
        return {"teacher": self.method.teacher.init(rng, batch["image"])}

    def load(self, abstract, shardings):
        return {"teacher": self.method.teacher.load(abstract["teacher"], shardings["teacher"])}


class CAEv2(MaskedEncoderMethod):
    weight_layout = "cae_v2"

    def __init__(self, config, num_examples=None):
        super().__init__(config, num_examples)
        inp, cfg, reg = config.input, config.method, config.regressor
        if not self.encoder.cls_token:
            raise ValueError("CAE v2 aligns the [CLS] token: config.model.cls_token must be True.")
        if cfg.supervise not in SUPERVISE:
            raise ValueError(f"config.method.supervise={cfg.supervise!r}: use one of {SUPERVISE}.")
        self.teacher = teachers.from_config(config.teacher, grid=self.grid, student_mean=tuple(inp.mean),
                                            student_std=tuple(inp.std))
        self.frozen = FrozenTeacher(self)
        width = reg.width or self.encoder.width
        self.predictor_kwargs = dict(grid=self.grid, width=width, depth=reg.depth, num_heads=reg.num_heads,
                                     mlp_dim=int(reg.mlp_ratio * width), layerscale=reg.layerscale,
                                     drop_path=reg.drop_path, dtype=self.encoder.dtype,
                                     attention_impl=self.encoder.attention_impl)

    @classmethod
    def resolve_config(cls, config):
        if config.teacher.dim is not None:    # given on the command line, or resolved already
            return config
        config = copy.deepcopy(config)
        config.teacher.dim = teachers.output_dim(config.teacher.source)
        return config

    @property
    def predictor(self) -> LatentPredictor:
        # Built on use: its output width is the teacher's, which may need the teacher's config.
        return LatentPredictor(**self.predictor_kwargs, out_dim=self.teacher.out_dim)

    def token_weights(self) -> jax.Array:
        """Loss weight of each position in [cls, visible..., masked...]: the official recipe weighs
        all 1 + N tokens equally; 'visible'/'masked' are the arXiv v1 ablations."""
        w_vis = 1.0 if self.config.method.supervise in ("all", "visible") else 0.0
        w_mask = 1.0 if self.config.method.supervise in ("all", "masked") else 0.0
        w_cls = w_vis if self.teacher.has_cls else 0.0
        return jnp.asarray([w_cls] + [w_vis] * self.num_visible + [w_mask] * self.num_masked, jnp.float32)

    # -- state -----------------------------------------------------------------------------------
    def init_params(self, rng, batch):
        k_enc, k_pred = jax.random.split(rng)
        _, visible, masked = self.sample_masks(rng, batch)
        encoder = self.encoder.init(k_enc, batch["image"], visible)["params"]
        tokens, _ = self.encoder.apply({"params": nn.unbox(encoder)}, batch["image"], visible)
        predictor = self.predictor.init(k_pred, tokens, visible, masked)["params"]
        return {"encoder": encoder, "predictor": predictor}

    # -- step ------------------------------------------------------------------------------------
    def loss(self, params, extras, frozen, batch, rng, step):
        images = batch["image"]
        _, visible, masked = self.sample_masks(rng, batch)
        tokens, _ = self.encode_visible(params, images, visible, rng, step)
        pred = self.predictor.apply({"params": params["predictor"]}, tokens, visible, masked, train=True,
                                    rngs={"dropout": dropout_key(rng, step, 1)})
        target = jax.lax.stop_gradient(self.teacher(frozen["teacher"], images))
        target = arrange_targets(target, visible, masked, self.teacher.has_cls)
        if not self.teacher.has_cls:   # a teacher without [CLS] (e.g. CAPI-style): patches only
            pred = pred[:, 1:]
        weights = self.token_weights()[-pred.shape[1]:]
        loss, cos = alignment_loss(pred, target, weights)
        metrics = {"align_loss": loss, "cos_visible": cos[:, -self.num_patches:-self.num_masked].mean(),
                   "cos_masked": cos[:, -self.num_masked:].mean()}
        if self.teacher.has_cls:
            metrics["cos_cls"] = cos[:, 0].mean()
        return self.config.method.loss_weight * loss, (metrics, extras)

    # -- accounting and features -------------------------------------------------------------------
    def train_flops_per_example(self):
        enc, kw = self.encoder, self.predictor_kwargs
        d_r, k, n_v = kw["width"], self.num_masked, self.num_visible
        encoder = self.encoder_flops(train=True)
        project = flops.dense(n_v + 1, enc.width, d_r) if d_r != enc.width else 0.0
        # Per regressor block: q/out projections on K queries, k/v on Nv+K tokens, attention
        # K x (Nv+K), MLP on K queries.
        regressor = kw["depth"] * (flops.dense(k, d_r, d_r) * 2 + flops.dense(n_v + k, d_r, d_r) * 2
                                   + 4.0 * k * (n_v + k) * d_r + 2 * flops.dense(k, d_r, kw["mlp_dim"]))
        head = flops.dense(self.num_patches + 1, d_r, self.teacher.out_dim)
        # The teacher runs forward only.
        return flops.TRAIN_MULTIPLIER * (encoder + project + regressor + head) + self.teacher.forward_flops()
