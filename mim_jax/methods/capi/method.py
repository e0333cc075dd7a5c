"""CAPI (Darcet et al., "Cluster and Predict Latent Patches for Improved Masked Image Modeling",
arXiv 2502.08769), following the official code (facebookresearch/capi; docs/methods/capi.md).

One step (`train_capi.py`):
1. teacher = EMA of the student encoder, on the whole image (no drop path); its patch tokens
   (registers dropped) are L2-normalised and scored by the clustering head (K prototypes);
2. positionwise Sinkhorn-Knopp over the global batch turns the scores into targets Q; the
   clustering head learns from -sum Q log softmax(scores / 0.12) over all tokens (its own loss,
   its own AdamW group: lr x0.5, weight decay 0.01);
3. the student encoder sees one visible block (inverse block masking + roll), the
   cross-attention predictor queries ~5% of the masked positions, the weight-normalised head
   predicts Q there: L = -sum Q log softmax(logits / 0.12);
4. after the optimizer step, EMA with momentum 1 - lr(t) over the encoder, predictor and head
   (not the clustering head).
The two losses touch disjoint parameters (teacher tokens and Q are stop-gradient), so one
backward pass of their sum gives both gradients.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax import flops
from mim_jax.methods.base import Component
from mim_jax.methods.capi import sinkhorn
from mim_jax.methods.capi.heads import ClusteringHead, Predictor, WeightNormHead, predictor_pooling
from mim_jax.methods.masked import MaskedEncoderMethod, dropout_key
from mim_jax.models.rope import grid_coords

STUDENT = ("encoder", "predictor", "head")     # what the EMA teacher tracks


def ema_momentum(lr, scale: float = 1.0):
    """CAPI's teacher momentum is exactly 1 - lr(t) (paper Table 6; `scale` > 1 speeds the teacher
    up for short runs such as the `local` preset)."""
    return 1.0 - scale * lr


def predict_subset(key, mask: jax.Array, num_predict: int) -> jax.Array:
    """CAPI prediction subsampling: `num_predict` distinct masked positions, a uniformly random
    subset (in random order), int32 [num_predict]. Needs num_predict <= the mask's count."""
    # Masked cells get a random score in [0, 1), visible ones -1: the top scores are a uniformly
    # random subset of the masked cells.
    scores = jnp.where(mask, jax.random.uniform(key, mask.shape), -1.0)
    return jax.lax.top_k(scores, num_predict)[1].astype(jnp.int32)


class TeacherEMA(Component):
    """`Method.ema`: the teacher of step 4 above; a finished run is evaluated with it."""

    def update(self, extras, params, lr):
        m = ema_momentum(lr, self.method.config.method.ema_lr_scale)
        return {"ema": jax.tree.map(lambda t, s: m * t + (1 - m) * s, extras["ema"], {k: params[k] for k in STUDENT})}

    def weights(self, params, extras):
        return dict(params, **extras["ema"])


