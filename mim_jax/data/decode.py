"""Decoding a record's image in the Grain workers, at reduced scale where a crop allows it.

Training sources hand the transforms the encoded bytes (TFDS `SkipDecoding`), so the decode can
know the crop first: a random-resized crop whose box is at least 2x (4x, 8x) the output on both
sides is decoded by libjpeg at 1/2 (1/4, 1/8) scale (its DCT-domain downscaling, far cheaper than
a full decode followed by a large area resize). The box is the same one the full-size path draws
(same random stream, the header gives the full size); only resampling differs. PNG and other
formats decode at full size. Never import jax here.
"""
from __future__ import annotations

import io

import cv2
import numpy as np
from PIL import Image

_FULL = {1: cv2.IMREAD_GRAYSCALE, 3: cv2.IMREAD_COLOR}
_REDUCED = {  # factor -> channels -> flag
    2: {1: cv2.IMREAD_REDUCED_GRAYSCALE_2, 3: cv2.IMREAD_REDUCED_COLOR_2},
    4: {1: cv2.IMREAD_REDUCED_GRAYSCALE_4, 3: cv2.IMREAD_REDUCED_COLOR_4},
    8: {1: cv2.IMREAD_REDUCED_GRAYSCALE_8, 3: cv2.IMREAD_REDUCED_COLOR_8},
}


def is_encoded(image) -> bool:
    return isinstance(image, (bytes, np.bytes_)) or (isinstance(image, np.ndarray) and image.dtype.kind in "SO")


def _buffer(image) -> np.ndarray:
    if isinstance(image, np.ndarray) and image.dtype.kind == "O":
        image = image.item()
    return np.frombuffer(bytes(image), np.uint8)


def _imdecode(image, flag: int, channels: int) -> np.ndarray:
    out = cv2.imdecode(_buffer(image), flag)
    if out is None:
        raise ValueError("A record's image could not be decoded (corrupt or not an image): re-prepare the data set.")
    if channels == 3:
        out = cv2.cvtColor(out, cv2.COLOR_BGR2RGB)
    return out.reshape(out.shape[0], out.shape[1], channels)   # cv2 drops a single channel axis


def image(record_image, channels: int) -> np.ndarray:
    """HWC uint8 from a record's image (encoded bytes, or an array from a decoding source)."""
    if not is_encoded(record_image):
        return record_image
    return _imdecode(record_image, _FULL[channels], channels)


def label_map(record_mask) -> np.ndarray:
    """[H, W] integer labels from a record's per-pixel label (an encoded PNG or an array), taken as
    stored: never converted to grey (a colour PNG's first channel holds the label, as in ADE20K)."""
    if is_encoded(record_mask):
        out = cv2.imdecode(_buffer(record_mask), cv2.IMREAD_UNCHANGED)
        if out is None:
            raise ValueError("A record's label map could not be decoded: re-prepare the data set.")
    else:
        out = np.asarray(record_mask)
    return out[..., 0] if out.ndim == 3 else out


def header(record_image) -> tuple[int, int, str]:
    """(height, width, format) from the encoded image's header, without decoding it."""
    with Image.open(io.BytesIO(bytes(_buffer(record_image)))) as im:
        return im.height, im.width, im.format


def reduction(box_h: int, box_w: int, size: int, max_factor: int = 8) -> int:
    """The largest libjpeg scale factor (1, 2, 4, 8) that keeps the box at least `size` on both sides."""
    factor = 1
    for f in (2, 4, 8):
        if f <= max_factor and box_h >= f * size and box_w >= f * size:
            factor = f
    return factor


def crop_region(record_image, box, size: int, channels: int, max_factor: int = 8, known_header=None) -> np.ndarray:
    """The pixels of `box` = (top, left, h, w) in full-size coordinates, decoded at the largest
    scale reduction that keeps them at least `size` on both sides (JPEG only), then cropped.
    `known_header` is `header(record_image)` where the caller has read it already."""
    top, left, h, w = box
    height, width, fmt = known_header or header(record_image)
    factor = reduction(h, w, size, max_factor) if fmt == "JPEG" else 1
    if factor == 1:
        return image(record_image, channels)[top:top + h, left:left + w]
    small = _imdecode(record_image, _REDUCED[factor][channels], channels)
    # libjpeg's scaled output is ceil(full / factor) on each side; map the box by the true ratio.
    sy, sx = small.shape[0] / height, small.shape[1] / width
    y0, x0 = int(round(top * sy)), int(round(left * sx))
    y1, x1 = max(int(round((top + h) * sy)), y0 + 1), max(int(round((left + w) * sx)), x0 + 1)
    return small[y0:y1, x0:x1]
