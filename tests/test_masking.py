"""Mask samplers: exact counts, statistics, and agreement with independent NumPy references.

All checks run on fixed keys and NumPy seeds, so they are deterministic; the statistical
thresholds are strict (alpha = 1e-4) so that a correct sampler passes for essentially any seed.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import masking
from mim_jax.methods.capi.method import predict_subset

try:
    from scipy import stats
except ImportError:  # the tests fall back to the Wilson-Hilferty approximation below
    stats = None

ALPHA = 1e-4             # significance level for "these agree" / "this is uniform"
ALPHA_REJECT = 1e-12     # a broken sampler must be rejected far beyond chance
# Upper normal quantiles, Phi^-1(1 - alpha), for the no-scipy fallback.
Z_UPPER = {ALPHA: 3.7190, ALPHA_REJECT: 7.0345}
# Per-position two-proportion z-tests: |z| <= 5 has two-sided p = 5.7e-7 each, so even with 256
# positions (Bonferroni) the family-wise false-alarm rate is < 1.5e-4.
Z_POSITION = 5.0
M = 3000                 # masks per statistical sample


def keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


@functools.lru_cache(maxsize=None)
def _compiled(kind, grid, k, options):
    """jit(vmap(sampler)), cached so tests that share a configuration share one compilation (about
    a second each for the block sampler's while_loop). Block returns (mask, steps, missing)."""
    options = dict(options)
    if kind == "block":
        fn = lambda key: masking._block_mask(key, grid, k, **options)
    elif kind == "random":
        fn = lambda key: (masking.random_mask(key, grid[0] * grid[1], k, **options),)
    else:
        fn = lambda key: (masking.inverse_block_mask(key, grid, k, **options),)
    return jax.jit(jax.vmap(fn))


def run(kind, grid, k, n=M, seed=0, **options):
    return [np.asarray(x) for x in _compiled(kind, grid, k, tuple(sorted(options.items())))(keys(n, seed))]


def sample(kind, grid, k, n=M, seed=0, **options):
    """n masks [n, N] as NumPy, through jit + vmap as in the train step."""
    return run(kind, grid, k, n, seed, **options)[0]


# ---- statistics helpers --------------------------------------------------------------------------

def chi2_critical(alpha, df):
    """Upper-alpha critical value of chi-square(df): scipy if installed, else the Wilson-Hilferty
    approximation (within 0.1% for df >= 100; slightly too large, i.e. conservative, for small df;
    test_chi2_fallback_is_close_to_scipy checks it)."""
    if stats is not None:
        return stats.chi2.isf(alpha, df)
    z = Z_UPPER[alpha]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def uniformity_statistic(masks, rng):
    """Chi-square statistic and df for "every position is equally likely to be masked".

    Cells of one mask are dependent (exact count, blocks), so per-cell counts are not multinomial
    and the textbook chi-square test would be miscalibrated. Instead take ONE uniformly random
    masked cell from each mask: given the fixed count K, P(pick = p) = P(p masked) / K, which is
    1/N for all p iff the marginals are uniform, and picks from different masks are independent,
    so the goodness-of-fit test is exact.
    """
    picks = np.where(masks, rng.random(masks.shape), -1.0).argmax(1)
    counts = np.bincount(picks, minlength=masks.shape[1])
    expected = len(masks) / masks.shape[1]
    return ((counts - expected) ** 2 / expected).sum(), masks.shape[1] - 1


def homogeneity_statistic(x, y, min_count=10):
    """Two-sample chi-square statistic and df for integer samples x, y (same distribution?).

    Adjacent values are pooled until each bin holds >= min_count observations of both samples
    together (so expected counts are >= ~5 with equal sample sizes)."""
    values = np.union1d(x, y)
    cx = np.array([(x == v).sum() for v in values])
    cy = np.array([(y == v).sum() for v in values])
    bins, acc = [], np.zeros(2)
    for a, b in zip(cx, cy):
        acc += (a, b)
        if acc.sum() >= min_count:
            bins.append(acc)
            acc = np.zeros(2)
    if acc.sum():
        if bins:
            bins[-1] = bins[-1] + acc
        else:
            bins.append(acc)
    table = np.array(bins)                                   # [bins, 2]
    if len(table) < 2:
        return 0.0, 1
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    return ((table - expected) ** 2 / expected).sum(), len(table) - 1


def assert_same_distribution(x, y, what):
    stat, df = homogeneity_statistic(np.asarray(x), np.asarray(y))
    assert stat < chi2_critical(ALPHA, df), (what, stat, df)


def max_position_z(a, b):
    """Largest |z| over positions of the two-proportion test "P(masked) is the same in a and b"."""
    pa, pb = a.mean(0), b.mean(0)
    pooled = (a.sum(0) + b.sum(0)) / (len(a) + len(b))
    se = np.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    z = np.where(se > 0, np.abs(pa - pb) / np.where(se > 0, se, 1), 0.0)
    return z.max()


def count_components(masks, grid_hw, wrap=False):
    """Number of 4-connected components of True cells per mask [M, N]; `wrap`: on the torus.

    Label propagation: every True cell repeatedly takes the smallest label among itself and its
    True neighbours; at the fixed point each component carries its smallest cell index, so the
    components are counted by the cells whose label is their own index."""
    gh, gw = grid_hw
    m = np.asarray(masks).reshape(-1, gh, gw)
    own = np.arange(gh * gw).reshape(gh, gw)
    label = np.where(m, own, gh * gw)
    while True:
        best = label
        for axis in (1, 2):
            for shift in (1, -1):
                nb = np.roll(label, shift, axis)
                if not wrap:                        # drop what wrapped around the edge
                    edge = [slice(None)] * 3
                    edge[axis] = 0 if shift == 1 else -1
                    nb[tuple(edge)] = gh * gw
                best = np.minimum(best, nb)
        best = np.where(m, best, gh * gw)
        if np.array_equal(best, label):
            return (m & (label == own)).sum((1, 2))
        label = best


# ---- NumPy references (independent, float64, written from the specs) ---------------------------

def np_random_mask(rng, num_patches, k):
    mask = np.zeros(num_patches, bool)
    mask[rng.choice(num_patches, k, replace=False)] = True
    return mask


def np_block_mask(rng, gh, gw, k, min_block=16, max_block=None, aspect=(0.3, 1 / 0.3)):
    """CAE furnace/masking_generator.py semantics: attempts until exactly k cells are masked."""
    max_block = k if max_block is None else max_block
    mask = np.zeros((gh, gw), bool)
    count = 0
    while count < k:
        cap = min(k - count, max_block)
        area = min_block + (cap - min_block) * rng.random()       # Python random.uniform
        ar = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
        h, w = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
        if h < gh and w < gw:
            top, left = rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1)
            new = h * w - mask[top:top + h, left:left + w].sum()
            if 0 < new <= cap:
                mask[top:top + h, left:left + w] = True
                count += new
    return mask.reshape(-1)


