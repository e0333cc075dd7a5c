"""CAPI's predictor and heads (facebookresearch/capi `model.py`; docs/methods/capi.md §1.3-1.4).

- `Predictor`: one shared mask token per predicted position; blocks of cross-attention only
  (queries never attend to each other, so every prediction is independent), RoPE on queries (at
  their positions) and keys (at the encoder tokens' positions, registers included), each block
  with its own k/v projections of the same encoder output; pre-RMSNorm on the queries only; a
  non-affine final RMSNorm.
- `WeightNormHead`: the student head, L2-normalised input times weight-normalised prototypes
  (`weight_norm` over each prototype row, gain g learned and initialised to 1).
- `ClusteringHead`: the teacher's clustering head, L2-normalised token times N(0, 1) prototypes
  plus a bias. It is trained by its own loss, never by the student's.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mim_jax.models import rope as rope_lib
from mim_jax.models.layers import (
    DropPath,
    Dtype,
    Mlp,
    attention,
    check_drop_path_form,
    constrain,
    l2_normalize,
    make_norm,
    param_init,
    residual,
    trunc_normal,
)


class CrossAttentionBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    drop_path: float = 0.0
    norm_eps: float = 1e-5
    rope: str = "capi"
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    drop_path_form: str = "naive"

    @nn.compact
    def __call__(self, x, context, coords, context_coords, deterministic: bool):
        width = x.shape[-1]
        heads = lambda y: y.reshape(*y.shape[:2], self.num_heads, width // self.num_heads)  # noqa: E731

        def dense(name, names, features=width):
            return nn.Dense(features, use_bias=False, dtype=self.dtype, name=name,
                            kernel_init=param_init(nn.initializers.xavier_uniform(), names))

        norm1 = make_norm("rmsnorm", self.dtype, "norm1", self.norm_eps)
        q_proj, k_proj, v_proj = (dense(n, ("embed", "qkv")) for n in ("q", "k", "v"))
        out_proj = dense("out", ("qkv", "embed"))

        def cross_attention(h, coords, context, context_coords):
            q = rope_lib.apply_rope(heads(q_proj(norm1(h))), coords, self.rope)
            k = rope_lib.apply_rope(heads(k_proj(context)), context_coords, self.rope)
            return out_proj(attention(q, k, heads(v_proj(context)), self.attention_impl).reshape(h.shape))

        mlp = Mlp(self.mlp_dim, self.dtype, use_bias=False, name="mlp")
        norm2 = make_norm("rmsnorm", self.dtype, "norm2", self.norm_eps)
        drop = dict(rate=self.drop_path, deterministic=deterministic, form=self.drop_path_form)
        # The subset form subsets the queries, their coordinates and the context alike (official).
        x = residual(x, cross_attention, coords, context, context_coords, drop_path=DropPath(self.drop_path), **drop)
        x = residual(x, lambda h: mlp(norm2(h)), drop_path=DropPath(self.drop_path), **drop)
        return constrain(x, ("act_batch", "act_len", "act_emb"))


class Predictor(nn.Module):
    """(encoder tokens [B, T, D] after enc_norm, their coords [B, T, 2], query coords [B, Q, 2])
    -> per-block outputs after the non-affine dec_norm, [depth] x [B, Q, D]."""
    depth: int
    num_heads: int
    mlp_dim: int
    drop_path: float = 0.0          # the same in every block (CAPI)
    norm_eps: float = 1e-5
    rope: str = "capi"
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None
    drop_path_form: str = "naive"   # or "subset" (layers.SubsetDropPath)

    @nn.compact
    def __call__(self, context, context_coords, query_coords, *, train: bool = False):
        check_drop_path_form(self.drop_path_form)
        width = context.shape[-1]
        token = self.param("mask_token", param_init(nn.initializers.normal(0.02), (None, "norm")), (1, width))
        x = jnp.broadcast_to(token.astype(self.dtype), query_coords.shape[:2] + (width,))
        dec_norm = make_norm("rmsnorm", self.dtype, "dec_norm", self.norm_eps, affine=False)
        outputs = []
        for i in range(self.depth):
            x = CrossAttentionBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, drop_path=self.drop_path,
                                    norm_eps=self.norm_eps, rope=self.rope, dtype=self.dtype,
                                    attention_impl=self.attention_impl, drop_path_form=self.drop_path_form,
                                    name=f"block_{i}")(
                x, context, query_coords, context_coords, not train)
            outputs.append(dec_norm(x))
        return outputs


class WeightNormHead(nn.Module):
    """logits_k = g_k <v_k / ||v_k||, x / ||x||> over `num_prototypes` prototypes."""
    num_prototypes: int

    @nn.compact
    def __call__(self, x):
        # The official trunc_normal_(std=0.02) cuts at +-2 absolute: effectively untruncated.
        v = self.param("v", param_init(trunc_normal(0.02), ("embed", None)),
                       (x.shape[-1], self.num_prototypes))
        # [1, K] rather than [K]: the official gain is a [K, 1] tensor and takes full weight decay.
        g = self.param("g", param_init(nn.initializers.ones, (None, None)), (1, self.num_prototypes))
        weight = g * v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-8)
        return l2_normalize(x.astype(jnp.float32), 1e-12) @ weight


class ClusteringHead(nn.Module):
    """logits = W^T (z / ||z||) + c, W ~ N(0, 1): the online clustering of teacher tokens."""
    num_prototypes: int

    @nn.compact
    def __call__(self, z):
        return nn.Dense(self.num_prototypes, name="prototypes",
                        kernel_init=param_init(nn.initializers.normal(1.0), ("embed", None)),
                        bias_init=param_init(nn.initializers.zeros, (None,)))(
            l2_normalize(z.astype(jnp.float32), 1e-7))


def predictor_pooling(predictor_outputs, block: int = 0):
    """CAPI's global representation: mask queries at every position, the output of the first
    predictor block (after dec_norm) averaged over positions."""
    return predictor_outputs[block].mean(axis=1)
