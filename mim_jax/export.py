"""Export a run's encoder to PyTorch: `python -m mim_jax.export --workdir=DIR --format=F --out=OUT`.

- `timm`: OUT/model.safetensors + OUT/config.json (timm's own folder format) for
  `timm.create_model("local-dir:OUT", pretrained=True)` or `timm.create_model(cfg["architecture"],
  pretrained=True, pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file="OUT/model.safetensors"),
  **cfg["model_args"])`, with strict key matching (MAE, CAE v2, Beyond Masking and CMAE encoders): the fixed sin-cos table
  written as `pos_embed` in the layout it was trained with, BEiT q/v biases folded into `qkv.bias`,
  LayerScale as `ls1/ls2.gamma`, no `mask_token`.
- `official`: OUT/checkpoint.pth in the method's official layout ({"model": state_dict}), so a run
  continues in the official PyTorch code: MAE's with its decoder (the `*_full.pth` layout), CAE
  v2's BEiT encoder, Beyond Masking's MAE-pytorch encoder, CAPI's `backbone.`; CMAE has no official
  code and writes MAE's layout, which SDMAE's encoder shares.
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
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")   # its notice would print at every start

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS

# timm's plain-ViT sizes by width, with their standard depth and heads (an exact match is that model).
TIMM_SIZES = {192: ("tiny", 12, 3), 384: ("small", 12, 6), 768: ("base", 12, 12), 1024: ("large", 24, 16),
              1280: ("huge", 32, 16)}
# timm's registered plain-ViT entry points (timm 1.0: vit_<size>_patch<P>_<res>). model_args override
# every field they set, so a model of another depth, patch or resolution is built from the nearest.
TIMM_ARCHS = {"vit_tiny_patch16_224", "vit_tiny_patch16_384",
              "vit_small_patch8_224", "vit_small_patch16_224", "vit_small_patch16_384", "vit_small_patch32_224",
              "vit_small_patch32_384",
              "vit_base_patch8_224", "vit_base_patch16_224", "vit_base_patch16_384", "vit_base_patch32_224",
              "vit_base_patch32_384",
              "vit_large_patch14_224", "vit_large_patch16_224", "vit_large_patch16_384", "vit_large_patch32_224",
              "vit_large_patch32_384",
              "vit_huge_patch14_224"}
_SHORT_NAMES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L", "huge": "H"}
# For a width timm has no name for: a registered name to build from (model_args set every field).
TIMM_GENERIC = "vit_base_patch16_224"


def timm_architecture(encoder, image_size: int) -> str:
    """timm's name for the model where it has one (vit_base_patch16_224 for a ViT-B/16 at 224), else
    the registered name nearest to it (same width, then same patch size) that timm builds it from:
    timm.create_model needs a registered name, model_args carry the rest (`timm_description`)."""
    size = TIMM_SIZES.get(encoder.width, ("",))[0]
    candidates = [f"vit_{size}_patch{encoder.patch_size}_{image_size}", f"vit_{size}_patch{encoder.patch_size}_224",
                  f"vit_{size}_patch16_224", f"vit_{size}_patch14_224"]
    return next((name for name in candidates if name in TIMM_ARCHS), TIMM_GENERIC)


def timm_description(encoder, image_size: int, channels: int) -> str:
    """What the export holds, which `architecture` alone may not say: 'ViT-Ti/4, 4 blocks (timm's tiny
    has 12), 28x28 pixels, 1 channel; built as vit_tiny_patch16_224 with model_args'."""
    architecture = timm_architecture(encoder, image_size)
    size, depth, heads = TIMM_SIZES.get(encoder.width, (None, None, None))
    parts = [f"ViT-{_SHORT_NAMES[size]}/{encoder.patch_size}" if size
             else f"ViT of width {encoder.width}, patch {encoder.patch_size}"]
    if encoder.depth != depth:
        parts.append(f"{encoder.depth} blocks" + (f" (timm's {size} has {depth})" if size else ""))
    if size and encoder.num_heads != heads:
        parts.append(f"{encoder.num_heads} heads (timm's {size} has {heads})")
    parts.append(f"{image_size}x{image_size} pixels, {channels} channel{'s' if channels > 1 else ''}")
    return ", ".join(parts) + f"; built as {architecture} with model_args"


def provenance(weights) -> dict:
    method = weights.method
    return {"run": str(weights.description.split(" @ ")[0]), "step": weights.step,
            "method": weights.config.method.name,
            "weights": "ema teacher" if method.ema is not None else "student"}


def _unstacked(params):
    """Loop-layout params (a `model.scan=True` run stacks its blocks)."""
    from mim_jax.models import layers
    return {k: layers.unstack_blocks(v) for k, v in params.items()}


def _encoder_params(weights):
    return _unstacked(weights.params)["encoder"]


def timm_model_args(encoder, image_size: int, channels: int) -> dict:
    return dict(img_size=image_size, patch_size=encoder.patch_size, in_chans=channels, embed_dim=encoder.width,
                depth=encoder.depth, num_heads=encoder.num_heads, mlp_ratio=encoder.mlp_dim / encoder.width,
                qkv_bias=encoder.use_bias, class_token=encoder.cls_token, num_classes=0,
                global_pool="token" if encoder.cls_token else "avg", fc_norm=False,
                init_values=encoder.layerscale, no_embed_class=False)


