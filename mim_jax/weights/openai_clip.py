"""OpenAI's own CLIP files (`ViT-B-16.pt`, `ViT-L-14.pt`, ... from the openai/CLIP download URLs)
<-> `models.clip.CLIPVisionTower` params.

The released files are TorchScript archives (`files.read` loads them with `torch.jit.load`; a
plain `torch.save` of the same state dict reads too). Their vision tower, as `clip/model.py`
(`VisionTransformer`, `ResidualAttentionBlock`) names it:

  visual.conv1.weight [D, 3, p, p]            (no bias)       -> patch_embedding/kernel
  visual.class_embedding [D]                                  -> class_embedding
  visual.positional_embedding [1 + g*g, D]                    -> position_embedding
  visual.ln_pre.{weight,bias}                                 -> pre_layrnorm
  visual.transformer.resblocks.{i}.ln_1.{weight,bias}         -> layers_i/layer_norm1
  visual.transformer.resblocks.{i}.attn.in_proj_weight [3D, D]  q | k | v along the output axis
  visual.transformer.resblocks.{i}.attn.in_proj_bias [3D]     -> layers_i/{q,k,v}_proj
  visual.transformer.resblocks.{i}.attn.out_proj.{weight,bias}  -> layers_i/out_proj
  visual.transformer.resblocks.{i}.ln_2.{weight,bias}         -> layers_i/layer_norm2
  visual.transformer.resblocks.{i}.mlp.c_fc.{weight,bias}     -> layers_i/fc1
  visual.transformer.resblocks.{i}.mlp.c_proj.{weight,bias}   -> layers_i/fc2
  visual.ln_post.{weight,bias}                                -> post_layernorm
  visual.proj [D, proj_dim]   (already [in, out], no bias)    -> visual_projection/kernel

Everything not under `visual.` is the text tower (and `input_resolution`, `context_length`,
`vocab_size` scalars in the archives) and is ignored. The architecture is not stored: as
`clip/model.py::build_model` does, it is read from the shapes (heads = width // 64, the MLP 4x wide
in the released models but read from `c_fc`), with QuickGELU and LayerNorm eps 1e-5 (torch's
default) throughout, i.e. Hugging Face's `hidden_act="quick_gelu"`, `layer_norm_eps=1e-5`. The
ResNet models (`RN50.pt`, ...) have no `visual.proj` and are refused.

`LAYOUT` is the registry entry: it recognises such a file among the encoder layouts and refuses it
there (a CLIP tower is a teacher, not an encoder to evaluate); `load(path)` reads one for a teacher.
"""
from __future__ import annotations

import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import parallel
from mim_jax.errors import WeightsError, WeightsNotFoundError
from mim_jax.weights import files
from mim_jax.weights.layout import Layout
from mim_jax.weights.tensors import Entry, MismatchError, linear, norm, patch_conv, same, to_params as _to_params
from mim_jax.weights.tensors import to_tensors as _to_tensors

PREFIX = "visual."
BLOCKS = PREFIX + "transformer.resblocks."
BLOCK = BLOCKS + "{}."
IGNORE = (r"(?!visual\.).*",)       # the text tower and the archives' scalars
LAYER_NORM_EPS = 1e-5               # clip/model.py's LayerNorm(d_model): torch's default eps
HEAD_DIM = 64                       # clip/model.py: vision_heads = vision_width // 64
SUFFIXES = (".pt", ".pth")          # OpenAI's released files are .pt; .pth for a re-saved state dict

