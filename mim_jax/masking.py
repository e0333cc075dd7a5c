"""Mask samplers, sampled inside the jitted train step.

Every sampler maps ONE key to ONE boolean mask [N] (raster order over the patch grid, True =
masked) with a static, exact number of masked patches, so every shape downstream (visible tokens,
decoder queries) is static under jit. Batch them with `sample_masks` (a vmap).

Keys come from the run seed and each example's global stream index (`example_keys`), never from
the step or the device, so a mask does not depend on the mesh, the process count, the batch
composition or a resume.

Samplers:
  random_mask         MAE: a uniformly random subset of exactly K positions.
  block_mask          BEiT/CAE block-wise masking (CAE `furnace/masking_generator.py`), exact K.
  inverse_block_mask  CAPI (`data.py`, InverseBlockMasking): one visible rectangle, rolled.
Each is a `config.method.mask.type` that every masked-encoder method's MaskPlan reads, so they are
shared even where only one recipe picks them (MAE's paper ablates block masking).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

Sampler = Callable[[jax.Array], jax.Array]


# ---- keys ----------------------------------------------------------------------------------------

def example_keys(key: jax.Array, example_index: jax.Array, tag: int | None = None) -> jax.Array:
    """One key per example: fold_in(key, example_index[b]) -> keys [B].

    `example_index` is the int32 index of each example in the whole training stream, so it already
    identifies the step; folding in the step (or the device) as well would make masks change with
    the batch size, the mesh or a resume. `tag` (optional; `Method.example_keys` folds its own
    `purpose` in before calling this) separates independent uses, e.g. mask vs. prediction subset.
    Indices wrap at 2**32 (fold_in takes uint32 data).
    """
    if tag is not None:
        key = jax.random.fold_in(key, tag)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.asarray(example_index))


def sample_masks(sampler: Sampler, keys: jax.Array) -> jax.Array:
    """Masks [B, N] from keys [B]."""
    return jax.vmap(sampler)(keys)


# ---- MAE -----------------------------------------------------------------------------------------

def random_mask(key: jax.Array, num_patches: int, num_masked: int) -> jax.Array:
    """MAE: exactly `num_masked` of `num_patches` positions, every subset equally likely."""
    _check_count(num_patches, num_masked)
    chosen = jax.random.permutation(key, num_patches)[:num_masked]
    return jnp.zeros(num_patches, bool).at[chosen].set(True)


# ---- BEiT / CAE block-wise -----------------------------------------------------------------------

def _rectangle(grid_hw, top, left, h, w) -> jax.Array:
    """Boolean [H, W] that is True on rows [top, top+h) and columns [left, left+w)."""
    rows = jnp.arange(grid_hw[0])[:, None]
    cols = jnp.arange(grid_hw[1])[None, :]
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def _uniform_int(u, n):
    """Uniform integer in {0, ..., n-1} from u ~ U[0, 1) (the minimum guards float rounding)."""
    return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


def _block_step(key, mask, grid_hw, num_masked: int, min_block: float, max_block: int,
                aspect, candidates: int) -> jax.Array:
    """`candidates` independent CAE attempts against `mask` [N]; the first acceptable one is added.

    Rejected attempts leave the mask unchanged, so trying several at once and keeping the first
    acceptable one gives exactly the distribution of trying them one after another; it only cuts
    the number of sequential while_loop iterations, which matters for the slow tail (see
    `block_mask`).
    """
    gh, gw = grid_hw
    remaining = num_masked - mask.sum()
    # CAE's max_mask_patches: bounds both the area draw and the number of new cells accepted.
    cap = jnp.minimum(remaining, max_block).astype(jnp.float32)
    # Python's random.uniform(a, b) is a + (b - a) * U(0, 1): when remaining < min_block it draws
    # from [remaining, min_block], i.e. the bounds just swap. Area is then often > remaining; such
    # rectangles are accepted only if they overlap the mask enough.
    lo, hi = jnp.minimum(min_block, cap), jnp.maximum(min_block, cap)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])

    def attempt(u):
        # Four U[0, 1) draws per attempt, used the way Python's random module uses them.
        area = lo + (hi - lo) * u[0]
        ar = jnp.exp(log_lo + (log_hi - log_lo) * u[1])
        # jnp.round rounds half to even, like Python's round().
        h = jnp.round(jnp.sqrt(area * ar)).astype(jnp.int32)
        w = jnp.round(jnp.sqrt(area / ar)).astype(jnp.int32)
        # Uniform integers in {0, ..., H - h} and {0, ..., W - w} (inclusive, like random.randint).
        top = _uniform_int(u[2], jnp.maximum(gh - h, 0) + 1)
        left = _uniform_int(u[3], jnp.maximum(gw - w, 0) + 1)
        rect = _rectangle(grid_hw, top, left, h, w).reshape(-1)
        new = (rect & ~mask).sum()
        ok = (h < gh) & (w < gw) & (new >= 1) & (new <= cap)   # strict h < H, w < W as in CAE
        return rect, ok

    rects, ok = jax.vmap(attempt)(jax.random.uniform(key, (candidates, 4)))
    first = jnp.argmax(ok)                                     # index of the first True, else 0
    return jnp.where(ok[first], mask | rects[first], mask)


def _block_mask(key, grid_hw, num_masked: int, min_block: float = 16, max_block: int | None = None,
                aspect=(0.3, 1 / 0.3), max_attempts: int = 2048, candidates: int = 8):
    """block_mask plus diagnostics: (mask [N], loop iterations, cells filled by the fallback)."""
    gh, gw = grid_hw
    n = gh * gw
    _check_count(n, num_masked)
    max_block = num_masked if max_block is None else max_block
    max_steps = -(-max_attempts // candidates)
    loop_key, fill_key = jax.random.split(key)

    def not_done(carry):
        mask, step = carry
        return (mask.sum() < num_masked) & (step < max_steps)

    def body(carry):
        mask, step = carry
        mask = _block_step(jax.random.fold_in(loop_key, step), mask, grid_hw, num_masked, min_block,
                           max_block, aspect, candidates)
        return mask, step + 1

    mask, steps = jax.lax.while_loop(not_done, body, (jnp.zeros(n, bool), jnp.int32(0)))

    # Fallback for a run that hit the bound: add uniformly random unmasked cells until the count
    # is exact (the official generator would just keep trying). Sort unmasked cells first, in a
    # random order, and take as many as are missing; a no-op when the loop finished.
    missing = num_masked - mask.sum()
    order = jnp.argsort(jnp.where(mask, 2.0, jax.random.uniform(fill_key, (n,))))
    fill = jnp.zeros(n, bool).at[order].set(jnp.arange(n) < missing)
    return mask | fill, steps, missing


def block_mask(key, grid_hw, num_masked: int, min_block: float = 16, max_block: int | None = None,
               aspect=(0.3, 1 / 0.3), max_attempts: int = 2048, candidates: int = 8) -> jax.Array:
    """BEiT/CAE block-wise masking with an exact count (docs/methods/cae_v2.md §3).

    Until exactly `num_masked` cells are masked, with cap = min(remaining, max_block) (max_block
    defaults to num_masked, as in CAE): draw area ~ U(min_block, cap) (bounds swapped when
    cap < min_block, like Python's random.uniform), aspect ratio log-uniform in `aspect`,
    h = round(sqrt(area*ar)), w = round(sqrt(area/ar)); only if h < H and w < W, draw top and left
    uniformly (inclusive); accept the rectangle if it adds between 1 and cap new cells.

    CAE's generator loops until the count is exact, with no bound. Here the loop is a
    jax.lax.while_loop over at most `max_attempts` attempts, `candidates` per iteration (same
    distribution, see `_block_step`). If the bound is ever hit, the remaining cells are filled with
    uniformly random unmasked cells so the count stays exact. The default bound (2048 attempts =
    256 iterations) essentially never binds: the number of iterations has a short exponential tail,
    and over 10^6 masks for each of 14x14 with K in {16, 30, 49, 98, 147} and 16x16 with K = 166
    the mean was 4-10 iterations, the 99.99th percentile <= 35 and the maximum 54; the fallback
    never fired. (One attempt per iteration would need up to ~420 sequential iterations; under
    vmap the whole batch waits for its slowest mask.)
    """
    return _block_mask(key, grid_hw, num_masked, min_block, max_block, aspect, max_attempts,
                       candidates)[0]


# ---- CAPI inverse block --------------------------------------------------------------------------

def _log_aspect_bounds(grid_hw, num_visible: int, aspect):
    """CAPI clamps log(ar) to [log(n/W^2), log(H^2/n)], which keeps h <= H and w <= W."""
    gh, gw = grid_hw
    lo = max(math.log(aspect[0]), math.log(num_visible / gw ** 2))
    hi = min(math.log(aspect[1]), math.log(gh ** 2 / num_visible))
    if lo > hi:
        raise ValueError(f"No aspect ratio in {aspect} fits {num_visible} visible cells in a "
                         f"{gh}x{gw} grid.")
    return lo, hi


def inverse_block_params(key, grid_hw, num_masked: int, aspect=(0.5, 2.0)):
    """The random draws of CAPI's inverse block mask: int32 (h, w, top, left, shift_y, shift_x)."""
    gh, gw = grid_hw
    n = gh * gw - num_masked                      # visible cells
    lo, hi = _log_aspect_bounds(grid_hw, n, aspect)
    k_ar, k_top, k_left, k_sy, k_sx = jax.random.split(key, 5)
    ar = jnp.exp(jax.random.uniform(k_ar, (), minval=lo, maxval=hi))
    # ceil so that h*w >= n. Mathematically h <= H and w <= W by the bounds above; the minimum
    # only absorbs float32 rounding at the bound (CAPI adds 1e-5 to n for the same reason).
    h = jnp.minimum(jnp.ceil(jnp.sqrt(n * ar)).astype(jnp.int32), gh)
    w = jnp.minimum(jnp.ceil(jnp.sqrt(n / ar)).astype(jnp.int32), gw)
    top = jax.random.randint(k_top, (), 0, gh - h + 1)
    left = jax.random.randint(k_left, (), 0, gw - w + 1)
    shift_y = jax.random.randint(k_sy, (), 0, gh)
    shift_x = jax.random.randint(k_sx, (), 0, gw)
    return h, w, top, left, shift_y, shift_x


def inverse_block_from_params(grid_hw, num_masked: int, h, w, top, left, shift_y, shift_x):
    """Deterministic part of CAPI's mask: the first n = N - num_masked cells (raster order) of the
    h x w rectangle at (top, left) are visible (full rows plus one partial row), the grid is rolled
    cyclically by (shift_y, shift_x), and the mask is the complement. Needs h*w >= n."""
    gh, gw = grid_hw
    n = gh * gw - num_masked
    rect = _rectangle(grid_hw, top, left, h, w).reshape(-1)
    visible = rect & (jnp.cumsum(rect) <= n)      # cumsum = 1-based raster rank inside the rectangle
    visible = jnp.roll(visible.reshape(gh, gw), (shift_y, shift_x), axis=(0, 1))
    return ~visible.reshape(-1)


def inverse_block_mask(key, grid_hw, num_masked: int, aspect=(0.5, 2.0), roll: bool = True):
    """CAPI (docs/methods/capi.md §2): a visible block of exactly N - num_masked cells, rolled, then inverted.

    The roll (uniform in {0..H-1} x {0..W-1}, with wrap-around) makes every position equally likely
    to be masked; without it the centre is favoured. The visible region may wrap around the edges.
    """
    gh, gw = grid_hw
    _check_count(gh * gw, num_masked)
    if num_masked == gh * gw:                     # nothing visible (CAPI returns this too)
        return jnp.ones(gh * gw, bool)
    h, w, top, left, shift_y, shift_x = inverse_block_params(key, grid_hw, num_masked, aspect)
    if not roll:
        shift_y = shift_x = 0
    return inverse_block_from_params(grid_hw, num_masked, h, w, top, left, shift_y, shift_x)


# ---- indices -------------------------------------------------------------------------------------

def mask_indices(mask: jax.Array, num_masked: int):
    """(visible_idx [N-K], masked_idx [K]) int32, each ascending.

    The encoder gathers visible tokens with the first, the decoder scatters predictions back with
    the second. `num_masked` must be the mask's exact (static) count.
    """
    n = mask.shape[0]
    order = jnp.argsort(mask, stable=True)        # False (visible) first; stable keeps positions ascending
    return order[: n - num_masked].astype(jnp.int32), order[n - num_masked:].astype(jnp.int32)


# ---- config --------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """How a method masks: the patch grid, the exact (static) number of masked patches and the
    sampler, built once from `config.method.mask`; `sample` runs inside the jitted step."""
    grid: tuple[int, int]
    num_masked: int
    sampler: Sampler

    @classmethod
    def from_config(cls, cfg, grid_hw) -> "MaskPlan":
        grid_hw = tuple(grid_hw)
        return cls(grid=grid_hw, num_masked=num_masked_from_config(cfg, grid_hw[0] * grid_hw[1]),
                   sampler=sampler_from_config(cfg, grid_hw))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_visible(self) -> int:
        return self.num_patches - self.num_masked

    def sample(self, keys: jax.Array):
        """keys [B] -> (masks [B, N] bool, visible_idx [B, N-K], masked_idx [B, K]), indices ascending."""
        masks = sample_masks(self.sampler, keys)
        visible, masked = jax.vmap(lambda m: mask_indices(m, self.num_masked))(masks)
        return masks, visible, masked


_OPTIONS = {
    "random": (),
    "block": ("min_block", "max_block", "aspect", "max_attempts", "candidates"),
    "inverse_block": ("aspect", "roll"),
}


def num_masked_from_config(cfg, num_patches: int) -> int:
    """`num_masked` if set, else int(num_patches * ratio) (CAE's and CAPI's rounding)."""
    k = cfg.get("num_masked")
    k = int(num_patches * cfg["ratio"]) if k is None else int(k)
    _check_count(num_patches, k)
    return k


def sampler_from_config(cfg, grid_hw) -> Sampler:
    """{'type': 'random'|'block'|'inverse_block', 'num_masked': K or 'ratio': r, **options} -> a
    sampler key -> mask [N]. Options: block: min_block, max_block, aspect, max_attempts,
    candidates; inverse_block: aspect, roll. Unknown keys raise (catches typos in configs)."""
    kind = cfg["type"]
    if kind not in _OPTIONS:
        raise ValueError(f"Unknown mask type {kind!r}: use one of {sorted(_OPTIONS)}.")
    unknown = set(cfg.keys()) - {"type", "ratio", "num_masked", *_OPTIONS[kind]}
    if unknown:
        raise ValueError(f"Unknown options {sorted(unknown)} for mask type {kind!r}.")
    n = grid_hw[0] * grid_hw[1]
    k = num_masked_from_config(cfg, n)
    options = {name: cfg[name] for name in _OPTIONS[kind] if cfg.get(name) is not None}
    if "aspect" in options:
        options["aspect"] = tuple(options["aspect"])
    grid_hw = tuple(grid_hw)
    if kind == "random":
        return lambda key: random_mask(key, n, k)
    if kind == "block":
        return lambda key: block_mask(key, grid_hw, k, **options)
    return lambda key: inverse_block_mask(key, grid_hw, k, **options)


def _check_count(num_patches: int, num_masked: int):
    if not 0 <= num_masked <= num_patches:
        raise ValueError(f"num_masked={num_masked} must be in [0, {num_patches}].")
