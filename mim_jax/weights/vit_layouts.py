"""The ViT layouts of other codebases as registry entries: timm (= the official MAE files), CAE v2's
BEiT, Beyond Masking's MAE-pytorch and Hugging Face ViT / ViTMAE. Each detects its files by their
tensor names, reads the encoder's architecture (width, depth, heads, patch, positions, biases,
LayerScale, [CLS]) from the tensors (and config.json where there is one), so no config is needed to
evaluate a file, and converts both ways through the `Entry` lists of `vit.py`."""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import numpy as np

from mim_jax.errors import WeightsError
from mim_jax.models import layers
from mim_jax.weights import folders, tensors as tensor_maps, vit
from mim_jax.weights.layout import Description, Layout

VARIANT_BY_WIDTH = {192: "Ti", 384: "S", 512: "M", 768: "B", 1024: "L", 1280: "H", 1408: "g"}
# The head count is in no tensor: a file without a config.json gets the one of its layout's known
# architecture of that width, and a width the layout has none of is an error asking for it.
# timm's ViTs (DeiT, MAE's releases): tiny 3, small 6, medium 8, base 12, large 16, huge 16, giant 16.
HEADS_BY_WIDTH = {192: 3, 384: 6, 512: 8, 768: 12, 1024: 16, 1280: 16, 1408: 16}
# CAE v2's official models (configs/cae_v2.py SIZES): Tiny and Small have 12 heads, not DeiT's 3 / 6.
CAE_V2_HEADS = {192: 12, 384: 12, 768: 12, 1024: 16}
# Beyond Masking's registered models (modeling_pretrain.py: pretrain_mae_{base,large}_patch16_224).
BEYOND_MASKING_HEADS = {768: 12, 1024: 16}
TIMM_POSEMBS = ("sincos2d", "sincos2d_rowfirst", "sincos1d")   # the fixed tables a stored one is tried as


@dataclasses.dataclass(frozen=True)
class DecoderNaming:
    """How a full pre-training checkpoint names its pixel decoder (a `models.decoder.PixelDecoder`)."""
    probe: str                   # a tensor only a file with the decoder holds: its input Linear [D_dec, D]
    blocks: str                  # the blocks' name prefix
    prefixes: tuple[str, ...]    # every decoder tensor's name starts with one of these
    entries: Callable            # (decoder module, number of prefix tokens) -> [Entry]
    heads_by_width: dict         # the official decoders' head counts (not in any tensor)
    table: str | None = None     # the stored fixed position table ([1, prefix + N, D_dec]), if any
    posemb: str | None = None    # the fixed table's kind where it is not stored

    def describe(self, tensors, config_json, path, prefix_tokens: int) -> dict:
        width = tensors[self.probe].shape[0]
        depth = sum(1 for n in tensors if re.fullmatch(rf"{re.escape(self.blocks)}\d+\.norm1\.weight", n))
        heads = _heads(width, config_json, f"{path} (decoder)", self.heads_by_width, key="decoder_num_heads")
        out = dict(width=width, depth=depth, num_heads=heads, mlp_dim=tensors[f"{self.blocks}0.mlp.fc1.weight"].shape[0],
                   embed_bias=self.probe.replace(".weight", ".bias") in tensors)
        posemb = self.posemb
        if self.table in tensors:
            rows = tensors[self.table][0, prefix_tokens:]
            kind = _posemb_of(rows, _square_grid(len(rows), f"{path}: {self.table}"), width, TIMM_POSEMBS)
            # No fixed kind fits: left unstated, so the import's table check names the mismatch.
            posemb = None if kind == "learn" else kind
        return out if posemb is None else dict(out, posemb=posemb)


# Official MAE's *_full.pth (512 wide, 16 heads); Beyond Masking's MAE-pytorch model
# (pretrain_mae_{base,large}_patch16_224: 384 wide with 6 heads, 512 with 8).
MAE_DECODER = DecoderNaming(probe="decoder_embed.weight", blocks="decoder_blocks.", prefixes=("mask_token", "decoder_"),
                            entries=vit.mae_decoder_entries, heads_by_width={512: 16}, table="decoder_pos_embed")