def np_inverse_block_params(rng, gh, gw, k, aspect=(0.5, 2.0)):
    n = gh * gw - k
    lo = max(math.log(aspect[0]), math.log(n / gw ** 2))
    hi = min(math.log(aspect[1]), math.log(gh ** 2 / n))
    ar = math.exp(rng.uniform(lo, hi))
    h = min(math.ceil(math.sqrt(n * ar)), gh)
    w = min(math.ceil(math.sqrt(n / ar)), gw)
    return (h, w, rng.integers(0, gh - h + 1), rng.integers(0, gw - w + 1),
            rng.integers(0, gh), rng.integers(0, gw))


def np_inverse_block_from_params(gh, gw, k, h, w, top, left, sy, sx):
    n = gh * gw - k
    visible = np.zeros((gh, gw), bool)
    cells = [(r, c) for r in range(top, top + h) for c in range(left, left + w)]
    for r, c in cells[:n]:
        visible[r, c] = True
    shifted = np.zeros_like(visible)
    for r in range(gh):
        for c in range(gw):
            shifted[(r + sy) % gh, (c + sx) % gw] = visible[r, c]
    return ~shifted.reshape(-1)


def np_inverse_block_mask(rng, gh, gw, k, roll=True):
    h, w, top, left, sy, sx = np_inverse_block_params(rng, gh, gw, k)
    if not roll:
        sy = sx = 0
    return np_inverse_block_from_params(gh, gw, k, h, w, top, left, sy, sx)


# ---- exact counts and the bounded loop -----------------------------------------------------------

