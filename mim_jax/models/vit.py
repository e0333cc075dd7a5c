"""A pure-functional Linen Vision Transformer shared by every method.

Design notes:
- Parameters are fp32; matmuls run in `dtype` (bf16 on accelerators).
- Every weight carries logical axis names (`nn.with_logical_partitioning`) and every activation a
  logical constraint; the mapping to mesh axes lives in the config (`sharding_rules`), never here.
- `ViT.__call__` takes optional `visible_idx` [B, K]: only those patches are embedded and run
  through the blocks (MAE-style encoders), so cost scales with K, not N.
- It returns `(tokens, out)`: `out` holds every intermediate (`block_i`, `encoded`, `patch_tokens`,
  ...) so heads and probes choose features without touching the model. Unused outputs cost nothing
  under jit (dead-code elimination).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax.models import rope as rope_lib

Dtype = Any

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


def constrain(x, names: Sequence[str | None]):
    """The single place activations get their logical sharding names."""
    return nn.with_logical_constraint(x, tuple(names))


def param_init(init: Callable, names: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(names))


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, patch*patch*C] in raster order (row-major over the grid)."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {patch}.")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def sincos_2d(grid_h: int, grid_w: int, width: int, row_first: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos positions [grid_h*grid_w, width], each half as [sin | cos].

    MAE's layout (default) encodes the column (w) coordinate in the first half and the row in the
    second; BEiT/CAE's (`row_first=True`) the other way round. The network learns whichever it
    was trained with, so released weights need their own layout."""
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}.")
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    hh, ww = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                         np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    halves = [encode(hh), encode(ww)] if row_first else [encode(ww), encode(hh)]
    return np.concatenate(halves, axis=1).astype(np.float32)


def sincos_1d(length: int, width: int) -> np.ndarray:
    """Transformer-style fixed positions over a flattened index [length, width]: sin on even and
    cos on odd channels, channel pair j at frequency 1 / 10000^(2j/width) (MAE-pytorch's
    `get_sinusoid_encoding_table`, used by Beyond Masking's encoder and decoder)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    angles = pos / 10000 ** (2 * (np.arange(width) // 2) / width)
    table = np.where(np.arange(width) % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


def positions(kind: str, grid, width: int) -> np.ndarray:
    """Fixed position table [grid_h*grid_w, width] of `kind`: 'sincos2d' (MAE), 'sincos2d_rowfirst'
    (BEiT/CAE) or 'sincos1d' (Transformer-style over the raster index)."""
    if kind == "sincos1d":
        return sincos_1d(grid[0] * grid[1], width)
    if kind in ("sincos2d", "sincos2d_rowfirst"):
        return sincos_2d(*grid, width, row_first=kind == "sincos2d_rowfirst")
    raise ValueError(f"Unknown fixed position embedding {kind!r}: use 'sincos2d', 'sincos2d_rowfirst' or 'sincos1d'.")


def linear_init(style: str) -> Callable:
    """Kernel init of every Linear layer in the blocks: 'xavier' (MAE, CAE), or 'trunc_normal'
    (MAE-pytorch/BEiT lineage: N(0, 0.02) truncated at +-1 std, as their `trunc_normal_` helper)."""
    if style == "xavier":
        return nn.initializers.xavier_uniform()
    if style == "trunc_normal":
        return nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0)
    raise ValueError(f"Unknown linear init {style!r}: use 'xavier' or 'trunc_normal'.")


def attention(q, k, v, implementation: str | None, pad_multiple: int | None = None):
    """softmax(q k^T / sqrt(d)) v over [B, T, heads, head_dim] via jax.nn.dot_product_attention.
    Keys and values may be longer or shorter than the queries (cross-attention).

    cuDNN's fused kernel rejects lengths that are not a multiple of 64 (e.g. 197 = 196 + CLS), so
    for implementation='cudnn' we pad to the next multiple and pass the true lengths: the padded
    keys are masked out and the padded queries sliced away.
    """
    if pad_multiple is None:
        pad_multiple = 64 if implementation == "cudnn" else 1
    b, t_q, t_kv = q.shape[0], q.shape[1], k.shape[1]
    pad_q, pad_kv = -t_q % pad_multiple, -t_kv % pad_multiple
    if not (pad_q or pad_kv):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    def pad(x, n):
        return jnp.pad(x, [(0, 0), (0, n), (0, 0), (0, 0)])

    out = jax.nn.dot_product_attention(
        pad(q, pad_q), pad(k, pad_kv), pad(v, pad_kv), implementation=implementation,
        query_seq_lengths=jnp.full((b,), t_q, jnp.int32), key_value_seq_lengths=jnp.full((b,), t_kv, jnp.int32))
    return out[:, :t_q]


def make_norm(kind: str, dtype: Dtype, name: str | None = None, eps: float = 1e-6, affine: bool = True) -> nn.Module:
    scale = param_init(nn.initializers.ones, ("norm",))
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, scale_init=scale, use_scale=affine, use_bias=affine,
                            bias_init=param_init(nn.initializers.zeros, ("norm",)))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, dtype=dtype, name=name, scale_init=scale, use_scale=affine)
    raise ValueError(f"Unknown norm {kind!r}: use 'layernorm' or 'rmsnorm'.")


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example."""
    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * mask.astype(x.dtype) / keep


