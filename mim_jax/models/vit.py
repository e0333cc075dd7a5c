"""The Vision Transformer encoder every method uses, and its sizes.

- `ViT.__call__` takes optional `visible_idx` [B, K]: only those patches are embedded and run
  through the blocks (MAE-style encoders), so cost scales with K, not N.
- It returns `(tokens, out)`: `out` holds every intermediate (`block_i`, `encoded`, `patch_tokens`,
  ...) so heads and probes choose features without touching the model. Unused outputs cost nothing
  under jit (dead-code elimination).
- Layers, norms and position tables come from `models/layers.py`.
"""
from __future__ import annotations

import re

import flax.linen as nn
import jax.numpy as jnp

from mim_jax.models import rope as rope_lib
from mim_jax.models.layers import Dtype, Transformer, constrain, make_norm, param_init, patchify, positions

# width, depth, mlp_dim, heads (ViT paper + DeiT Ti/S; H as in MAE).
_SIZES = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}


def decode_variant(variant: str) -> dict:
    """'B/16' -> dict(width, depth, mlp_dim, num_heads, patch_size)."""
    match = re.fullmatch(r"(\w+)/(\d+)", variant or "")
    if not match or match.group(1) not in _SIZES:
        raise ValueError(f"Unknown ViT variant {variant!r}: expected one of "
                         f"{sorted(_SIZES)} followed by /<patch>, e.g. 'B/16'.")
    width, depth, mlp_dim, heads = _SIZES[match.group(1)]
    return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads,
                patch_size=int(match.group(2)))