MAE_PYTORCH_DECODER = DecoderNaming(probe="encoder_to_decoder.weight", blocks="decoder.blocks.",
                                    prefixes=("mask_token", "decoder.", "encoder_to_decoder."),
                                    entries=vit.mae_pytorch_decoder_entries, heads_by_width={384: 6, 512: 8},
                                    posemb="sincos1d")


class ViTLayout(Layout):
    """What the ViT layouts share: the import into `params["encoder"]` (and a pixel decoder) from the
    subclass's `encoder_entries(encoder, grid, channels, prefix)` and `ignored(desc, keys)`."""
    decoder: DecoderNaming | None = None   # how the layout's full checkpoints name the decoder
    with_decoder = False          # exports the decoder too (the official training checkpoint's layout)

    def _entries(self, method, channels: int, prefix: str, keys) -> list[tensor_maps.Entry]:
        entries = tensor_maps.under("encoder", self.encoder_entries(method.encoder, method.grid, channels, prefix))
        if "decoder" in keys:
            entries += tensor_maps.under("decoder", self.decoder.entries(method.decoder,
                                                                         method.encoder.num_prefix_tokens))
        return entries

    def to_params(self, tensors, desc, method, abstract, keys=None):
        keys = tuple(keys or ("encoder",))
        unknown = sorted(set(keys) - {"encoder", "decoder"})
        if unknown or ("decoder" in keys and not desc.has_decoder):
            raise WeightsError(f"{desc.path} holds {'an encoder and a decoder' if desc.has_decoder else 'an encoder'}"
                               f"; params {unknown or ['decoder']} cannot be loaded from it.")
        target = jax.eval_shape(layers.unstack_blocks, {k: abstract[k] for k in keys})
        params = tensor_maps.to_params(tensors, self._entries(method, desc.channels, desc.prefix, keys), target,
                                       ignore=self.ignored(desc, keys), source=f"{desc.path} ({desc.layout} layout)")
        if method.encoder.scan:
            params = {k: layers.stack_blocks(v, method.encoder.depth) for k, v in params.items()}
        return params

    def from_params(self, params, method):
        keys = ("encoder", "decoder") if self.with_decoder else ("encoder",)
        return tensor_maps.to_tensors({k: params[k] for k in keys},
                                      self._entries(method, method.config.input.channels, "", keys))


