"""PyTorch layouts of the ViT encoder (and MAE's decoder) <-> `models.vit.ViT` params.

Families, all from the same `Entry` lists (so every layout imports and exports):
- `TIMM`: timm's VisionTransformer, which is also the official MAE layout (`mae_pretrain_vit_*.pth`,
  `vit_*.mae` on the hub): `cls_token`, `pos_embed` (1 + N rows, the [CLS] row zero for fixed
  tables), `patch_embed.proj`, `blocks.i.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
  ls2.gamma}`, `norm`.
- `BEIT`: CAE v2's released encoder (`encoder.` prefix, `attn.q_bias`/`attn.v_bias` beside a
  bias-free qkv, LayerScale as `gamma_1`/`gamma_2`, the fixed table stored).
- `MAE_PYTORCH`: MAE-pytorch, which Beyond Masking forks (`encoder.` prefix, q/v biases, the 1-D
  sin-cos table not stored, an unused `encoder.cls_token`).
- Hugging Face `ViTModel` / `ViTMAEModel` (`hf_entries`): separate query/key/value.
Fixed position tables are never loaded: the file's copy is checked against the table this model
computes, which catches a layout mix-up (MAE's column-first vs BEiT's row-first halves).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from mim_jax.errors import WeightsError
from mim_jax.weights.tensors import Entry, MismatchError, fixed, fold_qv_bias, linear, norm, patch_conv, same, split_qkv
from mim_jax.models import layers


@dataclasses.dataclass(frozen=True)
class Naming:
    """How one PyTorch ViT family names the encoder's tensors."""
    prefix: str = ""
    layerscale: tuple[str, str] = ("ls1.gamma", "ls2.gamma")
    qv_bias: bool = False        # BEiT's separate q_bias / v_bias (else one dense qkv.bias)
    stores_fixed_pos: bool = True
    unused_cls: bool = False     # a [CLS] parameter the forward never uses (written as zeros, not loaded)


TIMM = Naming()
BEIT = Naming(prefix="encoder.", layerscale=("gamma_1", "gamma_2"), qv_bias=True)
# MAE-pytorch keeps a [CLS] parameter its forward never uses (its concatenation is commented out).
MAE_PYTORCH = Naming(prefix="encoder.", layerscale=("gamma_1", "gamma_2"), qv_bias=True, stores_fixed_pos=False,
                     unused_cls=True)


def _fixed_table(vit, grid, width, with_cls_row: bool) -> np.ndarray:
    table = layers.positions(vit.posemb, grid, width)
    if with_cls_row:
        table = np.concatenate([np.zeros((1, width), np.float32), table])
    return table[None]


def block_entries(torch_prefix: str, path, *, naming: Naming, qkv_bias: str, use_bias: bool,
                  layerscale: bool) -> list[Entry]:
    """One pre-norm block (`layers.Block` params at `path`) in a timm-style layout."""
    out = norm(f"{torch_prefix}norm1", path + ("norm1",)) + norm(f"{torch_prefix}norm2", path + ("norm2",))
    attn = path + ("attn",)
    out += linear(f"{torch_prefix}attn.qkv", attn + ("qkv",), bias=False)
    if qkv_bias == "qv" and naming.qv_bias:
        out += [same(f"{torch_prefix}attn.q_bias", attn + ("q_bias",)),
                same(f"{torch_prefix}attn.v_bias", attn + ("v_bias",))]
    elif qkv_bias == "qv":
        out.append(fold_qv_bias(f"{torch_prefix}attn.qkv.bias", attn + ("q_bias",), attn + ("v_bias",)))
    elif use_bias and naming.qv_bias:
        out.append(dense_as_qv_bias(f"{torch_prefix}attn.q_bias", f"{torch_prefix}attn.v_bias", attn + ("qkv", "bias")))
    elif use_bias:
        out.append(same(f"{torch_prefix}attn.qkv.bias", attn + ("qkv", "bias")))
    out += linear(f"{torch_prefix}attn.proj", attn + ("out",), bias=use_bias)
    out += linear(f"{torch_prefix}mlp.fc1", path + ("mlp", "fc1"), bias=use_bias)
    out += linear(f"{torch_prefix}mlp.fc2", path + ("mlp", "fc2"), bias=use_bias)
    if layerscale:
        out += [same(torch_prefix + naming.layerscale[0], path + ("attn_scale",)),
                same(torch_prefix + naming.layerscale[1], path + ("mlp_scale",))]
    return out


def dense_as_qv_bias(q_name: str, v_name: str, path) -> Entry:
    """A dense qkv bias [3D] <-> BEiT's q_bias and v_bias (Beyond Masking's decoder here is dense,
    MAE-pytorch's has q and v biases). The key bias adds q . b_k to every logit of a query alike,
    which the softmax ignores, so writing it away changes no output; it imports back as zero."""
    def to_ours(t):
        return [np.concatenate([t[0], np.zeros_like(t[0]), t[1]])]

    def to_torch(o):
        q, _, v = np.split(o[0], 3)
        return [q, v]
    return Entry(torch=(q_name, v_name), ours=(path,), to_ours=to_ours, to_torch=to_torch)


