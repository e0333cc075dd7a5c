"""The official CAPI backbone (facebookresearch/capi `model.py`, `EncoderDecoder`) <-> this
project's CAPI params (`params["encoder"]`: `models.vit.ViT`; `params["predictor"]`:
`methods/capi/heads.py` Predictor).

The released torch-hub files (`capi_vitl14_{lvd,p205,i22k,in1k}.pth`) and the training script's
evaluation dumps hold the backbone as `backbone.` + its module path:

  backbone.patch_embed.{weight [D, C, p, p], bias [D]}      Conv2d (the only bias in the model)
  backbone.registers [1, R, D]                              ours: encoder/registers
  backbone.mask_token [1, D]                                ours: predictor/mask_token
  backbone.encoder.blocks.{i}.residual1.norm.weight         RMSNorm -> encoder/encoder/block_i/norm1
  backbone.encoder.blocks.{i}.residual1.fn.{q,k,v}_proj.weight   -> block_i/attn/qkv (fused)
  backbone.encoder.blocks.{i}.residual1.fn.proj.weight           -> block_i/attn/out
  backbone.encoder.blocks.{i}.residual1.fn.rope.freqs [2, head_dim]   fixed, checked (below)
  backbone.encoder.blocks.{i}.residual2.norm.weight              -> block_i/norm2
  backbone.encoder.blocks.{i}.residual2.fn.fc{1,2}.weight        -> block_i/mlp/fc{1,2}
  backbone.decoder.blocks.{i}.<the same names>              -> predictor/block_i/{norm1,q,k,v,out,norm2,mlp}

`enc_norm` and `dec_norm` are RMSNorms without a weight (`elementwise_affine=False`), so neither
side stores anything for them. Everything else of our params (the student head `head`, the
clustering head `clustering`) is not part of the backbone: an importer fills `COVERED` and leaves
the rest (`ours_not_in_backbone`). The training script's evaluation dumps of the student (EMA)
also hold `head.*` (its weight-normalised head); pass `ignore=HEADS` to import such a file.
`LAYOUT` is the registry entry; its `describe` reads the architecture of such a file (the number of
heads is stored only as the RoPE frequencies' head_dim).

How the official code and this model differ, none of it visible in the tensors:
- RoPE frequencies are an `nn.Parameter` in every attention module (trained with lr 0, so they
  keep their init); here they are computed (`models/rope.py`). Importing checks every copy against
  ours instead of loading it; exporting writes ours.
- The official angles are `coords @ freqs` in the activation dtype (bf16 in training); ours are
  float32. In float32 (the hub models on CPU) the two forwards agree to rounding.
- The training script's dumps read each weight through SimpleFSDP's all-gather parametrization,
  which casts to the compute dtype (bf16), so a released file may hold bf16-rounded values. The
  hub loader copies the file into float32 parameters, so such a file would make the
  official model run with bf16-rounded frequencies; we accept such a file (with a warning) but
  keep exact frequencies, so features then differ slightly (angle error < 2^-9 relative).
- Drop path: the official default is the "efficient" residual (the branch runs on a random 80 %
  of the batch); ours drops whole examples ("naive"). Training only; the weights are the same.
"""
from __future__ import annotations

import logging
import re

import jax
import numpy as np

from mim_jax.errors import WeightsError
from mim_jax.weights.tensors import (Entry, MismatchError, linear, norm, patch_conv, same, split_qkv, to_params,
                                     to_tensors)
from mim_jax.models import layers
from mim_jax.models import rope as rope_lib
from mim_jax.weights.layout import Description, Layout

PREFIX = "backbone."
COVERED = ("encoder", "predictor")       # top-level params subtrees the official backbone holds
HEADS = (r"head\..*",)                   # the student head in the training script's eval dumps
# The official norm_layer_kwargs default; not stored, so a different eps would load silently.
OFFICIAL_NORM_EPS = 1e-5
# bf16 rounds to within 2^-9 relative; anything further is another frequency table.
_ROPE_RTOL = 2.0 ** -8