def export_timm(weights, out: pathlib.Path) -> dict:
    from mim_jax.interop import files, tensors, vit

    method, inp = weights.method, weights.config.input
    encoder = method.encoder
    state = tensors.to_tensors({"encoder": _encoder_params(weights)}, tensors.under(
        "encoder", vit.encoder_entries(encoder, method.grid, inp.channels, vit.TIMM)))
    meta = provenance(weights)
    files.write_safetensors(state, out / "model.safetensors", {k: str(v) for k, v in meta.items()})
    config = {
        "architecture": timm_architecture(encoder, inp.image_size),
        "num_classes": 0,
        "model_args": timm_model_args(encoder, inp.image_size, inp.channels),
        "pretrained_cfg": {"input_size": [inp.channels, inp.image_size, inp.image_size], "mean": list(inp.mean),
                           "std": list(inp.std), "num_classes": 0, "interpolation": "bicubic",
                           "crop_pct": 0.875, "license": "see the run's data and recipe",
                           "description": timm_description(encoder, inp.image_size, inp.channels)},
        "mim_jax": meta,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return config


def official_state(weights) -> dict:
    """The method's official PyTorch state dict."""
    from mim_jax.interop import tensors, vit

    method, name = weights.method, weights.config.method.name
    encoder, channels = method.encoder, weights.config.input.channels
    if name == "capi":
        from mim_jax.interop import capi
        return capi.export_backbone(_unstacked(weights.params), method)
    naming = {"cae_v2": vit.BEIT, "beyond_masking": vit.MAE_PYTORCH}.get(name, vit.TIMM)
    entries = tensors.under("encoder", vit.encoder_entries(encoder, method.grid, channels, naming))
    params = {"encoder": _encoder_params(weights)}
    if name == "mae":
        entries += tensors.under("decoder", vit.mae_decoder_entries(method.decoder, encoder.num_prefix_tokens))
        params["decoder"] = _unstacked(weights.params)["decoder"]
    return tensors.to_tensors(params, entries)


def export_official(weights, out: pathlib.Path) -> pathlib.Path:
    from mim_jax.interop import files
    path = out / "checkpoint.pth"
    files.write_torch(official_state(weights), path, {"mim_jax": provenance(weights)})
    # Not read by the official code; it tells an import what the tensors do not (head count; the
    # resolution where no position table is stored).
    encoder = weights.method.encoder
    inp = weights.config.input
    info = {"num_heads": encoder.num_heads, "image_size": inp.image_size, "mean": list(inp.mean), "std": list(inp.std)}
    if getattr(weights.method, "decoder", None) is not None and weights.config.method.name == "mae":
        info["decoder_num_heads"] = weights.method.decoder.num_heads
    (out / "config.json").write_text(json.dumps({**info, "mim_jax": provenance(weights)}, indent=2))
    return path


def export_hf(weights, out: pathlib.Path) -> dict:
    from mim_jax.interop import files, tensors, vit

    method, inp = weights.method, weights.config.input
    encoder = method.encoder
    state = tensors.to_tensors({"encoder": _encoder_params(weights)}, tensors.under(
        "encoder", vit.hf_entries(encoder, method.grid, inp.channels)))
    meta = provenance(weights)
    files.write_safetensors(state, out / "model.safetensors", {"format": "pt", **{k: str(v) for k, v in meta.items()}})
    config = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": encoder.width,
              "num_hidden_layers": encoder.depth, "num_attention_heads": encoder.num_heads,
              "intermediate_size": encoder.mlp_dim, "hidden_act": "gelu", "layer_norm_eps": encoder.norm_eps,
              "image_size": inp.image_size, "patch_size": encoder.patch_size, "num_channels": inp.channels,
              "qkv_bias": encoder.use_bias, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "mim_jax": meta}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"height": inp.image_size,
                                                                                 "width": inp.image_size},
        "do_normalize": True, "image_mean": list(inp.mean), "image_std": list(inp.std)}, indent=2))
    return config


def export(workdir, fmt: str, out) -> pathlib.Path:
    import jax

    from mim_jax import parallel, pretrained

    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh([("data", 1), ("fsdp", 1)], devices=jax.devices()[:1])   # the rules name both axes
    weights = pretrained.load(workdir, mesh)
    if fmt == "timm":
        export_timm(weights, out)
    elif fmt == "hf":
        export_hf(weights, out)
    else:
        export_official(weights, out)
    logging.info("Exported %s (%s) to %s as %s.", workdir, provenance(weights)["weights"], out, fmt)
    return out


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not FLAGS.workdir or not FLAGS.out:
        raise app.UsageError("--workdir and --out are required.")
    from mim_jax import console
    console.quiet_unless_verbose()
    try:
        export(FLAGS.workdir, FLAGS.format, FLAGS.out)
    except (ValueError, FileNotFoundError) as e:   # expected errors: one readable message
        print(f"Export failed: {e}", file=sys.stderr)
        sys.exit(1)


def define_flags(flag_values: flags.FlagValues = FLAGS):
    """Only when run as a command, so the module imports beside the other entry points (and on a
    fresh FlagValues in tests/test_docs.py)."""
    flags.DEFINE_string("workdir", None, "Pre-training workdir (its newest checkpoint is exported).",
                        flag_values=flag_values)
    flags.DEFINE_enum(name="format", default="timm", enum_values=["timm", "official", "hf"], help="Output layout.",
                      flag_values=flag_values)
    flags.DEFINE_string("out", None, "Output folder (created).", flag_values=flag_values)


if __name__ == "__main__":
    define_flags()
    app.run(main)
