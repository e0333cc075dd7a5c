"""Beyond Masking's official model (sunsmarterjie/beyond_masking `zoomed-in/modeling_pretrain.py`:
MAE-pytorch's `PretrainVisionTransformer`, encoder and decoder) against this project's import and
`--format=official` export: a training checkpoint of the official script imports with the official
forward's outputs, an export loads strictly into the official model and gives this model's outputs."""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn as tnn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from configs import common  # noqa: E402
from mim_jax import export, parallel, pretrained  # noqa: E402
from mim_jax.models import layers  # noqa: E402


# ---- the official model (modeling_pretrain.py / modeling_finetune.py, eval path), names as there ----

def get_sinusoid_encoding_table(n_position, d_hid):
    def angles(position):
        return [position / np.power(10000, 2 * (hid_j // 2) / d_hid) for hid_j in range(d_hid)]
    table = np.array([angles(pos_i) for pos_i in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.FloatTensor(table).unsqueeze(0)


class Attention(tnn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv = tnn.Linear(dim, dim * 3, bias=False)
        self.q_bias = tnn.Parameter(torch.zeros(dim))
        self.v_bias = tnn.Parameter(torch.zeros(dim))
        self.proj = tnn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv_bias = torch.cat((self.q_bias, torch.zeros_like(self.v_bias, requires_grad=False), self.v_bias))
        qkv = F.linear(input=x, weight=self.qkv.weight, bias=qkv_bias)
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class Mlp(tnn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = tnn.Linear(dim, hidden), tnn.GELU(), tnn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(tnn.Module):      # init_values=0: no gamma_1 / gamma_2
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = tnn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = tnn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(tnn.Module):
    def __init__(self, patch, chans, dim):
        super().__init__()
        self.proj = tnn.Conv2d(chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Encoder(tnn.Module):    # PretrainVisionTransformerEncoder
    def __init__(self, img, patch, chans, dim, depth, heads, mlp_ratio):
        super().__init__()
        self.patch_embed = PatchEmbed(patch, chans, dim)
        self.cls_token = tnn.Parameter(torch.zeros(1, 1, dim))      # never used by the forward
        self.pos_embed = get_sinusoid_encoding_table((img // patch) ** 2, dim)   # a plain attribute
        self.blocks = tnn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = tnn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, ids_keep):
        x = self.patch_embed(x) + self.pos_embed.type_as(x)
        x = torch.gather(x, 1, ids_keep[..., None].repeat(1, 1, x.shape[-1]))
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Decoder(tnn.Module):    # PretrainVisionTransformerDecoder
    def __init__(self, num_classes, dim, depth, heads, mlp_ratio):
        super().__init__()
        self.blocks = tnn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = tnn.LayerNorm(dim, eps=1e-6)
        self.head = tnn.Linear(dim, num_classes)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


class PretrainVisionTransformer(tnn.Module):
    def __init__(self, img, patch, chans, dim, depth, heads, dec_dim, dec_depth, dec_heads, mlp_ratio=4.0):
        super().__init__()
        self.encoder = Encoder(img, patch, chans, dim, depth, heads, mlp_ratio)
        self.decoder = Decoder(patch * patch * chans, dec_dim, dec_depth, dec_heads, mlp_ratio)
        self.encoder_to_decoder = tnn.Linear(dim, dec_dim, bias=False)
        self.mask_token = tnn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed = get_sinusoid_encoding_table((img // patch) ** 2, dec_dim)

    def forward(self, imgs, ids_keep, ids_restore):
        """(visible encoder tokens, predictions of every patch), `forward` before its loss."""
        x_vis = self.encoder(imgs, ids_keep)
        x = self.encoder_to_decoder(x_vis)
        x = torch.cat([x, self.mask_token.repeat(x.shape[0], ids_restore.shape[1] - x.shape[1], 1)], dim=1)
        x = torch.gather(x, 1, ids_restore[..., None].repeat(1, 1, x.shape[2]))      # unshuffle
        return x_vis, self.decoder(x + self.decoder_pos_embed.type_as(x))


# ---- helpers ------------------------------------------------------------------------------------

IMAGE, PATCH, CHANNELS, WIDTH, DEPTH, HEADS, DEC_WIDTH, DEC_DEPTH, DEC_HEADS = 32, 8, 3, 64, 2, 4, 48, 2, 3


def random_official(**sizes) -> PretrainVisionTransformer:
    torch.manual_seed(0)
    model = PretrainVisionTransformer(**sizes).eval()
    with torch.no_grad():     # biases, norms, q/v biases and tokens away from their init
        for name, p in model.named_parameters():
            if p.ndim == 1 or name.endswith("token"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def save_model(model, path, args: argparse.Namespace):
    """As `utils.save_model` of the official script: model, optimizer, epoch, scaler, args."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 299,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0}, "args": args}, str(path))


def masks(n, b, seed=0):
    """(visible, masked) patch indices per example, a quarter visible."""
    rng = np.random.default_rng(seed)
    shuffle = np.stack([rng.permutation(n) for _ in range(b)])
    return np.sort(shuffle[:, :n // 4], 1), np.sort(shuffle[:, n // 4:], 1)


def ours(weights, images, visible, masked):
    method, params = weights.method, weights.params
    tokens, _ = method.encoder.apply({"params": params["encoder"]}, jnp.asarray(images), jnp.asarray(visible))
    pred = method.decoder.apply({"params": params["decoder"]}, tokens, jnp.asarray(visible), jnp.asarray(masked))
    return np.asarray(tokens), np.asarray(pred)


def theirs(model, images, visible, masked):
    """The official forward with this mask: ids_keep the visible patches, ids_restore their unshuffle."""
    ids_restore = np.argsort(np.concatenate([visible, masked], 1), 1)
    with torch.no_grad():
        tokens, pred = model(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(visible),
                             torch.from_numpy(ids_restore))
    return tokens.numpy(), pred.numpy()


def mesh():
    return parallel.make_mesh([("data", -1), ("fsdp", 1)])


# ---- tests -------------------------------------------------------------------------------------

def test_a_training_checkpoint_of_the_official_script_imports_with_the_official_outputs(tmp_path):
    model = random_official(img=IMAGE, patch=PATCH, chans=CHANNELS, dim=WIDTH, depth=DEPTH, heads=HEADS,
                            dec_dim=DEC_WIDTH, dec_depth=DEC_DEPTH, dec_heads=DEC_HEADS)
    save_model(model, tmp_path / "checkpoint-299.pth", argparse.Namespace(
        model="pretrain_mae_base_patch16_224", mask_ratio=0.75, input_size=IMAGE, output_dir=str(tmp_path)))
    # What the tensors do not say: the resolution (no table stored) and, at these widths, the heads.
    (tmp_path / "config.json").write_text(json.dumps({"image_size": IMAGE, "num_heads": HEADS,
                                                      "decoder_num_heads": DEC_HEADS}))
    weights = pretrained.load(f"beyond_masking:{tmp_path / 'checkpoint-299.pth'}", mesh(), keys=("encoder", "decoder"))
    images = np.random.default_rng(1).normal(size=(2, IMAGE, IMAGE, CHANNELS)).astype(np.float32)
    visible, masked = masks((IMAGE // PATCH) ** 2, 2)
    for a, b in zip(ours(weights, images, visible, masked), theirs(model, images, visible, masked)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_the_official_export_loads_strictly_into_the_official_model_and_agrees(tmp_path):
    config = common.pretrain_config("beyond_masking:local")
    config.model.update(width=32, depth=2, num_heads=2, mlp_dim=128)     # the official MLP ratio (4) in both
    weights = pretrained.random_init(config, mesh())
    leaves, tree = jax.tree.flatten(weights.params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    weights.params = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    path = export.export_official(weights, tmp_path)
    inp, dec = config.input, config.decoder
    model = PretrainVisionTransformer(img=inp.image_size, patch=4, chans=inp.channels, dim=32, depth=2, heads=2,
                                      dec_dim=dec.width, dec_depth=dec.depth, dec_heads=dec.num_heads).eval()
    state = torch.load(str(path), weights_only=True)["model"]
    model.load_state_dict(state, strict=True)     # every tensor of the official model, nothing else
    images = np.random.default_rng(2).normal(size=(2, inp.image_size, inp.image_size, inp.channels)).astype(np.float32)
    visible, masked = masks((inp.image_size // 4) ** 2, 2, seed=3)
    for a, b in zip(ours(weights, images, visible, masked), theirs(model, images, visible, masked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # ... and it imports back: the encoder exactly, the decoder up to its key bias (no effect on any output).
    back = pretrained.load(f"beyond_masking:{path}", mesh(), keys=("encoder", "decoder"))
    jax.tree.map(np.testing.assert_array_equal, back.params["encoder"], layers.unstack_blocks(weights.params["encoder"]))
    for a, b in zip(ours(back, images, visible, masked), ours(weights, images, visible, masked)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