class Attention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    implementation: str | None = None
    qkv_bias: str = "dense"     # "dense": the qkv layer's own bias (iff use_bias); "qv": BEiT's
    rope: str | None = None     # 2-D RoPE kind (models/rope.py) applied to q and k at `coords`
    kernel_init: Callable = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x, coords=None):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        # One fused projection for q, k and v (a single larger matmul is faster than three),
        # xavier-initialised over the whole (D, 3D) matrix as timm's fused qkv Linear.
        qkv = nn.Dense(3 * width, dtype=self.dtype, use_bias=self.use_bias and self.qkv_bias == "dense",
                       name="qkv", kernel_init=param_init(self.kernel_init, ("embed", "qkv")),
                       bias_init=param_init(nn.initializers.zeros, ("qkv",)))(x)
        if self.qkv_bias == "qv":
            # BEiT/CAE: learned q and v biases, the k bias fixed at zero (it would cancel in the
            # softmax anyway); separate parameters so released checkpoints map one to one.
            q_bias, v_bias = (self.param(n, param_init(nn.initializers.zeros, ("qkv",)), (width,))
                              for n in ("q_bias", "v_bias"))
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        elif self.qkv_bias != "dense":
            raise ValueError(f"Unknown qkv_bias {self.qkv_bias!r}: use 'dense' or 'qv'.")
        qkv = qkv.reshape(*x.shape[:2], 3, self.num_heads, head_dim)
        q, k, v = (constrain(qkv[:, :, i], ("act_batch", "act_len", "act_heads", "act_kv")) for i in range(3))
        if self.rope:
            q, k = rope_lib.apply_rope(q, coords, self.rope), rope_lib.apply_rope(k, coords, self.rope)
        out = attention(q, k, v, self.implementation).reshape(x.shape[:2] + (width,))
        return nn.Dense(width, dtype=self.dtype, use_bias=self.use_bias, name="out",
                        kernel_init=param_init(self.kernel_init, ("qkv", "embed")),
                        bias_init=param_init(nn.initializers.zeros, ("embed",)))(out)


class Mlp(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, use_bias=self.use_bias, name="fc1",
                     kernel_init=param_init(self.kernel_init, ("embed", "mlp")),
                     bias_init=param_init(nn.initializers.zeros, ("mlp",)))(x)
        x = constrain(nn.gelu(x, approximate=False), ("act_batch", "act_len", "act_mlp"))
        return nn.Dense(width, dtype=self.dtype, use_bias=self.use_bias, name="fc2",
                        kernel_init=param_init(self.kernel_init, ("mlp", "embed")),
                        bias_init=param_init(nn.initializers.zeros, ("embed",)))(x)


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale and drop path."""
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    norm: str = "layernorm"
    use_bias: bool = True
    layerscale: float | None = None
    drop_path: float = 0.0
    attention_impl: str | None = None
    qkv_bias: str = "dense"
    rope: str | None = None
    norm_eps: float = 1e-6
    linear_init: str = "xavier"

    @nn.compact
    def __call__(self, x, deterministic: bool = True, coords=None):
        def branch(y, name):
            if self.layerscale is not None:
                gamma = self.param(f"{name}_scale", param_init(
                    nn.initializers.constant(self.layerscale), ("norm",)), (y.shape[-1],))
                y = y * gamma.astype(y.dtype)
            return DropPath(self.drop_path)(y, deterministic)

        init = linear_init(self.linear_init)
        y = Attention(self.num_heads, self.dtype, self.use_bias, self.attention_impl, self.qkv_bias, self.rope,
                      init, name="attn")(make_norm(self.norm, self.dtype, "norm1", self.norm_eps)(x), coords)
        x = constrain(x + branch(y, "attn"), ("act_batch", "act_len", "act_emb"))
        y = Mlp(self.mlp_dim, self.dtype, self.use_bias, init, name="mlp")(
            make_norm(self.norm, self.dtype, "norm2", self.norm_eps)(x))
        return constrain(x + branch(y, "mlp"), ("act_batch", "act_len", "act_emb"))


class Transformer(nn.Module):
    """A stack of blocks (used by encoders and decoders); returns final tokens and per-block outputs."""
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    norm: str = "layernorm"
    use_bias: bool = True
    layerscale: float | None = None
    drop_path: float = 0.0          # maximum rate, linearly increasing with depth
    attention_impl: str | None = None
    remat: bool = False
    qkv_bias: str = "dense"
    rope: str | None = None
    norm_eps: float = 1e-6
    drop_path_uniform: bool = False   # CAPI: the same rate in every block instead of a linear ramp
    linear_init: str = "xavier"

    @nn.compact
    def __call__(self, x, deterministic: bool = True, coords=None):
        block_cls = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        out = {}
        for i in range(self.depth):
            rate = self.drop_path if self.drop_path_uniform else self.drop_path * i / max(self.depth - 1, 1)
            x = block_cls(self.num_heads, self.mlp_dim, self.dtype, self.norm, self.use_bias,
                          self.layerscale, rate, self.attention_impl, self.qkv_bias, self.rope, self.norm_eps,
                          self.linear_init, name=f"block_{i}")(x, deterministic, coords)
            out[f"block_{i}"] = x
        return x, out


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
    qkv_bias: str = "dense"
    init_style: str = "mae"         # patch embedding and CLS init: "mae", "beit" (BEiT/CAE) or "torch"
    linear_init: str = "xavier"     # every Linear in the blocks: "xavier" or "trunc_normal"
    norm_eps: float = 1e-6
    final_norm_affine: bool = True  # CAPI's enc_norm has no scale
    drop_path_uniform: bool = False

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
        x, out = Transformer(self.depth, self.num_heads, self.mlp_dim, self.dtype, self.norm,
                             self.use_bias, self.layerscale, self.drop_path, self.attention_impl,
                             self.remat, self.qkv_bias, self.rope, self.norm_eps, self.drop_path_uniform,
                             self.linear_init, name="encoder")(x, not train, coords)
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
