"""Reading and writing PyTorch-world weight files as flat dicts of float32 numpy arrays.

Read: `.safetensors` (no torch needed), `.pth`/`.pt`/`.bin` torch pickles (loaded with
`weights_only=True`: tensors, builtins and `SAFE_GLOBALS` only, no code runs; the official training
checkpoints with their optimizer state and `args` load), TorchScript archives (OpenAI's CLIP `.pt`), and
folders holding `model.safetensors` or `pytorch_model.bin` (+ `config.json`, returned too).
Training checkpoints nest the weights (`{"model": ...}`, `{"state_dict": ...}`); the usual wrapper
keys are unwrapped.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import pickle

import numpy as np

from mim_jax.errors import WeightsError, WeightsNotFoundError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# The only classes a torch pickle may hold beside tensors and builtins: the official training scripts'
# `utils.save_model` (MAE, Beyond Masking's MAE-pytorch, CAE) stores its argparse arguments as `args`.
SAFE_GLOBALS = (argparse.Namespace,)
_WRAPPERS = ("model", "state_dict", "module", "model_state", "teacher")


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("Reading .pth/.pt/.bin weights needs PyTorch (the CPU build is enough): "
                          "pip install torch. .safetensors files need no torch.") from None
    return torch


def weights_path(path) -> pathlib.Path:
    path = pathlib.Path(path).expanduser()
    if path.is_dir():
        for name in WEIGHT_FILES:
            if (path / name).is_file():
                return path / name
        raise WeightsNotFoundError(f"{path} is a folder without {' or '.join(WEIGHT_FILES)}: pass the weight file "
                                "itself or a Hugging Face / timm model folder.")
    if not path.is_file():
        raise WeightsNotFoundError(f"Weight file {path} does not exist.")
    return path


def read_config_json(path) -> dict | None:
    """config.json of a model folder (or beside a weight file), if there is one."""
    path = pathlib.Path(path).expanduser()
    folder = path if path.is_dir() else path.parent
    file = folder / "config.json"
    return json.loads(file.read_text()) if file.is_file() else None


def _unwrap(obj, source):
    for _ in range(3):
        if isinstance(obj, dict) and not any(hasattr(v, "shape") for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                raise WeightsError(f"{source} holds {sorted(obj)[:8]}, none of them a state dict "
                                   f"(looked for {list(_WRAPPERS)}).")
            obj = inner
    return obj


def read(path) -> dict[str, np.ndarray]:
    """The tensors of a weight file or folder (non-tensor entries such as step counters dropped)."""
    file = weights_path(path)
    if file.suffix == ".safetensors":
        from safetensors.numpy import load_file
        try:
            return {k: np.asarray(v, np.float32) for k, v in load_file(str(file)).items()}
        except Exception as e:   # safetensors raises its own error types for truncated files
            raise WeightsError(f"{file} is not a readable safetensors file ({e}).") from None
    torch = _torch()
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            obj = torch.load(str(file), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), str(e).splitlines()[0])
        raise WeightsError(f"{file} holds Python objects other than tensors and the argparse arguments of the official "
                           f"training scripts ({found}); they are not unpickled, as that could run any code. Save "
                           "its state dict alone (torch.save(checkpoint['model'], path)) and load that.") from None
    except RuntimeError as e:
        if "TorchScript" not in str(e) and "constants.pkl" not in str(e):
            raise WeightsError(f"{file} is not a readable PyTorch checkpoint ({e}).") from None
        obj = torch.jit.load(str(file), map_location="cpu").state_dict()   # OpenAI's CLIP archives
    except Exception as e:  # truncated zip, wrong format
        raise WeightsError(f"{file} is not a readable PyTorch checkpoint ({type(e).__name__}: {e}).") from None
    state = _unwrap(obj, file)
    return {k: v.detach().float().numpy() for k, v in state.items() if hasattr(v, "detach")}


def write_safetensors(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)


def write_torch(tensors: dict[str, np.ndarray], path, extra: dict | None = None) -> None:
    """A `.pth` as the official training scripts save it: {"model": state_dict, **extra}."""
    torch = _torch()
    state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}   # writable copies
    torch.save({"model": state, **(extra or {})}, str(path))


def normalisation(path, config_json: dict | None):
    """(mean, std) from timm's pretrained_cfg, this project's exports or a Hugging Face
    preprocessor_config.json; (None, None) where nothing records them."""
    cfg = (config_json or {}).get("pretrained_cfg", config_json or {})
    if "mean" in cfg and "std" in cfg:
        return tuple(cfg["mean"]), tuple(cfg["std"])
    path = pathlib.Path(path)
    pre = (path if path.is_dir() else path.parent) / "preprocessor_config.json"
    if pre.is_file():
        data = json.loads(pre.read_text())
        if "image_mean" in data:
            return tuple(data["image_mean"]), tuple(data["image_std"])
    return None, None


def write(tensors: dict[str, np.ndarray], path, meta: dict, wrapped: bool = True) -> None:
    """A state dict as `path`'s suffix says: safetensors with `meta` as metadata, or a `.pth` as the
    official training scripts save it ({"model": state_dict, "mim_jax": meta}); `wrapped=False`: the
    flat state dict alone, as a hub loader reads it (`meta` then only in the config.json beside it)."""
    path = pathlib.Path(path)
    if path.suffix == ".safetensors":
        write_safetensors(tensors, path, {"format": "pt", **{k: str(v) for k, v in meta.items()}})
    elif wrapped:
        write_torch(tensors, path, {"mim_jax": meta})
    else:
        torch = _torch()
        torch.save({k: torch.from_numpy(np.array(v, np.float32)) for k, v in tensors.items()}, str(path))
