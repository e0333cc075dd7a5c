"""The one grammar that names weights, parsed once into a typed value.

  run:DIR            a pre-training workdir of this project (the prefix may be left out)
  <layout>:PATH      a weight file or folder in that layout (`mae:/ckpt/mae_pretrain_vit_base.pth`)
  PATH               a weight file (.pth, .pt, .bin, .safetensors) or a model folder holding one,
                     its layout detected from the tensor names; any other path is a workdir
  OWNER/NAME         a Hugging Face hub id (a CLIP teacher), where no such local path exists
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re

from mim_jax.errors import UserFacingError
from mim_jax.weights import files, registry

SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
RUN = "run"
_PREFIX = re.compile(r"([A-Za-z][A-Za-z0-9_]*):(?!//)(.*)", re.S)   # gs://bucket/run is a path, not a prefix


class UnknownLayoutError(UserFacingError, ValueError):
    """A spec's prefix names no layout."""


@dataclasses.dataclass(frozen=True)
class Run:
    """A workdir of this project (local, or a gs:// URL)."""
    path: str


@dataclasses.dataclass(frozen=True)
class File:
    """A weight file or model folder; `layout` None: detected from the tensor names."""
    path: pathlib.Path
    layout: str | None = None


@dataclasses.dataclass(frozen=True)
class Hub:
    """A Hugging Face hub repo id."""
    id: str


WeightSpec = Run | File | Hub


def parse(text) -> WeightSpec:
    """A spec string (or a path) -> Run, File or Hub. An unknown prefix is an error naming the
    known layouts."""
    if isinstance(text, (Run, File, Hub)):
        return text
    text = str(text)
    match = _PREFIX.fullmatch(text)
    if match and not os.path.exists(text):
        prefix, rest = match.groups()
        if prefix == RUN:
            return Run(rest)
        if prefix not in registry.names():
            raise UnknownLayoutError(f"{text!r} names the layout {prefix!r}, which is not one of "
                                     f"{', '.join(registry.names())} (or run: for a workdir of this project).")
        return File(pathlib.Path(os.path.expanduser(rest)), prefix)
    path = pathlib.Path(os.path.expanduser(text))
    if "://" in text:
        return Run(text)
    if path.suffix in SUFFIXES or (path.is_dir() and not (path / "checkpoints").exists() and any(
            (path / f).is_file() for f in files.WEIGHT_FILES)):
        return File(path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists():
        return Hub(text)
    return Run(text)


def names_an_encoder(spec: WeightSpec) -> bool:
    """A run, or a file named with a layout whose weights are a ViT encoder: what a teacher
    distils from, where any other spec is a CLIP tower."""
    return isinstance(spec, Run) or (isinstance(spec, File) and spec.layout is not None
                                     and registry.get(spec.layout).evaluated_by is not None)