class CAPI(MaskedEncoderMethod):
    weight_layout = "capi"
    released = dict(
        model=dict(drop_path=0.2, drop_path_uniform=True, qkv_init="per_projection", drop_path_form="subset"),
        predictor=dict(drop_path=0.2),
        method=dict(name="capi", num_prototypes=16384, target_temp=0.06, student_temp=0.12, clustering_temp=0.12,
                    sinkhorn_iterations=3, sinkhorn_chunk=32, prediction_subsampling=0.05, ema_lr_scale=1.0,
                    mask=dict(type="inverse_block", ratio=0.65, num_masked=None, aspect=(0.5, 2.0), roll=True)))
    inexact_accumulation = ("CAPI's Sinkhorn-Knopp normalises the teacher's cluster assignments over the batch "
                             "(each prototype gets an equal share of it); with grad_accum_steps={k} each "
                             "normalisation would see 1/{k} of it ({micro} of {batch} images), so the targets "
                             "would change.")

    def __init__(self, config, num_examples=None):
        super().__init__(config, num_examples)
        cfg, pred = config.method, config.predictor
        if self.encoder.cls_token or not self.encoder.rope:
            raise ValueError("CAPI's encoder has no [CLS] token and uses RoPE: set model.cls_token=False and "
                             "model.posemb='rope' (or 'rope_axial').")
        self.num_predict = max(int(self.num_masked * cfg.prediction_subsampling), 1)
        self.predictor = Predictor(
            depth=pred.depth, num_heads=pred.num_heads or self.encoder.num_heads,
            mlp_dim=int(pred.mlp_ratio * self.encoder.width), drop_path=pred.drop_path, norm_eps=self.encoder.norm_eps,
            rope=self.encoder.rope, dtype=self.encoder.dtype, attention_impl=self.encoder.attention_impl,
            drop_path_form=self.encoder.drop_path_form)   # official: one drop_path_type for both
        self.head = WeightNormHead(cfg.num_prototypes)
        self.clustering = ClusteringHead(cfg.num_prototypes)
        self.ema = TeacherEMA(self)
        chunk = cfg.sinkhorn_chunk or self.num_patches
        self.sinkhorn_chunk = max(c for c in range(1, chunk + 1) if self.num_patches % c == 0)

    # -- masks and coordinates ---------------------------------------------------------------------
    def masks_and_queries(self, rng, batch):
        """(visible_idx [B, N-K], the masked positions the predictor queries [B, num_predict])."""
        masks, visible, _ = self.sample_masks(rng, batch)
        predict = jax.vmap(lambda k, m: predict_subset(k, m, self.num_predict))(
            self.example_keys(rng, batch, purpose=1), masks)
        return visible, predict

    def _query_coords(self, idx):
        coords = jnp.asarray(grid_coords(*self.grid))
        return coords[idx]

    # -- state -----------------------------------------------------------------------------------
    def init_params(self, rng, batch):
        k_enc, k_pred, k_head, k_clust = jax.random.split(rng, 4)
        visible, predict = self.masks_and_queries(rng, batch)
        encoder = self.encoder.init(k_enc, batch["image"], visible)["params"]
        tokens, out = self.encoder.apply({"params": nn.unbox(encoder)}, batch["image"], visible)
        predictor = self.predictor.init(k_pred, tokens, out["coords"], self._query_coords(predict))["params"]
        return {"encoder": encoder, "predictor": predictor,
                "head": self.head.init(k_head, tokens[:, :1])["params"],
                "clustering": self.clustering.init(k_clust, tokens[:, :1])["params"]}

    def init_extras(self, rng, params, batch):
        # The teacher starts as an exact copy of the student.
        return {"ema": {k: params[k] for k in STUDENT}}

    def teacher_tokens(self, ema, images):
        """EMA encoder on the whole image, in eval mode: final-norm patch tokens [B, P, D]."""
        _, out = self.encoder.apply({"params": ema["encoder"]}, images)
        return out["patch_tokens"]

    def loss(self, params, extras, frozen, batch, rng, step):
        cfg = self.config.method
        images = batch["image"]
        visible, predict = self.masks_and_queries(rng, batch)
        teacher = jax.lax.stop_gradient(self.teacher_tokens(extras["ema"], images))
        clustering_loss, targets, stats = sinkhorn.clustering_targets(
            lambda p, z: self.clustering.apply({"params": p}, z), params["clustering"], teacher, predict,
            target_temp=cfg.target_temp, pred_temp=cfg.clustering_temp, iterations=cfg.sinkhorn_iterations,
            chunk=self.sinkhorn_chunk)

        tokens, out = self.encode_visible(params, images, visible, rng, step)
        predicted = self.predictor.apply({"params": params["predictor"]}, tokens, out["coords"],
                                         self._query_coords(predict), train=True,
                                         rngs={"dropout": dropout_key(rng, step, 1)})[-1]
        logits = self.head.apply({"params": params["head"]}, predicted)
        capi_loss = jnp.mean(sinkhorn.soft_cross_entropy(targets, logits, cfg.student_temp))
        in_use = jnp.sum(stats["assignment_histogram"] > 0)
        metrics = {"capi_loss": capi_loss, "clustering_loss": clustering_loss,
                   "target_entropy": stats["target_entropy"], "prototypes_in_use": in_use.astype(jnp.float32),
                   "student_accuracy": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(targets, -1))}
        return capi_loss + clustering_loss, (metrics, extras)

    # -- accounting and features -------------------------------------------------------------------
    def train_flops_per_example(self):
        enc, pred = self.encoder, self.predictor
        d, k, n_vis = enc.width, self.config.method.num_prototypes, self.num_visible
        teacher = self.encoder_flops(self.num_patches)
        student = self.encoder_flops(train=True)
        q, ctx = self.num_predict, n_vis + enc.num_registers
        predictor = pred.depth * (2 * flops.dense(q, d, d) + 2 * flops.dense(ctx, d, d) + 4.0 * q * ctx * d
                                  + 2 * flops.dense(q, d, pred.mlp_dim)) * self.branch_fraction(pred.drop_path)
        head = flops.dense(q, d, k)
        clustering = flops.dense(self.num_patches, d, k)    # forward; backward reaches only the weights
        return (teacher + 2 * clustering + flops.TRAIN_MULTIPLIER * (student + predictor + head))

    def encode(self, params, images):
        """Patch tokens (`patch_tokens`, `patch_mean`) and CAPI's global representation (`cls`):
        mask queries at every position through the predictor, block 1 output averaged."""
        tokens, out = self.encoder.apply({"params": params["encoder"]}, images)
        # One query per patch of THIS input (the paper evaluates at 448 after training at 224).
        p = self.encoder.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        queries = jnp.broadcast_to(jnp.asarray(grid_coords(*grid))[None], (images.shape[0], grid[0] * grid[1], 2))
        outputs = self.predictor.apply({"params": params["predictor"]}, tokens, out["coords"], queries)
        out["cls"] = predictor_pooling(outputs, block=0)
        out["registers"] = tokens[:, :self.encoder.num_registers]
        return out

