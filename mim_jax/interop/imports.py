"""Weight files from other codebases: which layout a file is in and which encoder it holds.

A weights spec is `[layout:]path`: `mae:/ckpt/mae_pretrain_vit_base.pth`,
`timm:/hub/vit_base_patch16_224.mae/model.safetensors`, `hf:/models/vit-mae-base`,
`cae_v2:/ckpt/caev2_base_300ep.pth`, `beyond_masking:/ckpt/checkpoint-399.pth`,
`capi:/ckpt/capi_vitl14_lvd.pth`, `cmae:` (this project's timm export). Without a layout the
family is detected from the tensor names; with one, the file must be in that layout. The encoder's
architecture (width, depth, heads, patch, positions, biases, LayerScale, [CLS]) is read from the
tensors (and `config.json` where there is one), so no config is needed to evaluate a file.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import re

import numpy as np

from mim_jax.interop import files
from mim_jax.models import layers

# layout -> (tensor family, the method that evaluates such an encoder, pretrained.RELEASED). The
# encoder is all that evaluations and warm starts read, so layouts whose method needs more to build
# (CAE v2's teacher) evaluate through MAE's method with their own encoder fields.
LAYOUTS = {
    "mae": ("timm", "mae"), "timm": ("timm", "mae"), "cmae": ("timm", "mae"), "hf": ("hf", "mae"),
    "cae_v2": ("beit", "mae"), "beyond_masking": ("mae_pytorch", "beyond_masking"), "capi": ("capi", "capi"),
}
VARIANT_BY_WIDTH = {192: "Ti", 384: "S", 512: "M", 768: "B", 1024: "L", 1280: "H", 1408: "g"}
# Standard ViT head counts by width (ViT, DeiT, MAE); files without a config.json need them.
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16}
SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclasses.dataclass
class Description:
    """What a weight file holds, enough to build the model it fits."""
    layout: str
    family: str
    path: pathlib.Path
    config_name: str             # the method whose config (pretrained.imported_config) evaluates it
    model: dict                  # config.model fields of its encoder
    image_size: int
    channels: int
    mean: tuple | None = None    # input normalisation, where a config file records it
    std: tuple | None = None
    prefix: str = ""             # HF: 'vit.' inside *ForPreTraining / *ForImageClassification
    has_decoder: bool = False    # MAE's *_full.pth: the decoder can continue pre-training
    extra: dict = dataclasses.field(default_factory=dict)


def parse(spec: str) -> tuple[str | None, pathlib.Path]:
    layout, sep, rest = spec.partition(":")
    if sep and layout in LAYOUTS:
        return layout, pathlib.Path(os.path.expanduser(rest))
    return None, pathlib.Path(os.path.expanduser(spec))


def is_weights(spec: str) -> bool:
    """True for a weights spec (a layout prefix, a weight file, or a model folder that is not a
    workdir of this project)."""
    layout, path = parse(spec)
    if layout is not None:
        return True
    if path.suffix in SUFFIXES:
        return True
    return path.is_dir() and not (path / "checkpoints").exists() and any(
        (path / f).is_file() for f in files.WEIGHT_FILES)


@functools.lru_cache(maxsize=2)
def read(path: pathlib.Path) -> dict:
    return files.read(path)


def detect_family(tensors: dict) -> tuple[str, str]:
    """(family, key prefix) from the tensor names."""
    names = list(tensors)
    if any(n.startswith("backbone.") for n in names):
        return "capi", "backbone."
    for n in names:
        m = re.fullmatch(r"(.*)embeddings\.patch_embeddings\.projection\.weight", n)
        if m:
            return "hf", m.group(1)
    for n in names:
        m = re.fullmatch(r"(.*)patch_embed\.proj\.weight", n)
        if m:
            prefix = m.group(1)
            if prefix == "":
                return "timm", ""
            if prefix == "encoder.":
                return ("beit" if "encoder.pos_embed" in tensors else "mae_pytorch"), prefix
    if any(n.startswith("visual.transformer.resblocks.") for n in names):
        raise ValueError("This is an OpenAI CLIP checkpoint: use it as CAE v2's teacher "
                         "(configs/cae_v2.py:teacher=/path/ViT-B-16.pt), not as an encoder to evaluate.")
    raise ValueError(f"Unrecognised weight layout (first tensors: {names[:6]}). Known layouts: {sorted(LAYOUTS)}; "
                     "name one explicitly as <layout>:/path.")


def _posemb_of(table: np.ndarray, grid, width: int, candidates) -> str:
    for kind in candidates:
        if np.allclose(table, layers.positions(kind, grid, width), atol=1e-4):
            return kind
    return "learn"


def _square_grid(n: int, what: str) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"{what} has {n} positions, not a square grid.")
    return side, side


def _heads(width: int, config_json: dict | None, spec: str) -> int:
    if config_json:
        for key in ("num_attention_heads", "num_heads"):
            if key in config_json:
                return int(config_json[key])
        if "num_heads" in config_json.get("model_args", {}):
            return int(config_json["model_args"]["num_heads"])
    if width not in HEADS_BY_WIDTH:
        raise ValueError(f"{spec}: a {width}-wide ViT is not a standard size and there is no config.json beside it "
                         "saying how many attention heads it has.")
    return HEADS_BY_WIDTH[width]


def _vit_description(tensors, family, prefix, layout, path, config_json) -> Description:
    if family == "hf":
        p = prefix
        conv = tensors[f"{p}embeddings.patch_embeddings.projection.weight"]
        block = f"{p}encoder.layer.{{}}."
        depth = sum(1 for n in tensors if re.fullmatch(rf"{re.escape(p)}encoder\.layer\.\d+\.layernorm_before\.weight", n))
        mlp_dim = tensors[block.format(0) + "intermediate.dense.weight"].shape[0]
        has_cls = f"{p}embeddings.cls_token" in tensors
        table = tensors.get(f"{p}embeddings.position_embeddings")
        k_biases = [tensors.get(block.format(i) + "attention.attention.key.bias") for i in range(depth)]
        qkv_bias = "qv" if all(b is not None and not np.any(b) for b in k_biases) else "dense"
        use_bias = block.format(0) + "attention.output.dense.bias" in tensors
        layerscale = None
        eps = float((config_json or {}).get("layer_norm_eps", 1e-12))
    else:
        conv = tensors[f"{prefix}patch_embed.proj.weight"]
        block = f"{prefix}blocks.{{}}."
        depth = sum(1 for n in tensors if re.fullmatch(rf"{re.escape(prefix)}blocks\.\d+\.norm1\.weight", n))
        mlp_dim = tensors[block.format(0) + "mlp.fc1.weight"].shape[0]
        has_cls = f"{prefix}cls_token" in tensors and family != "mae_pytorch"
        table = tensors.get(f"{prefix}pos_embed")
        qkv_bias = "qv" if block.format(0) + "attn.q_bias" in tensors else "dense"
        if qkv_bias == "dense" and _zero_key_biases(tensors, [block.format(i) + "attn.qkv.bias" for i in range(depth)]):
            qkv_bias = "qv"    # a BEiT-style encoder exported with its q/v biases folded into qkv.bias
        use_bias = block.format(0) + "attn.proj.bias" in tensors
        layerscale = 0.1 if any(block.format(0) + n in tensors for n in ("gamma_1", "ls1.gamma")) else None
        eps = 1e-6    # timm, MAE, BEiT/CAE and MAE-pytorch all build LayerNorm(eps=1e-6)
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    if table is not None:
        rows = table.shape[1] - int(has_cls)
        grid = _square_grid(rows, f"{path}: the position table")
        body = table[0, int(has_cls):]
        candidates = ("sincos2d_rowfirst", "sincos2d") if family == "beit" else ("sincos2d", "sincos2d_rowfirst", "sincos1d")
        posemb = _posemb_of(body, grid, width, candidates)
    else:   # MAE-pytorch does not store its fixed 1-D table
        size = int((config_json or {}).get("image_size", 224))
        grid, posemb = (size // patch, size // patch), "sincos1d"
    model = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=_heads(width, config_json, str(path)),
                 variant=f"{VARIANT_BY_WIDTH.get(width, 'B')}/{patch}", cls_token=has_cls, posemb=posemb, qkv_bias=qkv_bias, use_bias=use_bias,
                 layerscale=layerscale, norm="layernorm", norm_eps=eps, num_registers=0)
    config_name = LAYOUTS[layout][1] if layout else ("beyond_masking" if family == "mae_pytorch" else "mae")
    has_decoder = family == "timm" and "decoder_embed.weight" in tensors
    extra = {"decoder": _mae_decoder(tensors, config_json)} if has_decoder else {}
    return Description(layout=layout or family, family=family, path=path, config_name=config_name, model=model,
                       image_size=grid[0] * patch, channels=channels, prefix=prefix, has_decoder=has_decoder,
                       extra=extra)


def _mae_decoder(tensors, config_json) -> dict:
    """MAE's decoder size from a *_full.pth (heads: config.json, else MAE's 16)."""
    width = tensors["decoder_embed.weight"].shape[0]
    depth = sum(1 for n in tensors if re.fullmatch(r"decoder_blocks\.\d+\.norm1\.weight", n))
    heads = int((config_json or {}).get("decoder_num_heads", 16))
    return dict(width=width, depth=depth, num_heads=heads, mlp_dim=tensors["decoder_blocks.0.mlp.fc1.weight"].shape[0])


def _zero_key_biases(tensors, names) -> bool:
    """Every block's key bias exactly zero: trained dense biases never are, folded q/v ones always."""
    biases = [tensors.get(n) for n in names]
    return all(b is not None and not np.any(np.split(b, 3)[1]) for b in biases)


