"""Mask samplers, sampled inside the jitted train step.

Every sampler maps ONE key to ONE boolean mask [N] (raster order over the patch grid, True =
masked) with a static, exact number of masked patches, so all shapes stay static under jit. Keys
come from the run seed and each example's global stream index (`example_keys`), so a mask does
not depend on the mesh, the process count, the batch composition or a resume.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Sampler = Callable[[jax.Array], jax.Array]


def example_keys(key: jax.Array, example_index: jax.Array) -> jax.Array:
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(example_index)


def random_mask(key, num_patches: int, num_masked: int) -> jax.Array:
    """MAE: a uniformly random subset of exactly `num_masked` positions."""
    order = jnp.argsort(jax.random.uniform(key, (num_patches,)))
    return jnp.zeros(num_patches, bool).at[order[:num_masked]].set(True)


def _rectangle(grid_hw, top, left, h, w):
    rows = jnp.arange(grid_hw[0])[:, None]
    cols = jnp.arange(grid_hw[1])[None, :]
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def block_mask(key, grid_hw, num_masked: int, min_block: int = 16, max_block: int | None = None,
               aspect=(0.3, 1 / 0.3), max_attempts: int = 1000) -> jax.Array:
    """BEiT/CAE block-wise masking with an exact count (CAE `furnace/masking_generator.py`).

    Each attempt draws area ~ U(min_block, min(remaining, max_block)) (like Python's
    random.uniform, the bounds swap when remaining < min_block), a log-uniform aspect ratio, a
    rectangle h = round(sqrt(area*ar)), w = round(sqrt(area/ar)) that must be strictly smaller
    than the grid, and a uniform position; it is accepted if it adds between 1 and `remaining`
    new cells. Attempts repeat until the count is exact. The official generator gives up after 10
    failed attempts and may return fewer cells; to keep the count static we keep trying, and after
    `max_attempts` (not reached in our tests over 10^4 masks) fill the rest with random cells.
    """
    gh, gw = grid_hw
    max_block = max_block or num_masked
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])

    def attempt(carry):
        mask, key, i = carry
        key, k_area, k_ar, k_top, k_left = jax.random.split(key, 5)
        remaining = num_masked - mask.sum()
        hi = jnp.minimum(remaining, max_block).astype(jnp.float32)
        area = jax.random.uniform(k_area, (), minval=jnp.minimum(min_block, hi), maxval=jnp.maximum(min_block, hi))
        ar = jnp.exp(jax.random.uniform(k_ar, (), minval=log_lo, maxval=log_hi))
        h = jnp.round(jnp.sqrt(area * ar)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(area / ar)).astype(jnp.int32)
        top = jax.random.randint(k_top, (), 0, jnp.maximum(gh - h, 0) + 1)
        left = jax.random.randint(k_left, (), 0, jnp.maximum(gw - w, 0) + 1)
        rect = _rectangle(grid_hw, top, left, h, w).reshape(-1)
        new = (rect & ~mask).sum()
        ok = (h < gh) & (w < gw) & (new >= 1) & (new <= remaining)
        return jnp.where(ok, mask | rect, mask), key, i + 1

    def not_done(carry):
        mask, _, i = carry
        return (mask.sum() < num_masked) & (i < max_attempts)

    mask, key, _ = jax.lax.while_loop(not_done, attempt, (jnp.zeros(gh * gw, bool), key, 0))
    # Fallback (practically never taken): top up with random unmasked cells.
    scores = jnp.where(mask, -1.0, jax.random.uniform(key, (gh * gw,)))
    order = jnp.argsort(-scores)
    fill = jnp.zeros(gh * gw, bool).at[order].set(jnp.arange(gh * gw) < num_masked - mask.sum())
    return mask | fill


def inverse_block_params(key, grid_hw, num_masked: int, aspect=(0.5, 2.0)):
    """Random parameters of CAPI's inverse block mask: (h, w, top, left, shift_y, shift_x)."""
    gh, gw = grid_hw
    n = gh * gw - num_masked
    k_ar, k_top, k_left, k_sy, k_sx = jax.random.split(key, 5)
    # Bounds as in the official code: they keep h <= gh and w <= gw (they do not bind at CAPI's sizes).
    lo = max(math.log(aspect[0]), math.log(n / gw ** 2))
    hi = min(math.log(aspect[1]), math.log(gh ** 2 / n))
    ar = jnp.exp(jax.random.uniform(k_ar, (), minval=lo, maxval=hi))
    h = jnp.minimum(jnp.ceil(jnp.sqrt(n * ar)).astype(jnp.int32), gh)
    w = jnp.minimum(jnp.ceil(jnp.sqrt(n / ar)).astype(jnp.int32), gw)
    top = jax.random.randint(k_top, (), 0, gh - h + 1)
    left = jax.random.randint(k_left, (), 0, gw - w + 1)
    return h, w, top, left, jax.random.randint(k_sy, (), 0, gh), jax.random.randint(k_sx, (), 0, gw)


