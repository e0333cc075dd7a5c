"""Turns a folder of your own images into a TFDS data set (array_record) that any config reads.

  python -m mim_jax.data.prepare_folder --src=DIR --name=NAME [--val_fraction=0.1] [--seed=0]
      [--data_dir=TFDS_DIR] [--overwrite] [--num_workers=N] [--masks=MASK_DIR]

then train with `--config.input.dataset=NAME [--config.input.data_dir=TFDS_DIR]` plus the
channels/mean/std overrides the command prints at the end (the data set is not in
`catalog.DATASETS`, so configs would otherwise assume RGB ImageNet statistics).

Layout. DIR with (non-hidden) subfolders: each subfolder is a class, labels follow the sorted
folder names (stored as the ClassLabel's names), images are found at any depth inside them and
files lying directly in DIR are skipped. DIR without subfolders: every image gets label 0, of a
single class named after DIR. Hidden files and folders (".name") are ignored. Symbolic links are
followed, each real file and folder once: a link to a folder listed already (a loop such as
`ln -s . DIR/loop`, or a second name) and a second name of a file are skipped and listed.

Images. Every file is opened and fully decoded with PIL: a file that is not an image, or cannot be
decoded (truncated, corrupt), is skipped, and its name and the reason are written to
TFDS_DIR/NAME/skipped.txt. The data set has 1 channel if every image is grayscale (PIL modes 1, L,
LA, I;16, I, F: alpha is dropped, 16-bit values are scaled to 8 bits), otherwise 3 (grayscale
images are replicated, RGBA/LA/palette/CMYK converted to RGB as PIL's `convert("RGB")` does,
dropping alpha). The channel count is the Image feature's shape, (None, None, C), which
`pipeline.open_source(..., channels=)` checks against config.input.channels. JPEG and PNG files
already in the data set's form (8-bit L or RGB) are stored byte for byte; everything else is
converted and stored as PNG (lossless, EXIF orientation applied, as OpenCV applies it when the
pipeline decodes a stored JPEG). Images whose longer side exceeds MAX_SIDE (2048) are stored
downscaled to it, as PNG (a JPEG is decoded at a reduced scale first); files over PIL's
decompression-bomb limit (about 179 million pixels) are skipped. Records keep the encoded bytes,
which the pipeline decodes itself (data/decode.py).

Masks (--masks=MASK_DIR, for the segmentation probe). Each image's per-pixel labels are the file
at the same relative path in MASK_DIR with the extension .png, .bmp, .tif or .tiff (lossless: the
values are the labels): one channel (mode L, P (palette indices), 1 or I with values <= 255).
They are stored as the feature `segmentation` (PNG), resized nearest to the stored image's size
when that was downscaled; an image without a mask, or whose mask has another aspect ratio, is
skipped and listed. The labels found are saved in the metadata (mask_labels).

Splits. `train`, and with --val_fraction > 0 a held-out split named `test`: the split the
evaluators (kNN, linear/attentive probes, fine-tuning's accuracy) read for data sets outside
`catalog.EVAL_SPLITS`, so periodic and standalone evaluations work without an eval_split
override. It takes round(val_fraction x n) images of every class (stratified), chosen by a
permutation seeded by --seed over the sorted file names: the same folder and seed give the same
split. Per-channel mean/std are computed over the train images' pixels (in [0, 1]), every image
weighing the same whatever its size, and saved with the channel count and class names in the data
set's metadata (metadata.json).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import re
import shutil
import sys
import warnings

import numpy as np
from PIL import Image, ImageOps

from mim_jax.errors import UserFacingError

VERSION = "1.0.0"
HELD_OUT_SPLIT = "test"   # evaluators' eval split for data sets outside catalog.EVAL_SPLITS
SKIPPED_LOG = "skipped.txt"
GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# (format, mode) stored byte for byte: OpenCV decodes them to exactly what the conversion gives.
PASSTHROUGH = frozenset({("JPEG", "L"), ("JPEG", "RGB"), ("PNG", "L"), ("PNG", "RGB")})
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# Images are stored with their longer side at most MAX_SIDE (larger ones downscaled: training crops
# and resizes to a few hundred pixels); files over PIL's decompression-bomb limit (2 x
# Image.MAX_IMAGE_PIXELS, about 179 million pixels) are skipped undecoded.
MAX_SIDE = 2048
_POOL_MIN_FILES = 64   # fewer files are inspected in this process (worker start-up costs more)


class FolderError(UserFacingError, ValueError):
    pass


@dataclasses.dataclass
class Prepared:
    """What `prepare_folder` built."""
    name: str
    data_dir: str            # the TFDS data dir (parent of NAME/)
    dataset_dir: str         # data_dir/NAME/VERSION
    channels: int
    mean: tuple
    std: tuple
    class_names: list
    split_sizes: dict        # split -> number of images
    skipped: list            # (relative path, reason)
    skipped_log: str
    data_dir_given: bool = True
    mask_labels: list | None = None   # with --masks: the labels the masks hold

    def overrides(self) -> str:
        """The config flags that train on this data set."""
        def fmt(values):   # a tuple literal, quoted for the shell
            return "'(" + ",".join(f"{v:.4f}" for v in values) + ("," if len(values) == 1 else "") + ")'"
        flags = [f"--config.input.dataset={self.name}"]
        if self.data_dir_given:
            flags.append(f"--config.input.data_dir={self.data_dir}")
        flags += [f"--config.input.channels={self.channels}", f"--config.input.mean={fmt(self.mean)}",
                  f"--config.input.std={fmt(self.std)}"]
        return " ".join(flags)


# ----------------------------------------------------------------------------------- the folder

def _visible(names):
    return sorted(n for n in names if not n.startswith("."))


def list_folder(src: str):
    """(class names, [(relative path, label)], [(relative path, reason)], layout) of the folder.
    Symbolic links are followed, each real file and folder once: a link to a folder already listed
    (a loop such as `ln -s . SRC/loop`) and a second name of a file already listed are skipped."""
    if not os.path.isdir(src):
        raise FolderError(f"--src={src} is not a folder.")
    top = _visible(os.listdir(src))
    walked = {os.path.realpath(src)}       # folders listed: a link to one of them is not followed
    skipped, subdirs = [], []
    for name in (n for n in top if os.path.isdir(os.path.join(src, n))):
        real = os.path.realpath(os.path.join(src, name))
        if real in walked or os.path.realpath(src).startswith(real + os.sep):
            skipped.append((name, f"a link to {real}, listed already (a loop or a second name)"))
        else:
            walked.add(real)
            subdirs.append(name)
    files_seen = {}                        # real path -> the relative path it is listed under
    if not subdirs:   # flat: one class
        base = os.path.basename(os.path.normpath(os.path.abspath(src))) or "images"
        flat = [n for n in top if not os.path.isdir(os.path.join(src, n))]
        return [base], [(n, 0) for n in _once(src, flat, files_seen, skipped)], skipped, "flat"
    skipped += [(n, "outside the class folders") for n in top if n not in subdirs and
                not os.path.isdir(os.path.join(src, n))]
    files = []
    for label, cls in enumerate(subdirs):
        found = []
        for root, dirs, names in os.walk(os.path.join(src, cls), followlinks=True):
            kept = []
            for d in _visible(dirs):
                real = os.path.realpath(os.path.join(root, d))
                if real in walked:
                    skipped.append((os.path.relpath(os.path.join(root, d), src),
                                    f"a link to {real}, listed already (a loop or a second name)"))
                else:
                    walked.add(real)
                    kept.append(d)
            dirs[:] = kept
            found += [os.path.relpath(os.path.join(root, n), src) for n in _visible(names)]
        files += [(path, label) for path in _once(src, sorted(found), files_seen, skipped)]
    return subdirs, files, skipped, "class_folders"


def _once(src: str, paths, files_seen: dict, skipped: list) -> list:
    """`paths` (relative to src) less the second names of files already listed (noted in `skipped`)."""
    kept = []
    for rel in paths:
        real = os.path.realpath(os.path.join(src, rel))
        if real in files_seen:
            skipped.append((rel, f"the same file as {files_seen[real]}"))
        else:
            files_seen[real] = rel
            kept.append(rel)
    return kept


def _gray(im: Image.Image) -> np.ndarray:
    """HxW uint8 of a grayscale-mode image (alpha dropped, 16/32-bit and float scaled to 8 bits)."""
    if im.mode in ("1", "L"):
        return np.asarray(im.convert("L"))
    if im.mode == "LA":
        return np.asarray(im.getchannel(0))
    a = np.asarray(im).astype(np.float64)
    if im.mode.startswith("I;16") or a.max(initial=0) > 255:   # 16-bit range
        a = a / 257.0
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def pixels(im: Image.Image, channels: int) -> np.ndarray:
    """HxWxC uint8: the documented conversion of a decoded PIL image to `channels`."""
    if im.mode in GRAY_MODES:
        g = _gray(im)[..., None]
        return g if channels == 1 else np.repeat(g, 3, axis=-1)
    if channels == 1:
        raise ValueError(f"a {im.mode} image in a 1-channel data set")   # cannot happen: channels come from the modes
    if im.mode == "P":
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"))


def _decoded(im: Image.Image) -> Image.Image:
    """The fully decoded image, its longer side at most MAX_SIDE (a JPEG decodes at a reduced scale
    first), so memory and time stay bounded whatever the file holds."""
    if max(im.size) <= MAX_SIDE:
        im.load()   # the full decode: truncated or corrupt data fails here
        return im
    im.draft(im.mode, (MAX_SIDE, MAX_SIDE))
    im.thumbnail((MAX_SIDE, MAX_SIDE))
    return im


def _open(data: bytes) -> Image.Image:
    """PIL's open, without its warning for images of 89-179 million pixels (`_decoded` bounds them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(data))