@dataclasses.dataclass(frozen=True)
class TimmFamily(ViTLayout):
    """timm's VisionTransformer names and the forks that prefix them (`encoder.`, BEiT's q/v biases)."""
    name: str
    family: str
    naming: vit.Naming
    evaluated_by: str = "mae"
    posembs: tuple[str, ...] = TIMM_POSEMBS   # fixed tables, tried in order
    decoder: DecoderNaming | None = None
    with_decoder: bool = False
    heads_by_width: dict = dataclasses.field(default_factory=lambda: HEADS_BY_WIDTH)

    def detect(self, tensors):
        p = self.naming.prefix
        # The prefixed forks differ in whether they store their fixed position table.
        return f"{p}patch_embed.proj.weight" in tensors and (not p or (f"{p}pos_embed" in tensors) ==
                                                              self.naming.stores_fixed_pos)

    def describe(self, tensors, path, config_json):
        prefix = self.naming.prefix
        block = f"{prefix}blocks.{{}}."
        depth = sum(1 for n in tensors if re.fullmatch(rf"{re.escape(prefix)}blocks\.\d+\.norm1\.weight", n))
        qkv_bias = "qv" if block.format(0) + "attn.q_bias" in tensors else "dense"
        if qkv_bias == "dense" and _zero_key_biases(tensors, [block.format(i) + "attn.qkv.bias" for i in range(depth)]):
            qkv_bias = "qv"    # a BEiT-style encoder exported with its q/v biases folded into qkv.bias
        has_decoder = self.decoder is not None and self.decoder.probe in tensors
        has_cls = f"{prefix}cls_token" in tensors and not self.naming.unused_cls
        return _description(
            self, path, config_json, conv=tensors[f"{prefix}patch_embed.proj.weight"], depth=depth,
            mlp_dim=tensors[block.format(0) + "mlp.fc1.weight"].shape[0],
            has_cls=has_cls,
            table=tensors.get(f"{prefix}pos_embed"), qkv_bias=qkv_bias,
            use_bias=block.format(0) + "attn.proj.bias" in tensors,
            layerscale=0.1 if any(block.format(0) + n in tensors for n in ("gamma_1", "ls1.gamma")) else None,
            eps=1e-6,   # timm, MAE, BEiT/CAE and MAE-pytorch all build LayerNorm(eps=1e-6)
            prefix=prefix, has_decoder=has_decoder,
            extra={"decoder": self.decoder.describe(tensors, config_json, path, int(has_cls))} if has_decoder else {})

    def ignored(self, desc, keys):
        p = re.escape(self.naming.prefix)
        decoder = [re.escape(n) for n in (self.decoder.prefixes if self.decoder else ())]
        # A supervised classifier on top of the encoder; the prefixed forks' full checkpoints also
        # hold a regressor, decoder or teacher beside the encoder.
        out = (rf"{p}head\..*",)
        if p:
            loaded = [p] + (decoder if "decoder" in keys else [])
            out += (rf"(?!{'|'.join(loaded)}).*",)
        else:
            out += (r"fc_norm\..*",)
        if "decoder" not in keys:
            out += tuple(n + ".*" for n in decoder)
        return out

    def encoder_entries(self, encoder, grid, channels, prefix):
        return vit.encoder_entries(encoder, grid, channels, self.naming)

    def checkpoint_info(self, method):
        return {"decoder_num_heads": method.decoder.num_heads} if self.with_decoder else {}

    def folder_config(self, method, inp, meta):
        return {"config.json": folders.timm_config(method.encoder, inp, meta)}


class HuggingFaceViT(ViTLayout):
    """transformers' `ViTModel` / `ViTMAEModel`, alone or inside `*ForPreTraining` /
    `*ForImageClassification` (the encoder then under `vit.`)."""
    name = family = "hf"
    evaluated_by = "mae"

    def detect(self, tensors):
        return self._prefix(tensors) is not None

    @staticmethod
    def _prefix(tensors):
        for n in tensors:
            m = re.fullmatch(r"(.*)embeddings\.patch_embeddings\.projection\.weight", n)
            if m:
                return m.group(1)
        return None

    def describe(self, tensors, path, config_json):
        p = self._prefix(tensors)
        block = f"{p}encoder.layer.{{}}."
        depth = sum(1 for n in tensors if re.fullmatch(rf"{re.escape(p)}encoder\.layer\.\d+\.layernorm_before\.weight", n))
        k_biases = [tensors.get(block.format(i) + "attention.attention.key.bias") for i in range(depth)]
        return _description(
            self, path, config_json, conv=tensors[f"{p}embeddings.patch_embeddings.projection.weight"], depth=depth,
            mlp_dim=tensors[block.format(0) + "intermediate.dense.weight"].shape[0],
            has_cls=f"{p}embeddings.cls_token" in tensors, table=tensors.get(f"{p}embeddings.position_embeddings"),
            qkv_bias="qv" if all(b is not None and not np.any(b) for b in k_biases) else "dense",
            use_bias=block.format(0) + "attention.output.dense.bias" in tensors, layerscale=None,
            eps=float((config_json or {}).get("layer_norm_eps", 1e-12)), prefix=p)

    def ignored(self, desc, keys):
        p = re.escape(desc.prefix)
        return (rf"(?!{p}embeddings\.|{p}encoder\.|{p}layernorm\.).*", rf"{p}embeddings\.mask_token")

    def encoder_entries(self, encoder, grid, channels, prefix):
        return vit.hf_entries(encoder, grid, channels, prefix=prefix)

    def folder_config(self, method, inp, meta):
        return folders.hf_config(method.encoder, inp, meta)


