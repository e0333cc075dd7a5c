"""OpenAI's own CLIP files (`ViT-B-16.pt`, ...) as CAE v2's teacher: a small random transformers CLIP
vision model, rewritten here into OpenAI's layout (clip/model.py's names, mapped independently of
`weights/openai_clip.py`), saved as a plain state dict and as a TorchScript archive like the
released files, loads into the Linen tower and gives transformers' outputs; broken files name
what is wrong."""
import re

import numpy as np
import pytest

from mim_jax.methods.cae_v2 import teachers
from mim_jax.models import clip
from mim_jax.weights import clip as clip_weights, openai_clip, tensors as tensors_lib

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# width 128 -> 2 heads (OpenAI: width // 64); the MLP is not 4x wide, so its width is read, not assumed.
VISION = dict(image_size=32, patch_size=8, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
              num_attention_heads=2, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=24)
FIELDS = dict(patch_size=8, width=128, depth=2, num_heads=2, mlp_dim=256, proj_dim=24, image_size=32,
              layer_norm_eps=1e-5)


def hf_to_openai(state: dict) -> dict:
    """A transformers CLIPVisionModelWithProjection state dict -> OpenAI clip/model.py names
    (`VisionTransformer` under `visual.`), as torch tensors; every HF tensor is used."""
    s = {k: v.detach().clone() for k, v in state.items() if not k.endswith("position_ids")}
    take = s.pop
    v = "vision_model."
    out = {"visual.conv1.weight": take(v + "embeddings.patch_embedding.weight"),
           "visual.class_embedding": take(v + "embeddings.class_embedding"),
           "visual.positional_embedding": take(v + "embeddings.position_embedding.weight")}
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for w in ("weight", "bias"):
            out[f"visual.{ours}.{w}"] = take(f"{v}{theirs}.{w}")
    i = 0
    while f"{v}encoder.layers.{i}.layer_norm1.weight" in s:
        hf, oa = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for w in ("weight", "bias"):
            out[f"{oa}attn.in_proj_{w}"] = torch.cat([take(f"{hf}self_attn.{n}_proj.{w}") for n in "qkv"], 0)
            for ours, theirs in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[f"{oa}{ours}.{w}"] = take(f"{hf}{theirs}.{w}")
        i += 1
    out["visual.proj"] = take("visual_projection.weight").T.contiguous()   # nn.Parameter(width, output_dim)
    assert not s, f"unmapped: {sorted(s)}"
    # The text tower the released files also hold, which the vision loader must skip.
    g = torch.Generator().manual_seed(1)
    text = {"positional_embedding": (16, 32), "token_embedding.weight": (100, 32), "ln_final.weight": (32,),
            "ln_final.bias": (32,), "text_projection": (32, 24), "logit_scale": (),
            "transformer.resblocks.0.attn.in_proj_weight": (96, 32), "transformer.resblocks.0.ln_1.weight": (32,)}
    out.update({k: torch.randn(shape, generator=g) for k, shape in text.items()})
    return out


class _Holder(torch.nn.Module):
    """Holds tensors under their dotted names, so its TorchScript archive's state_dict is them."""

    def __init__(self, tensors: dict):
        super().__init__()
        for name, value in tensors.items():
            *path, leaf = name.split(".")
            module = self
            for part in path:
                if part not in module._modules:
                    module.add_module(part, torch.nn.Module())
                module = module._modules[part]
            if value.is_floating_point():
                module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
            else:
                module.register_buffer(leaf, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(tensors: dict, path):
    torch.jit.save(torch.jit.script(_Holder(tensors)), str(path))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**VISION)
    m = transformers.CLIPVisionModelWithProjection(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0); randomise them so they are really tested
        for name, p in m.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def openai_state(model):
    return hf_to_openai(model.state_dict())