def inspect(path: str):
    """{'format', 'mode', 'size', 'mean', 'meansq'} of a readable image (its size as decoded, its
    per-channel mean and mean square, as RGB), or the reason it is skipped (a str). Runs in worker
    processes."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    try:
        im = _open(data)
    except Image.DecompressionBombError as e:
        return f"too large to decode ({e})"
    except Exception:   # noqa: BLE001 (PIL raises many types)
        return "not an image"
    try:
        fmt, mode, size = im.format, im.mode, im.size
        im = _decoded(im)
        rgb = pixels(im, 3).reshape(-1, 3)
    except Exception as e:   # noqa: BLE001
        return f"cannot be decoded ({type(e).__name__}: {str(e)[:100]})"
    if im.size != size:
        fmt = None   # stored downscaled, as PNG
    if (fmt, mode) in PASSTHROUGH:
        import cv2   # the pipeline's decoder must read the stored bytes as well
        if cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None:
            return "cannot be decoded by OpenCV"
    return {"format": fmt, "mode": mode, "size": im.size, "mean": rgb.mean(0, dtype=np.float64),
            "meansq": np.square(rgb, dtype=np.float32).mean(0, dtype=np.float64)}


def _inspect_all(paths, num_workers: int):
    if num_workers <= 1 or len(paths) < _POOL_MIN_FILES:
        return [inspect(p) for p in paths]
    import concurrent.futures
    import multiprocessing
    # spawn: the caller may have imported TensorFlow, which does not survive a fork.
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(inspect, paths, chunksize=max(1, min(256, len(paths) // (4 * num_workers)))))


def encoded(path: str, info: dict, channels: int) -> bytes:
    """The bytes a record stores: the file itself where it is already JPEG/PNG in the data set's
    form, otherwise the converted pixels as PNG."""
    with open(path, "rb") as f:
        data = f.read()
    if (info["format"], info["mode"]) in PASSTHROUGH and (channels == 3 or info["mode"] == "L"):
        return data
    with _open(data) as im:
        im = ImageOps.exif_transpose(_decoded(im))
        image = pixels(im, channels)
    out = io.BytesIO()
    Image.fromarray(image[..., 0] if channels == 1 else image).save(out, format="PNG")
    return out.getvalue()


MASK_EXTENSIONS = (".png", ".bmp", ".tif", ".tiff")
MASK_MODES = frozenset({"L", "P", "1", "I", "I;16"})


def mask_path(masks: str, rel: str) -> str | None:
    stem = os.path.join(masks, os.path.splitext(rel)[0])
    return next((stem + ext for ext in MASK_EXTENSIONS if os.path.isfile(stem + ext)), None)


def mask_labels(path: str, size) -> np.ndarray:
    """The label map of `path` as HxW uint8 at `size` (width, height), nearest; ValueError with the
    reason when it cannot be one."""
    with Image.open(path) as im:
        if im.mode not in MASK_MODES:
            raise ValueError(f"its mask is {im.mode}: a label map has one channel of labels")
        if abs(im.size[0] * size[1] - im.size[1] * size[0]) > 0.01 * im.size[0] * size[1]:
            raise ValueError(f"its mask is {im.size[0]}x{im.size[1]}, the image {size[0]}x{size[1]}")
        labels = np.asarray(im)
    if labels.max(initial=0) > 255:
        raise ValueError("its mask has labels over 255")
    labels = labels.astype(np.uint8)
    if labels.shape[::-1] != tuple(size):
        labels = np.asarray(Image.fromarray(labels).resize(tuple(size), Image.NEAREST))
    return labels


def encoded_mask(path: str, size) -> bytes:
    out = io.BytesIO()
    Image.fromarray(mask_labels(path, size)).save(out, format="PNG")
    return out.getvalue()


def split_indices(labels, val_fraction: float, seed: int):
    """(train indices, held-out indices), both sorted: round(val_fraction x n) of each class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, held_out = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        k = int(math.floor(val_fraction * len(members) + 0.5))
        held_out += list(members[:k])
        train += list(members[k:])
    return sorted(int(i) for i in train), sorted(int(i) for i in held_out)


