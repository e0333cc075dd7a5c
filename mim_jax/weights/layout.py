"""What every weight layout provides (`Layout`) and what reading a file tells (`Description`)."""
from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from mim_jax.errors import WeightsError


@dataclasses.dataclass
class Description:
    """What a weight file holds, enough to build the model it fits."""
    layout: str                  # the registry name of its layout
    family: str                  # how its tensors are named (`Layout.family`)
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


class Layout:
    """One codebase's way of naming a model's tensors: a registry entry (`registry.LAYOUTS`).

    `family` groups layouts that name tensors alike (official MAE files are timm's); a file named
    with one layout must be in its family. `evaluated_by` is the method whose config evaluates an
    encoder of this layout (`Method.released`); None for weights that are no such encoder (a
    CLIP tower, which only a teacher reads)."""
    name: str
    family: str
    evaluated_by: str | None = None
    refusal: str = ""            # why a file of a layout without `evaluated_by` is no encoder
    # How the official code saves (and its loader reads) a checkpoint: {"model": state_dict} as the
    # training scripts' save_model, or the flat state dict (CAPI's hub files).
    wrapped: bool = True

    def detect(self, tensors: dict) -> bool:
        """True when the tensor names are this layout's (checked in `registry.DETECTION` order)."""
        raise NotImplementedError

    def describe(self, tensors: dict, path: pathlib.Path, config_json: dict | None) -> Description:
        """The encoder architecture a file holds, read from its tensors (and config.json)."""
        raise WeightsError(f"{path}: {self.refusal}")

    def to_params(self, tensors: dict, desc: Description, method, abstract: dict, keys=None) -> dict:
        """The subtrees `keys` of `method`'s params (numpy, shaped like the abstract params, the
        method's block layout) from a file's tensors; every tensor accounted for."""
        raise NotImplementedError(f"weights in the {self.name} layout are not imported into a method's params")

    def from_params(self, params: dict, method) -> dict[str, np.ndarray]:
        """`method`'s params (loop layout) -> this layout's state dict."""
        raise NotImplementedError(f"the {self.name} layout has no export")

    def checkpoint_info(self, method) -> dict:
        """What a checkpoint in this layout cannot say in its tensors, beyond `checkpoint_config`'s."""
        return {}

    def checkpoint_config(self, method, inp, meta: dict) -> dict[str, dict]:
        """The config.json beside a checkpoint: not read by the official code, it tells an import
        what the tensors do not (head count; the resolution where no position table is stored)."""
        return {"config.json": {"num_heads": method.encoder.num_heads, "image_size": inp.image_size,
                                "mean": list(inp.mean), "std": list(inp.std), **self.checkpoint_info(method),
                                "mim_jax": meta}}

    def folder_config(self, method, inp, meta: dict) -> dict[str, dict]:
        """The JSON files beside `model.safetensors` when the layout is written as a folder."""
        raise NotImplementedError(f"the {self.name} layout has no folder format")
