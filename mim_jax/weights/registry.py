"""Every weight layout of another codebase, by name, and which one a file is in."""
from __future__ import annotations

import functools
import pathlib

from mim_jax.errors import WeightsError
from mim_jax.weights import capi, files, openai_clip, vit_layouts
from mim_jax.weights.layout import Description, Layout

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    vit_layouts.TIMM, vit_layouts.MAE, vit_layouts.HF, vit_layouts.CAE_V2, vit_layouts.BEYOND_MASKING, capi.LAYOUT,
    openai_clip.LAYOUT)}
ALIASES = {"cmae": "timm"}   # CMAE has no code of its own: its exports are timm's
# Each family once, the most specific names first (an HF file holds no timm names and vice versa).
DETECTION = (capi.LAYOUT, vit_layouts.HF, vit_layouts.TIMM, vit_layouts.CAE_V2, vit_layouts.BEYOND_MASKING,
             openai_clip.LAYOUT)


def names() -> list[str]:
    """Every name a spec may give its layout."""
    return sorted(set(LAYOUTS) | set(ALIASES))


def get(name: str) -> Layout:
    if name not in LAYOUTS and name not in ALIASES:
        raise WeightsError(f"Unknown weight layout {name!r}; known layouts: {', '.join(names())}.")
    return LAYOUTS[ALIASES.get(name, name)]


@functools.lru_cache(maxsize=2)
def read(path: pathlib.Path) -> dict:
    return files.read(path)


def detect(tensors: dict) -> Layout:
    """The layout whose tensor names a state dict has."""
    for layout in DETECTION:
        if layout.detect(tensors):
            return layout
    raise WeightsError(f"Unrecognised weight layout (first tensors: {list(tensors)[:6]}). Known layouts: "
                       f"{', '.join(names())}; name one explicitly as <layout>:/path.")


def describe(path: pathlib.Path, layout: str | None = None) -> Description:
    """The layout and encoder architecture of a weight file or folder; with `layout` named, the
    file must be in that layout's family."""
    tensors = read(path)
    found = detect(tensors)
    if layout is not None and get(layout).family != found.family:
        raise WeightsError(f"{path} is in the {found.family} layout, not {layout}'s ({get(layout).family}): "
                           f"pass it as {found.name}:{path}.")
    config_json = files.read_config_json(path)
    desc = get(layout or found.name).describe(tensors, path, config_json)
    desc.mean, desc.std = files.normalisation(path, config_json)
    return desc