# ------------------------------------------------------------------------------------- the builder

def _builder(name: str, data_dir, *, examples: dict, channels: int, class_names, encoding, metadata, src,
             masks: str | None = None):
    import tensorflow_datasets as tfds

    class FolderImages(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(VERSION)
        RELEASE_NOTES = {str(VERSION): "Prepared by mim_jax.data.prepare_folder."}

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, description=f"Images of the folder {src} (mim_jax.data.prepare_folder).",
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, channels), encoding_format=encoding),
                    "label": tfds.features.ClassLabel(names=list(class_names)),
                    "file_name": tfds.features.Text(),
                    **({"segmentation": tfds.features.Image(shape=(None, None, 1), encoding_format="png")}
                       if masks else {})}),
                supervised_keys=("image", "label"), metadata=tfds.core.MetadataDict(metadata))

        def _split_generators(self, dl_manager):
            del dl_manager   # nothing to download
            return {split: self._generate_examples(rows) for split, rows in examples.items() if rows}

        def _generate_examples(self, rows):
            for rel, label, info in rows:
                record = {"image": encoded(os.path.join(src, rel), info, channels), "label": label, "file_name": rel}
                if masks:
                    record["segmentation"] = encoded_mask(info["mask"], info["size"])
                yield rel, record

    FolderImages.name = name   # the folder and file names the TFDS readers look for
    return FolderImages(data_dir=data_dir, file_format="array_record")


