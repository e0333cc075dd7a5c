"""mim_jax.data.prepare_folder: a folder of images -> a TFDS array_record data set the configs read."""
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from mim_jax.data import decode, pipeline, prepare_folder as pf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def rgb(seed, h=18, w=22):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def smooth(seed, h=32, w=32):
    """A photo-like (low-frequency) image: JPEG keeps it within a few levels."""
    coarse = np.random.default_rng(seed).uniform(0, 255, (3, 3, 3)).astype(np.float32)
    return cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.uint8)


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kwargs).save(path)


def jpeg_bytes(array, quality=95):
    bgr = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    return cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()


def records(name, split, data_dir, channels):
    source = pipeline.open_source(name, split, str(data_dir), channels=channels)
    out = {}
    for i in range(len(source)):
        r = source[i]
        out[r["file_name"].decode()] = (decode.image(r["image"], channels), int(r["label"]), bytes(r["image"]))
    return source, out


def stats(arrays, channels):
    """Per-channel mean and std where every image weighs the same."""
    pixels = [a.reshape(-1, channels).astype(np.float64) / 255 for a in arrays]
    mean = np.mean([p.mean(0) for p in pixels], axis=0)
    return mean, np.sqrt(np.mean([np.square(p).mean(0) for p in pixels], axis=0) - mean ** 2)


