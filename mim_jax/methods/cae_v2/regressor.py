"""CAE's latent contextual regressor: cross-attention blocks that predict the latents of masked
patches from the (fixed) latents of visible patches (Atten4Vis/CAE `models/modeling_cae_helper.py`,
`LatentRegresser`/`RegressorBlock`; docs/methods/cae_v2.md §1.2).

One learned mask token is the query at every masked position. Keys and values are the visible
latents followed by the current queries, so the queries also attend to each other; the visible
latents are never updated. Positions enter queries and keys, not values.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mim_jax.models.layers import DropPath, Dtype, Mlp, attention, constrain, make_norm, param_init


class CrossAttention(nn.Module):
    """Separate bias-free q/k/v projections with BEiT's learned q and v biases (k bias zero)."""
    num_heads: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, q_in, k_in, v_in):
        width = q_in.shape[-1]
        head_dim = width // self.num_heads

        def project(x, name, bias):
            y = nn.Dense(width, use_bias=False, dtype=self.dtype, name=name,
                         kernel_init=param_init(nn.initializers.xavier_uniform(), ("embed", "qkv")))(x)
            if bias:
                y = y + self.param(f"{name}_bias", param_init(nn.initializers.zeros, ("qkv",)),
                                   (width,)).astype(y.dtype)
            return y.reshape(*x.shape[:2], self.num_heads, head_dim)

        out = attention(project(q_in, "q", True), project(k_in, "k", False), project(v_in, "v", True),
                        self.attention_impl)
        return nn.Dense(width, dtype=self.dtype, name="out",
                        kernel_init=param_init(nn.initializers.xavier_uniform(), ("qkv", "embed")),
                        bias_init=param_init(nn.initializers.zeros, ("embed",)))(
            out.reshape(*q_in.shape[:2], width))


class RegressorBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    layerscale: float = 0.1
    drop_path: float = 0.0
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, queries, context, pos_queries, pos_context, deterministic: bool):
        def scale(name, y):
            gamma = self.param(name, param_init(nn.initializers.constant(self.layerscale), ("norm",)),
                               (y.shape[-1],))
            return DropPath(self.drop_path)(y * gamma.astype(y.dtype), deterministic)

        kv = jnp.concatenate([context, queries], axis=1)
        pos_kv = jnp.concatenate([pos_context, pos_queries], axis=1)
        y = CrossAttention(self.num_heads, self.dtype, self.attention_impl, name="cross_attn")(
            make_norm("layernorm", self.dtype, "norm_q")(queries + pos_queries),
            make_norm("layernorm", self.dtype, "norm_k")(kv + pos_kv),
            make_norm("layernorm", self.dtype, "norm_v")(kv))
        x = queries + scale("attn_scale", y)
        # The official block normalises the residual stream itself here (not only the MLP input):
        # x = LN(x); x = x + MLP(x). Kept as is, since CAE's released regressors were trained so.
        x = make_norm("layernorm", self.dtype, "norm_mlp")(x)
        x = x + scale("mlp_scale", Mlp(self.mlp_dim, self.dtype, name="mlp")(x))
        return constrain(x, ("act_batch", "act_len", "act_emb"))


class LatentRegressor(nn.Module):
    """(visible latents [B, Nv, D], their positions [B, Nv, D], masked positions [B, K, D])
    -> predicted masked latents [B, K, D]. No final norm (CAE v2 normalises in its head)."""
    depth: int
    num_heads: int
    mlp_dim: int
    layerscale: float = 0.1
    drop_path: float = 0.0          # maximum rate, linear in depth from 0 (a single block gets 0)
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, visible, pos_visible, pos_masked, *, train: bool = False):
        width = visible.shape[-1]
        # trunc-normal std 0.02 cut at +-1 std, as CAE's trunc_normal_ helper.
        token = self.param("mask_token", param_init(nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0),
                                                    (None, None, "norm")), (1, 1, width))
        x = jnp.broadcast_to(token.astype(visible.dtype), pos_masked.shape)
        pos_visible, pos_masked = pos_visible.astype(x.dtype), pos_masked.astype(x.dtype)
        for i in range(self.depth):
            rate = self.drop_path * i / max(self.depth - 1, 1)
            x = RegressorBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, layerscale=self.layerscale,
                               drop_path=rate, dtype=self.dtype, attention_impl=self.attention_impl,
                               name=f"block_{i}")(x, visible, pos_masked, pos_visible, not train)
        return x
