"""2-D rotary position embeddings on [0, 1] coordinates, as CAPI uses them (facebookresearch/capi
`model.py` `Rope`; docs/methods/capi.md §1.2).

Coordinates are (row, col) in [0, 1]: a grid is `linspace(0, 1, H) x linspace(0, 1, W)` in raster
order, so a higher resolution only makes the grid denser. Frequencies: head_dim/4 values
`7 * 1e4 ** linspace(0, -1, head_dim/4)`, times 2*pi.

kind='capi' (default, the official formula, needed for released weights): channels [0, d/2) turn
with row * f and channels [d/2, d) with col * f (frequencies tiled twice within each half), and
the rotation pairs channel c with c + d/2 ("rotate half" over the whole head). The paired channels
therefore get different angles: it is not a rotation and not exactly relative.

kind='axial' (an option, not the official model): each half of the head is rotated by its own
coordinate with rotate-half inside the half, a true rotation whose q.k depends only on coordinate
differences.

Angles are computed in float32 (the official code builds them in the activation dtype, bf16 in
training, where 2*pi*7 rad is held to 0.25 rad): a deliberate deviation.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

KINDS = ("capi", "axial")


def frequencies(head_dim: int, max_freq: float = 7.0, min_freq: float = 7e-4) -> np.ndarray:
    """Angular frequencies [head_dim // 4]."""
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}.")
    return 2 * np.pi * max_freq * (max_freq / min_freq) ** np.linspace(0.0, -1.0, head_dim // 4)


def grid_coords(grid_h: int, grid_w: int) -> np.ndarray:
    """[(H*W), 2] (row, col) coordinates in [0, 1], raster order."""
    rows, cols = np.meshgrid(np.linspace(0, 1, grid_h), np.linspace(0, 1, grid_w), indexing="ij")
    return np.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1).astype(np.float32)


def edge_register_coords(n: int) -> np.ndarray:
    """CAPI's 'edge' register coordinates: n/4 per side of the unit square, going round it
    (down the left edge, along the bottom, up the right, back along the top). [n, 2]."""
    if n % 4:
        raise ValueError(f"Edge register coordinates need a multiple of 4 registers, got {n}.")
    c = np.arange(n // 4) / (n // 4)
    sides = [(c, 0 * c), (1 + 0 * c, c), (1 - c, 1 + 0 * c), (0 * c, 1 - c)]
    return np.concatenate([np.stack(s, -1) for s in sides]).astype(np.float32)


def scale_to_bbox(unit_coords, coords):
    """Maps [n, 2] unit-square coordinates into each example's bounding box of `coords` [B, T, 2]
    (CAPI's scale_reg_to_visible): [B, n, 2]."""
    lo, hi = coords.min(axis=1, keepdims=True), coords.max(axis=1, keepdims=True)
    return lo + jnp.asarray(unit_coords)[None] * (hi - lo)


def _rotate_half(x):
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-b, a], axis=-1)


def apply_rope(x, coords, kind: str = "capi"):
    """x [B, T, heads, head_dim], coords [B, T, 2] (or [T, 2]) -> x rotated by its positions."""
    d = x.shape[-1]
    f = jnp.asarray(frequencies(d), jnp.float32)
    coords = jnp.asarray(coords, jnp.float32)
    row, col = coords[..., 0:1], coords[..., 1:2]
    if kind == "capi":
        angle = jnp.concatenate([row * jnp.tile(f, 2), col * jnp.tile(f, 2)], axis=-1)   # [.., T, d]
        angle = angle[..., None, :]                                                      # heads axis
        out = x.astype(jnp.float32) * jnp.cos(angle) + _rotate_half(x.astype(jnp.float32)) * jnp.sin(angle)
    elif kind == "axial":
        halves = []
        for coord, half in zip((row, col), jnp.split(x.astype(jnp.float32), 2, axis=-1)):
            angle = (coord * jnp.tile(f, 2))[..., None, :]
            halves.append(half * jnp.cos(angle) + _rotate_half(half) * jnp.sin(angle))
        out = jnp.concatenate(halves, axis=-1)
    else:
        raise ValueError(f"Unknown RoPE kind {kind!r}: use one of {KINDS}.")
    return out.astype(x.dtype)