def test_class_folders_become_sorted_labels_in_rgb_with_junk_skipped(tmp_path):
    src, expected = tmp_path / "src", {}
    for k, cls in enumerate(["zebra", "ant", "moth"]):          # labels follow the sorted names
        for i in range(3):
            a = rgb(10 * k + i, 16 + i, 20 + k)
            save(src / cls / f"{i}.png", a)
            expected[f"{cls}/{i}.png"] = a
    a = rgb(100)[..., 0]                                        # grayscale among colour: replicated
    save(src / "ant" / "gray.png", a)
    expected["ant/gray.png"] = np.repeat(a[..., None], 3, -1)
    rgba = np.concatenate([rgb(101), np.full((18, 22, 1), 7, np.uint8)], -1)
    save(src / "moth" / "deep" / "rgba.png", rgba)              # nested, alpha dropped
    expected["moth/deep/rgba.png"] = rgba[..., :3]
    palette = Image.fromarray(rgb(102)).convert("P")
    palette.save(src / "zebra" / "palette.gif")                 # not JPEG/PNG: stored as PNG
    expected["zebra/palette.gif"] = np.asarray(palette.convert("RGB"))
    jpeg = jpeg_bytes(smooth(103))
    (src / "zebra" / "photo.jpg").write_bytes(jpeg)
    (src / "ant" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    whole = jpeg_bytes(rgb(104, 64, 64))
    (src / "ant" / "truncated.jpg").write_bytes(whole[:len(whole) // 2])     # an interrupted copy
    (src / "moth" / "notes.txt").write_text("not an image")
    (src / "stray.png").write_bytes((src / "ant" / "0.png").read_bytes())   # outside the class folders
    (src / "ant" / ".DS_Store").write_bytes(b"\0")              # hidden: ignored
    (src / ".cache").mkdir()                                    # hidden folder: not a class

    p = pf.prepare_folder(str(src), "my_insects", data_dir=str(tmp_path / "tfds"), val_fraction=0.0)
    assert (p.channels, p.class_names, p.split_sizes) == (3, ["ant", "moth", "zebra"], {"train": 13})
    source, got = records("my_insects", "train", tmp_path / "tfds", 3)
    assert source.dataset_info.features["image"].shape == (None, None, 3)
    assert source.dataset_info.features["label"].names == ["ant", "moth", "zebra"]
    assert sorted(got) == sorted([*expected, "zebra/photo.jpg"])
    for rel, (image, label, _) in got.items():
        assert label == p.class_names.index(rel.split("/")[0]), rel
        if rel in expected:
            np.testing.assert_array_equal(image, expected[rel], err_msg=rel)   # PNG: exactly the pixels
    assert got["zebra/photo.jpg"][2] == jpeg and got["ant/0.png"][2] == (src / "ant" / "0.png").read_bytes()
    assert np.abs(got["zebra/photo.jpg"][0].astype(int) - smooth(103)).mean() < 3

    skipped = dict(line.split("\t") for line in pathlib.Path(p.skipped_log).read_text().splitlines())
    assert p.skipped_log == str(tmp_path / "tfds" / "my_insects" / "skipped.txt") and len(p.skipped) == 4
    assert sorted(skipped) == ["ant/broken.jpg", "ant/truncated.jpg", "moth/notes.txt", "stray.png"]
    assert skipped["ant/broken.jpg"] == skipped["moth/notes.txt"] == "not an image"
    assert skipped["ant/truncated.jpg"].startswith("cannot be decoded")
    mean, std = stats([image for image, _, _ in got.values()], 3)
    np.testing.assert_allclose(p.mean, mean, atol=2e-3)   # the JPEG decodes within ±1 in PIL and OpenCV
    np.testing.assert_allclose(p.std, std, atol=2e-3)
    assert source.dataset_info.metadata["channels"] == 3
    assert source.dataset_info.metadata["class_names"] == ["ant", "moth", "zebra"]


def test_flat_grayscale_folder_is_one_channel_with_label_0_and_a_held_out_split(tmp_path):
    src, expected = tmp_path / "scans", {}
    for i in range(16):
        a = rgb(i, 12 + i % 3, 14)[..., 0]
        save(src / f"{i:02d}.png", a)
        expected[f"{i:02d}.png"] = a[..., None]
    deep = (np.random.default_rng(7).integers(0, 65536, (12, 14))).astype(np.uint16)
    save(src / "16bit.png", deep)                               # 16-bit: scaled to 8 bits
    expected["16bit.png"] = np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)[..., None]
    la = np.stack([rgb(8, 12, 14)[..., 0], np.full((12, 14), 9, np.uint8)], -1)
    save(src / "alpha.png", la, mode="LA")                      # gray + alpha: alpha dropped
    expected["alpha.png"] = la[..., :1]
    jpeg = cv2.imencode(".jpg", rgb(9, 16, 16)[..., 0])[1].tobytes()
    (src / "gray.jpg").write_bytes(jpeg)
    (src / "readme.txt").write_text("scanner settings")

    data_dir = tmp_path / "tfds"
    p = pf.prepare_folder(str(src), "scans", data_dir=str(data_dir), val_fraction=0.25, seed=3)
    assert (p.channels, p.class_names, p.split_sizes) == (1, ["scans"], {"train": 14, "test": 5})
    assert [rel for rel, _ in p.skipped] == ["readme.txt"]
    train, got = records("scans", "train", data_dir, 1)
    test, got_test = records("scans", "test", data_dir, 1)
    assert train.dataset_info.features["image"].shape == (None, None, 1)
    assert len(train) == 14 and len(test) == 5 and not set(got) & set(got_test)
    assert sorted([*got, *got_test]) == sorted([*expected, "gray.jpg"])
    for rel, (image, label, _) in {**got, **got_test}.items():
        assert label == 0
        if rel in expected:
            np.testing.assert_array_equal(image, expected[rel], err_msg=rel)
    assert got.get("gray.jpg", got_test.get("gray.jpg"))[2] == jpeg    # stored byte for byte
    with pytest.raises(pipeline.DataMismatchError, match="channels=1"):
        pipeline.open_source("scans", "train", str(data_dir), channels=3)
    # mean/std over the train split only (PIL and OpenCV decode the one JPEG alike within ±1)
    mean, std = stats([image for image, _, _ in got.values()], 1)
    np.testing.assert_allclose(p.mean, mean, atol=1e-3)
    np.testing.assert_allclose(p.std, std, atol=1e-3)
    flags = p.overrides()
    assert f"--config.input.channels=1 --config.input.mean='({p.mean[0]:.4f},)'" in flags
    assert f"--config.input.data_dir={data_dir}" in flags and "--config.input.dataset=scans" in flags

    # Same seed: the same held-out images; the rule is per class, round(fraction x n).
    again = pf.prepare_folder(str(src), "scans", data_dir=str(data_dir), val_fraction=0.25, seed=3, overwrite=True)
    assert again.split_sizes == {"train": 14, "test": 5}
    assert sorted(records("scans", "test", data_dir, 1)[1]) == sorted(got_test)


def test_held_out_split_is_per_class_and_seeded():
    labels = [0] * 10 + [1] * 5 + [2] * 1
    train, held = pf.split_indices(labels, 0.2, seed=0)
    assert sorted(train + held) == list(range(16)) and len(held) == 2 + 1 + 0
    assert [labels[i] for i in held].count(0) == 2
    assert pf.split_indices(labels, 0.2, seed=0) == (train, held)
    assert any(pf.split_indices(labels, 0.2, seed=s)[1] != held for s in range(1, 5))
    assert pf.split_indices(labels, 0.0, seed=0) == (list(range(16)), [])


def test_clear_errors(tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    (junk / "b.jpg").write_bytes(b"nope")
    data_dir = str(tmp_path / "tfds")
    with pytest.raises(pf.FolderError, match=r"No readable images .* all 2 files were skipped .*a.txt: not an image"):
        pf.prepare_folder(str(junk), "junk", data_dir=data_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(pf.FolderError, match="it has no files"):
        pf.prepare_folder(str(tmp_path / "empty"), "empty", data_dir=data_dir)
    assert not os.path.exists(os.path.join(data_dir, "junk"))
    with pytest.raises(pf.FolderError, match="not a folder"):
        pf.prepare_folder(str(tmp_path / "missing"), "missing", data_dir=data_dir)
    with pytest.raises(pf.FolderError, match="lower case"):
        pf.prepare_folder(str(junk), "My-Photos", data_dir=data_dir)
    with pytest.raises(pf.FolderError, match="TFDS data set already"):
        pf.prepare_folder(str(junk), "mnist", data_dir=data_dir)
    with pytest.raises(pf.FolderError, match="val_fraction"):
        pf.prepare_folder(str(junk), "junk", data_dir=data_dir, val_fraction=1.0)
    save(tmp_path / "one" / "x.png", rgb(0))
    pf.prepare_folder(str(tmp_path / "one"), "one", data_dir=data_dir, val_fraction=0.0)
    with pytest.raises(pf.FolderError, match="exists already .* --overwrite"):
        pf.prepare_folder(str(tmp_path / "one"), "one", data_dir=data_dir)


def run(cmd, timeout):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_command_prepares_a_folder_that_pre_training_and_its_probes_run_on(tmp_path):
    src = tmp_path / "shapes"
    for k, cls in enumerate(["circles", "squares"]):
        for i in range(40):   # 80 files: inspected by a pool of worker processes
            a = np.full((20, 20, 3), 40 + 150 * k, np.uint8)
            a[5:15, 5:15] = rgb(100 * k + i, 10, 10)
            save(src / cls / f"{i}.png", a)
    (src / "circles" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    data_dir = tmp_path / "tfds"
    out = run([sys.executable, "-m", "mim_jax.data.prepare_folder", f"--src={src}", "--name=shapes",
               f"--data_dir={data_dir}", "--num_workers=2"], timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "train 72, test 8 images, 2 classes (circles, squares), 3 channels" in out.stdout
    assert f"Skipped 1 files (not images or unreadable); listed in {data_dir}/shapes/skipped.txt" in out.stdout
    command = next(line for line in out.stdout.splitlines() if "python -m mim_jax.main" in line)
    overrides = [a for a in shlex.split(command) if a.startswith("--config.input.")]
    stats_line = json.loads(out.stdout.strip().splitlines()[-1])
    assert stats_line["channels"] == 3 and re.fullmatch(
        r"--config.input.mean=\(\d\.\d{4},\d\.\d{4},\d\.\d{4}\)", overrides[-2])

    workdir = tmp_path / "work"
    train = run([sys.executable, "-m", "mim_jax.main", "--config=configs/mae.py:local", f"--workdir={workdir}",
                 *overrides, "--config.input.image_size=16", "--config.input.batch_size=16",
                 "--config.model.depth=1", "--config.model.width=32", "--config.model.num_heads=2",
                 "--config.model.mlp_dim=64", "--config.decoder.depth=1", "--config.decoder.width=32",
                 "--config.decoder.num_heads=2", "--config.decoder.mlp_dim=64", "--config.total_steps=2",
                 "--config.log_steps=1", "--config.ckpt_steps=2", "--config.evals.knn.every_steps=2",
                 "--config.evals.linear.every_steps=2", "--config.evals.linear.epochs=2"], timeout=240)
    assert train.returncode == 0, train.stderr[-3000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "loss" in r) == [1, 2]
    probe = [r for r in rows if "eval/knn/knn_top1" in r]   # read the held-out `test` split
    assert probe and 0 <= probe[-1]["eval/knn/knn_top1"] <= 1 and "eval/linear/linear_top1" in probe[-1]


def test_a_symlink_loop_is_skipped_and_each_real_file_listed_once(tmp_path):
    src = tmp_path / "src"
    for cls in ("cat", "dog"):
        save(src / cls / "0.png", rgb(len(cls)))
    (src / "loop").symlink_to(".")                       # ln -s . SRC/loop
    (src / "cat" / "again").symlink_to("..")             # a loop inside a class
    (src / "dog" / "alias.png").symlink_to(src / "dog" / "0.png")
    (src / "more").symlink_to(src / "cat")               # a second name of a class folder
    classes, files, skipped, _ = pf.list_folder(str(src))
    assert classes == ["cat", "dog"] and files == [("cat/0.png", 0), ("dog/0.png", 1)]
    reasons = dict(skipped)
    assert set(reasons) == {"loop", "more", "cat/again", "dog/alias.png"}
    assert "(a loop or a second name)" in reasons["loop"] and reasons["dog/alias.png"] == "the same file as dog/0.png"


def test_a_large_image_is_stored_downscaled_and_weighs_as_one_image(tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "MAX_SIDE", 64)
    src = tmp_path / "src"
    save(src / "big.png", np.full((100, 200, 3), 255, np.uint8))   # over MAX_SIDE: 32x64 stored
    save(src / "small.png", np.zeros((8, 8, 3), np.uint8))
    huge = tmp_path / "huge.png"
    save(huge, np.zeros((60, 60), np.uint8))
    monkeypatch.setattr(pf.Image, "MAX_IMAGE_PIXELS", 1000)        # PIL refuses over 2 x this: undecoded
    assert pf.inspect(str(huge)).startswith("too large to decode (Image size (3600 pixels) exceeds limit")
    monkeypatch.undo()
    monkeypatch.setattr(pf, "MAX_SIDE", 64)
    p = pf.prepare_folder(str(src), "sized", data_dir=str(tmp_path / "tfds"), val_fraction=0.0)
    _, got = records("sized", "train", tmp_path / "tfds", 3)
    assert got["big.png"][0].shape == (32, 64, 3) and (got["big.png"][0] == 255).all()
    np.testing.assert_allclose(p.mean, [0.5] * 3)   # one white and one black image, whatever their sizes
    np.testing.assert_allclose(p.std, [0.5] * 3)


def test_masks_become_the_segmentation_feature_that_the_segmentation_probe_reads(tmp_path, monkeypatch):
    monkeypatch.setattr(pf, "MAX_SIDE", 32)
    src, masks = tmp_path / "src", tmp_path / "masks"
    rng = np.random.default_rng(9)
    labels = {name: rng.integers(0, 5, (16, 16), dtype=np.uint8) for name in ("a", "b", "c", "big")}
    for name in ("a", "b", "c"):
        save(src / "cls" / f"{name}.jpg", smooth(ord(name), 16, 16))
    save(src / "cls" / "big.png", smooth(1, 64, 64))               # stored 32x32: its 16x16 mask resized nearest
    save(src / "cls" / "lonely.png", smooth(2, 16, 16))            # no mask: skipped
    save(src / "cls" / "wide.png", smooth(3, 16, 16))              # a mask of another shape: skipped
    save(masks / "cls" / "a.png", labels["a"])
    save(masks / "cls" / "b.png", labels["b"], mode="L")
    palette = Image.fromarray(labels["c"], mode="P")
    palette.putpalette(list(rng.integers(0, 256, 768)))            # palette indices are the labels
    (masks / "cls").mkdir(parents=True, exist_ok=True)
    palette.save(masks / "cls" / "c.png")
    save(masks / "cls" / "big.png", labels["big"])
    save(masks / "cls" / "wide.png", np.zeros((16, 40), np.uint8))
    p = pf.prepare_folder(str(src), "masked", data_dir=str(tmp_path / "tfds"), val_fraction=0.0, masks=str(masks))
    assert p.mask_labels == sorted(set(np.concatenate([v.ravel() for v in labels.values()]).tolist()))
    reasons = dict(p.skipped)
    assert reasons["cls/lonely.png"].startswith("no mask cls/lonely{.png,") and "wide.png" in "".join(reasons)
    assert reasons["cls/wide.png"] == "its mask is 40x16, the image 16x16"   # width x height
    assert "--config=configs/segmentation_probe.py:init=WORKDIR,dense=masked" in pf.summary(p)
    source = pipeline.open_source("masked", "train", str(tmp_path / "tfds"), channels=3)
    stored = {source[i]["file_name"].decode(): decode.label_map(source[i]["segmentation"]) for i in range(len(source))}
    assert sorted(stored) == ["cls/a.jpg", "cls/b.jpg", "cls/big.png", "cls/c.jpg"]
    for name in ("a", "b", "c"):
        np.testing.assert_array_equal(stored[f"cls/{name}.jpg"], labels[name])
    np.testing.assert_array_equal(stored["cls/big.png"], labels["big"].repeat(2, 0).repeat(2, 1))
    view = pipeline.DenseTransform(resolution=8, mean=(0.5,) * 3, std=(0.25,) * 3)(source[0], None)
    assert view["image"].shape == (8, 8, 3) and view["label"].shape == (8, 8)
