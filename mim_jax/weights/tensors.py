"""Two-way maps between a PyTorch state dict and a Linen params tree, checked in full.

A layout is a list of `Entry`s: each names tensors of the state dict, paths of the params tree and
how one side becomes the other. The same list converts both ways, so an export followed by an
import is exact by construction, and a load is complete by construction: every tensor of the file
is used or matches an explicit `ignore` pattern, every parameter of the target is filled, every
shape agrees, or `MismatchError` lists all that is wrong at once (no silent partial loads).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, Sequence

import jax
import numpy as np

from mim_jax.errors import WeightsError

Path = tuple[str, ...]


class MismatchError(WeightsError):
    """A state dict that does not fit the model; the message lists every problem."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """`torch` tensors <-> `ours` params. `to_ours(list of arrays) -> list`, `to_torch` the inverse.
    An entry with no `ours` is a fixed table: `to_torch([])` writes it, importing checks the file's
    copy against it (`check`) instead of loading it."""
    torch: tuple[str, ...]
    ours: tuple[Path, ...]
    to_ours: Callable
    to_torch: Callable
    check: Callable | None = None


# ---- the conversions -------------------------------------------------------------------------

def same(torch_name: str, path: Path) -> Entry:
    return Entry(torch=(torch_name,), ours=(path,), to_ours=lambda t: [t[0]], to_torch=lambda o: [o[0]])


def linear(prefix: str, path: Path, bias: bool = True, weight: str = "weight") -> list[Entry]:
    """torch Linear [out, in] <-> Dense kernel [in, out] (+ bias)."""
    out = [Entry(torch=(f"{prefix}.{weight}",), ours=(path + ("kernel",),), to_ours=lambda t: [t[0].T],
                 to_torch=lambda o: [o[0].T])]
    if bias:
        out.append(same(f"{prefix}.bias", path + ("bias",)))
    return out


def norm(prefix: str, path: Path, bias: bool = True) -> list[Entry]:
    out = [same(f"{prefix}.weight", path + ("scale",))]
    if bias:
        out.append(same(f"{prefix}.bias", path + ("bias",)))
    return out


def patch_conv(torch_name: str, path: Path, patch: int, channels: int) -> Entry:
    """Conv2d weight [D, C, p, p] <-> a kernel over `layers.patchify`'s (row, col, channel) order."""
    def to_torch(o):
        return [o[0].reshape(patch, patch, channels, -1).transpose(3, 2, 0, 1)]
    return Entry(torch=(torch_name,), ours=(path,), to_torch=to_torch,
                 to_ours=lambda t: [t[0].transpose(2, 3, 1, 0).reshape(-1, t[0].shape[0])])


def split_qkv(names: Sequence[str], path: Path) -> Entry:
    """Separate q, k, v tensors (Linear weights [D, D] or biases [D]) <-> our fused qkv
    (kernel [D, 3D] or bias [3D]); q, k, v in that order along the output axis."""
    def to_ours(t):
        return [np.concatenate([x.T if x.ndim == 2 else x for x in t], axis=-1)]

    def to_torch(o):
        parts = np.split(o[0], 3, axis=-1)
        return [p.T if p.ndim == 2 else p for p in parts]
    return Entry(torch=tuple(names), ours=(path,), to_ours=to_ours, to_torch=to_torch)


def fold_qv_bias(torch_name: str, q_path: Path, v_path: Path) -> Entry:
    """A dense qkv bias [3D] <-> BEiT's learned q and v biases (the k bias is zero). Importing a
    dense bias whose k third is not zero into such a model is an error, not a silent drop."""
    def to_ours(t):
        q, k, v = np.split(t[0], 3)
        if np.any(k != 0):
            raise MismatchError(f"{torch_name} has a non-zero key bias (max |k| = {np.abs(k).max():.3g}); this "
                                "model has only q and v biases (model.qkv_bias='qv'): use qkv_bias='dense'.")
        return [q, v]
    return Entry(torch=(torch_name,), ours=(q_path, v_path), to_ours=to_ours,
                 to_torch=lambda o: [np.concatenate([o[0], np.zeros_like(o[0]), o[1]])])


