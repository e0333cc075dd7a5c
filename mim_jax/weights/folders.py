"""The JSON files of the folder exports: timm's (`config.json` with architecture, `model_args`,
`pretrained_cfg`) and Hugging Face's (`config.json` + `preprocessor_config.json`). `inp` is the
run's `config.input`; `meta` says which run, step and weights the folder holds."""
from __future__ import annotations

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


def timm_model_args(encoder, image_size: int, channels: int) -> dict:
    return dict(img_size=image_size, patch_size=encoder.patch_size, in_chans=channels, embed_dim=encoder.width,
                depth=encoder.depth, num_heads=encoder.num_heads, mlp_ratio=encoder.mlp_dim / encoder.width,
                qkv_bias=encoder.use_bias, class_token=encoder.cls_token, num_classes=0,
                global_pool="token" if encoder.cls_token else "avg", fc_norm=False,
                init_values=encoder.layerscale, no_embed_class=False)


def timm_config(encoder, inp, meta: dict) -> dict:
    return {
        "architecture": timm_architecture(encoder, inp.image_size),
        "num_classes": 0,
        "model_args": timm_model_args(encoder, inp.image_size, inp.channels),
        "pretrained_cfg": {"input_size": [inp.channels, inp.image_size, inp.image_size], "mean": list(inp.mean),
                           "std": list(inp.std), "num_classes": 0, "interpolation": "bicubic",
                           "crop_pct": 0.875, "license": "see the run's data and recipe",
                           "description": timm_description(encoder, inp.image_size, inp.channels)},
        "mim_jax": meta,
    }


def hf_config(encoder, inp, meta: dict) -> dict[str, dict]:
    config = {"architectures": ["ViTModel"], "model_type": "vit", "hidden_size": encoder.width,
              "num_hidden_layers": encoder.depth, "num_attention_heads": encoder.num_heads,
              "intermediate_size": encoder.mlp_dim, "hidden_act": "gelu", "layer_norm_eps": encoder.norm_eps,
              "image_size": inp.image_size, "patch_size": encoder.patch_size, "num_channels": inp.channels,
              "qkv_bias": encoder.use_bias, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "mim_jax": meta}
    preprocessor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                    "size": {"height": inp.image_size, "width": inp.image_size}, "do_normalize": True,
                    "image_mean": list(inp.mean), "image_std": list(inp.std)}
    return {"config.json": config, "preprocessor_config.json": preprocessor}