def _check_name(name: str) -> None:
    if not _NAME.match(name or ""):
        raise FolderError(f"--name={name!r}: use lower case letters, digits and '_', starting with a letter "
                          "(a TFDS data set name).")
    import tensorflow_datasets as tfds
    try:
        tfds.builder_cls(name)
    except Exception:   # noqa: BLE001 (DatasetNotFoundError: free to use)
        return
    raise FolderError(f"--name={name} is a TFDS data set already (tfds.builder would read that one): choose "
                      "another name.")


def prepare_folder(src: str, name: str, *, data_dir: str | None = None, val_fraction: float = 0.1, seed: int = 0,
                   overwrite: bool = False, num_workers: int = 1, masks: str | None = None) -> Prepared:
    """Builds data set `name` from the images in `src` into `data_dir` (TFDS's default data dir if
    None: $TFDS_DATA_DIR or ~/tensorflow_datasets). See the module docstring for the rules."""
    import tensorflow_datasets as tfds
    _check_name(name)
    if not 0.0 <= val_fraction < 1.0:
        raise FolderError(f"--val_fraction={val_fraction} must be in [0, 1).")
    root = os.path.abspath(os.path.expanduser(data_dir or tfds.core.constants.DATA_DIR))
    dataset_root = os.path.join(root, name)
    version_dir = os.path.join(dataset_root, VERSION)
    if os.path.exists(version_dir) and not overwrite:
        raise FolderError(f"Data set {name!r} exists already in {version_dir}: pass --overwrite to build it "
                          "again from the folder, or choose another --name.")

    src = os.path.abspath(os.path.expanduser(src))
    class_names, files, skipped, layout = list_folder(src)
    infos = _inspect_all([os.path.join(src, rel) for rel, _ in files], num_workers)
    if masks is not None:
        masks = os.path.abspath(os.path.expanduser(masks))
        if not os.path.isdir(masks):
            raise FolderError(f"--masks={masks} is not a folder.")
    kept, labels_seen = [], set()
    for (rel, label), info in zip(files, infos):
        if not isinstance(info, str) and masks is not None:
            info = dict(info, mask=mask_path(masks, rel))
            try:
                if info["mask"] is None:
                    raise ValueError(f"no mask {os.path.splitext(rel)[0]}{{{','.join(MASK_EXTENSIONS)}}} in {masks}")
                labels_seen.update(np.unique(mask_labels(info["mask"], info["size"])).tolist())
            except (ValueError, OSError) as e:
                info = str(e)
        if isinstance(info, str):
            skipped.append((rel, info))
        else:
            kept.append((rel, label, info))
    if not kept:
        listed = "; ".join(f"{rel}: {why}" for rel, why in skipped[:5]) + (" ..." if len(skipped) > 5 else "")
        raise FolderError(f"No readable images in {src}" + (f": all {len(skipped)} files were skipped ({listed})."
                                                             if skipped else ": it has no files."))
    channels = 1 if all(info["mode"] in GRAY_MODES for _, _, info in kept) else 3
    train, held_out = split_indices([label for _, label, _ in kept], val_fraction, seed)
    if not train:
        raise FolderError(f"--val_fraction={val_fraction} leaves no train images ({len(kept)} readable).")

    # Every image weighs the same, whatever its size.
    mean = np.mean([kept[i][2]["mean"] for i in train], axis=0)
    std = np.sqrt(np.maximum(np.mean([kept[i][2]["meansq"] for i in train], axis=0) - mean ** 2, 0.0))
    mean, std = tuple(float(v) / 255 for v in mean[:channels]), tuple(float(v) / 255 for v in std[:channels])

    stored = {"png" if (i["format"], i["mode"]) not in PASSTHROUGH or (channels == 1 and i["mode"] != "L")
              else i["format"].lower() for _, _, i in kept}
    examples = {"train": [kept[i] for i in train], HELD_OUT_SPLIT: [kept[i] for i in held_out]}
    empty = [class_names[c] for c in range(len(class_names)) if not any(label == c for _, label, _ in kept)]
    metadata = dict(channels=channels, mean=[round(v, 6) for v in mean], std=[round(v, 6) for v in std],
                    class_names=list(class_names), num_classes=len(class_names), source=src, layout=layout,
                    val_fraction=val_fraction, seed=seed, held_out_split=HELD_OUT_SPLIT, num_skipped=len(skipped))
    if masks is not None:
        metadata["mask_labels"] = sorted(int(v) for v in labels_seen)
    builder = _builder(name, root, examples=examples, channels=channels, class_names=class_names,
                       encoding=stored.pop() if len(stored) == 1 else None, metadata=metadata, src=src, masks=masks)
    if os.path.exists(version_dir):   # --overwrite, and the folder has images: replace the old copy
        shutil.rmtree(version_dir)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))

    log = os.path.join(dataset_root, SKIPPED_LOG)
    with open(log, "w") as f:
        f.writelines(f"{rel}\t{why}\n" for rel, why in skipped)
    if empty:
        logging.warning("Class folders without readable images (their labels have no examples): %s", empty)
    return Prepared(name=name, data_dir=root, dataset_dir=str(builder.data_dir), channels=channels, mean=mean,
                    std=std, class_names=list(class_names),
                    split_sizes={s: len(rows) for s, rows in examples.items() if rows},
                    skipped=skipped, skipped_log=log, data_dir_given=data_dir is not None,
                    mask_labels=metadata.get("mask_labels"))


