"""CMAE's losses and ContrastiveCrop's boxes against float64 NumPy transcriptions of the official
code (SDMAE `ctr_loss` / `loc_loss`, ContrastiveCrop `update_box`), torch's F.interpolate, closed
forms, and an 8-device mesh (tests/conftest.py)."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mim_jax.methods.cmae import contrastive

try:
    import torch
except ImportError:
    torch = None


def reference_info_nce(q, k, temperature):
    """SDMAE ctr_loss in float64: normalise, q k^T / T, CE against the diagonal, times 2T."""
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    k = k / np.linalg.norm(k, axis=1, keepdims=True)
    logits = q @ k.T / temperature
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(log_z - np.diag(logits)) * 2 * temperature)


def reference_grouped(q, k, temperature, groups):
    return float(np.mean([reference_info_nce(qg, kg, temperature)
                          for qg, kg in zip(np.split(q, groups), np.split(k, groups))]))


def vectors(seed, b=32, d=16):
    rng = np.random.default_rng(seed)
    # Correlated pairs, so the loss is well away from log(B) and the accuracy from 0.
    q = rng.normal(size=(b, d))
    return q, q + rng.normal(scale=0.8, size=(b, d))


@pytest.mark.parametrize("temperature", [1.0, 0.2, 0.07])
@pytest.mark.parametrize("groups", [1, 4])
def test_info_nce_matches_reference(temperature, groups):
    q, k = vectors(0)
    got = contrastive.info_nce(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), temperature,
                               num_groups=groups)
    assert got.dtype == jnp.float32 and got.shape == ()
    np.testing.assert_allclose(float(got), reference_grouped(q, k, temperature, groups), rtol=2e-6)


def test_info_nce_accuracy_and_gradients():
    q, k = vectors(1)
    for groups in (1, 4):
        unit_q, unit_k = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (q, k))
        sims = [qg @ kg.T for qg, kg in zip(np.split(unit_q, groups), np.split(unit_k, groups))]
        want = np.mean(np.concatenate([s.argmax(axis=1) == np.arange(len(s)) for s in sims]))
        got = contrastive.info_nce_accuracy(jnp.asarray(q), jnp.asarray(k), num_groups=groups)
        assert 0 < want < 1 and float(got) == pytest.approx(want)
    # Keys are not stop-gradiented inside (the caller does it), and a zero vector stays finite.
    grad_k = jax.grad(lambda k: contrastive.info_nce(jnp.asarray(q), k, 0.2))(jnp.asarray(k))
    assert float(jnp.abs(grad_k).max()) > 0
    zeros = jnp.zeros((4, 8)).at[1:].set(1.0)
    assert np.isfinite(float(contrastive.info_nce(zeros, zeros, 1.0)))
    with pytest.raises(ValueError, match="divide"):
        contrastive.info_nce(jnp.asarray(q), jnp.asarray(k), 1.0, num_groups=5)


def test_info_nce_on_a_mesh():
    """Batch sharded over 8 devices: the global-negative loss is the single-device value, and
    num_groups=8 gives exactly the per-device losses averaged (SDMAE's per-GPU negatives)."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    q, k = vectors(2, b=64)
    q32, k32 = jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)
    q_sharded, k_sharded = jax.device_put(q32, sharding), jax.device_put(k32, sharding)
    assert len(q_sharded.sharding.device_set) == 8
    for groups in (1, 8):
        loss = jax.jit(functools.partial(contrastive.info_nce, temperature=0.2, num_groups=groups))
        single = float(contrastive.info_nce(q32, k32, 0.2, num_groups=groups))
        np.testing.assert_allclose(float(loss(q_sharded, k_sharded)), single, rtol=1e-6)
        if groups == 8:   # every logit stays on its device: only the final mean is reduced
            hlo = loss.lower(q_sharded, k_sharded).compile().as_text()
            assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute"))
    per_shard = np.mean([reference_info_nce(q[i * 8:(i + 1) * 8], k[i * 8:(i + 1) * 8], 0.2) for i in range(8)])
    np.testing.assert_allclose(single, per_shard, rtol=2e-6)