def rope_table(head_dim: int) -> np.ndarray:
    """The official `Rope.freqs` [2, head_dim] for our frequencies: `coords @ table` is the angle
    that `rope.apply_rope(kind='capi')` uses (rows on channels [0, d/2), columns on [d/2, d), the
    head_dim/4 frequencies tiled twice within each half)."""
    f = np.tile(rope_lib.frequencies(head_dim), 2)
    table = np.zeros((2, head_dim))
    table[0, :head_dim // 2] = f
    table[1, head_dim // 2:] = f
    return table.astype(np.float32)


def _rope_entry(names: list[str], head_dim: int, what: str) -> Entry:
    """All RoPE copies of one transformer as one fixed entry: one report (and one warning) per stack."""
    table = rope_table(head_dim)

    def check(values):
        wrong_shape = [n for n, v in zip(names, values) if v.shape != table.shape]
        if wrong_shape:
            got = values[names.index(wrong_shape[0])].shape
            return (f"{', '.join(wrong_shape[:3])}{' ...' if len(wrong_shape) > 3 else ''} have shape {got}, but the "
                    f"{what}'s RoPE frequencies are {table.shape} (head_dim {head_dim}): the file's attention heads "
                    f"are {got[-1] if len(got) == 2 else '?'}-dimensional (set the number of heads to width / that)")
        errors = [float(np.max(np.abs(v - table) - _ROPE_RTOL * np.abs(table))) for v in values]
        wrong = [(n, float(np.abs(v - table).max())) for n, v, e in zip(names, values, errors) if e > 1e-6]
        if wrong:
            listed = ", ".join(f"{n} (max |diff| {d:.3g})" for n, d in wrong[:3])
            return (f"the {what}'s RoPE frequencies differ from the ones this model computes ({listed}"
                    f"{f' and {len(wrong) - 3} more' if len(wrong) > 3 else ''}; expected 2*pi*7*1e4**linspace(0, -1, "
                    f"{head_dim // 4}), rows on the first half of each head and columns on the second): the weights "
                    "were trained with other Rope max_freq/min_freq or another layout, which this model does not "
                    "support")
        if max(float(np.abs(v - table).max()) for v in values) > 1e-4:
            logging.warning("The %s's RoPE frequencies in the file are rounded (bf16?): the official model runs with "
                            "those, this one with exact float32 values, so features differ slightly.", what)
        return None
    return Entry(torch=tuple(names), ours=(), to_ours=lambda t: [], to_torch=lambda o: [table] * len(names), check=check)


def _registers(name: str, path, count: int, width: int) -> Entry:
    if count:
        return same(name, path)
    # The official model keeps an empty [1, 0, D] parameter; ours has none.
    empty = np.zeros((1, 0, width), np.float32)

    def check(values):
        return None if values[0].shape == empty.shape else (
            f"{name} has shape {values[0].shape}, but this model has no registers (model.num_registers=0)")
    return Entry(torch=(name,), ours=(), to_ours=lambda t: [], to_torch=lambda o: [empty], check=check)


def _block(t: str, o: tuple, rope: list, cross: bool) -> list[Entry]:
    """One official `Block` (`t` its name prefix) <-> our block at `o`; appends its RoPE name."""
    attn = t + "residual1.fn."
    out = (norm(t + "residual1.norm", o + ("norm1",), bias=False)
           + norm(t + "residual2.norm", o + ("norm2",), bias=False))
    if cross:   # the predictor keeps q, k and v separate (k and v read the encoder output)
        for n in ("q", "k", "v"):
            out += linear(f"{attn}{n}_proj", o + (n,), bias=False)
        out += linear(attn + "proj", o + ("out",), bias=False)
    else:       # the encoder fuses them, q | k | v along the output axis
        out.append(split_qkv([f"{attn}{n}_proj.weight" for n in "qkv"], o + ("attn", "qkv", "kernel")))
        out += linear(attn + "proj", o + ("attn", "out"), bias=False)
    out += linear(t + "residual2.fn.fc1", o + ("mlp", "fc1"), bias=False)
    out += linear(t + "residual2.fn.fc2", o + ("mlp", "fc2"), bias=False)
    rope.append(attn + "rope.freqs")
    return out


def _check_architecture(method) -> None:
    """The official `EncoderDecoder` is one fixed architecture; refuse what its layout cannot hold
    (or would load into a different computation) instead of writing a file that misbehaves."""
    enc, pred = method.encoder, method.predictor
    problems = []
    if enc.rope != "capi":
        problems.append(f"posemb={enc.posemb!r} (the official Rope pairs channel c with c + d/2 over the whole head, "
                        "which is posemb='rope'; 'rope_axial' is another model)")
    if enc.norm != "rmsnorm" or enc.use_bias or enc.layerscale is not None or enc.final_norm_affine:
        problems.append(f"norm={enc.norm!r}, use_bias={enc.use_bias}, layerscale={enc.layerscale}, "
                        f"final_norm_affine={enc.final_norm_affine} (official: RMSNorm blocks without biases or "
                        "LayerScale, a final RMSNorm without weight)")
    if enc.cls_token:
        problems.append("a [CLS] token (the official encoder has none)")
    if enc.norm_eps != OFFICIAL_NORM_EPS or pred.norm_eps != OFFICIAL_NORM_EPS:
        problems.append(f"norm_eps={enc.norm_eps} (official: {OFFICIAL_NORM_EPS})")
    # Mlp(in_features=dim) with its default mlp_ratio=4 in both stacks.
    if enc.mlp_dim != 4 * enc.width or pred.mlp_dim != 4 * enc.width:
        problems.append(f"MLP widths {enc.mlp_dim} / {pred.mlp_dim} (official: 4 x {enc.width})")
    if enc.num_registers % 4:
        problems.append(f"{enc.num_registers} registers (the official edge coordinates need a multiple of 4)")
    if problems:
        raise WeightsError("This CAPI model does not fit the official backbone layout: " + "; ".join(problems) + ".")


def _entries_by_key(method, prefix: str = PREFIX) -> dict[str, list[Entry]]:
    enc, pred = method.encoder, method.predictor
    _check_architecture(method)
    width, p = enc.width, prefix
    enc_entries = [patch_conv(f"{p}patch_embed.weight", ("encoder", "embedding", "kernel"), enc.patch_size,
                              method.config.input.channels),
                   same(f"{p}patch_embed.bias", ("encoder", "embedding", "bias")),
                   _registers(f"{p}registers", ("encoder", "registers"), enc.num_registers, width)]
    rope = []
    for i in range(enc.depth):
        enc_entries += _block(f"{p}encoder.blocks.{i}.", ("encoder", "encoder", f"block_{i}"), rope, cross=False)
    enc_entries.append(_rope_entry(rope, width // enc.num_heads, "encoder"))
    pred_entries, rope = [same(f"{p}mask_token", ("predictor", "mask_token"))], []
    for i in range(pred.depth):
        pred_entries += _block(f"{p}decoder.blocks.{i}.", ("predictor", f"block_{i}"), rope, cross=True)
    if rope:
        pred_entries.append(_rope_entry(rope, width // pred.num_heads, "predictor"))
    return {"encoder": enc_entries, "predictor": pred_entries}


def entries(method, keys=COVERED, prefix: str = PREFIX) -> list[Entry]:
    """The official names (`prefix` + module path) <-> our params paths (from the top of the params
    tree, loop layout: `block_i`, also when `model.scan` stacks them) for the subtrees `keys`."""
    by_key = _entries_by_key(method, prefix)
    unknown = sorted(set(keys) - set(by_key))
    if unknown:
        raise WeightsError(f"The official CAPI backbone holds params {list(COVERED)}, not {unknown}.")
    return [e for k in keys for e in by_key[k]]


def ours_not_in_backbone(method, params=None) -> list[str]:
    """Top-level params subtrees of `method` that the official backbone does not hold (the heads):
    an import leaves them as they are. `params` (a tree or its abstract shapes) saves a trace."""
    if params is None:
        params = jax.eval_shape(method.init_params, jax.random.key(0), method.batch_spec(1))
    return sorted(set(params) - set(COVERED))


def _loop(tree: dict) -> dict:
    return {k: layers.unstack_blocks(v) if k == "encoder" else v for k, v in tree.items()}


def import_backbone(tensors: dict, method, target: dict, keys=None, ignore=(), source: str = "the checkpoint") -> dict:
    """An official state dict -> {key: params subtree} for `keys` (default: all of `COVERED`),
    numpy float32 and shaped like `target` (the abstract params: the whole tree or those
    subtrees; scan layout if the encoder scans). Every tensor is used, checked (RoPE) or matches
    `ignore` (regexes, e.g. `HEADS`), else `MismatchError` lists what does not fit. With a subset
    of `keys`, the other subtrees' tensors are skipped by name (not by pattern)."""
    keys = tuple(keys or COVERED)
    used = entries(method, keys)
    skipped = [n for e in entries(method, tuple(k for k in COVERED if k not in keys)) for n in e.torch] \
        if set(keys) != set(COVERED) else []
    target = {k: target[k] for k in keys}
    if method.encoder.scan and "encoder" in target:
        target = jax.eval_shape(_loop, target)
    params = to_params(tensors, used, target, ignore=tuple(ignore) + tuple(re.escape(n) for n in skipped),
                       source=source)
    if method.encoder.scan and "encoder" in params:
        params["encoder"] = jax.tree.map(np.asarray, layers.stack_blocks(params["encoder"], method.encoder.depth))
    return params


def export_backbone(params: dict, method, prefix: str = PREFIX) -> dict[str, np.ndarray]:
    """Our params (the whole tree or just `COVERED`) -> the official backbone's state dict (float32
    numpy; saved flat, as `files.write(..., wrapped=False)` does, the official hub loader reads it
    and it loads into `EncoderDecoder` with `load_state_dict(strict=True)` after removing the prefix)."""
    missing = [k for k in COVERED if k not in params]
    if missing:
        raise WeightsError(f"The official backbone needs params {list(COVERED)}; {missing} are missing.")
    covered = {k: params[k] for k in COVERED}
    if method.encoder.scan:
        covered = _loop(covered)
    return to_tensors(covered, entries(method, COVERED, prefix))


def describe(tensors: dict, path, config_json: dict | None = None):
    """The architecture of an official backbone file: sizes from the tensors (heads from the RoPE
    frequencies' head_dim; nothing else stores them); the resolution from the config.json beside it
    (an export's, or the user's), else the releases' 224 px."""
    p = PREFIX
    conv = tensors.get(f"{p}patch_embed.weight")
    if conv is None or conv.ndim != 4:
        raise MismatchError(f"{path} has no {p}patch_embed.weight [D, C, p, p]: it is not an official CAPI backbone.")
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]

    def stack(name):
        pattern = rf"{re.escape(p)}{name}\.blocks\.\d+\.residual1\.norm\.weight"
        depth = sum(1 for n in tensors if re.fullmatch(pattern, n))
        if not depth:
            raise MismatchError(f"{path} has no {p}{name}.blocks.*: it is not an official CAPI backbone.")
        block = f"{p}{name}.blocks.0."
        needed = [block + "residual1.fn.rope.freqs", block + "residual2.fn.fc1.weight"]
        if any(n not in tensors for n in needed):
            raise MismatchError(f"{path} lacks {' or '.join(n for n in needed if n not in tensors)}, which give the "
                                f"{name}'s heads and MLP width.")
        return depth, width // tensors[needed[0]].shape[-1], tensors[needed[1]].shape[0]

    depth, heads, mlp_dim = stack("encoder")
    pred_depth, pred_heads, pred_mlp = stack("decoder")
    registers = tensors.get(f"{p}registers")
    model = dict(variant=f"L/{patch}", width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim,
                 num_registers=0 if registers is None else int(registers.shape[1]), cls_token=False, posemb="rope",
                 norm="rmsnorm", norm_eps=OFFICIAL_NORM_EPS, final_norm_affine=False, use_bias=False)
    # The releases: 224 px with /14 (16 x 16 patches); RoPE in [0, 1] makes any grid valid.
    image_size = int((config_json or {}).get("image_size", 16 * patch))
    return Description(layout="capi", family="capi", path=path, config_name="capi", model=model,
                       image_size=image_size, channels=channels, prefix=p,
                       extra={"predictor": dict(depth=pred_depth, num_heads=pred_heads, mlp_ratio=pred_mlp / width)})


class CapiLayout(Layout):
    """The registry entry: released files and training dumps (with `head.*`, left out)."""
    name = family = evaluated_by = "capi"
    wrapped = False     # model.py's __model_loader__ reads the `backbone.*` keys at the top of the file

    def detect(self, tensors):
        return any(n.startswith(PREFIX) for n in tensors)

    def describe(self, tensors, path, config_json):
        return describe(tensors, path, config_json)

    def to_params(self, tensors, desc, method, abstract, keys=None):
        keys = tuple(keys or COVERED)
        return import_backbone(tensors, method, {k: abstract[k] for k in keys}, keys=keys, ignore=HEADS,
                               source=f"{desc.path} (capi layout)")

    def from_params(self, params, method):
        return export_backbone(params, method)


LAYOUT = CapiLayout()
