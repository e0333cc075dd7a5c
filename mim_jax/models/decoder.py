"""MAE-style lightweight decoder: visible tokens + mask tokens -> a prediction per patch."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mim_jax.models.layers import TOKENS, Transformer, constrain, linear_init, make_norm, param_init, positions


def unshuffle(visible_tokens, mask_token, visible_idx, masked_idx):
    """Places visible tokens at `visible_idx` and `mask_token` at `masked_idx`: [B, N, D].

    Implemented as one gather by the inverse permutation (as MAE's ids_restore) rather than a
    scatter: gathers partition cleanly under sharding and have a cheap transpose.
    """
    b, k, d = visible_tokens.shape
    order = jnp.concatenate([visible_idx, masked_idx], axis=1)            # [B, N] shuffled positions
    restore = jnp.argsort(order, axis=1)
    fill = jnp.broadcast_to(mask_token.astype(visible_tokens.dtype), (b, masked_idx.shape[1], d))
    tokens = jnp.concatenate([visible_tokens, fill], axis=1)
    return jnp.take_along_axis(tokens, restore[..., None], axis=1)


class PixelDecoder(nn.Module):
    """Embeds encoder tokens to `width`, fills masked positions, runs `depth` blocks, predicts
    `out_dim` values per patch. Prefix tokens (CLS/registers) take part in attention and are dropped
    from the output unless `keep_prefix` ([B, prefix + N, out_dim] then)."""
    grid: tuple[int, int]
    out_dim: int
    width: int = 512
    depth: int = 8
    num_heads: int = 16
    mlp_dim: int = 2048
    num_prefix_tokens: int = 1
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: bool = False
    posemb: str = "sincos2d"        # fixed table (models.layers.positions); Beyond Masking: "sincos1d"
    embed_bias: bool = True         # Beyond Masking's encoder-to-decoder Linear has none
    linear_init: str = "xavier"     # "trunc_normal": MAE-pytorch lineage (also the mask token)
    keep_prefix: bool = False       # also predict at the prefix tokens (CMAE reads the [CLS] output)

    @nn.compact
    def __call__(self, tokens, visible_idx, masked_idx, *, train: bool = False):
        init = linear_init(self.linear_init)
        x = nn.Dense(self.width, dtype=self.dtype, name="embed", use_bias=self.embed_bias,
                     kernel_init=param_init(init, ("embed", "dec_embed")),
                     bias_init=param_init(nn.initializers.zeros, ("dec_embed",)))(tokens)
        p = self.num_prefix_tokens
        token_init = init if self.linear_init == "trunc_normal" else nn.initializers.normal(0.02)
        mask_token = self.param("mask_token", param_init(token_init, (None, None, "norm")), (1, 1, self.width))
        patches = unshuffle(x[:, p:], mask_token, visible_idx, masked_idx)
        patches = patches + jnp.asarray(positions(self.posemb, self.grid, self.width))[None].astype(x.dtype)
        x = constrain(jnp.concatenate([x[:, :p], patches], axis=1), TOKENS)
        x, _ = Transformer(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                           attention_impl=self.attention_impl, remat=self.remat, linear_init=self.linear_init,
                           name="decoder")(x, not train)
        x = make_norm("layernorm", self.dtype, "decoder_norm")(x)
        pred = nn.Dense(self.out_dim, dtype=self.dtype, name="pred",
                        kernel_init=param_init(init, ("dec_embed", "patch")),
                        bias_init=param_init(nn.initializers.zeros, ("patch",)))(x if self.keep_prefix else x[:, p:])
        return pred.astype(jnp.float32)