def test_position_loss():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(4, 10, 49))
    positions = rng.integers(0, 49, size=(4, 10))
    one_hot = np.eye(49)[positions]
    want_mse = np.mean((logits - one_hot) ** 2)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    want_ce = -np.mean(np.take_along_axis(log_probs, positions[..., None], axis=-1))
    args = (jnp.asarray(logits, jnp.float32), jnp.asarray(positions))
    np.testing.assert_allclose(float(contrastive.position_loss(*args)), want_mse, rtol=1e-6)
    np.testing.assert_allclose(float(contrastive.position_loss(*args, kind="ce")), want_ce, rtol=1e-6)
    with pytest.raises(ValueError, match="'mse', 'ce'"):
        contrastive.position_loss(*args, kind="l1")


# ------------------------------------------------------------------------------------------------
# Heat-map boxes.

def reference_upsample(m, out_h, out_w):
    """torch upsample_bilinear2d (align_corners=False) per output pixel, float64."""
    in_h, in_w = m.shape
    out = np.empty((out_h, out_w))
    for y in range(out_h):
        sy = max((y + 0.5) * in_h / out_h - 0.5, 0.0)
        y0 = int(sy)
        y1 = y0 + (1 if y0 < in_h - 1 else 0)
        ly = sy - y0
        for x in range(out_w):
            sx = max((x + 0.5) * in_w / out_w - 0.5, 0.0)
            x0 = int(sx)
            x1 = x0 + (1 if x0 < in_w - 1 else 0)
            lx = sx - x0
            out[y, x] = ((1 - ly) * ((1 - lx) * m[y0, x0] + lx * m[y0, x1])
                         + ly * ((1 - lx) * m[y1, x0] + lx * m[y1, x1]))
    return out


def reference_boxes(heat, out_h, out_w, t):
    """ContrastiveCrop update_box, float64, one image at a time."""
    boxes = []
    for m in heat.astype(np.float64):
        m = m - m.min()
        m = m / m.max()
        m = reference_upsample(m, out_h, out_w)
        rows = np.nonzero(m.max(axis=1) > t)[0]
        cols = np.nonzero(m.max(axis=0) > t)[0]
        boxes.append([rows[0] / out_h, cols[0] / out_w, rows[-1] / out_h, cols[-1] / out_w])
    return np.array(boxes)


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("in_hw,out_hw", [((14, 14), (224, 224)), ((7, 5), (32, 45)), ((14, 14), (10, 9))])
def test_upsampling_matches_torch(in_hw, out_hw):
    x = np.random.default_rng(4).random((3,) + in_hw).astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x)[:, None], size=out_hw, mode="bilinear",
                                           align_corners=False)[:, 0].numpy()
    np.testing.assert_allclose(np.asarray(contrastive.upsample_bilinear(jnp.asarray(x), out_hw)), want, atol=1e-6)
    np.testing.assert_allclose(reference_upsample(x[0].astype(np.float64), *out_hw), want[0], atol=1e-6)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_boxes_match_torch_update_box():
    """The body of the official update_box run in torch (float32) on random maps."""
    heat = np.random.default_rng(5).normal(size=(8, 14, 14)).astype(np.float32)
    maps = torch.from_numpy(heat).view(8, -1)
    maps = maps - maps.min(1, keepdim=True)[0]
    maps = (maps / maps.max(1, keepdim=True)[0]).view(8, 1, 14, 14)
    maps = torch.nn.functional.interpolate(maps, size=(224, 224), mode="bilinear", align_corners=False)
    for t in (0.1, 0.5):
        want = []
        for hmap in maps:
            hmap = hmap.squeeze(0)
            h_min, h_max = torch.nonzero((hmap.max(1)[0] > t).int()).view(-1)[[0, -1]] / 224
            w_min, w_max = torch.nonzero((hmap.max(0)[0] > t).int()).view(-1)[[0, -1]] / 224
            want.append([h_min, w_min, h_max, w_max])
        np.testing.assert_array_equal(np.asarray(contrastive.heatmap_boxes(jnp.asarray(heat), 224, t)),
                                      np.array(want, np.float32))


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.9])
def test_boxes_match_reference_on_random_maps(threshold):
    rng = np.random.default_rng(6)
    # Smooth blobs (a few Gaussians) as well as white noise.
    yy, xx = np.mgrid[:7, :6]
    blobs = sum(np.exp(-((yy - rng.uniform(0, 7, (6, 1, 1))) ** 2 + (xx - rng.uniform(0, 6, (6, 1, 1))) ** 2)
                       / rng.uniform(0.5, 4, (6, 1, 1))) for _ in range(3))
    heat = np.concatenate([blobs, rng.random((6, 7, 6))]).astype(np.float32)
    boxes = jax.jit(contrastive.heatmap_boxes, static_argnums=(1,))(jnp.asarray(heat), (40, 36), threshold)
    assert boxes.shape == (12, 4) and boxes.dtype == jnp.float32
    want = reference_boxes(heat, out_h=40, out_w=36, t=threshold).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(boxes), want)