def unused(torch_name: str, shape: tuple) -> Entry:
    """A parameter of the PyTorch model that its forward never uses (MAE-pytorch's [CLS]): written as
    zeros so the model loads strictly, its shape checked on import, its values not loaded."""
    def check(t):
        return None if t[0].shape == shape else f"{torch_name} has shape {t[0].shape}, the model's {shape}"
    return Entry(torch=(torch_name,), ours=(), to_ours=lambda t: [], to_torch=lambda o: [np.zeros(shape, np.float32)],
                 check=check)


def _learned_positions(cls_name: str, pos_name: str, has_cls: bool) -> list[Entry]:
    """timm and HF store [1, prefix + N, D] with the [CLS] row; ours is [N, D] with the [CLS]
    position folded into the [CLS] token (both are added to it before the first block)."""
    if not has_cls:
        return [Entry(torch=(pos_name,), ours=(("pos_embedding",),), to_ours=lambda t: [t[0][0]],
                      to_torch=lambda o: [o[0][None]])]

    def to_ours(t):
        cls, pos = t
        return [cls + pos[:, :1], pos[0, 1:]]

    def to_torch(o):
        cls, pos = o
        return [cls, np.concatenate([np.zeros_like(cls[0]), pos])[None]]
    return [Entry(torch=(cls_name, pos_name), ours=(("cls",), ("pos_embedding",)), to_ours=to_ours, to_torch=to_torch)]


def fits_timm(vit) -> bool:
    """Whether the timm-style layouts (timm, MAE, BEiT, MAE-pytorch) can hold this encoder."""
    return vit.norm == "layernorm" and not vit.rope and not vit.num_registers


def encoder_entries(vit, grid, channels: int, naming: Naming = TIMM) -> list[Entry]:
    """Every tensor of a `models.vit.ViT` encoder (loop layout) in a timm-style family."""
    if not fits_timm(vit):
        raise WeightsError(f"The {naming.prefix or 'timm'} ViT layout has LayerNorm, absolute positions and no "
                           f"registers; this encoder has norm={vit.norm}, posemb={vit.posemb}, "
                           f"registers={vit.num_registers} (CAPI's encoder exports in its official layout: "
                           "--format=official).")
    p = naming.prefix
    out = [patch_conv(f"{p}patch_embed.proj.weight", ("embedding", "kernel"), vit.patch_size, channels),
           same(f"{p}patch_embed.proj.bias", ("embedding", "bias"))]
    if vit.posemb == "learn":
        out += _learned_positions(f"{p}cls_token", f"{p}pos_embed", vit.cls_token)
    else:
        if vit.cls_token:
            out.append(same(f"{p}cls_token", ("cls",)))
        elif naming.unused_cls:
            out.append(unused(f"{p}cls_token", (1, 1, vit.width)))
        if naming.stores_fixed_pos:
            out.append(fixed(f"{p}pos_embed", _fixed_table(vit, grid, vit.width, vit.cls_token),
                             f"fixed {vit.posemb} position table"))
    for i in range(vit.depth):
        out += block_entries(f"{p}blocks.{i}.", ("encoder", f"block_{i}"), naming=naming, qkv_bias=vit.qkv_bias,
                             use_bias=vit.use_bias, layerscale=vit.layerscale is not None)
    out += norm(f"{p}norm", ("encoder_norm",))
    return out


def mae_decoder_entries(decoder, num_prefix_tokens: int) -> list[Entry]:
    """Official MAE's decoder (`*_full.pth`) <-> `models.decoder.PixelDecoder` params."""
    out = linear("decoder_embed", ("embed",), bias=decoder.embed_bias) + [same("mask_token", ("mask_token",))]
    table = layers.positions(decoder.posemb, decoder.grid, decoder.width)
    table = np.concatenate([np.zeros((num_prefix_tokens, decoder.width), np.float32), table])[None]
    out.append(fixed("decoder_pos_embed", table, f"fixed {decoder.posemb} decoder position table"))
    for i in range(decoder.depth):
        out += block_entries(f"decoder_blocks.{i}.", ("decoder", f"block_{i}"), naming=TIMM, qkv_bias="dense",
                             use_bias=True, layerscale=False)
    return out + norm("decoder_norm", ("decoder_norm",)) + linear("decoder_pred", ("pred",))