TIMM = TimmFamily(name="timm", family="timm", naming=vit.TIMM, decoder=MAE_DECODER)
MAE = TimmFamily(name="mae", family="timm", naming=vit.TIMM, decoder=MAE_DECODER, with_decoder=True)
CAE_V2 = TimmFamily(name="cae_v2", family="beit", naming=vit.BEIT, posembs=("sincos2d_rowfirst", "sincos2d"),
                    heads_by_width=CAE_V2_HEADS)
# The official model is MAE-pytorch's whole `PretrainVisionTransformer`, decoder included.
BEYOND_MASKING = TimmFamily(name="beyond_masking", family="mae_pytorch", naming=vit.MAE_PYTORCH,
                            evaluated_by="beyond_masking", heads_by_width=BEYOND_MASKING_HEADS,
                            decoder=MAE_PYTORCH_DECODER, with_decoder=True)
HF = HuggingFaceViT()


def _description(layout, path, config_json, *, conv, depth, mlp_dim, has_cls, table, qkv_bias, use_bias, layerscale,
                 eps, prefix, has_decoder=False, extra=None) -> Description:
    width, channels, patch = conv.shape[0], conv.shape[1], conv.shape[2]
    if table is not None:
        grid = _square_grid(table.shape[1] - int(has_cls), f"{path}: the position table")
        posemb = _posemb_of(table[0, int(has_cls):], grid, width, getattr(layout, "posembs", TIMM_POSEMBS))
    else:   # MAE-pytorch does not store its fixed 1-D table
        size = int((config_json or {}).get("image_size", 224))
        grid, posemb = (size // patch, size // patch), "sincos1d"
    heads = _heads(width, config_json, f"{layout.name}:{path}", getattr(layout, "heads_by_width", HEADS_BY_WIDTH))
    model = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                 variant=f"{VARIANT_BY_WIDTH.get(width, 'B')}/{patch}", cls_token=has_cls, posemb=posemb,
                 qkv_bias=qkv_bias, use_bias=use_bias, layerscale=layerscale, norm="layernorm", norm_eps=eps,
                 num_registers=0)
    return Description(layout=layout.name, family=layout.family, path=path, config_name=layout.evaluated_by, model=model,
                       image_size=grid[0] * patch, channels=channels, prefix=prefix, has_decoder=has_decoder,
                       extra=extra or {})


def _posemb_of(table: np.ndarray, grid, width: int, candidates) -> str:
    for kind in candidates:
        if np.allclose(table, layers.positions(kind, grid, width), atol=1e-4):
            return kind
    return "learn"


def _square_grid(n: int, what: str) -> tuple[int, int]:
    side = int(round(n ** 0.5))
    if side * side != n:
        raise WeightsError(f"{what} has {n} positions, not a square grid.")
    return side, side


def _heads(width: int, config_json: dict | None, spec: str, known: dict, key: str = "num_heads") -> int:
    """The head count from config.json (`key`, or Hugging Face's / timm's names), else from the layout's
    known architectures (`known`, by width)."""
    if config_json:
        for name in ("num_attention_heads", key) if key == "num_heads" else (key,):
            if name in config_json:
                return int(config_json[name])
        if key == "num_heads" and "num_heads" in config_json.get("model_args", {}):
            return int(config_json["model_args"]["num_heads"])
    if width not in known:
        raise WeightsError(f"{spec}: no known architecture of this layout is {width} wide (those are "
                           f"{sorted(known)}), and the number of attention heads is in no tensor: put a config.json "
                           f'beside the file saying it, e.g. {{"{key}": ...}}.')
    return known[width]


def _zero_key_biases(tensors, names) -> bool:
    """Every block's key bias exactly zero: trained dense biases never are, folded q/v ones always."""
    biases = [tensors.get(n) for n in names]
    return all(b is not None and not np.any(np.split(b, 3)[1]) for b in biases)
