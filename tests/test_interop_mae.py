"""MAE's official model (facebookresearch/mae `models_mae.py`: `MaskedAutoencoderViT`, timm's `Block`
and `PatchEmbed`) against this project's `--format=official` export and `mae:` import: the export
loads strictly into the official model and gives this model's encoder tokens and decoder predictions
for the same noise; an official `*_full.pth`-style file imports with the official outputs."""
import json
from functools import partial

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
from test_interop import _mesh, _perturbed, _tiny
from timm.models.vision_transformer import Block, PatchEmbed
from torch import nn as tnn

from mim_jax import export, pretrained

# ---- the official model (models_mae.py, its eval path before the loss), names as there ----------

def sincos_2d_table(dim: int, side: int) -> np.ndarray:
    """util/pos_embed.py's get_2d_sincos_pos_embed(dim, side, cls_token=True), written here from
    the paper's definition: the first half encodes the column (w), the second the row (h)."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
    rows, cols = np.meshgrid(np.arange(side, dtype=np.float64), np.arange(side, dtype=np.float64), indexing="ij")

    def one_axis(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    table = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
    return np.concatenate([np.zeros((1, dim)), table]).astype(np.float32)


class MaskedAutoencoderViT(tnn.Module):
    def __init__(self, img_size, patch_size, in_chans, embed_dim, depth, num_heads, decoder_embed_dim,
                 decoder_depth, decoder_num_heads, mlp_ratio):
        super().__init__()
        norm_layer = partial(tnn.LayerNorm, eps=1e-6)     # as mae_vit_*_dec512d8b
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        side = img_size // patch_size
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, embed_dim))
        table = torch.from_numpy(sincos_2d_table(embed_dim, side))[None]
        self.pos_embed = tnn.Parameter(table, requires_grad=False)
        self.blocks = tnn.ModuleList([Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                                      for _ in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.decoder_embed = tnn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        table = torch.from_numpy(sincos_2d_table(decoder_embed_dim, side))[None]
        self.decoder_pos_embed = tnn.Parameter(table, requires_grad=False)
        self.decoder_blocks = tnn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = tnn.Linear(decoder_embed_dim, patch_size ** 2 * in_chans, bias=True)

    def forward_encoder(self, x, noise, len_keep):
        """random_masking with the noise given (the official draws torch.rand)."""
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, x.shape[-1]))
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat((cls, x), dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]


# ---- helpers ------------------------------------------------------------------------------------

def theirs(model, images, noise, len_keep):
    with torch.no_grad():
        latent, ids_restore = model.forward_encoder(torch.from_numpy(images).permute(0, 3, 1, 2),
                                                    torch.from_numpy(noise), len_keep)
        return latent.numpy(), model.forward_decoder(latent, ids_restore).numpy()


def ours(weights, images, noise, len_keep):
    """The same noise as the official masking: the visible patches in its shuffled order."""
    order = np.argsort(noise, axis=1, kind="stable")
    visible, masked = jnp.asarray(order[:, :len_keep]), jnp.asarray(order[:, len_keep:])
    method, params = weights.method, weights.params
    tokens, _ = method.encoder.apply({"params": params["encoder"]}, jnp.asarray(images), visible)
    pred = method.decoder.apply({"params": params["decoder"]}, tokens, visible, masked)
    return np.asarray(tokens), np.asarray(pred)


def inputs(size, channels, seed):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, size, size, channels)).astype(np.float32)
    noise = rng.uniform(size=(2, (size // 4) ** 2)).astype(np.float32)    # patch 4 in both tests
    return images, noise


# ---- tests -------------------------------------------------------------------------------------

def test_the_official_export_loads_strictly_into_the_official_model_and_agrees(tmp_path):
    config = _tiny("mae")
    config.model.mlp_dim = 128          # the official model has one MLP ratio (4) for encoder and decoder
    weights = _perturbed(pretrained.random_init(config, _mesh()))
    path = export.export_official(weights, tmp_path)
    inp, dec = config.input, config.decoder
    model = MaskedAutoencoderViT(img_size=inp.image_size, patch_size=4, in_chans=inp.channels, embed_dim=32, depth=2,
                                 num_heads=2, decoder_embed_dim=dec.width, decoder_depth=dec.depth,
                                 decoder_num_heads=dec.num_heads, mlp_ratio=4).eval()
    built = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("pos_embed")}
    model.load_state_dict(torch.load(str(path), weights_only=True)["model"], strict=True)
    for name, table in built.items():     # the written tables are the official sin-cos ones
        np.testing.assert_allclose(model.state_dict()[name].numpy(), table.numpy(), atol=1e-6)
    images, noise = inputs(inp.image_size, inp.channels, seed=1)
    len_keep = int(noise.shape[1] * (1 - config.method.mask.ratio))
    for a, b in zip(ours(weights, images, noise, len_keep), theirs(model, images, noise, len_keep)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_an_official_full_file_imports_with_the_official_outputs(tmp_path):
    """`mae_pretrain_vit_*_full.pth` as the official code holds it: encoder and decoder under "model"."""
    size, channels = 32, 3
    torch.manual_seed(0)
    model = MaskedAutoencoderViT(img_size=size, patch_size=4, in_chans=channels, embed_dim=48, depth=2, num_heads=3,
                                 decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=4, mlp_ratio=4).eval()
    with torch.no_grad():     # biases, norms and tokens away from their init, so a dropped tensor shows
        for name, p in model.named_parameters():
            if p.requires_grad and (p.ndim == 1 or name.endswith("token")):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    torch.save({"model": model.state_dict()}, str(tmp_path / "mae_pretrain_vit_tiny_full.pth"))
    # Neither width is a released one: the head counts come from a config.json.
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 3, "decoder_num_heads": 4}))
    weights = pretrained.load(f"mae:{tmp_path / 'mae_pretrain_vit_tiny_full.pth'}", _mesh(),
                              keys=("encoder", "decoder"))
    # Read from the stored tables: the official ones are MAE's column-first layout.
    assert (weights.method.encoder.posemb, weights.method.decoder.posemb) == ("sincos2d", "sincos2d")
    images, noise = inputs(size, channels, seed=2)
    for a, b in zip(ours(weights, images, noise, 16), theirs(model, images, noise, 16)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