COUNT_CASES = [
    ("random", (14, 14), 147),          # MAE
    ("random", (7, 7), 0),
    ("random", (7, 7), 49),
    ("block", (14, 14), 30),            # CAE v2 Tiny / Small / Base
    ("block", (14, 14), 49),
    ("block", (14, 14), 98),
    ("block", (14, 14), 16),            # one min-size block: the slowest loop
    ("block", (7, 7), 20),
    ("block", (14, 14), 0),
    ("inverse_block", (16, 16), 166),   # CAPI
    ("inverse_block", (14, 14), 127),
    ("inverse_block", (7, 5), 20),
    ("inverse_block", (7, 7), 0),
    ("inverse_block", (7, 7), 49),
]


@pytest.mark.parametrize("kind,grid,k", COUNT_CASES)
def test_counts_are_exact_under_jit_and_vmap(kind, grid, k):
    out = run(kind, grid, k)
    masks = out[0]
    assert masks.shape == (M, grid[0] * grid[1]) and masks.dtype == bool
    assert set(masks.sum(1)) == {k}
    if kind == "block":
        # The default bound is 2048 attempts = 256 loop steps of 8 candidates. Over 10^6 masks per
        # K (see block_mask) the longest run took 54 steps; here none may come near the bound.
        _, steps, missing = out
        assert missing.max() == 0 and steps.max() < 128, steps.max()


def test_block_fallback_keeps_the_count_exact():
    """One loop step (8 attempts) cannot place 98 cells; the fallback tops the mask up."""
    masks, steps, missing = run("block", (14, 14), 98, n=300, max_attempts=8)
    assert set(masks.sum(1)) == {98}
    assert set(steps) == {1} and (missing > 0).all()


def test_sampler_from_config():
    assert masking.num_masked_from_config({"type": "random", "ratio": 0.75}, 196) == 147
    assert masking.num_masked_from_config({"type": "random", "ratio": 0.65, "num_masked": None}, 256) == 166
    configs = [({"type": "random", "ratio": 0.75}, (14, 14), sample("random", (14, 14), 147)),
               ({"type": "block", "num_masked": 30, "min_block": 16, "aspect": [0.3, 1 / 0.3]}, (14, 14),
                sample("block", (14, 14), 30)),
               ({"type": "inverse_block", "ratio": 0.65, "roll": False}, (16, 16),
                sample("inverse_block", (16, 16), 166, roll=False))]
    for cfg, grid, expected in configs:
        sampler = masking.sampler_from_config(cfg, grid)
        np.testing.assert_array_equal(jax.jit(lambda k: masking.sample_masks(sampler, k))(keys(M)), expected)
    with pytest.raises(ValueError, match="Unknown mask type"):
        masking.sampler_from_config({"type": "checkerboard", "ratio": 0.5}, (4, 4))
    with pytest.raises(ValueError, match="Unknown options"):
        masking.sampler_from_config({"type": "random", "ratio": 0.5, "roll": True}, (4, 4))
    with pytest.raises(ValueError, match="must be in"):
        masking.sampler_from_config({"type": "random", "num_masked": 17}, (4, 4))
    with pytest.raises(ValueError, match="No aspect ratio"):
        masking.inverse_block_mask(jax.random.key(0), (2, 16), 2, aspect=(0.5, 2.0))


# ---- uniformity ----------------------------------------------------------------------------------

def test_random_mask_is_uniform_over_positions():
    rng = np.random.default_rng(0)
    stat, df = uniformity_statistic(sample("random", (14, 14), 147, n=20000), rng)
    assert stat < chi2_critical(ALPHA, df)


def test_inverse_block_roll_is_uniform_and_without_roll_is_not():
    rng = np.random.default_rng(0)
    stat, df = uniformity_statistic(sample("inverse_block", (16, 16), 166, n=20000), rng)
    assert stat < chi2_critical(ALPHA, df)
    # The same test rejects the unrolled sampler, whose visible block favours the centre.
    fixed = sample("inverse_block", (16, 16), 166, n=20000, roll=False)
    stat, df = uniformity_statistic(fixed, rng)
    assert stat > chi2_critical(ALPHA_REJECT, df)
    visible = ~fixed.reshape(-1, 16, 16)
    assert visible[:, 7:9, 7:9].mean() > 3 * visible[:, 0, 0].mean()


