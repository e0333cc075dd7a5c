"""ContrastiveCrop's sampler and CMAE's second-view colour augmentations, against independent
NumPy transcriptions of the official algorithms (ContrastiveCrop.get_params, torchvision
ColorJitter / RandomGrayscale) and against colorsys / PIL.

Everything runs on fixed seeds, so it is deterministic; the statistical thresholds are strict
(alpha = 1e-4 per test) so that a correct sampler passes for essentially any seed.
"""
import colorsys
import math

import numpy as np
import pytest
from scipy import stats

from mim_jax.data import transforms
from mim_jax.methods.cmae import contrastive_crop as cc

ALPHA = 1e-4
N = 20_000
HEIGHT, WIDTH = 96, 160     # non-square, so a row/column mix-up shows
BOXES = {
    "full": (0.0, 0.0, 1.0, 1.0),
    "small_off_centre": (0.55, 0.1, 0.7, 0.3),
    "corner": (0.0, 0.8, 0.25, 1.0),          # touches the top-right corner
    "heatmap_float32": tuple(np.float32([9 / 96, 31 / 160, 58 / 96, 159 / 160])),
}


def official_get_params(height, width, rng, box, scale, ratio, alpha):
    """ContrastiveCrop.get_params transcribed loop for loop, numpy's Generator in place of torch."""
    area = height * width
    log_ratio = np.log(np.asarray(ratio, np.float64))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = float(np.exp(rng.uniform(log_ratio[0], log_ratio[1])))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            h0, w0, h1, w1 = (float(v) for v in box)    # the dataset passes box.float().tolist()
            ch0 = min(max(int(height * h0) - h // 2, 0), height - h)
            ch1 = min(max(int(height * h1) - h // 2, 0), height - h)
            cw0 = min(max(int(width * w0) - w // 2, 0), width - w)
            cw1 = min(max(int(width * w1) - w // 2, 0), width - w)
            i = ch0 + int((ch1 - ch0) * rng.beta(alpha, alpha))
            j = cw0 + int((cw1 - cw0) * rng.beta(alpha, alpha))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draws(fn, box, seed, n=N, alpha=0.6, scale=(0.2, 1.0)):
    """[n, 4] (top, left, h, w) from one generator."""
    rng = np.random.default_rng(seed)
    return np.array([fn(HEIGHT, WIDTH, rng, box=box, scale=scale, ratio=(3 / 4, 4 / 3), alpha=alpha)
                     for _ in range(n)])


def ours(height, width, rng, box, scale, ratio, alpha):
    return cc.sample_box_crop(height, width, rng, box=box, scale=scale, ratio=ratio, alpha=alpha)


def features(crops):
    """(h, w, centre row, centre column): the quantities whose distributions must agree."""
    top, left, h, w = crops.T
    return {"h": h, "w": w, "centre_y": top + h // 2, "centre_x": left + w // 2}


@pytest.mark.parametrize("name", list(BOXES))
def test_sampler_matches_official_distribution(name):
    box = BOXES[name]
    mine, reference = draws(ours, box, seed=1), draws(official_get_params, box, seed=2)
    for key, values in features(mine).items():
        p = stats.ks_2samp(values, features(reference)[key]).pvalue
        assert p > ALPHA, (name, key, p)


def test_sampler_uses_the_official_draw_order():
    """Same seed, same draws (uniform, uniform per try; then the row Beta, the column Beta)."""
    for name, box in BOXES.items():
        np.testing.assert_array_equal(draws(ours, box, seed=3, n=2000, alpha=0.1),
                                      draws(official_get_params, box, seed=3, n=2000, alpha=0.1), err_msg=name)


def test_transposed_box_is_rejected():
    """The comparison has power: rows and columns of the box swapped are caught by far."""
    h0, w0, h1, w1 = BOXES["small_off_centre"]
    mine = features(draws(ours, (w0, h0, w1, h1), seed=4))
    reference = features(draws(official_get_params, (h0, w0, h1, w1), seed=5))
    assert stats.ks_2samp(mine["centre_y"], reference["centre_y"]).pvalue < 1e-12


class BetaCounter:
    """A Generator stand-in that counts Beta draws: a crop drawn without one is the fallback."""

    def __init__(self, seed):
        self.rng, self.betas = np.random.default_rng(seed), 0

    def uniform(self, low, high):
        return self.rng.uniform(low, high)

    def beta(self, a, b):
        self.betas += 1
        return self.rng.beta(a, b)


@pytest.mark.parametrize("name", list(BOXES))
def test_crop_centre_lies_in_the_box_as_clipping_allows(name):
    """What the official formulas guarantee, exactly.

    Along one axis (size S, crop c, box pixel range [a, b] = [int(S*lo), int(S*hi)]) the top is
    drawn in [clip(a - c//2), clip(b - c//2)] with clip to [0, S - c]; so the centre t + c//2 lies
    in [clip(a), clip(b)] with clip to [lo_c, hi_c] = [c//2, S - c + c//2], the centres that keep
    the crop inside the image. Hence: if [a, b] meets [lo_c, hi_c], the centre lies in their
    intersection (inside the box); otherwise it is pinned to the end of [lo_c, hi_c] nearest the
    box. The fallback (all 10 sizes rejected, about 1 draw in 2500 here) ignores the box."""
    box = BOXES[name]
    rng, crops, fallback = BetaCounter(6), [], []
    for _ in range(5000):
        before = rng.betas
        crops.append(cc.sample_box_crop(HEIGHT, WIDTH, rng, box=box, alpha=0.1))
        fallback.append(rng.betas == before)
    crops, fallback = np.array(crops), np.array(fallback)
    assert fallback.any()
    np.testing.assert_array_equal(crops[fallback], [[0, 16, 96, 128]] * fallback.sum())
    top, left, h, w = crops[~fallback].T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= HEIGHT).all() and (left + w <= WIDTH).all()
    for start, crop, size, lo, hi in ((top, h, HEIGHT, box[0], box[2]), (left, w, WIDTH, box[1], box[3])):
        a, b = int(size * float(lo)), int(size * float(hi))
        centre = start + crop // 2
        lo_c, hi_c = crop // 2, size - crop + crop // 2
        assert ((centre >= np.clip(a, lo_c, hi_c)) & (centre <= np.clip(b, lo_c, hi_c))).all()
        meets = (a <= hi_c) & (b >= lo_c)
        assert ((centre >= a) & (centre <= b))[meets].all()
        assert ((centre == lo_c) | (centre == hi_c))[~meets].all()
        # Both ends of the allowed range are reached (Beta(0.1, 0.1) piles up near 0 and 1).
        assert (centre == np.clip(a, lo_c, hi_c)).any() and (centre == np.clip(b, lo_c, hi_c)).any()


@pytest.mark.parametrize("height,width,expected", [
    (40, 100, (0, 23, 40, 53)),    # wider than 4/3: full height, width trimmed to 4/3
    (100, 40, (23, 0, 53, 40)),    # taller than 3/4: full width, height trimmed to 4/3 of it
    (50, 60, (0, 0, 50, 60)),      # ratio inside the range: the whole image
])
def test_fallback_is_the_central_crop(height, width, expected):
    """An area fraction of 2-3 never fits: all 10 tries fail and no Beta is drawn."""
    rng = np.random.default_rng(7)
    got = cc.sample_box_crop(height, width, rng, box=BOXES["small_off_centre"], scale=(2.0, 3.0))
    assert got == expected
    assert got == transforms.sample_crop_box(height, width, np.random.default_rng(7), scale=(2.0, 3.0),
                                             ratio=(3 / 4, 4 / 3))
    skipped = np.random.default_rng(7)
    skipped.uniform(size=20)
    assert rng.random() == skipped.random()


def test_contrastive_crop_resizes_the_sampled_box():
    image = np.random.default_rng(8).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    box = BOXES["corner"]
    out = cc.contrastive_crop(image, np.random.default_rng(9), box=box, size=32, alpha=0.6)
    top, left, h, w = cc.sample_box_crop(HEIGHT, WIDTH, np.random.default_rng(9), box=box, alpha=0.6)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, transforms.resize(image[top:top + h, left:left + w], 32))
    gray = cc.contrastive_crop(image[..., :1], np.random.default_rng(9), box=box, size=24, interpolation="bicubic")
    assert gray.shape == (24, 24, 1)


# ------------------------------------------------------------------------------------------------
# Colour augmentations.

def _old_grayscale(image):
    if image.shape[2] == 1:
        return image.astype(np.float32)
    return (image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]


def old_color_jitter(image, rng, brightness=0.4, contrast=0.4, saturation=0.4):
    """transforms.color_jitter as it was before the hue keyword (copied verbatim)."""
    out = image.astype(np.float32)
    for op in rng.permutation(3):
        strength = (brightness, contrast, saturation)[op]
        if not strength:
            continue
        factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
        if op == 0:
            reference = 0.0
        elif op == 1:
            reference = float(np.round(_old_grayscale(out).mean()))
        else:
            reference = _old_grayscale(out)
        out = np.clip(factor * out + (1 - factor) * reference, 0, 255)
    return np.round(out).astype(np.uint8)


def images(seed, channels, shape=(12, 10)):
    return np.random.default_rng(seed).integers(0, 256, shape + (channels,), dtype=np.uint8)


@pytest.mark.parametrize("strengths", [(0.4, 0.4, 0.4), (0.4, 0.4, 0.2), (0.0, 0.8, 0.0), (0.0, 0.0, 0.0)])
@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_without_hue_is_unchanged(strengths, channels):
    b, c, s = strengths
    for seed in range(20):
        new_rng, old_rng = np.random.default_rng(seed), np.random.default_rng(seed)
        image = images(100 + seed, channels)
        np.testing.assert_array_equal(
            transforms.color_jitter(image, new_rng, brightness=b, contrast=c, saturation=s, hue=0.0),
            old_color_jitter(image, old_rng, brightness=b, contrast=c, saturation=s))
        assert new_rng.random() == old_rng.random()      # the same number of draws


def colorsys_hue(image, factor):
    """Reference hue shift, pixel by pixel, float64: RGB -> HSV, h + factor mod 1, back."""
    out = np.empty(image.shape, np.float64)
    for idx in np.ndindex(image.shape[:2]):
        h, s, v = colorsys.rgb_to_hsv(*(image[idx] / 255.0))
        out[idx] = colorsys.hsv_to_rgb((h + factor) % 1.0, s, v)
    return out * 255.0


def reference_jitter(image, rng, brightness, contrast, saturation, hue):
    """torchvision ColorJitter's four ops in one random permutation, float64, colorsys for hue."""
    out = image.astype(np.float64)
    for op in rng.permutation(4):
        strength = (brightness, contrast, saturation, hue)[op]
        if not strength:
            continue
        if op == 3:
            out = colorsys_hue(out, rng.uniform(-hue, hue))
            continue
        factor = rng.uniform(max(0.0, 1 - strength), 1 + strength)
        gray = out @ np.array([0.299, 0.587, 0.114])
        reference = (0.0, float(np.round(gray.mean())), gray[..., None])[op]
        out = np.clip(factor * out + (1 - factor) * reference, 0, 255)
    return out


@pytest.mark.parametrize("strengths", [(0.0, 0.0, 0.0, 0.1), (0.0, 0.0, 0.0, 0.5), (0.4, 0.4, 0.2, 0.1)])
def test_hue_matches_colorsys(strengths):
    b, c, s, hue = strengths
    for seed in range(6):
        image = images(200 + seed, 3, shape=(6, 7))
        got = transforms.color_jitter(image, np.random.default_rng(seed), brightness=b, contrast=c,
                                      saturation=s, hue=hue)
        want = reference_jitter(image, np.random.default_rng(seed), brightness=b, contrast=c, saturation=s,
                                hue=hue)
        # float32 vs float64 before the final rounding: at most one grey level apart.
        assert np.abs(got.astype(np.float64) - np.round(want)).max() <= 1
        assert np.mean(got == np.round(want)) > 0.9


def test_hue_on_gray_images_is_a_no_op_that_still_draws():
    image = images(300, 1)
    rng = np.random.default_rng(10)
    np.testing.assert_array_equal(transforms.color_jitter(image, rng, brightness=0, contrast=0, saturation=0,
                                                          hue=0.5), image)
    mirror = np.random.default_rng(10)
    mirror.permutation(4)
    mirror.uniform(-0.5, 0.5)
    assert rng.random() == mirror.random()
    with pytest.raises(ValueError, match="hue"):
        transforms.color_jitter(image, rng, hue=0.6)


def test_random_color_jitter_applies_with_probability_p():
    image = images(400, 3)
    rng = np.random.default_rng(11)
    out = cc.random_color_jitter(image, rng, p=1.0)
    mirror = np.random.default_rng(11)
    mirror.random()
    np.testing.assert_array_equal(out, transforms.color_jitter(image, mirror, brightness=0.4, contrast=0.4,
                                                               saturation=0.2, hue=0.1))
    rng = np.random.default_rng(12)
    changed = [not np.array_equal(cc.random_color_jitter(image, rng, p=0.8), image) for _ in range(2000)]
    assert stats.binomtest(sum(changed), 2000, 0.8).pvalue > ALPHA


def test_random_grayscale():
    from PIL import Image
    image = images(500, 3, shape=(16, 16))
    out = cc.random_grayscale(image, np.random.default_rng(13), p=1.0)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (out == out[..., :1]).all()
    np.testing.assert_array_equal(out[..., 0], np.asarray(Image.fromarray(image).convert("L")))
    np.testing.assert_array_equal(cc.random_grayscale(image, np.random.default_rng(13), p=0.0), image)
    gray = images(501, 1)
    np.testing.assert_array_equal(cc.random_grayscale(gray, np.random.default_rng(13), p=1.0), gray)
    rng = np.random.default_rng(14)
    hits = sum(not np.array_equal(cc.random_grayscale(image, rng, p=0.2), image) for _ in range(2000))
    assert stats.binomtest(hits, 2000, 0.2).pvalue > ALPHA
