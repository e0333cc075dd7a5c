"""The official CAPI backbone layout (`interop/capi.py`) against a PyTorch reference of the official
`model.py` (facebookresearch/capi): same features both ways, exact round trips, clear errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn as tnn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from configs import capi as capi_config  # noqa: E402
from mim_jax import parallel  # noqa: E402
from mim_jax.methods import get_method  # noqa: E402
from mim_jax.weights import capi as layout  # noqa: E402
from mim_jax.weights.tensors import MismatchError  # noqa: E402

WIDTH, DEPTH, HEADS, PATCH, REGISTERS, PRED_DEPTH, CHANNELS = 64, 2, 4, 4, 4, 2, 3


# ---- the official backbone (model.py, eval path), module names as there -------------------------

class Mlp(tnn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = tnn.Linear(dim, 4 * dim, bias=False)
        self.act = tnn.GELU()
        self.fc2 = tnn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Rope(tnn.Module):
    def __init__(self, dim, max_freq=7, min_freq=7e-4):
        super().__init__()
        self.dim, self.max_freq, self.min_freq = dim, max_freq, min_freq
        self.freqs = tnn.Parameter(torch.empty(2, dim))

    def _device_weight_init(self):
        freqs_1d = self.max_freq * (self.max_freq / self.min_freq) ** torch.linspace(0, -1, self.dim // 4)
        freqs_1d = torch.cat([freqs_1d, freqs_1d])
        freqs_2d = torch.zeros(2, self.dim)
        freqs_2d[0, : self.dim // 2] = freqs_1d
        freqs_2d[1, -self.dim // 2:] = freqs_1d
        self.freqs.data.copy_(freqs_2d * 2 * torch.pi)

    def forward(self, x, coords):
        angle = coords @ self.freqs
        return x * angle.cos() + rotate_half(x) * angle.sin()


class Attention(tnn.Module):
    def __init__(self, dim, num_heads, context_dim=None):
        super().__init__()
        self.num_heads = num_heads
        context_dim = context_dim or dim
        self.q_proj = tnn.Linear(dim, dim, bias=False)
        self.k_proj = tnn.Linear(context_dim, dim, bias=False)
        self.v_proj = tnn.Linear(context_dim, dim, bias=False)
        self.proj = tnn.Linear(dim, dim, bias=False)
        self.rope = Rope(dim // num_heads)

    def forward(self, x, coords, context=None, context_coords=None):
        if context is None or context_coords is None:
            context, context_coords = x, coords
        b, n_q, d = x.shape
        n_k, h = context.shape[1], self.num_heads
        q = self.q_proj(x).reshape(b, n_q, h, d // h).transpose(1, 2)
        k = self.k_proj(context).reshape(b, n_k, h, d // h).transpose(1, 2)
        v = self.v_proj(context).reshape(b, n_k, h, d // h).transpose(1, 2)
        q = self.rope(q, coords[:, None, :, :])
        k = self.rope(k, context_coords[:, None, :, :])
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape([b, n_q, d]))


class Residual(tnn.Module):      # NaiveResidual in eval mode
    def __init__(self, norm, fn):
        super().__init__()
        self.norm, self.fn = norm, fn

    def forward(self, x, **kwargs):
        return x + self.fn(self.norm(x), **kwargs)


def rms(dim, affine=True):
    return tnn.RMSNorm(dim, eps=1e-5, elementwise_affine=affine)


class Block(tnn.Module):
    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        self.residual1 = Residual(rms(dim), Attention(dim, heads, context_dim))
        self.residual2 = Residual(rms(dim), Mlp(dim))

    def forward(self, x, context=None, coords=None, context_coords=None):
        x = self.residual1(x, context=context, coords=coords, context_coords=context_coords)
        return self.residual2(x)


class Transformer(tnn.Module):
    def __init__(self, dim, depth, heads, context_dim=None):
        super().__init__()
        self.blocks = tnn.ModuleList([Block(dim, heads, context_dim) for _ in range(depth)])

    def forward(self, x, return_layers, contexts=None, coords=None, context_coords=None):
        outputs = {0: x} if 0 in return_layers else {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, context=contexts[i] if contexts is not None else None, coords=coords,
                    context_coords=context_coords)
            if i + 1 in return_layers:
                outputs[i + 1] = x
        return outputs


class EncoderDecoder(tnn.Module):
    def __init__(self, patch_size=PATCH, in_chans=CHANNELS, n_registers=REGISTERS, dim=WIDTH, heads=HEADS,
                 depth=DEPTH, pred_depth=PRED_DEPTH):
        super().__init__()
        self.patch_size, self.n_registers, self.embed_dim = patch_size, n_registers, dim
        self.encoder = Transformer(dim, depth, heads)
        self.decoder = Transformer(dim, pred_depth, heads, context_dim=dim)
        self.mask_token = tnn.Parameter(torch.empty(1, dim))
        self.registers = tnn.Parameter(torch.empty(1, n_registers, dim))
        self.patch_embed = tnn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.enc_norm = rms(dim, affine=False)
        self.dec_norm = rms(dim, affine=False)

    def get_edge_coordinates(self, n, dtype):
        side = n // 4
        reg = torch.zeros(1, n, 2, dtype=dtype)
        c = torch.arange(side, dtype=dtype) / side
        reg[:, 0 * side:1 * side, 0], reg[:, 0 * side:1 * side, 1] = c, 0
        reg[:, 1 * side:2 * side, 0], reg[:, 1 * side:2 * side, 1] = 1, c
        reg[:, 2 * side:3 * side, 0], reg[:, 2 * side:3 * side, 1] = 1 - c, 1
        reg[:, 3 * side:4 * side, 0], reg[:, 3 * side:4 * side, 1] = 0, 1 - c
        return reg

    def forward(self, x):
        """(global_repr [b, d], registers [b, k, d], feature map [b, ih, iw, d]), as official."""
        b, _, h, w = x.shape
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        coord_x = torch.linspace(0, 1, h // self.patch_size, dtype=x.dtype)
        coord_y = torch.linspace(0, 1, w // self.patch_size, dtype=x.dtype)
        coords = torch.cartesian_prod(coord_x, coord_y)[None].expand(b, -1, -1)
        reg = self.get_edge_coordinates(self.n_registers, x.dtype).expand(b, -1, -1)
        lo, hi = coords.min(dim=1, keepdim=True).values, coords.max(dim=1, keepdim=True).values
        reg = lo + reg * (hi - lo)                          # scale_reg_to_visible
        x = torch.cat([self.registers.expand(b, -1, -1), x], dim=1)
        coords_enc = torch.cat([reg, coords], dim=1)
        depth = len(self.encoder.blocks)
        enc = self.enc_norm(self.encoder(x, coords=coords_enc, return_layers={depth})[depth])
        queries = self.mask_token[None].expand(*coords.shape[:2], -1)      # every position (no indices)
        dec = self.decoder(queries, contexts=[enc] * len(self.decoder.blocks), coords=coords,
                           context_coords=coords_enc, return_layers={1})
        dec_out = self.dec_norm(dec[1])
        feature_map = enc[:, self.n_registers:].reshape(b, h // self.patch_size, w // self.patch_size, self.embed_dim)
        return dec_out.mean(dim=1), enc[:, :self.n_registers], feature_map


def random_reference(seed=0) -> EncoderDecoder:
    """Every weight random (norm weights away from 1), the RoPE frequencies as the official init."""
    torch.manual_seed(seed)
    model = EncoderDecoder().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("rope.freqs"):
                continue
            if name in ("registers", "mask_token"):
                p.normal_(0, 1)
            elif p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.1)
        for m in model.modules():
            if isinstance(m, Rope):
                m._device_weight_init()
    return model


def official_state(model) -> dict[str, np.ndarray]:
    return {"backbone." + k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def load_official(tensors) -> EncoderDecoder:
    """As the official hub loader: strip 'backbone.', load (strictly here)."""
    model = EncoderDecoder().eval()
    model.load_state_dict({k.removeprefix("backbone."): torch.tensor(v) for k, v in tensors.items()
                           if k.startswith("backbone.")}, strict=True)
    return model


# ---- this project's side ----------------------------------------------------------------------

def tiny_config(scan=False, **model):
    c = capi_config.get_config("local")
    c.input.update(image_size=16, channels=CHANNELS, batch_size=8, num_workers=0)
    c.model.update(width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=4 * WIDTH, num_registers=REGISTERS,
                   patch_size=PATCH, scan=scan, **model)
    c.predictor.update(depth=PRED_DEPTH)
    c.method.update(num_prototypes=32, sinkhorn_chunk=16)
    c.evals = {}
    return c


@pytest.fixture(scope="module")
def method():
    return get_method(tiny_config())


@pytest.fixture(scope="module")
def abstract(method):
    return parallel.unbox_abstract(jax.eval_shape(method.init_params, jax.random.key(0), method.batch_spec(1)))


@pytest.fixture(scope="module")
def encode(method):
    return jax.jit(method.encode)


def random_params(method, seed=1):
    batch = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), method.batch_spec(1))
    params = nn.unbox(method.init_params(jax.random.key(seed), batch))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    # Norm scales (ones at init) and the zero patch bias must differ from their init to be tested.
    return jax.tree.unflatten(tree, [np.asarray(x + 0.3 * jax.random.normal(k, x.shape) * (1 if x.ndim == 1 else
                                                                                             x.std() + 0.1))
                                     for x, k in zip(leaves, keys)])


IMAGES = [(2, 16, 16), (2, 16, 24)]      # the non-square one pins rows vs columns


def images_of(shape, seed=3):
    b, h, w = shape
    return np.random.default_rng(seed).normal(size=(b, h, w, CHANNELS)).astype(np.float32)


def compare(encode, params, model, images):
    out = encode(params, jnp.asarray(images))
    with torch.no_grad():
        cls, registers, fmap = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    b = images.shape[0]
    for name, ours, theirs in (("patch_tokens", out["patch_tokens"], fmap.reshape(b, -1, WIDTH)),
                               ("cls", out["cls"], cls), ("registers", out["registers"], registers)):
        ours, theirs = np.asarray(ours), theirs.numpy()
        assert ours.shape == theirs.shape, name
        err = np.abs(ours - theirs).max() / np.abs(theirs).max()
        assert err < 1e-5, (name, err)      # float32 rounding is ~1e-6


# ---- tests ------------------------------------------------------------------------------------

def test_official_state_dict_imports_and_gives_the_official_features(method, abstract, encode):
    model = random_reference()
    tensors = official_state(model)
    assert {n for e in layout.entries(method) for n in e.torch} == set(tensors)      # every official name
    params = layout.import_backbone(tensors, method, abstract)         # the whole tree as target: fills COVERED
    assert sorted(params) == sorted(layout.COVERED) and layout.ours_not_in_backbone(method, abstract) == [
        "clustering", "head"]
    assert jax.tree.map(lambda x: (x.shape, x.dtype), params) == jax.tree.map(
        lambda x: (x.shape, x.dtype), {k: abstract[k] for k in layout.COVERED})
    for shape in IMAGES:
        compare(encode, params, model, images_of(shape))


def test_exported_params_load_strictly_into_the_official_model_and_agree(method, encode):
    params = random_params(method)
    tensors = layout.export_backbone(params, method)              # heads present in params: left out
    assert all(v.dtype == np.float32 for v in tensors.values())
    model = load_official(tensors)
    for shape in IMAGES:
        compare(encode, params, model, images_of(shape, seed=4))


def test_round_trips_are_exact(method, abstract):
    params = random_params(method, seed=5)
    covered = {k: params[k] for k in layout.COVERED}
    back = layout.import_backbone(layout.export_backbone(params, method), method, abstract)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), covered, back)

    tensors = official_state(random_reference(seed=6))
    again = layout.export_backbone(layout.import_backbone(tensors, method, abstract), method)
    assert set(again) == set(tensors)
    for name, value in tensors.items():
        if name.endswith("rope.freqs"):     # written from our table (torch's float32 init differs by an ulp)
            np.testing.assert_allclose(again[name], value, rtol=1e-6, atol=0)
            np.testing.assert_array_equal(again[name], layout.rope_table(WIDTH // HEADS))
        else:
            np.testing.assert_array_equal(again[name], value, err_msg=name)


def test_scanned_encoder_uses_the_same_layout(method, abstract):
    scanned = get_method(tiny_config(scan=True))
    target = parallel.unbox_abstract(jax.eval_shape(scanned.init_params, jax.random.key(0), scanned.batch_spec(1)))
    tensors = official_state(random_reference(seed=7))
    loop = layout.import_backbone(tensors, method, abstract)
    stacked = layout.import_backbone(tensors, scanned, target)
    kernel = stacked["encoder"]["encoder"]["blocks"]["block"]["attn"]["qkv"]["kernel"]
    np.testing.assert_array_equal(kernel[1], loop["encoder"]["encoder"]["block_1"]["attn"]["qkv"]["kernel"])
    exported = layout.export_backbone(stacked, scanned)
    assert all(np.array_equal(exported[n], layout.export_backbone(loop, method)[n]) for n in exported)


@pytest.mark.parametrize("change, named, says", [
    ("missing", "backbone.encoder.blocks.1.residual1.fn.k_proj.weight", "missing 1 tensor"),
    ("extra", "backbone.encoder.blocks.2.residual1.norm.weight", "unexpected 1 tensor"),
    ("shape", "backbone.decoder.blocks.1.residual2.fn.fc1.weight", "model needs"),
    ("shape", "backbone.patch_embed.weight", "model needs"),
    ("shape", "backbone.registers", "model needs"),
])
def test_tensors_that_do_not_fit_are_named(method, abstract, change, named, says):
    tensors = official_state(random_reference())
    if change == "missing":
        del tensors[named]
    elif change == "extra":
        tensors[named] = np.ones(WIDTH, np.float32)
    else:
        tensors[named] = np.concatenate([tensors[named]] * 2, axis=-1)
    with pytest.raises(MismatchError) as info:
        layout.import_backbone(tensors, method, abstract)
    assert named in str(info.value) and says in str(info.value), str(info.value)


def test_rope_frequencies_are_checked_not_loaded(method, abstract):
    base = official_state(random_reference())
    enc = "backbone.encoder.blocks.1.residual1.fn.rope.freqs"
    dec = "backbone.decoder.blocks.0.residual1.fn.rope.freqs"
    for name, value, pattern in (
            (enc, base[enc] * 1.5, "encoder's RoPE frequencies differ.*max_freq/min_freq"),
            (dec, base[dec][::-1].copy(), "predictor's RoPE frequencies differ"),        # rows and columns swapped
            (enc, np.zeros((2, 8), np.float32), r"head_dim 16.*8-dimensional")):           # 8 heads, not 4
        tensors = dict(base, **{name: value})
        with pytest.raises(MismatchError, match=pattern) as info:
            layout.import_backbone(tensors, method, abstract)
        assert name in str(info.value)
    # A bf16 copy of the right table is accepted (with a warning).
    rounded = {n: (torch.from_numpy(v).bfloat16().float().numpy() if n.endswith("rope.freqs") else v)
               for n, v in base.items()}
    layout.import_backbone(rounded, method, abstract)


def test_heads_of_an_eval_dump_and_subsets(method, abstract):
    tensors = dict(official_state(random_reference()), **{"head.last_layer.weight": np.ones((32, WIDTH), np.float32)})
    with pytest.raises(MismatchError, match="unexpected 1 tensor.*head.last_layer.weight"):
        layout.import_backbone(tensors, method, abstract)
    assert sorted(layout.import_backbone(tensors, method, abstract, ignore=layout.HEADS)) == ["encoder", "predictor"]
    # The encoder alone: the predictor's tensors are skipped by name, nothing else is.
    only = layout.import_backbone(tensors, method, abstract, keys=("encoder",), ignore=layout.HEADS)
    assert sorted(only) == ["encoder"]
    with pytest.raises(MismatchError, match="backbone.decoder.blocks.7"):
        layout.import_backbone(dict(tensors, **{"backbone.decoder.blocks.7.x": np.ones(1)}), method, abstract,
                               keys=("encoder",), ignore=layout.HEADS)


def test_models_the_official_layout_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="rope_axial"):
        layout.entries(get_method(tiny_config(posemb="rope_axial")))
    with pytest.raises(ValueError, match="norm_eps"):
        layout.entries(get_method(tiny_config(norm_eps=1e-6)))
    config = tiny_config()
    config.model.mlp_dim = 2 * WIDTH           # the official blocks' MLPs are 4 x wide (the local preset's 2 x)
    with pytest.raises(ValueError, match=rf"MLP widths {2 * WIDTH} / "):
        layout.entries(get_method(config))


def test_describe_reads_the_architecture_from_the_tensors():
    desc = layout.describe(official_state(random_reference()), "capi_tiny.pth")
    assert (desc.family, desc.config_name, desc.channels, desc.image_size) == ("capi", "capi", CHANNELS, 16 * PATCH)
    assert {k: desc.model[k] for k in ("width", "depth", "num_heads", "mlp_dim", "num_registers")} == dict(
        width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=4 * WIDTH, num_registers=REGISTERS)
    assert desc.model["variant"].endswith(f"/{PATCH}")
    assert desc.extra == {"predictor": dict(depth=PRED_DEPTH, num_heads=HEADS, mlp_ratio=4.0)}


def test_the_hugging_face_export_of_capi_suggests_a_format_that_works(method, tmp_path):
    """CAPI fits neither transformers' ViT nor timm's: the error points at --format=official."""
    from mim_jax import export, pretrained
    from mim_jax.errors import UserFacingError
    weights = pretrained.Weights(config=tiny_config(), method=method, params=random_params(method), step=1,
                                 description="run")
    for fmt in ("hf", "timm"):
        with pytest.raises(UserFacingError, match="--format=official") as info:
            export.write(weights, fmt, tmp_path)
        assert "--format=timm" not in str(info.value)


def hub_loader(path) -> EncoderDecoder:
    """model.py's `__model_loader__` (what hubconf.py calls) on a local file: `torch.load(...,
    weights_only=True)`, the 'backbone.' keys without the prefix, `load_state_dict` (strict here;
    the official strict=False would load nothing from a file it cannot read, silently)."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    pre = "backbone."
    sd = {k.removeprefix(pre): v for k, v in sd.items() if k.startswith(pre)}
    model = EncoderDecoder().eval()
    model.load_state_dict(sd, strict=True)
    return model


def _weights(method, config=None, seed=1):
    from mim_jax import pretrained
    return pretrained.Weights(config=config or tiny_config(), method=method, params=random_params(method, seed),
                              step=1, description="run")


def test_the_official_export_is_what_the_official_hub_loader_reads(method, encode, tmp_path):
    from mim_jax import export
    weights = _weights(method)
    path = export.export_official(weights, tmp_path)
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    assert all(k.startswith("backbone.") and isinstance(v, torch.Tensor) for k, v in state.items())
    model = hub_loader(path)
    for shape in IMAGES:
        compare(encode, weights.params, model, images_of(shape, seed=8))


def test_an_import_runs_at_the_resolution_the_file_records(method, tmp_path):
    """An export records its run's resolution (16 px here); without a record, the releases' 16
    patches; a config.json written by the user sets another."""
    from mim_jax import export, pretrained
    path = export.export_official(_weights(method), tmp_path)
    assert pretrained.read_config(f"capi:{path}").input.image_size == 16
    (tmp_path / "config.json").write_text('{"image_size": 32}')
    assert pretrained.read_config(f"capi:{path}").input.image_size == 32
    (tmp_path / "config.json").unlink()
    assert pretrained.read_config(f"capi:{path}").input.image_size == 16 * PATCH