def fixed(torch_name: str, table: np.ndarray, what: str, atol: float = 1e-4) -> Entry:
    """A fixed (not trained) table the model computes itself, e.g. a sin-cos position table."""
    def check(t):
        if t[0].shape != table.shape:
            return f"{torch_name} has shape {t[0].shape}, the model's {what} {table.shape}"
        err = float(np.abs(t[0] - table).max())
        if err > atol:
            return (f"{torch_name} differs from the model's {what} (max |diff| {err:.3g}): the weights were "
                    "trained with another position layout (set config.model.posemb to theirs)")
        return None
    return Entry(torch=(torch_name,), ours=(), to_ours=lambda t: [], to_torch=lambda o: [table], check=check)


def under(key: str, entries: Sequence[Entry]) -> list[Entry]:
    """The same entries for params one level down, at params[key] (e.g. a method's 'encoder')."""
    return [dataclasses.replace(e, ours=tuple((key,) + p for p in e.ours)) for e in entries]


# ---- applying a layout ---------------------------------------------------------------------

def _get(tree, path: Path):
    for key in path:
        tree = tree[key]
    return tree


def _set(tree: dict, path: Path, value):
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _paths(tree, prefix=()) -> dict[Path, object]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_paths(v, prefix + (k,)))
        return out
    return {prefix: tree}


def _fmt(items, limit=8) -> str:
    items = sorted(items)
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def to_params(tensors: dict, entries: Sequence[Entry], target, *, ignore: Sequence[str] = (),
              source: str = "the checkpoint") -> dict:
    """State dict -> params shaped like `target` (a tree of arrays or ShapeDtypeStructs).
    `ignore` holds regexes (full match) of tensors that are deliberately not loaded."""
    want = {p: tuple(x.shape) for p, x in _paths(target).items()}
    names = {n for e in entries for n in e.torch}
    missing = sorted(names - set(tensors))
    unexpected = sorted(n for n in set(tensors) - names if not any(re.fullmatch(p, n) for p in ignore))
    problems, params, filled = [], {}, set()
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_fmt(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): {_fmt(unexpected)}")
    for entry in entries:
        if any(n not in tensors for n in entry.torch):
            continue
        values = [np.asarray(tensors[n], np.float32) for n in entry.torch]
        if entry.check is not None:
            problem = entry.check(values)
            if problem:
                problems.append(problem)
            continue
        try:
            converted = entry.to_ours(values)
        except MismatchError as e:
            problems.append(str(e))
            continue
        except ValueError as e:   # a reshape that cannot apply: a shape mismatch
            problems.append(f"{'/'.join(entry.torch)} {[v.shape for v in values]} cannot be converted ({e})")
            continue
        for path, value in zip(entry.ours, converted):
            name = "/".join(path)
            if path not in want:
                problems.append(f"{'/'.join(entry.torch)} maps to {name}, which this model does not have")
            elif value.shape != want[path]:
                problems.append(f"{'/'.join(entry.torch)} has shape {[v.shape for v in values]}, which gives "
                                f"{name} {value.shape}; the model needs {want[path]}")
            else:
                _set(params, path, value)
                filled.add(path)
    unfilled = sorted("/".join(p) for p in set(want) - filled - {p for e in entries for p in e.ours})
    if unfilled:
        problems.append(f"{len(unfilled)} parameter(s) of the model have no tensor in this layout: {_fmt(unfilled)}")
    if problems:
        more = f"; and {len(problems) - 12} more problems" if len(problems) > 12 else ""
        raise MismatchError(f"{source} does not fit the model: " + "; ".join(problems[:12]) + more + ".")
    return params


def to_tensors(params, entries: Sequence[Entry]) -> dict[str, np.ndarray]:
    """Params -> state dict (float32 numpy, contiguous). Every param must be used by an entry."""
    flat = {p: np.asarray(jax.device_get(x), np.float32) for p, x in _paths(params).items()}
    used = {p for e in entries for p in e.ours}
    unused = sorted("/".join(p) for p in set(flat) - used)
    if unused:
        raise MismatchError(f"the export layout has no place for {len(unused)} parameter(s): {_fmt(unused)}.")
    out = {}
    for entry in entries:
        values = entry.to_torch([flat[p] for p in entry.ours])
        out.update({n: np.ascontiguousarray(v, np.float32) for n, v in zip(entry.torch, values)})
    return out