def summary(p: Prepared) -> str:
    sizes = ", ".join(f"{s} {n}" for s, n in p.split_sizes.items())
    names = ", ".join(p.class_names[:10]) + (", ..." if len(p.class_names) > 10 else "")
    lines = [f"Prepared {p.name} in {p.dataset_dir}: {sizes} images, {len(p.class_names)} classes ({names}), "
             f"{p.channels} channel{'s' if p.channels > 1 else ''}.",
             f"Skipped {len(p.skipped)} files (not images or unreadable); listed in {p.skipped_log}."]
    if HELD_OUT_SPLIT not in p.split_sizes:
        lines.append(f"No {HELD_OUT_SPLIT!r} split (no image held out): the evaluators, and the periodic probes "
                     "of configs' local presets (config.evals), need one; prepare with --val_fraction > 0.")
    lines += ["Train on it with (mean/std over the train images):",
              f"  python -m mim_jax.main --config=configs/mae.py --workdir=WORKDIR {p.overrides()}",
              f"Fine-tune with --config.method.num_classes={len(p.class_names)} (configs/finetune.py).",
              json.dumps({"channels": p.channels, "mean": p.mean, "std": p.std})]
    if p.mask_labels is not None:
        data_dir = f" --config.data_dir={p.data_dir}" if p.data_dir_given else ""
        lines += [f"Its masks hold the labels {p.mask_labels}; probe an encoder's patch features on them with "
                  "(label 255, if any, is ignored):",
                  f"  python -m mim_jax.main --config=configs/segmentation_probe.py:init=WORKDIR,dense={p.name} "
                  f"--workdir=OUT --config.num_classes={max(p.mask_labels) + 1}"
                  f"{data_dir}"]
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags
    f = flags.FLAGS
    try:
        prepared = prepare_folder(f.src, f.name, data_dir=f.data_dir, val_fraction=f.val_fraction, seed=f.seed,
                                  overwrite=f.overwrite, num_workers=f.num_workers, masks=f.masks)
    except UserFacingError as e:
        sys.exit(f"Error: {e}")
    print(summary(prepared))