def expected_extent(first_cell, last_cell, cells, out, t):
    """Closed form for a 0/1 step of cells [first_cell, last_cell] (at least two cells wide, so
    its peak is 1) upsampled from `cells` to `out` samples, scale s = out/cells. Just outside
    the step the value ramps linearly: at output o the source is (o + 0.5)/s - 0.5, so the first
    sample above t has o > s (first - 1/2 + t) - 1/2 and the last o < s (last + 3/2 - t) - 1/2."""
    s = out / cells
    lower, upper = s * (first_cell - 0.5 + t) - 0.5, s * (last_cell + 1.5 - t) - 0.5
    for edge in (lower, upper):
        assert abs(edge - round(edge)) > 1e-3      # no float ties in the chosen cases
    first = 0 if first_cell == 0 else math.floor(lower) + 1
    last = out - 1 if last_cell == cells - 1 else math.ceil(upper) - 1
    return first, last


@pytest.mark.parametrize("cells,out,rect", [
    ((14, 14), (224, 224), (3, 5, 8, 10)),      # (row0, col0, row1, col1), inclusive
    ((14, 14), (224, 224), (0, 12, 1, 13)),     # touching the top and right borders
    ((7, 5), (32, 45), (2, 1, 5, 2)),           # non-integer scales
])
@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5])
def test_bright_rectangle_gives_its_box(cells, out, rect, threshold):
    heat = np.full(cells, 0.2, np.float32)
    r0, c0, r1, c1 = rect
    heat[r0:r1 + 1, c0:c1 + 1] = 3.0
    top, bottom = expected_extent(r0, r1, cells=cells[0], out=out[0], t=threshold)
    left, right = expected_extent(c0, c1, cells=cells[1], out=out[1], t=threshold)
    want = np.array([top / out[0], left / out[1], bottom / out[0], right / out[1]], np.float32)
    got = np.asarray(contrastive.heatmap_boxes(jnp.asarray(heat[None]), out, threshold))[0]
    np.testing.assert_array_equal(got, want)
    reference = reference_boxes(heat[None], out_h=out[0], out_w=out[1], t=threshold)[0]
    np.testing.assert_array_equal(got, reference.astype(np.float32))
    if threshold == 0.5 and cells[0] == 14:
        # At t = 0.5 with scale 16 the box is the rectangle's pixel extent, last index not incremented.
        np.testing.assert_array_equal(got, np.float32([r0 / 14, c0 / 14, (r1 + 1) / 14 - 1 / 224,
                                                       (c1 + 1) / 14 - 1 / 224]))


def test_degenerate_maps_give_the_whole_image():
    heat = jnp.stack([jnp.full((14, 14), 3.0), jnp.zeros((14, 14)),
                      jax.random.normal(jax.random.key(0), (14, 14))]).astype(jnp.bfloat16)
    boxes = np.asarray(contrastive.heatmap_boxes(heat, 224, 0.1))
    assert np.isfinite(boxes).all()
    np.testing.assert_array_equal(boxes[:2], [[0, 0, 1, 1]] * 2)   # constant: nothing to localise
    assert (boxes[2] != [0, 0, 1, 1]).any()
    # Nothing above the threshold (the official code would fail to index): the whole image too.
    np.testing.assert_array_equal(np.asarray(contrastive.heatmap_boxes(heat[2:], 224, 1.0)), [[0, 0, 1, 1]])
    # Everything active: the official (0, 0, 223/224, 223/224) of issue cc#15.
    np.testing.assert_array_equal(np.asarray(contrastive.heatmap_boxes(heat[2:], 224, -1.0)),
                                  np.float32([[0, 0, 223 / 224, 223 / 224]]))
