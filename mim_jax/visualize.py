"""Pictures of a pre-training run: its reconstructions, or its patch features (`--pca`), as a PNG
grid with one row per evaluation image.

  python -m mim_jax.visualize /tmp/mae_local [--num_images=8] [--out=/tmp/mae_local/reconstructions.png] [--step=N]
  python -m mim_jax.visualize --pca /tmp/mae_local [--dataset=fashion_mnist_mosaic] [--resolution=56]
  python -m mim_jax.visualize --pca capi:/ckpt/capi_vitl14.pth --dataset=imagenet2012 --out=/tmp/capi_pca.png

`--pca` (any method, any weight spec) draws the first three principal components of the patch
tokens, fitted over the images shown, as RGB beside each image, the background (one side of the
first component) black unless `--nopca_background` (evaluators/patch_pca.py).

Columns: the original (for Beyond Masking its target: the undegraded view the tokens predict),
the masked encoder input (masked patches grey; for Beyond Masking the degraded input),
the reconstruction of every patch, and the reconstruction with the target pasted back on the
visible patches. Masks are the run's own (seeded by config.seed and the image's index); the
model runs in eval mode. Per-patch normalised predictions (MAE's norm_pix_loss, Beyond Masking's
per-patch-and-channel targets) get each target patch's mean and variance back, then the data set's
mean/std. Methods without a pixel decoder (CAE v2, CAPI) have no reconstructions.
"""
from __future__ import annotations

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # its notice would print at every start

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from mim_jax import parallel, pretrained  # noqa: E402
from mim_jax.data import catalog, decode, pipeline, transforms  # noqa: E402
from mim_jax.errors import UserFacingError  # noqa: E402
from mim_jax.evaluators import encoder as encoder_lib, patch_pca  # noqa: E402
from mim_jax.evaluators.reconstructions import check_pixels, default_scale, eval_batch, grid, reconstructor  # noqa: E402
from mim_jax.runtime import console  # noqa: E402

FLAGS = flags.FLAGS


def write_png(image: np.ndarray, path) -> pathlib.Path:
    from PIL import Image
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def visualize(workdir, *, num_images: int = 8, out=None, step: int | None = None, scale: int | None = None,
              data_dir: str | None = None) -> pathlib.Path:
    config = pretrained.read_config(workdir)
    method = pretrained.get_method(config)
    check_pixels(method)              # before restoring anything
    mesh = parallel.make_mesh(config.mesh)
    weights = pretrained.load(workdir, mesh, step=step)   # encoder and decoder
    batch = eval_batch(weights.method, num_images, data_dir)
    columns = reconstructor(weights.method, parallel.Sharding.of(weights.config, mesh), config.seed)(weights.params, batch)
    image = grid(columns, scale or default_scale(columns["images"].shape[1]))
    return write_png(image, out or pathlib.Path(workdir) / "reconstructions.png")


def pca_images(config, num_images: int, *, dataset: str | None = None, resolution: int | None = None,
               data_dir: str | None = None) -> np.ndarray:
    """The first `num_images` images of the evaluation split of `dataset` (default: the run's), resized
    bicubic to `resolution` (default: the run's input size) and normalised as the run's input."""
    inp = config.input
    name = dataset or inp.dataset
    split = catalog.EVAL_SPLITS.get(name, "test")
    source = pipeline.open_source(name, split, data_dir or inp.data_dir, channels=inp.channels)
    size = resolution or inp.image_size
    return np.stack([transforms.normalize(transforms.resize(decode.image(source[i]["image"], inp.channels), size,
                                                            "bicubic"), inp.mean, inp.std)
                     for i in range(min(num_images, len(source)))])


def visualize_pca(spec: str, *, num_images: int = 8, out=None, scale: int | None = None, dataset: str | None = None,
                  resolution: int | None = None, data_dir: str | None = None, background: bool = True) -> pathlib.Path:
    config = pretrained.read_config(spec)
    encoder = encoder_lib.load(spec, parallel.make_mesh(config.mesh), feature="patch_tokens")
    images = pca_images(config, num_images, dataset=dataset, resolution=resolution, data_dir=data_dir)
    colours = patch_pca.pca_rgb(np.asarray(encoder.features(images)), background=background)
    shown = images * np.asarray(config.input.std) + np.asarray(config.input.mean)
    folder = pathlib.Path(spec) if pathlib.Path(spec).is_dir() else pathlib.Path(".")
    return write_png(patch_pca.picture(shown, colours, scale or default_scale(images.shape[1])),
                     out or folder / "patch_pca.png")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m mim_jax.visualize [--pca] WORKDIR_OR_WEIGHTS [--num_images=8] "
                             "[--out=PNG] [--step=N]")
    console.quiet_unless_verbose()
    try:
        if FLAGS.pca:
            path = visualize_pca(argv[1], num_images=FLAGS.num_images, out=FLAGS.out, scale=FLAGS.scale,
                                 dataset=FLAGS.dataset, resolution=FLAGS.resolution, data_dir=FLAGS.data_dir,
                                 background=FLAGS.pca_background)
        else:
            path = visualize(argv[1], num_images=FLAGS.num_images, out=FLAGS.out, step=FLAGS.step, scale=FLAGS.scale,
                             data_dir=FLAGS.data_dir)
    except (UserFacingError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"Wrote {path}")


def define_flags(flag_values: flags.FlagValues = FLAGS):
    """Only when run as a command, so the module imports beside the other entry points (and on a
    fresh FlagValues in tests/test_docs.py)."""
    flags.DEFINE_integer("num_images", 8, "Rows: the first N images of the run's evaluation split.",
                         flag_values=flag_values)
    flags.DEFINE_string("out", None, "PNG path (default: WORKDIR/reconstructions.png, WORKDIR/patch_pca.png; "
                        "./patch_pca.png for a weight file).", flag_values=flag_values)
    flags.DEFINE_bool("pca", False, "Draw the patch features' principal components instead of reconstructions.",
                      flag_values=flag_values)
    flags.DEFINE_bool("pca_background", True, "With --pca: black out the background side of the first component.",
                      flag_values=flag_values)
    flags.DEFINE_string("dataset", None, "With --pca: the images of another data set's evaluation split.",
                        flag_values=flag_values)
    flags.DEFINE_integer("resolution", None, "With --pca: resize the images to this size (default: the run's).",
                         flag_values=flag_values)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).", flag_values=flag_values)
    flags.DEFINE_integer("scale", None, "Enlarge each cell this many times (default: to about 64 pixels).",
                         flag_values=flag_values)
    flags.DEFINE_string("data_dir", None, "TFDS data dir (default: the run's config.input.data_dir).",
                        flag_values=flag_values)


if __name__ == "__main__":
    define_flags()
    app.run(main)