def define_flags(flag_values=None):
    """Called only when run as a command, so importing this module never adds absl flags
    (flag_values: absl's global FLAGS by default; tests/test_docs.py passes a fresh one)."""
    from absl import flags
    fv = flags.FLAGS if flag_values is None else flag_values
    flags.DEFINE_string("src", None, "Folder of images, with or without class subfolders.", required=True,
                        flag_values=fv)
    flags.DEFINE_string("name", None, "Name of the TFDS data set (config.input.dataset).", required=True,
                        flag_values=fv)
    flags.DEFINE_float("val_fraction", 0.1, f"Fraction of each class held out as the {HELD_OUT_SPLIT!r} split.",
                       flag_values=fv)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or ~/tensorflow_datasets).",
                        flag_values=fv)
    flags.DEFINE_integer("seed", 0, "Seed of the held-out split's selection.", flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "Build again if the data set exists already.", flag_values=fv)
    flags.DEFINE_integer("num_workers", min(8, os.cpu_count() or 1), "Processes that inspect the images.",
                         flag_values=fv)
    flags.DEFINE_string("masks", None, "Folder of per-pixel label maps, one per image at the same relative path "
                        "(stored as the feature 'segmentation').", flag_values=fv)


if __name__ == "__main__":
    from absl import app
    define_flags()
    app.run(main)