def inverse_block_from_params(grid_hw, num_masked: int, h, w, top, left, shift_y, shift_x) -> jax.Array:
    """Deterministic part: the first n cells (raster order) of the h x w rectangle are visible,
    the grid is rolled cyclically by (shift_y, shift_x), and the mask is the complement."""
    gh, gw = grid_hw
    n = gh * gw - num_masked
    rect = _rectangle(grid_hw, top, left, h, w)
    rank = jnp.cumsum(rect.reshape(-1)).reshape(gh, gw)      # raster rank inside the rectangle
    visible = rect & (rank <= n)
    visible = jnp.roll(visible, (shift_y, shift_x), axis=(0, 1))
    return ~visible.reshape(-1)


def inverse_block_mask(key, grid_hw, num_masked: int, aspect=(0.5, 2.0), roll: bool = True) -> jax.Array:
    """CAPI: a visible block of exactly N - num_masked cells, cyclically rolled, then inverted.

    The roll makes every position equally likely to be visible; without it the centre is favoured.
    """
    h, w, top, left, sy, sx = inverse_block_params(key, grid_hw, num_masked, aspect)
    if not roll:
        sy = sx = 0
    return inverse_block_from_params(grid_hw, num_masked, h, w, top, left, sy, sx)


def mask_indices(mask: jax.Array, num_masked: int):
    """(visible_idx [N-K], masked_idx [K]), each ascending: gather for encoders, scatter for decoders."""
    n = mask.shape[0]
    order = jnp.argsort(mask, stable=True)   # False (visible) first, positions ascending
    return order[: n - num_masked].astype(jnp.int32), order[n - num_masked:].astype(jnp.int32)


def predict_subset(key, mask: jax.Array, num_predict: int) -> jax.Array:
    """CAPI prediction subsampling: `num_predict` distinct masked positions, uniformly at random."""
    scores = jnp.where(mask, jax.random.uniform(key, mask.shape), -1.0)
    return jnp.argsort(-scores)[:num_predict].astype(jnp.int32)


def num_masked_from_config(cfg, num_patches: int) -> int:
    if cfg.get("num_masked"):
        return int(cfg["num_masked"])
    return int(num_patches * cfg["ratio"])


def sampler_from_config(cfg, grid_hw) -> Sampler:
    """{'type': 'random'|'block'|'inverse_block', 'num_masked': K or 'ratio': r, ...} -> sampler."""
    n = grid_hw[0] * grid_hw[1]
    k = num_masked_from_config(cfg, n)
    kind = cfg["type"]
    if kind == "random":
        return lambda key: random_mask(key, n, k)
    if kind == "block":
        return lambda key: block_mask(key, grid_hw, k, min_block=cfg.get("min_block", 16))
    if kind == "inverse_block":
        return lambda key: inverse_block_mask(key, grid_hw, k, roll=cfg.get("roll", True))
    raise ValueError(f"Unknown mask type {kind!r}: use 'random', 'block' or 'inverse_block'.")
