"""CAE v2's official encoder (Atten4Vis/CAE `models/modeling_cae_helper.py`: `VisionTransformerEncoder`,
BEiT-style q/v biases, LayerScale `gamma_1/gamma_2`, a fixed row-first sin-cos table, no relative
positions) against this project's `--format=official` export: the export loads strictly into it and
its features, with and without a mask, equal this model's."""
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from test_interop import _random_weights
# BEiT's attention (q and v biases), MLP and patch embedding, as CAE's code has them too
from test_interop_beyond_masking import Attention, Mlp, PatchEmbed
from torch import nn as tnn

from mim_jax import export

# ---- the official encoder (eval path), names as there ------------------------------------------

def build_2d_sincos_position_embedding(side: int, dim: int, temperature=10000.0):
    """As the encoder builds it: torch.meshgrid's default 'ij' indexing of (w, h), then
    [sin w, cos w, sin h, cos h], and a zero row for [CLS]."""
    grid_w, grid_h = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                                    indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    out_w, out_h = torch.outer(grid_w.flatten(), omega), torch.outer(grid_h.flatten(), omega)
    table = torch.cat([torch.sin(out_w), torch.cos(out_w), torch.sin(out_h), torch.cos(out_h)], dim=1)
    return tnn.Parameter(torch.cat([torch.zeros(1, dim), table])[None], requires_grad=False)


class Block(tnn.Module):
    def __init__(self, dim, num_heads, mlp_ratio, init_values):
        super().__init__()
        self.norm1, self.attn = tnn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = tnn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))
        self.gamma_1 = tnn.Parameter(init_values * torch.ones(dim))
        self.gamma_2 = tnn.Parameter(init_values * torch.ones(dim))

    def forward(self, x):
        x = x + self.gamma_1 * self.attn(self.norm1(x))
        return x + self.gamma_2 * self.mlp(self.norm2(x))


class VisionTransformerEncoder(tnn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, mlp_ratio, init_values):
        super().__init__()
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = build_2d_sincos_position_embedding(img_size // patch_size, embed_dim)
        self.blocks = tnn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, init_values) for _ in range(depth)])
        self.norm = tnn.LayerNorm(embed_dim, eps=1e-6)

    def forward(self, x, bool_masked_pos):
        x = self.patch_embed(x)
        b, _, dim = x.shape
        x = torch.cat((self.cls_token.expand(b, -1, -1), x[~bool_masked_pos].reshape(b, -1, dim)), dim=1)
        pos = self.pos_embed.expand(b, -1, -1)
        x = x + torch.cat((pos[:, :1], pos[:, 1:][~bool_masked_pos].reshape(b, -1, dim)), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class CaeV2Encoder(tnn.Module):
    """The `encoder.` part of `ContextAutoencoderViT` (modeling_cae.py), which the released files hold."""
    def __init__(self, **kwargs):
        super().__init__()
        self.encoder = VisionTransformerEncoder(**kwargs)


# ---- tests -------------------------------------------------------------------------------------

def test_the_official_export_loads_strictly_into_the_official_encoder_and_agrees(tmp_path):
    weights = _random_weights("cae_v2")
    path = export.export_official(weights, tmp_path)
    inp = weights.config.input
    model = CaeV2Encoder(img_size=inp.image_size, patch_size=4, in_chans=inp.channels, embed_dim=32, depth=2,
                         num_heads=2, mlp_ratio=2, init_values=0.1).eval()
    built = model.encoder.pos_embed.detach().clone()
    model.load_state_dict(torch.load(str(path), weights_only=True)["model"], strict=True)
    np.testing.assert_allclose(model.encoder.pos_embed.detach().numpy(), built.numpy(), atol=1e-6)   # row-first
    images = np.random.default_rng(1).normal(size=(2, inp.image_size, inp.image_size, inp.channels)).astype(np.float32)
    n = (inp.image_size // 4) ** 2
    rng = np.random.default_rng(2)
    visible = np.sort(np.stack([rng.permutation(n)[:n // 4] for _ in range(2)]), axis=1)
    masked = np.ones((2, n), bool)
    np.put_along_axis(masked, visible, False, axis=1)
    for keep, bool_masked_pos in [(None, np.zeros((2, n), bool)), (visible, masked)]:
        with torch.no_grad():
            ref = model.encoder(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(bool_masked_pos))
        tokens, _ = weights.method.encoder.apply({"params": weights.params["encoder"]}, jnp.asarray(images),
                                                 None if keep is None else jnp.asarray(keep))
        np.testing.assert_allclose(np.asarray(tokens), ref.numpy(), rtol=1e-5, atol=1e-5)
