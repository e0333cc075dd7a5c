"""Beyond Masking's batched image operations on device (jnp, NHWC): area resampling, per-patch
per-channel targets, symmetric padding, fisheye warps, random blur and de-colourisation. They run inside the jitted train step, so every shape is static and every random
choice comes from a key.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's `F.interpolate(mode='area')` (adaptive average pooling)
    along one axis: output i averages inputs floor(i*n_in/n_out) .. ceil((i+1)*n_in/n_out) - 1,
    for shrinking and enlarging alike."""
    m = np.zeros((n_out, n_in), np.float32)
    for i in range(n_out):
        start, stop = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, start:stop] = 1.0 / (stop - start)
    return m


def area_resize(images, size: int):
    """[B, H, W, C] -> [B, size, size, C] by separable adaptive average pooling (two matmuls)."""
    rows = jnp.asarray(area_matrix(images.shape[1], size))
    cols = jnp.asarray(area_matrix(images.shape[2], size))
    return jnp.einsum("ih,bhwc,jw->bijc", rows, images, cols, precision=jax.lax.Precision.HIGHEST)


def patch_channel_statistics(images, patch: int):
    """(pixels [B, N, p*p, C] in `patchify` order, their means and unbiased stds [B, N, 1, C]) of
    each patch and channel of [B, H, W, C] images."""
    b, h, w, c = images.shape
    x = images.astype(jnp.float32).reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch, c)
    return x, x.mean(axis=2, keepdims=True), jnp.sqrt(x.var(axis=2, keepdims=True, ddof=1))


def patch_channel_normalize(images, patch: int):
    """Beyond Masking's target: each patch and each channel separately shifted to mean 0 and
    divided by (unbiased std + 1e-6) over the patch's p*p pixels. [B, H, W, C] -> [B, N, p*p*C]
    in `patchify` order (row in patch, column in patch, channel). MAE instead normalises all
    p*p*C values of a patch together."""
    x, mean, std = patch_channel_statistics(images, patch)
    return ((x - mean) / (std + 1e-6)).reshape(*x.shape[:2], -1)


def symmetric_place(images, size: int, top, left):
    """Puts [B, s, s, C] at (top, left) of a size x size canvas filled by symmetric mirroring
    (edge pixel repeated, corners mirrored on both axes; numpy's mode='symmetric'), the
    zoomed-out input. `top`/`left` may be traced; size - s <= s."""
    s = images.shape[1]
    pad = size - s
    if not 0 <= pad <= s:
        raise ValueError(f"Cannot mirror-pad a {s}-pixel image to {size}.")
    # Mirroring does not depend on how much is padded, so pad `pad` on every side and slice.
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="symmetric")
    return jax.lax.dynamic_slice(padded, (0, pad - top, pad - left, 0), (images.shape[0], size, size, images.shape[3]))


def fisheye_grid(size: int, center, magnitude):
    """Beyond Masking's distortion field on [-1, 1]^2 (x = column, y = row, as `grid_sample`):
    g' = g + magnitude * (center - g) * |center - g|. Returns [size, size, 2] (x, y)."""
    lin = jnp.linspace(-1.0, 1.0, size)
    gy, gx = jnp.meshgrid(lin, lin, indexing="ij")
    grid = jnp.stack([gx, gy], axis=-1)
    d = center - grid
    return grid + d * jnp.sqrt(jnp.sum(d * d, axis=-1, keepdims=True)) * magnitude


def grid_sample(image, grid):
    """PyTorch `grid_sample(bilinear, padding_mode='zeros', align_corners=True)` of one image
    [H, W, C] at grid [h, w, 2] (x, y in [-1, 1]): out-of-image neighbours count as zero."""
    h, w = image.shape[:2]
    x = (grid[..., 0] + 1.0) * (w - 1) / 2.0
    y = (grid[..., 1] + 1.0) * (h - 1) / 2.0
    x0, y0 = jnp.floor(x), jnp.floor(y)
    out = 0.0
    for dy in (0, 1):
        for dx in (0, 1):
            xi, yi = x0 + dx, y0 + dy
            weight = (1.0 - jnp.abs(x - xi)) * (1.0 - jnp.abs(y - yi))
            inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
            pixel = image[jnp.clip(yi, 0, h - 1).astype(jnp.int32), jnp.clip(xi, 0, w - 1).astype(jnp.int32)]
            out = out + jnp.where(inside, weight, 0.0)[..., None] * pixel
    return out


def conv_same(image, kernel):
    """One image [H, W, C] convolved (cross-correlation, zero padding, same size) with its own
    kernel [k, k, C, C]."""
    return jax.lax.conv_general_dilated(image[None], kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=jax.lax.Precision.HIGHEST)[0]
