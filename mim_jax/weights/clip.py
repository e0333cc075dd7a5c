"""A CLIP teacher's weights -> CLIPVisionTower fields and params.

`source` is one of
- a Hugging Face hub repo id (`openai/clip-vit-base-patch16`, downloaded once into the HF cache),
  a local folder holding `model.safetensors` + `config.json`, or the .safetensors file itself
  (config.json beside it). Offline without a cached copy, the error names the files to download
  and where to point the config;
- one of OpenAI's own released files, `ViT-B-16.pt`, `ViT-L-14.pt`, ... (TorchScript archives as
  openai/CLIP downloads them; a `torch.save`d state dict in the same layout, `.pt` or `.pth`, too):
  no config, the architecture is read from the tensor shapes (`openai_clip.py`).

`vision_fields(source)` gives the tower fields of either kind, `load_clip_vision(source)` fields and
params; `read_config(source)` a Hugging Face style config.json (synthesised for an OpenAI file).
"""
from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from mim_jax.errors import WeightsError, WeightsNotFoundError
from mim_jax.weights import openai_clip
from mim_jax.weights.openai_clip import is_openai_file

FILES = ("model.safetensors", "config.json")


def _offline_help(repo: str) -> str:
    urls = " and ".join(f"https://huggingface.co/{repo}/resolve/main/{f}" for f in FILES)
    return (f"Could not get the CLIP teacher {repo!r} from the Hugging Face hub (offline, or "
            f"HF_HUB_OFFLINE is set, and it is not in the HF cache). Download {urls} into a folder, "
            f"e.g. /data/{repo.split('/')[-1]}/, and pass that folder as the teacher: "
            f"--config=configs/cae_v2.py:teacher=/data/{repo.split('/')[-1]} (or set config.teacher.source).")


def hf_config(fields: dict) -> dict:
    """CLIPVisionTower fields -> the Hugging Face CLIPModel config.json that `clip_config_from_hf`
    reads back to the same fields."""
    return dict(projection_dim=fields["proj_dim"], vision_config=dict(
        hidden_size=fields["width"], intermediate_size=fields["mlp_dim"], num_hidden_layers=fields["depth"],
        num_attention_heads=fields["num_heads"], image_size=fields["image_size"], patch_size=fields["patch_size"],
        hidden_act="quick_gelu", layer_norm_eps=fields["layer_norm_eps"], projection_dim=fields["proj_dim"]))


def resolve(source: str, cache_dir: str | None = None, files=FILES) -> pathlib.Path:
    """The local folder holding `files` (model.safetensors and config.json) for `source`; for an
    OpenAI `.pt` file, the folder it is in (after checking it exists)."""
    path = pathlib.Path(os.path.expanduser(source))
    if is_openai_file(source):
        return openai_clip.existing_path(source).parent
    if path.suffix == ".safetensors":
        folder = path.parent
        if not path.is_file():
            raise WeightsNotFoundError(f"CLIP weights {path} do not exist.")
    elif path.is_dir():
        folder = path
    elif source.count("/") == 1 and not source.startswith((".", "/")):
        return _download(source, cache_dir, files)
    else:
        raise WeightsNotFoundError(f"CLIP teacher {source!r} is neither a folder, a .safetensors file, an OpenAI "
                                "CLIP .pt file (ViT-B-16.pt) nor a Hugging Face repo id such as "
                                "'openai/clip-vit-base-patch16'.")
    missing = [f for f in ("config.json",) + (() if path.suffix else ("model.safetensors",))
               if not (folder / f).is_file()]
    if missing:
        raise WeightsNotFoundError(f"{folder} lacks {missing}: a CLIP teacher folder needs model.safetensors and "
                                "config.json as on its Hugging Face page (Files and versions).")
    return folder


def _download(repo: str, cache_dir: str | None, files=FILES) -> pathlib.Path:
    try:
        import huggingface_hub
    except ImportError as e:   # pragma: no cover - it is in requirements.txt
        raise WeightsNotFoundError(_offline_help(repo) + " (huggingface_hub is not installed.)") from e
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        paths = [huggingface_hub.hf_hub_download(repo, f, cache_dir=cache_dir, local_files_only=offline)
                 for f in files]
    except Exception as e:  # network, auth, missing cache: all mean the same to the user
        raise WeightsNotFoundError(f"{_offline_help(repo)}\n(cause: {type(e).__name__}: {e})") from None
    return pathlib.Path(paths[0]).parent


