"""CMAE (Mao et al., "Improvements to Self-Supervised Representation Learning for Masked Image
Modeling", arXiv 2205.10546). The paper has no code; its recipe is realised as in the authors'
later SDMAE code (Talented-Q/SDMAE `models_sdmae.py`), plus ContrastiveCrop (Peng et al. 2022,
xyupeng/ContrastiveCrop) for the views, as the abstract describes.

One step, for two views of each image that share ONE mask:
1. the MAE encoder (frozen patch embedding) sees each view's visible patches; a tiny pixel
   decoder (1 block, 128 wide) reconstructs the masked patches of both views (unnormalised pixels);
2. a position head predicts each visible token's grid index (MSE against one-hot);
3. the contrastive head reads the decoder's whole output sequence (its [CLS] token after two
   blocks), a predictor follows; the keys come from a momentum copy of the contrastive head only
   (EMA 0.999, advanced before it computes them), on the other view; symmetrised InfoNCE with
   T = 1 and the x2T factor, weight 0.1, negatives from the global batch;
   L = rec(v1) + rec(v2) + pos(v1) + pos(v2) + 0.1 (l(q1, k2) + l(q2, k1)).
ContrastiveCrop: after 20 % of training and then every 20 %, a full-token pass of the current
encoder over the training set turns its last block's [CLS] attention into one box per image
(`ContrastiveCrop.run`); the host pipeline then confines both views' crop centres to that box. A
run shorter than one epoch does not refresh (`ContrastiveCrop.steps`).
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from mim_jax import flops, parallel
from mim_jax.data import pipeline
from mim_jax.methods.base import Component, RefreshInterrupted
from mim_jax.methods.cmae import contrastive, views
from mim_jax.methods.cmae.heads import ContrastiveHead, MlpHead, PositionHead
from mim_jax.methods.mae.method import MAE, masked_mse, normalized_pixel_targets
from mim_jax.methods.masked import dropout_key
from mim_jax.runtime import console

HEATMAPS = ("cls_attention", "token_norm")
NEGATIVES = ("global", "device")
MOMENTUM_INIT = ("copy", "independent")


def ema(target, online, momentum):
    """target <- m target + (1 - m) online, leaf by leaf (no gradient reaches the target)."""
    return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * jax.lax.stop_gradient(o), target, online)


def box_areas(boxes) -> np.ndarray:
    """Fractions of the image the (h_min, w_min, h_max, w_max) boxes cover."""
    boxes = np.asarray(boxes)
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


class ContrastiveCrop(Component):
    """`Method.refresh` and `Method.host_state` of CMAE: the per-example boxes in the extras
    (`boxes`; `box_updates` counts the refreshes that made them)."""

    def steps(self, total_steps):
        """End of the warm-up (20 %) and then every interval (20 %), never at the last step
        (ContrastiveCrop updates at epochs W, 2W, ... of 5W), as fractions of the run.

        None in a run shorter than one epoch (total_steps x batch < training set): each refresh
        encodes the whole training set, more images than such a run trains on, and most of the
        boxes would never be drawn from (a 5-step run would pass over 60k images four times to
        train on 640). Runs of an epoch or more, the recipe's and the local preset's (938 steps,
        2 epochs: steps 188, 376, 564, 752) refresh as the schedule says."""
        cc, n = self.method.config.method.ccrop, self.method.num_examples
        if not cc.enabled or (n is not None and total_steps * self.method.config.input.batch_size < n):
            return ()
        first = max(int(round(cc.warmup_percent * total_steps)), 1)
        every = max(int(round(cc.interval_percent * total_steps)), 1)
        return tuple(range(first, total_steps, every))

    def run(self, params, extras, source, sharding, should_stop=None):
        """New boxes for every training example from the current encoder (ContrastiveCrop's
        semantic-aware localisation), keyed by the stable source index."""
        config = self.method.config
        inp, cc = config.input, config.method.ccrop
        boxes_of = sharding.jit(lambda p, images: contrastive.heatmap_boxes(
            self.method.heat_maps(p, images), inp.image_size, cc.threshold))
        it = pipeline.eval_iterator(source, global_batch_size=cc.batch_size, process_index=jax.process_index(),
                                    process_count=jax.process_count(),
                                    transform=views.ResizeTransform(inp.image_size, inp.mean, inp.std))
        # A pass over the whole training set: minutes on a CPU, worth saying.
        logging.info("Refreshing the ContrastiveCrop boxes: heat maps of the current encoder for %s training "
                     "images.", f"{len(source):,}")
        progress = console.Progress("ContrastiveCrop boxes", len(source), "images")
        boxes, done = [], 0
        for local in it:
            if should_stop is not None and should_stop():
                it.close()
                raise RefreshInterrupted(done, len(source))
            batch = parallel.host_batch_to_global(local, sharding.mesh)
            found = multihost_utils.process_allgather(boxes_of(params["encoder"], batch["image"]), tiled=True)
            keep = multihost_utils.process_allgather(local["_mask"], tiled=True)
            boxes.append(np.asarray(found)[np.asarray(keep)])
            done += len(boxes[-1])
            progress.update(done)
        boxes = np.concatenate(boxes)
        areas = box_areas(boxes)
        # The largest box is (0, 0, (S-1)/S, (S-1)/S) (ContrastiveCrop does not add 1 to the last
        # index): the known failure is every box collapsing to it.
        whole = ((inp.image_size - 1) / inp.image_size) ** 2
        logs = {"box_area_mean": float(areas.mean()), "box_whole_image_fraction": float(np.mean(areas >= whole - 1e-6)),
                "box_area": areas}
        return dict(extras, boxes=boxes, box_updates=extras["box_updates"] + 1), logs

    def applied(self, extras):
        return int(jax.device_get(extras["box_updates"]))

    def flops(self):
        return self.method.encoder_flops(self.method.num_patches)

    def read(self, extras):
        if self.applied(extras) == 0:
            return None       # warm-up: plain random-resized crops
        return np.asarray(jax.device_get(extras["boxes"]))


class CMAE(MAE):
    # No official code: the encoder alone, in MAE's (= timm's) names, which SDMAE's encoder shares.
    weight_layout = "timm"
    inexact_accumulation = ("CMAE's InfoNCE takes its negatives from the batch and its heads' BatchNorm (SyncBN) "
                             "normalises over it; with grad_accum_steps={k} both would see 1/{k} of it ({micro} of "
                             "{batch} images), and the momentum head and BatchNorm statistics would advance "
                             "{k} times per step.")

    def __init__(self, config, num_examples=None):
        super().__init__(config, num_examples)
        cfg, ctr, enc = config.method, config.contrastive, self.encoder
        if not enc.cls_token or not self.decoder.keep_prefix:
            raise ValueError("CMAE contrasts the decoder's [CLS] output: set config.model.cls_token=True and "
                             "config.decoder.keep_prefix=True.")
        for name, value, allowed in (("method.position_loss", cfg.position_loss, contrastive.POSITION_LOSSES),
                                     ("contrastive.negatives", ctr.negatives, NEGATIVES),
                                     ("contrastive.momentum_init", ctr.momentum_init, MOMENTUM_INIT),
                                     ("method.ccrop.heatmap", cfg.ccrop.heatmap, HEATMAPS)):
            if value not in allowed:
                raise ValueError(f"config.{name}={value!r}: use one of {allowed}.")
        self.dim = ctr.dim or enc.width
        self.contrastive_head = ContrastiveHead(
            width=enc.width, depth=ctr.depth, num_heads=ctr.num_heads or enc.num_heads, hidden_dim=ctr.hidden_dim,
            out_dim=self.dim, dtype=enc.dtype, attention_impl=enc.attention_impl)
        self.predictor = MlpHead(num_layers=2, hidden_dim=ctr.hidden_dim, out_dim=self.dim)
        self.position_head = PositionHead(num_positions=self.num_patches, dtype=enc.dtype)
        self.refresh = self.host_state = ContrastiveCrop(self)

    # -- state -----------------------------------------------------------------------------------
    def _decoded(self, params, batch):
        """Encoder tokens and decoder outputs of view 1 in eval mode (for initialisation)."""
        _, visible, masked = self.sample_masks(jax.random.key(0), batch)
        tokens, _ = self.encoder.apply({"params": params["encoder"]}, batch["image"], visible)
        return tokens, self.decoder.apply({"params": params["decoder"]}, tokens, visible, masked)

    def _head_variables(self, rng, decoded):
        k_ctr, k_pred = jax.random.split(rng)
        ctr = self.contrastive_head.init(k_ctr, decoded, train=False)
        pred = self.predictor.init(k_pred, jnp.zeros((decoded.shape[0], self.dim)), train=False)
        return ctr, pred

    def init_params(self, rng, batch):
        k_mae, k_heads, k_pos = jax.random.split(rng, 3)
        params = super().init_params(k_mae, batch)
        tokens, decoded = self._decoded(nn.unbox(params), batch)
        ctr, pred = self._head_variables(k_heads, decoded)
        pos = self.position_head.init(k_pos, tokens[:, self.encoder.num_prefix_tokens:])
        return dict(params, contrastive=ctr["params"], predictor=pred["params"], position=pos["params"])

    def init_extras(self, rng, params, batch):
        if self.num_examples is None:
            raise ValueError("CMAE keeps one ContrastiveCrop box per training example: build it with "
                             "get_method(config, num_examples=<training set size>).")
        _, decoded = self._decoded(nn.unbox(params), batch)
        ctr, pred = self._head_variables(jax.random.fold_in(rng, 0), decoded)
        # MoCo's intent: the momentum head starts as a copy of the online head. (SDMAE copies
        # before re-initialising every Linear, so its momentum head starts independent:
        # contrastive.momentum_init='independent'.)
        if self.config.contrastive.momentum_init == "copy":
            momentum = params["contrastive"]
        else:
            momentum = self._head_variables(jax.random.fold_in(rng, 1), decoded)[0]["params"]
        whole = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 1.0, 1.0], jnp.float32), (self.num_examples, 4))
        return {"momentum": momentum,
                "batch_stats": {"contrastive": ctr["batch_stats"], "predictor": pred["batch_stats"],
                                "momentum": ctr["batch_stats"]},
                "boxes": whole, "box_updates": jnp.zeros((), jnp.int32)}

    # -- step ------------------------------------------------------------------------------------
    def _negative_groups(self) -> int:
        return parallel.batch_shards() if self.config.contrastive.negatives == "device" else 1

    def loss(self, params, extras, frozen, batch, rng, step):
        cfg, ctr = self.config.method, self.config.contrastive
        prefix = self.encoder.num_prefix_tokens
        masks, visible, masked = self.sample_masks(rng, batch)       # one mask for both views
        stats = extras["batch_stats"]
        metrics, rec, pos, online, decoded = {}, [], [], [], []
        for view, images in enumerate((batch["image"], batch["image2"])):
            view_rng = jax.random.fold_in(rng, view) if view else rng
            tokens, _ = self.encode_visible(params, images, visible, view_rng, step)
            pred = self.decoder.apply({"params": params["decoder"]}, tokens, visible, masked, train=True,
                                      rngs={"dropout": dropout_key(view_rng, step, 1)})
            target = normalized_pixel_targets(images, self.encoder.patch_size, cfg.norm_pix_loss)
            rec.append(masked_mse(pred[:, prefix:], target, masks))
            scores = self.position_head.apply({"params": params["position"]}, tokens[:, prefix:])
            pos.append(contrastive.position_loss(scores, visible, cfg.position_loss))
            other = "ce" if cfg.position_loss == "mse" else "mse"
            metrics[f"position_{other}_v{view + 1}"] = contrastive.position_loss(scores, visible, other)
            z, new = self.contrastive_head.apply({"params": params["contrastive"], "batch_stats": stats["contrastive"]},
                                                 pred, train=True, mutable=["batch_stats"])
            stats = dict(stats, contrastive=new["batch_stats"])
            q, new = self.predictor.apply({"params": params["predictor"], "batch_stats": stats["predictor"]}, z,
                                          train=True, mutable=["batch_stats"])
            stats = dict(stats, predictor=new["batch_stats"])
            online.append(q)
            decoded.append(jax.lax.stop_gradient(pred))
        # The momentum head advances first, then computes the keys (SDMAE's order), in train mode.
        momentum = ema(extras["momentum"], params["contrastive"], ctr.momentum)
        keys = []
        for pred in decoded:
            k, new = self.contrastive_head.apply({"params": momentum, "batch_stats": stats["momentum"]}, pred,
                                                 train=True, mutable=["batch_stats"])
            stats = dict(stats, momentum=new["batch_stats"])
            keys.append(jax.lax.stop_gradient(k))
        groups = self._negative_groups()
        ctr_loss = (contrastive.info_nce(online[0], keys[1], ctr.temperature, groups)
                    + contrastive.info_nce(online[1], keys[0], ctr.temperature, groups))
        rec_loss, pos_loss = rec[0] + rec[1], pos[0] + pos[1]
        loss = rec_loss + cfg.position_weight * pos_loss + ctr.weight * ctr_loss
        metrics.update(reconstruction_loss=rec_loss, position_loss=pos_loss, contrastive_loss=ctr_loss,
                       contrastive_accuracy=0.5 * (contrastive.info_nce_accuracy(online[0], keys[1], groups)
                                                   + contrastive.info_nce_accuracy(online[1], keys[0], groups)))
        return loss, (metrics, dict(extras, momentum=momentum, batch_stats=stats))

    # -- ContrastiveCrop ---------------------------------------------------------------------------
    def heat_maps(self, encoder_params, images):
        """[B, grid_h, grid_w] per-image maps of the full-token encoder in eval mode: the last
        block's [CLS] attention over the patches (head mean), or the patch tokens' norm before
        the final LayerNorm."""
        p = self.encoder.num_prefix_tokens
        (_, out), state = self.encoder.apply({"params": encoder_params}, images, mutable=["intermediates"])
        if self.config.method.ccrop.heatmap == "cls_attention":
            blocks = state["intermediates"]["encoder"]
            last = (blocks["blocks"]["block"] if "blocks" in blocks else blocks[f"block_{self.encoder.depth - 1}"])
            attention = last["attn"]["cls_attention"][0]
            heat = attention[-1] if attention.ndim == 3 else attention      # scanned: [depth, B, T]
            heat = heat[:, p:]
        else:
            heat = jnp.linalg.norm(out["pre_norm"][:, p:].astype(jnp.float32), axis=-1)
        grid_h, grid_w = images.shape[1] // self.encoder.patch_size, images.shape[2] // self.encoder.patch_size
        return heat.reshape(images.shape[0], grid_h, grid_w)

    # -- host side -------------------------------------------------------------------------------
    def batch_spec(self, global_batch_size):
        spec = super().batch_spec(global_batch_size)
        spec["image2"] = spec["image"]
        return spec

    def train_transform(self, host_state=None):
        inp, cc, v2 = self.config.input, self.config.method.ccrop, self.config.method.view2
        return views.ContrastiveViewsTransform(
            image_size=inp.image_size, crop_scale=inp.crop_scale, crop_ratio=inp.crop_ratio, mean=tuple(inp.mean),
            std=tuple(inp.std), boxes=host_state, alpha=cc.alpha, interpolation=inp.interpolation, flip=inp.flip,
            view2_flip=v2.flip, jitter=tuple(v2.jitter), jitter_prob=v2.jitter_prob, gray_prob=v2.gray_prob)

    # -- accounting ------------------------------------------------------------------------------
    def train_flops_per_example(self):
        enc, dec, ctr = self.encoder, self.decoder, self.config.contrastive
        tokens = self.num_patches + enc.num_prefix_tokens
        patch_dim = enc.patch_size ** 2 * self.config.input.channels
        decoder = self.decoder_flops() + flops.dense(enc.num_prefix_tokens, dec.width, patch_dim)   # + [CLS] output
        head = ((flops.dense(tokens, patch_dim, enc.width) if patch_dim != enc.width else 0.0)
                + flops.transformer_forward(tokens, enc.width, ctr.depth, 4 * enc.width)
                + flops.dense(1, enc.width, ctr.hidden_dim) + flops.dense(1, ctr.hidden_dim, ctr.hidden_dim)
                + flops.dense(1, ctr.hidden_dim, self.dim))
        predictor = flops.dense(1, self.dim, ctr.hidden_dim) + flops.dense(1, ctr.hidden_dim, self.dim)
        position = flops.dense(self.num_visible, enc.width, enc.width // 2) + flops.dense(
            self.num_visible, enc.width // 2, self.num_patches)
        online = self.encoder_flops(train=True) + decoder + head + predictor + position
        # Two views through the trained path (forward + backward), the momentum head forward only.
        return 2 * (flops.TRAIN_MULTIPLIER * online + head)