def describe(spec: str) -> Description:
    """The layout and encoder architecture of a weights spec."""
    layout, path = parse(spec)
    tensors = read(path)
    family, prefix = detect_family(tensors)
    if layout is not None and LAYOUTS[layout][0] != family:
        raise ValueError(f"{path} is in the {family} layout, not {layout}'s ({LAYOUTS[layout][0]}): "
                         f"pass it as {next(k for k, v in LAYOUTS.items() if v[0] == family)}:{path}.")
    config_json = files.read_config_json(path)
    if family == "capi":
        from mim_jax.interop import capi
        desc = capi.describe(tensors, path)
    else:
        desc = _vit_description(tensors, family, prefix, layout, path, config_json)
    desc.mean, desc.std = _normalisation(path, config_json)
    return desc


def _normalisation(path: pathlib.Path, config_json: dict | None):
    """(mean, std) from timm's pretrained_cfg, this project's exports or a Hugging Face
    preprocessor_config.json; (None, None) where nothing records them."""
    cfg = (config_json or {}).get("pretrained_cfg", config_json or {})
    if "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    folder = path if path.is_dir() else path.parent
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        import json
        data = json.loads(pre.read_text())
        if "image_mean" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    return None, None


def ignored(desc: Description, keys) -> tuple[str, ...]:
    """Regexes of the tensors an import of the params `keys` deliberately leaves out."""
    if desc.family == "timm":
        out = [r"head\..*", r"fc_norm\..*"]      # a supervised classifier on top of the encoder
        if "decoder" not in keys:
            out += [r"mask_token", r"decoder_.*"]
        return tuple(out)
    if desc.family == "hf":
        return (r"(?!{}).*".format(re.escape(desc.prefix + "embeddings.") + "|" + re.escape(desc.prefix + "encoder.")
                                   + "|" + re.escape(desc.prefix + "layernorm.")),
                rf"{re.escape(desc.prefix)}embeddings\.mask_token")
    if desc.family in ("beit", "mae_pytorch"):
        # CAE's full checkpoints also hold the regressor, decoder and teacher; MAE-pytorch's the
        # decoder; MAE-pytorch's encoder has an unused [CLS] parameter and an empty head.
        return (r"(?!encoder\.).*", r"encoder\.head\..*", r"encoder\.cls_token" if desc.family == "mae_pytorch" else "$^")
    return ()