def _weights_file(source: str, folder: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(source) if source.endswith(".safetensors") else folder / "model.safetensors"


def read_config(source: str, cache_dir: str | None = None) -> dict:
    """The Hugging Face config.json of `source` (online, a hub id fetches only that file); for an
    OpenAI `.pt` file, the equivalent config built from its tensor shapes."""
    if is_openai_file(source):
        return hf_config(openai_clip.fields_of(source))
    return json.loads((resolve(source, cache_dir, files=("config.json",)) / "config.json").read_text())


def vision_fields(source: str, cache_dir: str | None = None) -> dict:
    """CLIPVisionTower fields of any CLIP `source` (HF: from config.json; OpenAI: from the shapes)."""
    if is_openai_file(source):
        return openai_clip.fields_of(source)
    from mim_jax.models.clip import clip_config_from_hf
    return clip_config_from_hf(read_config(source, cache_dir))


def load_clip_vision(source: str, cache_dir: str | None = None) -> tuple[dict, dict]:
    """(CLIPVisionTower fields, params as float32 numpy) from a CLIPModel or
    CLIPVisionModelWithProjection checkpoint or an OpenAI CLIP file (text-tower tensors are
    ignored)."""
    from safetensors.numpy import load_file

    from mim_jax.models.clip import clip_config_from_hf

    if is_openai_file(source):
        return openai_clip.load(source)
    folder = resolve(source, cache_dir)
    fields = clip_config_from_hf(json.loads((folder / "config.json").read_text()))
    tensors = load_file(str(_weights_file(source, folder)))
    return fields, convert(tensors, fields)


def convert(tensors: dict, fields: dict) -> dict:
    """HF tensor names -> the Linen tree; torch Linear [out, in] -> kernel [in, out]; the patch
    conv [D, C, p, p] -> a kernel over `patchify`'s (row, col, channel) pixel order."""
    tensors = {k.removeprefix("vision_model."): np.asarray(v, np.float32) for k, v in tensors.items()
               if k.startswith("vision_model.") or k == "visual_projection.weight"}
    used = set()

    def take(name):
        if name not in tensors:
            raise WeightsError(f"CLIP checkpoint lacks 'vision_model.{name}' (is it a CLIP vision checkpoint of "
                               f"the configured size? depth={fields['depth']}).")
        used.add(name)
        return tensors[name]

    def linear(prefix, bias=True):
        out = {"kernel": take(f"{prefix}.weight").T}
        if bias:
            out["bias"] = take(f"{prefix}.bias")
        return out

    def norm(prefix):
        return {"scale": take(f"{prefix}.weight"), "bias": take(f"{prefix}.bias")}

    conv = take("embeddings.patch_embedding.weight")
    params = {
        "patch_embedding": {"kernel": conv.transpose(2, 3, 1, 0).reshape(-1, conv.shape[0])},
        "class_embedding": take("embeddings.class_embedding"),
        "position_embedding": take("embeddings.position_embedding.weight"),
        "pre_layrnorm": norm("pre_layrnorm"),
        "post_layernorm": norm("post_layernorm"),
    }
    for i in range(fields["depth"]):
        p = f"encoder.layers.{i}"
        params[f"layers_{i}"] = {
            "layer_norm1": norm(f"{p}.layer_norm1"), "layer_norm2": norm(f"{p}.layer_norm2"),
            **{f"{n}_proj": linear(f"{p}.self_attn.{n}_proj") for n in ("q", "k", "v", "out")},
            "fc1": linear(f"{p}.mlp.fc1"), "fc2": linear(f"{p}.mlp.fc2")}
    if fields["proj_dim"]:
        params["visual_projection"] = {"kernel": take("visual_projection.weight").T}
    unused = sorted(set(tensors) - used - {"embeddings.position_ids"})
    if unused:
        raise WeightsError(f"CLIP checkpoint has vision tensors the tower does not use: {unused[:5]} "
                           f"(config.json says depth={fields['depth']}).")
    return params
