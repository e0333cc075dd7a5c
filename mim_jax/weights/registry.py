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


def read(path: pathlib.Path) -> dict:
    """The tensors of a weight file, read once while the file stays the same (describing and then
    importing a file reads it once): cached by path, size, modification time and inode, so a file
    rewritten at the same path is read again."""
    file = files.weights_path(path)
    stat = file.stat()
    return _read(file, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=2)
def _read(file: pathlib.Path, size: int, mtime_ns: int, inode: int) -> dict:
    return files.read(file)


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
    # An export of this project records its method: where that method evaluates some layout's files,
    # it evaluates this one too (a Beyond Masking encoder in timm's layout keeps its mean-token feature).
    exported_by = ((config_json or {}).get("mim_jax") or {}).get("method")
    if exported_by is not None and exported_by in {entry.evaluated_by for entry in LAYOUTS.values()}:
        desc.config_name = exported_by
    return desc
