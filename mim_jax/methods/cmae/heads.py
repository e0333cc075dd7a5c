"""CMAE's heads (Mao et al. 2022, realised as in the authors' SDMAE code, Talented-Q/SDMAE
`models_sdmae.py`): the contrastive head on the decoder's output sequence, its predictor, and
the token-position head.

- `ContrastiveHead` (SDMAE's `ctr_model`): transformer blocks at the encoder's width over the
  decoder's output tokens, the [CLS] token, then a 3-layer MLP without biases, BatchNorm + ReLU
  after each hidden layer and a final BatchNorm without affine (SimCLR/MoCo v3). SDMAE feeds the
  decoder's pixel predictions (p*p*3 = 768 values per token) straight into 768-wide blocks, which
  only fits ViT-B/16; where the two differ a Linear projection maps them to the encoder's width
  (`input_proj`), a documented addition.
- `MlpHead(num_layers=2)`: the predictor, 2 layers, BN + ReLU in between, final BN without affine.
- `PositionHead`: Linear(D, D/2) -> Linear(D/2, P) with no nonlinearity, scores of the P grid
  positions for every visible encoder token.

BatchNorm normalises over the global batch (under jit with the batch sharded XLA all-reduces
the statistics, i.e. SyncBN): a sharded step equals a single-device one. SDMAE trained on one GPU,
where the two coincide. Running statistics live in the `batch_stats` collection (eps 1e-5,
momentum 0.9 = PyTorch's 0.1).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mim_jax.models.layers import TOKENS, Block, Dtype, constrain, param_init


def _batch_norm(train: bool, affine: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, use_scale=affine, use_bias=affine,
                        dtype=jnp.float32, name=name, scale_init=param_init(nn.initializers.ones, ("norm",)),
                        bias_init=param_init(nn.initializers.zeros, ("norm",)))


class MlpHead(nn.Module):
    """SDMAE's `_build_mlp`: `num_layers` bias-free Linears (xavier), BN + ReLU between them, a
    final BN without affine."""
    num_layers: int
    hidden_dim: int
    out_dim: int

    @nn.compact
    def __call__(self, x, *, train: bool):
        x = x.astype(jnp.float32)
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.out_dim if last else self.hidden_dim, use_bias=False, name=f"linear_{i}",
                         kernel_init=param_init(nn.initializers.xavier_uniform(), ("embed", None)))(x)
            x = _batch_norm(train, affine=not last, name=f"bn_{i}")(x)
            if not last:
                x = nn.relu(x)
        return x


class ContrastiveHead(nn.Module):
    """Decoder output tokens [B, 1 + N, d_in] ([CLS] first) -> embedding [B, out_dim]."""
    width: int
    depth: int
    num_heads: int
    hidden_dim: int
    out_dim: int
    dtype: Dtype = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, tokens, *, train: bool):
        x = tokens
        if x.shape[-1] != self.width:
            x = nn.Dense(self.width, dtype=self.dtype, name="input_proj",
                         kernel_init=param_init(nn.initializers.xavier_uniform(), ("patch", "embed")),
                         bias_init=param_init(nn.initializers.zeros, ("embed",)))(x)
        x = constrain(x.astype(self.dtype), TOKENS)
        for i in range(self.depth):
            x = Block(num_heads=self.num_heads, mlp_dim=4 * self.width, dtype=self.dtype,
                      attention_impl=self.attention_impl, name=f"block_{i}")(x)
        return MlpHead(num_layers=3, hidden_dim=self.hidden_dim, out_dim=self.out_dim, name="mlp")(
            x[:, 0], train=train)


class PositionHead(nn.Module):
    """Encoder tokens [B, L, D] -> scores of the `num_positions` grid cells [B, L, P]."""
    num_positions: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens):
        width = tokens.shape[-1]
        x = nn.Dense(width // 2, dtype=self.dtype, name="linear_0",
                     kernel_init=param_init(nn.initializers.xavier_uniform(), ("embed", None)),
                     bias_init=param_init(nn.initializers.zeros, (None,)))(tokens)
        x = nn.Dense(self.num_positions, dtype=self.dtype, name="linear_1",
                     kernel_init=param_init(nn.initializers.xavier_uniform(), (None, None)),
                     bias_init=param_init(nn.initializers.zeros, (None,)))(x)
        return x.astype(jnp.float32)