class ViT(nn.Module):
    """ViT encoder on (optionally) a subset of patches, with optional CLS and register tokens."""
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    num_heads: int = 12
    posemb: str = "sincos2d"        # or "sincos2d_rowfirst" (BEiT/CAE), "sincos1d" (Beyond Masking),
                                    # "learn", "rope" (CAPI), "rope_axial"
    cls_token: bool = True
    num_registers: int = 0
    norm: str = "layernorm"
    use_bias: bool = True
    layerscale: float | None = None
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    remat: bool = False
    remat_policy: str | None = None  # a jax.checkpoint_policies name; None saves nothing
    scan: bool = False              # one nn.scan over the blocks (params stacked, see layers.Transformer)
    qkv_bias: str = "dense"
    qkv_init: str = "fused"         # "per_projection": q, k, v initialised as separate Linears (CAPI)
    init_style: str = "mae"         # patch embedding and CLS init: "mae", "beit" (BEiT/CAE) or "torch"
    linear_init: str = "xavier"     # every Linear in the blocks: "xavier" or "trunc_normal"
    norm_eps: float = 1e-6
    final_norm_affine: bool = True  # CAPI's enc_norm has no scale
    drop_path_uniform: bool = False
    drop_path_form: str = "naive"   # "subset": CAPI's efficient stochastic depth (layers.SubsetDropPath)

    @property
    def rope(self) -> str | None:
        return {"rope": "capi", "rope_axial": "axial"}.get(self.posemb)

    def token_coords(self, grid, visible_idx, batch: int):
        """RoPE (row, col) coordinates in [0, 1] of [CLS, registers, patches]: patches on the grid,
        registers on the edge of the patches' bounding box (CAPI), CLS at the origin. [B, T, 2]."""
        coords = jnp.broadcast_to(jnp.asarray(rope_lib.grid_coords(*grid))[None], (batch, grid[0] * grid[1], 2))
        if visible_idx is not None:
            coords = jnp.take_along_axis(coords, visible_idx[..., None], axis=1)
        prefix = []
        if self.cls_token:
            prefix.append(jnp.zeros((batch, 1, 2), jnp.float32))
        if self.num_registers:
            prefix.append(rope_lib.scale_to_bbox(rope_lib.edge_register_coords(self.num_registers), coords))
        return jnp.concatenate(prefix + [coords], axis=1)

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.cls_token) + self.num_registers

    @nn.compact
    def __call__(self, images, visible_idx=None, *, train: bool = False):
        patches = patchify(images, self.patch_size)
        b, n, _ = patches.shape
        grid = (images.shape[1] // self.patch_size, images.shape[2] // self.patch_size)
        if visible_idx is not None:
            # Gather pixels before the embedding so the patch projection also runs on K, not N.
            patches = jnp.take_along_axis(patches, visible_idx[..., None], axis=1)
        if self.init_style not in ("mae", "beit", "torch"):
            raise ValueError(f"Unknown init_style {self.init_style!r}: use 'mae', 'beit' or 'torch'.")
        # MAE: xavier on the flattened conv kernel, CLS ~ N(0, 0.02). BEiT/CAE: both from a normal
        # of std 0.02 truncated at +-1 std (their trunc_normal_ helper passes a=-std, b=std).
        # torch: the patch embedding keeps PyTorch's Conv2d default, U(+-1/sqrt(fan_in))
        # (MAE-pytorch, which Beyond Masking forks, never re-initialises it).
        trunc = nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0)
        token_init = trunc if self.init_style in ("beit", "torch") else nn.initializers.normal(0.02)
        embed_init = {"mae": nn.initializers.xavier_uniform(), "beit": trunc,
                      "torch": nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")}[self.init_style]
        x = nn.Dense(self.width, dtype=self.dtype, name="embedding",
                     kernel_init=param_init(embed_init, ("patch", "embed")),
                     bias_init=param_init(nn.initializers.zeros, ("embed",)))(patches.astype(self.dtype))

        if self.posemb in ("sincos2d", "sincos2d_rowfirst", "sincos1d"):
            pos = jnp.asarray(positions(self.posemb, grid, self.width))[None]
        elif self.rope:
            pos = jnp.zeros((1, n, self.width))   # positions enter through RoPE in every attention
        elif self.posemb == "learn":
            pos = self.param("pos_embedding", param_init(nn.initializers.normal(0.02), (None, "norm")),
                             (n, self.width))[None]
        else:
            raise ValueError(f"Unknown posemb {self.posemb!r}: use 'sincos2d', 'sincos2d_rowfirst', 'sincos1d', "
                             "'learn', 'rope' or 'rope_axial'.")
        pos = jnp.broadcast_to(pos, (b, n, self.width))
        if visible_idx is not None:
            pos = jnp.take_along_axis(pos, visible_idx[..., None], axis=1)
        x = x + pos.astype(x.dtype)

        prefix = []
        if self.cls_token:  # The CLS position embedding is zero (MAE), so it gets none.
            prefix.append(self.param("cls", param_init(token_init, (None, None, "norm")),
                                     (1, 1, self.width)))
        if self.num_registers:
            prefix.append(self.param("registers", param_init(nn.initializers.normal(0.02), (None, None, "norm")),
                                     (1, self.num_registers, self.width)))
        if prefix:
            prefix = jnp.concatenate(prefix, axis=1).astype(x.dtype)
            x = jnp.concatenate([jnp.broadcast_to(prefix, (b,) + prefix.shape[1:]), x], axis=1)
        x = constrain(x, ("act_batch", "act_len", "act_emb"))

        coords = self.token_coords(grid, visible_idx, b) if self.rope else None
        x, out = Transformer(
            depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype, norm=self.norm,
            use_bias=self.use_bias, layerscale=self.layerscale, drop_path=self.drop_path,
            attention_impl=self.attention_impl, remat=self.remat, remat_policy=self.remat_policy, scan=self.scan,
            qkv_bias=self.qkv_bias, qkv_init=self.qkv_init, rope=self.rope, norm_eps=self.norm_eps,
            drop_path_uniform=self.drop_path_uniform, linear_init=self.linear_init,
            drop_path_form=self.drop_path_form, name="encoder")(x, not train, coords)
        out["pre_norm"] = x
        x = make_norm(self.norm, self.dtype, "encoder_norm", self.norm_eps, self.final_norm_affine)(x)
        out["encoded"] = x
        p = self.num_prefix_tokens
        if self.cls_token:
            out["cls"] = x[:, 0]
        out["patch_tokens"] = x[:, p:]
        out["patch_mean"] = x[:, p:].mean(axis=1)
        if coords is not None:
            out["coords"] = coords
        return x, out


def vit_from_config(model_config, **overrides) -> ViT:
    """Builds a ViT from a config block with `variant` plus optional field overrides."""
    cfg = dict(model_config)
    sizes = decode_variant(cfg.pop("variant"))
    sizes.update({k: v for k, v in cfg.items() if v is not None})
    sizes.update(overrides)
    if isinstance(sizes.get("dtype"), str):
        sizes["dtype"] = jnp.dtype(sizes["dtype"])
    fields = set(ViT.__dataclass_fields__) - {"parent", "name"}
    unknown = set(sizes) - fields
    if unknown:
        raise ValueError(f"Unknown ViT option(s) {sorted(unknown)}; valid: {sorted(fields)}.")
    return ViT(**sizes)