@pytest.fixture(scope="module")
def files(openai_state, tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai_clip")
    plain, archive = folder / "ViT-T-8.pth", folder / "ViT-T-8.pt"
    torch.save(openai_state, str(plain))
    # The released archives also carry these integer scalars (clip/model.py::build_model deletes them).
    save_torchscript({**openai_state, "input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
                      "vocab_size": torch.tensor(100)}, archive)
    return {"state_dict": plain, "torchscript": archive}


def _reference(model, images):
    """transformers' tokens after post_layernorm + visual_projection, and its image embedding."""
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state
        tokens = model.visual_projection(model.vision_model.post_layernorm(hidden))
        embeds = model(pixel_values=pixels).image_embeds
    return tokens.numpy(), embeds.numpy()


def test_the_archive_is_torchscript(files):
    with pytest.raises(Exception):   # as the released files: not a plain pickle
        torch.load(str(files["torchscript"]), map_location="cpu", weights_only=True)
    assert "visual.transformer.resblocks.1.attn.in_proj_weight" in torch.jit.load(str(files["torchscript"])).state_dict()


def test_fields_are_read_from_the_shapes_as_hf_config_gives_them(model, openai_state):
    fields = openai_clip.fields_from_tensors({k: v.numpy() for k, v in openai_state.items()})
    assert fields == FIELDS == clip.clip_config_from_hf(model.config.to_dict())


@pytest.mark.parametrize("kind", ["state_dict", "torchscript"])
def test_openai_file_matches_transformers(model, files, kind):
    fields, params = clip_weights.load_clip_vision(str(files[kind]))
    assert fields == FIELDS
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(clip.CLIPVisionTower(**fields).apply({"params": params}, images))
    tokens, embeds = _reference(model, images)
    assert ours.shape == (3, 1 + 16, 24)
    np.testing.assert_allclose(ours, tokens, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(ours[:, 0], embeds, atol=2e-5, rtol=1e-5)   # [CLS] is CLIP's image embedding


def test_both_kinds_and_the_hf_checkpoint_give_the_same_params(model, files, tmp_path):
    _, plain = clip_weights.load_clip_vision(str(files["state_dict"]))
    _, archive = clip_weights.load_clip_vision(str(files["torchscript"]))
    model.save_pretrained(tmp_path, safe_serialization=True)
    _, hf = clip_weights.load_clip_vision(str(tmp_path))
    for other in (archive, hf):
        assert sorted(tensors_lib._paths(other)) == sorted(tensors_lib._paths(plain))
        for path, value in tensors_lib._paths(other).items():
            np.testing.assert_array_equal(value, tensors_lib._paths(plain)[path], err_msg="/".join(path))


def test_export_gives_back_the_vision_tensors(openai_state):
    state = {k: v.numpy() for k, v in openai_state.items()}
    params = openai_clip.to_params(state, FIELDS)
    back = openai_clip.to_tensors(params, FIELDS)
    assert sorted(back) == sorted(k for k in state if k.startswith("visual."))
    for k, v in back.items():
        np.testing.assert_array_equal(v, state[k], err_msg=k)


def test_config_and_output_dim_of_a_pt_file(files):
    for kind in ("state_dict", "torchscript"):
        source = str(files[kind])
        assert clip_weights.vision_fields(source) == FIELDS
        # read_config gives the equivalent HF config, so clip_config_from_hf(read_config(...)) works too.
        assert clip.clip_config_from_hf(clip_weights.read_config(source)) == FIELDS
        assert teachers.output_dim(source) == 24


def _save_broken(openai_state, tmp_path, change):
    state = dict(openai_state)
    change(state)
    path = tmp_path / "broken.pt"
    save_torchscript(state, path)
    return str(path)


def test_missing_tensor_is_named(openai_state, tmp_path):
    name = "visual.transformer.resblocks.1.mlp.c_proj.bias"
    path = _save_broken(openai_state, tmp_path, lambda s: s.pop(name))
    with pytest.raises(tensors_lib.MismatchError, match=r"missing 1 tensor\(s\): " + re.escape(name)):
        clip_weights.load_clip_vision(path)


def test_wrong_shape_is_named(openai_state, tmp_path):
    name = "visual.transformer.resblocks.0.attn.out_proj.weight"
    path = _save_broken(openai_state, tmp_path, lambda s: s.__setitem__(name, torch.zeros(128, 96)))
    with pytest.raises(tensors_lib.MismatchError, match=re.escape(name) + r".*\(96, 128\); the model needs \(128, 128\)"):
        clip_weights.load_clip_vision(path)
    # A fused q|k|v that does not split in three.
    name = "visual.transformer.resblocks.1.attn.in_proj_bias"
    path = _save_broken(openai_state, tmp_path, lambda s: s.__setitem__(name, torch.zeros(100)))
    with pytest.raises(tensors_lib.MismatchError, match=re.escape(name)):
        clip_weights.load_clip_vision(path)


def test_stray_vision_tensor_is_named(openai_state, tmp_path):
    path = _save_broken(openai_state, tmp_path, lambda s: s.__setitem__("visual.attnpool.c_proj.weight", torch.zeros(2)))
    with pytest.raises(tensors_lib.MismatchError, match=r"unexpected 1 tensor\(s\): visual\.attnpool\.c_proj\.weight"):
        clip_weights.load_clip_vision(path)


def test_resnet_and_non_clip_files_are_refused(tmp_path):
    rn = tmp_path / "RN50.pt"
    torch.save({"visual.conv1.weight": torch.zeros(32, 3, 3, 3), "visual.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1),
                "visual.attnpool.positional_embedding": torch.zeros(50, 2048), "text_projection": torch.zeros(8, 4)}, str(rn))
    with pytest.raises(ValueError, match="ResNet"):
        clip_weights.load_clip_vision(str(rn))
    other = tmp_path / "other.pt"
    torch.save({"blocks.0.norm1.weight": torch.zeros(8)}, str(other))
    with pytest.raises(ValueError, match="not an OpenAI CLIP file"):
        clip_weights.vision_fields(str(other))


def test_missing_pt_file_names_the_download(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        clip_weights.load_clip_vision(str(tmp_path / "ViT-B-16.pt"))
    assert openai_clip.URLS["ViT-B-16.pt"] in str(err.value) and "teacher=" in str(err.value)
    with pytest.raises(FileNotFoundError, match="ViT-L-14.pt"):
        teachers.output_dim(str(tmp_path / "ViT-L-14.pt"))