def test_predict_subset_is_distinct_masked_and_uniform():
    mask = masking.inverse_block_mask(jax.random.key(1), (16, 16), 166)
    picks = np.asarray(jax.jit(jax.vmap(lambda k: predict_subset(k, mask, 8)))(keys(4000)))
    assert picks.shape == (4000, 8) and picks.dtype == np.int32
    assert all(len(set(p)) == 8 for p in picks)
    assert np.asarray(mask)[picks].all()
    counts = np.bincount(picks.reshape(-1), minlength=256)[np.asarray(mask)]   # the 166 masked cells
    expected = picks.size / 166
    assert ((counts - expected) ** 2 / expected).sum() < chi2_critical(ALPHA, 165)


# ---- shapes of the masked regions ----------------------------------------------------------------

def test_inverse_block_visible_region_is_one_block_on_the_torus():
    masks = sample("inverse_block", (16, 16), 166)
    assert set(count_components(~masks, (16, 16), wrap=True)) == {1}
    # Visible regions do wrap around the edges (otherwise the roll would do nothing)...
    assert (count_components(~masks, (16, 16)) > 1).mean() > 0.5
    # ...and without the roll the block is one piece on the plane.
    unrolled = sample("inverse_block", (16, 16), 166, roll=False)
    assert set(count_components(~unrolled, (16, 16))) == {1}


def test_first_block_on_an_empty_grid_is_a_rectangle():
    empty = jnp.zeros(196, bool)
    step = jax.jit(jax.vmap(lambda k: masking._block_step(k, empty, (14, 14), 98, 16, 98, (0.3, 1 / 0.3), 1)))
    masks = np.asarray(step(keys(2000))).reshape(-1, 14, 14)
    accepted = masks[masks.any((1, 2))]
    assert len(accepted) > 1000                       # most attempts fit on an empty grid
    for m in accepted:
        rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
        assert m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()      # solid bounding box
        assert len(rows) < 14 and len(cols) < 14 and m.sum() <= 98


@pytest.mark.parametrize("k", [30, 98])
def test_block_masks_have_far_fewer_components_than_random_masks(k):
    blocks = count_components(sample("block", (14, 14), k), (14, 14))
    randoms = count_components(sample("random", (14, 14), k), (14, 14))
    assert blocks.mean() * 4 < randoms.mean(), (blocks.mean(), randoms.mean())


# ---- agreement with the NumPy references ---------------------------------------------------------

def compare_with_reference(jax_masks, np_masks, grid_hw, what):
    """Per-position marginals and the distribution of the number of connected components agree."""
    assert max_position_z(jax_masks, np_masks) < Z_POSITION, what
    assert_same_distribution(count_components(jax_masks, grid_hw), count_components(np_masks, grid_hw), what)


def test_random_mask_matches_numpy_reference():
    rng = np.random.default_rng(1)
    np_masks = np.stack([np_random_mask(rng, 196, 147) for _ in range(M)])
    compare_with_reference(sample("random", (14, 14), 147, seed=1), np_masks, (14, 14), "random")


@pytest.mark.parametrize("k", [30, 98])
def test_block_mask_matches_numpy_reference(k):
    rng = np.random.default_rng(k)
    np_masks = np.stack([np_block_mask(rng, 14, 14, k) for _ in range(M)])
    compare_with_reference(sample("block", (14, 14), k, seed=k), np_masks, (14, 14), f"block K={k}")


def test_block_reference_comparison_can_fail():
    """The same comparison rejects a block sampler with the wrong minimum block size."""
    rng = np.random.default_rng(5)
    np_masks = np.stack([np_block_mask(rng, 14, 14, 98) for _ in range(M)])
    wrong = sample("block", (14, 14), 98, seed=5, min_block=4)
    stat, df = homogeneity_statistic(count_components(wrong, (14, 14)), count_components(np_masks, (14, 14)))
    assert stat > chi2_critical(ALPHA_REJECT, df)


def test_inverse_block_matches_numpy_reference():
    # Unrolled masks, so that the marginals carry the block geometry (rolled ones are uniform).
    rng = np.random.default_rng(2)
    np_masks = np.stack([np_inverse_block_mask(rng, 16, 16, 166, roll=False) for _ in range(M)])
    jax_masks = sample("inverse_block", (16, 16), 166, seed=2, roll=False)
    assert max_position_z(jax_masks, np_masks) < Z_POSITION
    # The block shape (h, w), drawn from the log-uniform aspect ratio.
    np_hw = [100 * p[0] + p[1] for p in (np_inverse_block_params(rng, 16, 16, 166) for _ in range(M))]
    h, w, *_ = jax.vmap(lambda key: masking.inverse_block_params(key, (16, 16), 166))(keys(M, seed=3))
    assert_same_distribution(100 * np.asarray(h) + np.asarray(w), np.array(np_hw), "(h, w)")


