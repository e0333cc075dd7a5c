"""The OpenAI CLIP vision tower in Linen, laid out like Hugging Face's
`CLIPVisionModelWithProjection` so its `model.safetensors` loads one tensor per parameter
(`weights/clip.py`). It is a frozen teacher here: `__call__` returns every token after the final
LayerNorm and the visual projection (CAE v2's targets), not only the pooled [CLS] embedding.

Differences from the student ViT that matter for exactness: QuickGELU (x * sigmoid(1.702 x)), a
LayerNorm before the blocks (`pre_layrnorm`, HF's spelling), learned positions including the
[CLS] one, separate q/k/v projections with biases, LayerNorm eps 1e-5, no bias in the patch
embedding or the projection.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mim_jax.models.layers import Dtype, attention, constrain, param_init, patchify

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Hugging Face CLIPVisionConfig defaults, for keys a config.json leaves out.
_HF_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def clip_config_from_hf(config: dict) -> dict:
    """HF config.json (of CLIPModel or CLIPVisionModelWithProjection) -> CLIPVisionTower fields."""
    vision = dict(_HF_DEFAULTS, **config.get("vision_config", config))
    if vision["hidden_act"] != "quick_gelu":
        raise ValueError(f"CLIP checkpoint uses hidden_act={vision['hidden_act']!r}; only OpenAI CLIP's "
                         "quick_gelu is implemented.")
    return dict(patch_size=vision["patch_size"], width=vision["hidden_size"], depth=vision["num_hidden_layers"],
                num_heads=vision["num_attention_heads"], mlp_dim=vision["intermediate_size"],
                proj_dim=config.get("projection_dim", vision.get("projection_dim", 512)),
                image_size=vision["image_size"], layer_norm_eps=vision["layer_norm_eps"])


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def resize_positions(table, grid: tuple[int, int]):
    """Learned positions [1 + g*g, D] -> [1 + grid_h*grid_w, D]: the patch part resized
    bicubically on its 2-D grid, the [CLS] position kept."""
    n = table.shape[0] - 1
    side = int(round(n ** 0.5))
    if (side, side) == tuple(grid):
        return table
    patches = table[1:].reshape(side, side, -1)
    patches = jax.image.resize(patches, (*grid, table.shape[-1]), "bicubic").reshape(-1, table.shape[-1])
    return jnp.concatenate([table[:1], patches.astype(table.dtype)], axis=0)


def _dense(features: int, names: tuple, dtype, name: str, use_bias: bool = True) -> nn.Dense:
    """nn.Dense with this project's logical axis names on kernel and bias (called inside a parent's
    compact method, so it binds there under `name`)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, name=name,
                    kernel_init=param_init(nn.initializers.lecun_normal(), names),
                    bias_init=param_init(nn.initializers.zeros, names[1:]))


def _layernorm(eps, dtype, name):
    return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, scale_init=param_init(nn.initializers.ones, ("norm",)),
                        bias_init=param_init(nn.initializers.zeros, ("norm",)))


class CLIPEncoderLayer(nn.Module):
    num_heads: int
    mlp_dim: int
    eps: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        heads = lambda y: y.reshape(*y.shape[:2], self.num_heads, width // self.num_heads)  # noqa: E731
        y = _layernorm(self.eps, self.dtype, "layer_norm1")(x)
        q, k, v = (heads(_dense(width, ("embed", "qkv"), self.dtype, f"{n}_proj")(y)) for n in "qkv")
        y = attention(q, k, v, None).reshape(x.shape)
        x = x + _dense(width, ("qkv", "embed"), self.dtype, "out_proj")(y)
        y = _layernorm(self.eps, self.dtype, "layer_norm2")(x)
        y = quick_gelu(_dense(self.mlp_dim, ("embed", "mlp"), self.dtype, "fc1")(y))
        x = x + _dense(width, ("mlp", "embed"), self.dtype, "fc2")(y)
        return constrain(x, ("act_batch", "act_len", "act_emb"))


class CLIPVisionTower(nn.Module):
    """images [B, H, W, 3], CLIP-normalised -> tokens [B, 1 + N, proj_dim] ([CLS] first)."""
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    proj_dim: int | None = 512
    image_size: int = 224           # native resolution: size of the learned position table
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32

    num_prefix_tokens = 1   # [CLS]

    @nn.compact
    def __call__(self, images):
        p = self.patch_size
        grid = (images.shape[1] // p, images.shape[2] // p)
        x = _dense(self.width, ("patch", "embed"), self.dtype, "patch_embedding", use_bias=False)(
            patchify(images.astype(self.dtype), p))
        cls = self.param("class_embedding", param_init(nn.initializers.normal(0.02), ("norm",)), (self.width,))
        native = (self.image_size // p) ** 2
        table = self.param("position_embedding", param_init(nn.initializers.normal(0.02), (None, "norm")),
                           (native + 1, self.width))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x], axis=1)
        x = x + resize_positions(table, grid).astype(x.dtype)[None]
        x = constrain(_layernorm(self.layer_norm_eps, self.dtype, "pre_layrnorm")(x), ("act_batch", "act_len", "act_emb"))
        for i in range(self.depth):
            x = CLIPEncoderLayer(num_heads=self.num_heads, mlp_dim=self.mlp_dim, eps=self.layer_norm_eps,
                                 dtype=self.dtype, name=f"layers_{i}")(x)
        x = _layernorm(self.layer_norm_eps, self.dtype, "post_layernorm")(x)
        if self.proj_dim:
            x = _dense(self.proj_dim, ("embed", None), self.dtype, "visual_projection", use_bias=False)(x)
        return x