# The released ViT files (clip/clip.py::_MODELS), for error messages.
URLS = {
    "ViT-B-32.pt": "https://openaipublic.azureedge.net/clip/models/"
                   "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B-16.pt": "https://openaipublic.azureedge.net/clip/models/"
                   "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L-14.pt": "https://openaipublic.azureedge.net/clip/models/"
                   "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L-14-336px.pt": "https://openaipublic.azureedge.net/clip/models/"
                         "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}


def is_openai_clip(tensors: dict) -> bool:
    """An OpenAI CLIP state dict (ViT or ResNet): its image tower is under `visual.`."""
    return any(n.startswith(PREFIX) for n in tensors)


def _shape(tensors: dict, name: str, ndim: int, source: str) -> tuple[int, ...]:
    if name not in tensors:
        if f"{PREFIX}layer1.0.conv1.weight" in tensors or f"{PREFIX}attnpool.positional_embedding" in tensors:
            raise MismatchError(f"{source} is an OpenAI CLIP ResNet (RN50/RN101/...): only the ViT models "
                                "(ViT-B-32.pt, ViT-B-16.pt, ViT-L-14.pt, ...) can be the teacher.")
        raise MismatchError(f"{source} lacks {name}: it is not an OpenAI CLIP ViT file (expected {PREFIX}conv1.weight, "
                            f"{PREFIX}positional_embedding, {BLOCK.format('{i}')}*, {PREFIX}proj as in "
                            "openai/CLIP clip/model.py; first tensors: " + ", ".join(sorted(tensors)[:5]) + ").")
    shape = tuple(np.shape(tensors[name]))
    if len(shape) != ndim:
        raise MismatchError(f"{source}: {name} has shape {shape}, not {ndim}-dimensional as in an OpenAI CLIP ViT.")
    return shape


def fields_from_tensors(tensors: dict, source: str = "the checkpoint") -> dict:
    """CLIPVisionTower fields of an OpenAI CLIP ViT state dict, read from the shapes as
    `clip/model.py::build_model` does; the same dict `clip.clip_config_from_hf` returns for the
    equivalent Hugging Face config (QuickGELU is the tower's only activation, so no field)."""
    width, channels, patch, patch_w = _shape(tensors, f"{PREFIX}conv1.weight", 4, source)
    rows, _ = _shape(tensors, f"{PREFIX}positional_embedding", 2, source)
    side = int(round((rows - 1) ** 0.5))
    if side * side != rows - 1 or patch != patch_w:
        raise MismatchError(f"{source}: {PREFIX}positional_embedding has {rows} rows and {PREFIX}conv1.weight is "
                            f"{patch}x{patch_w}: not 1 + a square grid of square patches.")
    blocks = {int(m.group(1)) for n in tensors if (m := re.match(re.escape(BLOCKS) + r"(\d+)\.", n))}
    if not blocks:
        raise MismatchError(f"{source} has no {BLOCK.format('{i}')}* tensors: not an OpenAI CLIP ViT file.")
    # depth = the highest block + 1, so a block with missing tensors is reported by name by `to_params`.
    c_fc = [BLOCK.format(i) + "mlp.c_fc.weight" for i in sorted(blocks)]
    mlp_dim, _ = _shape(tensors, next((n for n in c_fc if n in tensors), c_fc[0]), 2, source)
    _, proj_dim = _shape(tensors, f"{PREFIX}proj", 2, source)
    if width < HEAD_DIM:
        raise MismatchError(f"{source}: width {width} < {HEAD_DIM}, so clip/model.py's width // {HEAD_DIM} "
                            "attention heads would be none.")
    return dict(patch_size=patch, width=width, depth=max(blocks) + 1, num_heads=width // HEAD_DIM, mlp_dim=mlp_dim,
                proj_dim=proj_dim, image_size=side * patch, layer_norm_eps=LAYER_NORM_EPS)


def _in_proj(name: str, block: tuple, what: str) -> Entry:
    """in_proj_weight [3D, D] (or in_proj_bias [3D]) <-> the q, k, v Dense kernels [D, D] (biases [D])."""
    paths = tuple(block + (f"{n}_proj", what) for n in "qkv")

    def to_ours(t):
        return [p.T if p.ndim == 2 else p for p in np.split(t[0], 3, axis=0)]

    def to_torch(o):
        return [np.concatenate([p.T if p.ndim == 2 else p for p in o], axis=0)]
    return Entry(torch=(name,), ours=paths, to_ours=to_ours, to_torch=to_torch)


def entries(fields: dict) -> list[Entry]:
    """The OpenAI names <-> the CLIPVisionTower params paths, for a tower with `fields`."""
    out = [patch_conv(f"{PREFIX}conv1.weight", ("patch_embedding", "kernel"), fields["patch_size"], 3),
           same(f"{PREFIX}class_embedding", ("class_embedding",)),
           same(f"{PREFIX}positional_embedding", ("position_embedding",))]
    out += norm(f"{PREFIX}ln_pre", ("pre_layrnorm",)) + norm(f"{PREFIX}ln_post", ("post_layernorm",))
    for i in range(fields["depth"]):
        t, o = BLOCK.format(i), (f"layers_{i}",)
        out += norm(t + "ln_1", o + ("layer_norm1",)) + norm(t + "ln_2", o + ("layer_norm2",))
        out += [_in_proj(t + "attn.in_proj_weight", o, "kernel"), _in_proj(t + "attn.in_proj_bias", o, "bias")]
        out += linear(t + "attn.out_proj", o + ("out_proj",))
        out += linear(t + "mlp.c_fc", o + ("fc1",)) + linear(t + "mlp.c_proj", o + ("fc2",))
    if fields["proj_dim"]:
        out.append(same(f"{PREFIX}proj", ("visual_projection", "kernel")))
    return out


def abstract_params(fields: dict):
    """The tower's params as shapes (unboxed), the target a file must fill."""
    from mim_jax.models.clip import CLIPVisionTower
    tower = CLIPVisionTower(**fields)
    images = jnp.zeros((1, fields["image_size"], fields["image_size"], 3), jnp.float32)
    return parallel.unbox_abstract(jax.eval_shape(tower.init, jax.random.key(0), images)["params"])


def to_params(tensors: dict, fields: dict, source: str = "the checkpoint") -> dict:
    """An OpenAI CLIP state dict -> CLIPVisionTower params (float32 numpy). Every `visual.` tensor
    is used and every param filled with the right shape, or `MismatchError` names what is wrong."""
    return _to_params(tensors, entries(fields), abstract_params(fields), ignore=IGNORE, source=source)


def to_tensors(params: dict, fields: dict) -> dict[str, np.ndarray]:
    """CLIPVisionTower params -> the vision half of an OpenAI CLIP state dict (float32 numpy)."""
    return _to_tensors(params, entries(fields))


class OpenAIClip(Layout):
    name = family = "openai_clip"
    refusal = ("this is an OpenAI CLIP checkpoint: use it as CAE v2's teacher "
               "(configs/cae_v2.py:teacher=/path/ViT-B-16.pt), not as an encoder to evaluate.")

    def detect(self, tensors):
        return is_openai_clip(tensors)


LAYOUT = OpenAIClip()


def is_openai_file(source: str) -> bool:
    """True for a path to one of OpenAI's CLIP files (by its suffix: `.pt` / `.pth`)."""
    return pathlib.Path(os.path.expanduser(source)).suffix in SUFFIXES


def existing_path(source: str) -> pathlib.Path:
    path = pathlib.Path(os.path.expanduser(source))
    if not path.is_file():
        url = URLS.get(path.name)
        where = (f"download {url} (openai/CLIP's clip/clip.py _MODELS) to {path}" if url else
                 "download the file from the URL openai/CLIP's clip/clip.py _MODELS lists for it, e.g. "
                 + URLS["ViT-B-16.pt"])
        raise WeightsNotFoundError(f"OpenAI CLIP weights {path} do not exist: {where}, and pass its path as the "
                                   f"teacher: --config=configs/cae_v2.py:teacher={path} (or set config.teacher.source).")
    return path


def _read(path: pathlib.Path) -> dict:
    tensors = files.read(path)
    if not is_openai_clip(tensors):
        raise WeightsError(f"{path} is not an OpenAI CLIP file (no visual.* tensors; "
                           f"first tensors: {sorted(tensors)[:5]}). A Hugging Face CLIP checkpoint is a folder with "
                           "model.safetensors + config.json, or the .safetensors file itself.")
    return tensors


_FIELDS: dict = {}   # (path, mtime, size) -> fields: config time, build and load each ask


def fields_of(source: str, tensors: dict | None = None) -> dict:
    """The tower fields of an OpenAI CLIP file, read once per file version."""
    path = existing_path(source)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _FIELDS:
        _FIELDS[key] = fields_from_tensors(_read(path) if tensors is None else tensors, source=str(path))
    return dict(_FIELDS[key])


def load(source: str) -> tuple[dict, dict]:
    """(CLIPVisionTower fields, params) of an OpenAI CLIP file."""
    path = existing_path(source)
    tensors = _read(path)
    fields = fields_of(source, tensors)
    return fields, to_params(tensors, fields, source=str(path))