def test_inverse_block_construction_matches_numpy_exactly():
    """For parameters drawn by the JAX sampler and for every rectangle that can hold the visible
    cells (random rolls), the JAX construction equals the NumPy one cell for cell."""
    gh, gw, k = 16, 16, 166
    n = gh * gw - k
    drawn = np.stack([np.asarray(p) for p in jax.vmap(
        lambda key: masking.inverse_block_params(key, (gh, gw), k))(keys(300, seed=4))], 1)
    h, w = drawn[:, 0], drawn[:, 1]
    # ceil(sqrt(n*ar)) * ceil(sqrt(n/ar)): at least n cells, and less than one extra row and column.
    assert (h <= gh).all() and (w <= gw).all() and (h * w >= n).all() and ((h - 1) * (w - 1) < n).all()
    rng = np.random.default_rng(4)
    exhaustive = [(h, w, top, left, rng.integers(0, gh), rng.integers(0, gw))
                  for h in range(1, gh + 1) for w in range(1, gw + 1) if h * w >= n
                  for top in range(gh - h + 1) for left in range(gw - w + 1)]
    params = np.concatenate([drawn, np.array(exhaustive)])
    build = jax.jit(jax.vmap(lambda p: masking.inverse_block_from_params((gh, gw), k, *p)))
    got = np.asarray(build(jnp.asarray(params, jnp.int32)))
    assert set(got.sum(1)) == {k}
    # The NumPy construction is slow: check every drawn case and every 7th exhaustive one.
    for i in [*range(len(drawn)), *range(len(drawn), len(params), 7)]:
        np.testing.assert_array_equal(got[i], np_inverse_block_from_params(gh, gw, k, *params[i]), str(params[i]))


# ---- indices and keys ----------------------------------------------------------------------------

def test_mask_indices_partition_the_grid():
    masks = sample("block", (7, 7), 20)[:100]
    visible, masked = jax.jit(jax.vmap(lambda m: masking.mask_indices(m, 20)))(masks)
    assert visible.shape == (100, 29) and masked.shape == (100, 20)
    assert visible.dtype == masked.dtype == jnp.int32
    for m, v, x in zip(masks, np.asarray(visible), np.asarray(masked)):
        assert (np.diff(v) > 0).all() and (np.diff(x) > 0).all()
        np.testing.assert_array_equal(np.sort(np.concatenate([v, x])), np.arange(49))
        assert not m[v].any() and m[x].all()


def test_masks_depend_on_the_example_index_only():
    key = jax.random.key(7)
    sampler = masking.sampler_from_config({"type": "inverse_block", "ratio": 0.65}, (16, 16))
    masks = jax.jit(lambda idx: masking.sample_masks(sampler, masking.example_keys(key, idx)))
    a = masks(jnp.array([5, 9, 11, 12], jnp.int32))
    b = masks(jnp.array([11, 5, 40, 7], jnp.int32))       # another batch, other order
    np.testing.assert_array_equal(a[0], b[1])
    np.testing.assert_array_equal(a[2], b[0])
    assert len({np.asarray(m).tobytes() for m in a}) == 4  # different examples differ
    # A tag separates purposes, and equals folding it into the key first (what
    # Method.example_keys does with its `purpose`).
    idx = jnp.array([5, 9], jnp.int32)
    data = lambda k: np.asarray(jax.random.key_data(k))
    tagged = data(masking.example_keys(key, idx, tag=1))
    np.testing.assert_array_equal(tagged, data(masking.example_keys(jax.random.fold_in(key, 1), idx)))
    assert not (tagged == data(masking.example_keys(key, idx))).all(1).any()


def test_chi2_fallback_is_close_to_scipy():
    if stats is None:
        pytest.skip("scipy not installed")
    for df in (3, 20, 165, 255):
        for alpha in (ALPHA, ALPHA_REJECT):
            z = Z_UPPER[alpha]
            approx = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
            exact = stats.chi2.isf(alpha, df)
            assert exact <= approx <= exact * 1.2