def mae_pytorch_decoder_entries(decoder, num_prefix_tokens: int) -> list[Entry]:
    """MAE-pytorch's decoder (Beyond Masking's `PretrainVisionTransformer`: `encoder_to_decoder`,
    `mask_token`, `decoder.{blocks,norm,head}`; its fixed 1-D table is not stored) <-> PixelDecoder."""
    out = linear("encoder_to_decoder", ("embed",), bias=decoder.embed_bias) + [same("mask_token", ("mask_token",))]
    for i in range(decoder.depth):
        out += block_entries(f"decoder.blocks.{i}.", ("decoder", f"block_{i}"), naming=MAE_PYTORCH, qkv_bias="dense",
                             use_bias=True, layerscale=False)
    return out + norm("decoder.norm", ("decoder_norm",)) + linear("decoder.head", ("pred",))


def hf_entries(vit, grid, channels: int, prefix: str = "") -> list[Entry]:
    """Hugging Face `ViTModel` (`prefix=''`) or `ViTMAEModel` inside `ViTMAEForPreTraining`
    (`prefix='vit.'`). Their architecture has a [CLS] token, LayerNorm and dense q/k/v biases."""
    if vit.layerscale is not None or not vit.cls_token or vit.norm != "layernorm" or vit.rope or vit.num_registers:
        works = "the timm layout (--format=timm)" if fits_timm(vit) else "the method's own layout (--format=official)"
        raise WeightsError("transformers' ViT has a [CLS] token, LayerNorm, absolute positions and no LayerScale or "
                           f"registers; this encoder does not fit it: use {works}.")
    p = prefix
    out = [patch_conv(f"{p}embeddings.patch_embeddings.projection.weight", ("embedding", "kernel"), vit.patch_size,
                      channels),
           same(f"{p}embeddings.patch_embeddings.projection.bias", ("embedding", "bias"))]
    if vit.posemb == "learn":
        out += _learned_positions(f"{p}embeddings.cls_token", f"{p}embeddings.position_embeddings", True)
    else:
        out += [same(f"{p}embeddings.cls_token", ("cls",)),
                fixed(f"{p}embeddings.position_embeddings", _fixed_table(vit, grid, vit.width, True),
                      f"fixed {vit.posemb} position table")]
    for i in range(vit.depth):
        t, o = f"{p}encoder.layer.{i}.", ("encoder", f"block_{i}")
        attn = o + ("attn",)
        qkv = [f"{t}attention.attention.{n}" for n in ("query", "key", "value")]
        out.append(split_qkv([f"{n}.weight" for n in qkv], attn + ("qkv", "kernel")))
        if vit.qkv_bias == "qv":
            out.append(_hf_qv_bias([f"{n}.bias" for n in qkv], attn))
        elif vit.use_bias:
            out.append(split_qkv([f"{n}.bias" for n in qkv], attn + ("qkv", "bias")))
        out += linear(f"{t}attention.output.dense", attn + ("out",), bias=vit.use_bias)
        out += norm(f"{t}layernorm_before", o + ("norm1",)) + norm(f"{t}layernorm_after", o + ("norm2",))
        out += linear(f"{t}intermediate.dense", o + ("mlp", "fc1"), bias=vit.use_bias)
        out += linear(f"{t}output.dense", o + ("mlp", "fc2"), bias=vit.use_bias)
    return out + norm(f"{p}layernorm", ("encoder_norm",))


def _hf_qv_bias(names, attn) -> Entry:
    def to_ours(t):
        q, k, v = t
        if np.any(k != 0):
            raise MismatchError(f"{names[1]} is not zero; this model has only q and v biases (model.qkv_bias='qv').")
        return [q, v]
    return Entry(torch=tuple(names), ours=(attn + ("q_bias",), attn + ("v_bias",)), to_ours=to_ours,
                 to_torch=lambda o: [o[0], np.zeros_like(o[0]), o[1]])


def _cubic_weights(size_in: int, size_out: int, a: float = -0.75) -> np.ndarray:
    """[size_out, size_in] weights of PyTorch's bicubic interpolation (align_corners=False, border
    indices clamped, A = -0.75): `W @ x` resamples x along one axis as F.interpolate does."""
    def kernel(t):
        t = np.abs(t)
        return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                        np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))
    scale = size_in / size_out
    src = (np.arange(size_out) + 0.5) * scale - 0.5
    floor = np.floor(src)
    weights = np.zeros((size_out, size_in))
    for offset in (-1, 0, 1, 2):
        index = np.clip(floor + offset, 0, size_in - 1).astype(int)
        np.add.at(weights, (np.arange(size_out), index), kernel(src - (floor + offset)))
    return weights


def resize_positions(table: np.ndarray, old_grid, new_grid) -> np.ndarray:
    """A learned [h*w, D] position table resampled bicubically to another grid (a fine-tune at a
    higher resolution), as timm's resample_abs_pos_embed with antialias=False."""
    h, w = old_grid
    grid = np.asarray(table, np.float64).reshape(h, w, -1)
    out = np.einsum("ih,hwd,jw->ijd", _cubic_weights(h, new_grid[0]), grid, _cubic_weights(w, new_grid[1]))
    return out.reshape(new_grid[0] * new_grid[1], -1).astype(np.float32)
