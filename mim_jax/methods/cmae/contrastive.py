"""CMAE's contrastive and position losses, and ContrastiveCrop's heat-map boxes (docs/methods/cmae.md §1.3,
§1.4, §2.1, §6).

References: Talented-Q/SDMAE `models_sdmae.py` (`ctr_loss`, `loc_loss`) for the losses,
xyupeng/ContrastiveCrop `DDP_moco_ccrop.py` (`update_box`) for the boxes.

All functions are plain jnp over the global batch. Under jit with the batch sharded over a mesh,
`info_nce(num_groups=1)` makes XLA gather the keys (global negatives), while
`num_groups=<devices>` keeps every logit on its own device (SDMAE's per-GPU negatives), without
naming a mesh axis: the grouping is a reshape of the batch axis.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.models.layers import l2_normalize

POSITION_LOSSES = ("mse", "ce")


def _grouped_logits(q, k, temperature, num_groups: int):
    """[G, B/G, B/G] logits of normalised q against normalised k within each contiguous group."""
    b, d = q.shape
    if k.shape != q.shape:
        raise ValueError(f"q and k must have the same shape, got {q.shape} and {k.shape}.")
    if num_groups < 1 or b % num_groups:
        raise ValueError(f"num_groups ({num_groups}) must be positive and divide the batch ({b}).")
    q = l2_normalize(q.astype(jnp.float32)).reshape(num_groups, b // num_groups, d)
    k = l2_normalize(k.astype(jnp.float32)).reshape(num_groups, b // num_groups, d)
    # HIGHEST: TF32/bf16 matmuls would put O(1e-3) noise on cosines that T = 0.2 amplifies.
    return jnp.einsum("gnd,gmd->gnm", q, k, precision=jax.lax.Precision.HIGHEST) / temperature


def info_nce(q, k, temperature, num_groups: int = 1):
    """MoCo v3 InfoNCE as SDMAE's `ctr_loss`: 2T * mean_i CE(softmax(q_i . k_j / T)_j, j = i).

    q, k: [B, D] (normalised here, in float32). Row i's positive is k_i; the negatives are the
    other keys of its group: `num_groups` contiguous groups of B / G rows (G = the number of
    devices the batch is split over reproduces per-device negatives; G = 1 uses the whole batch).
    The mean is over all B rows. Gradients flow into k as well: a caller whose keys are targets
    (SDMAE's momentum head) must apply `jax.lax.stop_gradient` itself. Returns a float32 scalar."""
    logits = _grouped_logits(q, k, temperature, num_groups)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -2.0 * temperature * jnp.mean(jnp.diagonal(log_probs, axis1=-2, axis2=-1))


def info_nce_accuracy(q, k, num_groups: int = 1):
    """Fraction of rows whose most similar key (within the group) is their own positive: the
    metric to log beside `info_nce` (independent of the temperature). Ties count as misses."""
    logits = _grouped_logits(q, k, 1.0, num_groups)
    positive = jnp.diagonal(logits, axis1=-2, axis2=-1)
    others = jnp.where(jnp.eye(logits.shape[-1], dtype=bool), -jnp.inf, logits)
    return jnp.mean(positive > jnp.max(others, axis=-1))


def position_loss(logits, positions, kind: str = "mse"):
    """Token position prediction. logits [B, L, P] for L tokens, positions [B, L] int: each
    token's index in its view's patch grid (P cells).

    "mse": SDMAE's `loc_loss`, the mean over B*L*P of (logits - one_hot(positions))^2;
    "ce": the mean over B*L of the cross-entropy over the P classes. Returns a float32 scalar."""
    if kind not in POSITION_LOSSES:
        raise ValueError(f"Unknown position loss {kind!r}: use one of {POSITION_LOSSES}.")
    logits = logits.astype(jnp.float32)
    if kind == "mse":
        return jnp.mean(jnp.square(logits - jax.nn.one_hot(positions, logits.shape[-1], dtype=jnp.float32)))
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(log_probs, positions[..., None], axis=-1))


def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] weights of torch F.interpolate(mode='bilinear', align_corners=False) along one
    axis (the official `update_box` leaves align_corners unset, i.e. False): source coordinate
    (o + 0.5) * in/out - 0.5, clamped at 0 below; the upper neighbour is clamped to the last
    sample. For upsampling this equals jax.image.resize('bilinear'), whose renormalised
    edge weights amount to the same clamping; the explicit matrix fixes the semantics for
    downsampling too (no antialiasing, as torch's default) and lets the matmul precision be set."""
    src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
    lower = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    upper = np.minimum(lower + 1, in_size - 1)
    frac = src - lower
    weights = np.zeros((out_size, in_size), np.float64)
    np.add.at(weights, (np.arange(out_size), lower), 1.0 - frac)
    np.add.at(weights, (np.arange(out_size), upper), frac)
    return weights.astype(np.float32)


def upsample_bilinear(maps, size: tuple[int, int]):
    """[..., h, w] -> [..., H, W] with torch's align_corners=False bilinear (`bilinear_matrix`)."""
    rows = jnp.asarray(bilinear_matrix(maps.shape[-2], size[0]))
    cols = jnp.asarray(bilinear_matrix(maps.shape[-1], size[1]))
    return jnp.einsum("Hh,...hw,Ww->...HW", rows, maps.astype(jnp.float32), cols,
                      precision=jax.lax.Precision.HIGHEST)


def heatmap_boxes(heat, image_size, threshold: float):
    """ContrastiveCrop's `update_box`: heat maps [B, h, w] -> boxes [B, 4] float32, normalised
    (h_min, w_min, h_max, w_max).

    Per image: min-max normalise to [0, 1], upsample bilinearly to the input resolution
    (`image_size`: an int for square inputs or (H, W)), call a row active if its maximum exceeds
    `threshold` (columns likewise), and return (first active row / H, first active column / W,
    last active row / H, last active column / W). As in the official code the last index is not
    incremented, so an all-active map gives (0, 0, (H-1)/H, (W-1)/W), e.g. 223/224.

    Where nothing exceeds the threshold, in particular for a constant map (which the official
    0/0 turns into NaN and then an indexing error), the box is the whole image (0, 0, 1, 1): the
    boxes' initial value, i.e. no localisation, so the crop falls back to plain RRC-like sampling.
    Static shapes throughout; jit-able."""
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)

    def extent(active, size):
        # k / size from a table: XLA turns a division by a constant into a multiplication by its
        # reciprocal, one ulp away from torch's correctly rounded k / size for some k.
        fractions = jnp.asarray(np.arange(size) / size, jnp.float32)
        # argmax returns the first True; on the reversed mask, the last.
        return fractions[jnp.argmax(active)], fractions[size - 1 - jnp.argmax(active[::-1])]

    def one_box(m):
        m = m - jnp.min(m)
        peak = jnp.max(m)
        m = jnp.where(peak > 0, m / jnp.where(peak > 0, peak, 1.0), 0.0)
        m = upsample_bilinear(m, (height, width))
        rows = jnp.max(m, axis=1) > threshold
        cols = jnp.max(m, axis=0) > threshold
        h_min, h_max = extent(rows, height)
        w_min, w_max = extent(cols, width)
        box = jnp.stack([h_min, w_min, h_max, w_max]).astype(jnp.float32)
        return jnp.where(jnp.any(rows), box, jnp.array([0.0, 0.0, 1.0, 1.0], jnp.float32))

    return jax.vmap(one_box)(heat.astype(jnp.float32))
