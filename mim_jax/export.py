"""Export a run's encoder to PyTorch: `python -m mim_jax.export --workdir=DIR --format=F --out=OUT`.

- `timm`: OUT/model.safetensors + OUT/config.json (timm's own folder format) for
  `timm.create_model("local-dir:OUT", pretrained=True)` or `timm.create_model(cfg["architecture"],
  pretrained=True, pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="OUT/model.safetensors"),
  **cfg["model_args"])`, with strict key matching (MAE, CAE v2, Beyond Masking and CMAE encoders): the fixed sin-cos table
  written as `pos_embed` in the layout it was trained with, BEiT q/v biases folded into `qkv.bias`,
  LayerScale as `ls1/ls2.gamma`, no `mask_token`.
- `official`: OUT/checkpoint.pth in the method's official layout, as its code saves and loads it
  ({"model": state_dict}; CAPI: the flat `backbone.*` dict its hub loader reads), so a run continues
  in the official PyTorch code: MAE's with its decoder (the `*_full.pth` layout), CAE v2's BEiT
  encoder, Beyond Masking's MAE-pytorch model, CAPI's `backbone.`; CMAE has no official code and
  writes MAE's layout, which SDMAE's encoder shares. A config.json beside it records what the
  tensors do not (heads, resolution, normalisation, which run).
- `hf`: a Hugging Face `ViTModel` folder (config.json + model.safetensors) where transformers has
  the architecture ([CLS], LayerNorm, no LayerScale: MAE, CMAE): `ViTModel.from_pretrained(OUT,
  add_pooling_layer=False)`.
Every export records the run, step and which weights (EMA teacher or student) it holds.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # its notice would print at every start

from absl import app, flags  # noqa: E402

from mim_jax.errors import UserFacingError  # noqa: E402

FLAGS = flags.FLAGS

# --format -> (the layout, None for the method's own `Method.weight_layout`; the weights file; the
# layout's method that gives the JSON files beside it).
FORMATS = {"timm": ("timm", "model.safetensors", "folder_config"), "hf": ("hf", "model.safetensors", "folder_config"),
           "official": (None, "checkpoint.pth", "checkpoint_config")}


def provenance(weights) -> dict:
    method = weights.method
    return {"run": str(weights.description.split(" @ ")[0]), "step": weights.step,
            "method": weights.config.method.name,
            "weights": "ema teacher" if method.ema is not None else "student"}


def write(weights, fmt: str, out: pathlib.Path) -> tuple[pathlib.Path, dict[str, dict]]:
    """`weights` in the layout of `fmt` under `out`: (the weights file, the JSON files beside it)."""
    from mim_jax.models import layers
    from mim_jax.weights import files, registry

    method, inp = weights.method, weights.config.input
    layout_name, filename, configs_of = FORMATS[fmt]
    layout = registry.get(layout_name or method.weight_layout)
    # Loop layout (a `model.scan=True` run stacks its blocks).
    params = {k: layers.unstack_blocks(v) for k, v in weights.params.items()}
    meta = provenance(weights)
    path = out / filename
    files.write(layout.from_params(params, method), path, meta, wrapped=layout.wrapped)
    configs = getattr(layout, configs_of)(method, inp, meta)
    for name, content in configs.items():
        (out / name).write_text(json.dumps(content, indent=2))
    return path, configs


def export_timm(weights, out: pathlib.Path) -> dict:
    return write(weights, "timm", out)[1]["config.json"]


def export_hf(weights, out: pathlib.Path) -> dict:
    return write(weights, "hf", out)[1]["config.json"]


def export_official(weights, out: pathlib.Path) -> pathlib.Path:
    return write(weights, "official", out)[0]


class ExportError(UserFacingError, ValueError):
    pass


def export(workdir, fmt: str, out, *, overwrite: bool = False) -> pathlib.Path:
    """Writes the run's weights into a hidden folder beside `out`, then renames it to `out`: a
    killed export leaves no half-written file there (the next export to `out` cleans up after it).
    A non-empty `out` is replaced only with `overwrite`."""
    import jax

    from mim_jax import parallel, pretrained

    out = pathlib.Path(out).absolute()
    _clean_up_after_killed_exports(out)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out={out} exists and is not empty: pass --overwrite to replace it, or another --out.")
    mesh = parallel.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])   # the rules name both axes
    weights = pretrained.load(workdir, mesh)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    partial.mkdir()
    try:
        write(weights, fmt, partial)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):   # --overwrite
            replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(replaced)
            os.replace(partial, out)
            if replaced.is_dir():
                shutil.rmtree(replaced)
            else:
                replaced.unlink()
        else:
            os.replace(partial, out)   # also over an empty folder
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    logging.info("Exported %s (%s) to %s as %s.", workdir, provenance(weights)["weights"], out, fmt)
    return out


def _clean_up_after_killed_exports(out: pathlib.Path):
    """What exports to `out` killed before they finished left beside it (their process is gone):
    a partial folder is removed; the previous contents that an `--overwrite` had moved aside go
    back to `out` if the new files never took their place, and are removed if they did."""
    for folder in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = folder.name[len(out.name) + 2:].rpartition("-")
        if kind not in ("partial", "replaced") or _alive(pid):
            continue
        if kind == "replaced" and not out.exists():
            folder.rename(out)
        elif folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
        else:
            folder.unlink(missing_ok=True)


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:   # another user's
        pass
    return True


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required.")
    from mim_jax.runtime import console
    console.quiet_unless_verbose()
    try:
        export(FLAGS.workdir, FLAGS.format, FLAGS.out, overwrite=FLAGS.overwrite)
    except (UserFacingError, ValueError, FileNotFoundError) as e:   # expected errors: one readable message
        print(f"Export failed: {e}", file=sys.stderr)
        sys.exit(1)


def define_flags(flag_values: flags.FlagValues = FLAGS):
    """Only when run as a command, so the module imports beside the other entry points (and on a
    fresh FlagValues in tests/test_docs.py)."""
    flags.DEFINE_string("workdir", None, "Pre-training workdir (its newest checkpoint is exported).",
                        flag_values=flag_values)
    flags.DEFINE_enum(name="format", default="timm", enum_values=list(FORMATS), help="Output layout.",
                      flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output folder (created; written whole or not at all).", flag_values=flag_values)
    flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.", flag_values=flag_values)


if __name__ == "__main__":
    define_flags()
    app.run(main)
