"""The Linen CLIP tower against Hugging Face transformers' PyTorch CLIP on the same weights (a small
randomly initialised CLIP saved as safetensors), and the loader's errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mim_jax import parallel
from mim_jax.methods.cae_v2 import teachers
from mim_jax.models import clip
from mim_jax.weights import clip as clip_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMALL = dict(image_size=32, patch_size=8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, hidden_act="quick_gelu", layer_norm_eps=1e-5)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A full CLIPModel (vision + text) with random weights, saved as HF saves openai/clip-*."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        vision_config=SMALL, projection_dim=24,
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=100, max_position_embeddings=16))
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0); randomise them so they are really tested
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layrnorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def _torch_reference(folder, images):
    """All tokens after post_layernorm + visual_projection, and CLIP's image embedding."""
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        hidden = model.vision_model(pixel_values=pixels).last_hidden_state
        tokens = model.visual_projection(model.vision_model.post_layernorm(hidden))
        embeds = model.get_image_features(pixel_values=pixels)
    embeds = getattr(embeds, "pooler_output", embeds)   # transformers 5 returns an output object
    return tokens.numpy(), embeds.numpy()


def test_linen_tower_matches_transformers(clip_dir):
    fields, params = clip_weights.load_clip_vision(str(clip_dir))
    assert fields == dict(patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, proj_dim=24, image_size=32,
                          layer_norm_eps=1e-5)
    images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(clip.CLIPVisionTower(**fields).apply({"params": params}, images))
    tokens, image_embeds = _torch_reference(clip_dir, images)
    assert ours.shape == (3, 1 + 16, 24)
    np.testing.assert_allclose(ours, tokens, atol=2e-5, rtol=1e-5)
    # Its [CLS] token is CLIP's image embedding.
    np.testing.assert_allclose(ours[:, 0], image_embeds, atol=2e-5, rtol=1e-5)


def test_the_same_file_loads_by_path(clip_dir):
    _, by_folder = clip_weights.load_clip_vision(str(clip_dir))
    _, by_file = clip_weights.load_clip_vision(str(clip_dir / "model.safetensors"))
    jax.tree.map(np.testing.assert_array_equal, by_folder, by_file)


def test_positions_are_interpolated_to_another_grid(clip_dir):
    fields, params = clip_weights.load_clip_vision(str(clip_dir))
    table = jnp.asarray(params["position_embedding"])
    np.testing.assert_array_equal(clip.resize_positions(table, (4, 4)), table)   # native grid: unchanged
    resized = np.asarray(clip.resize_positions(table, (2, 2)))
    np.testing.assert_array_equal(resized[0], table[0])
    # Halving a 4x4 grid by cubic resampling averages each 2x2 block with (approximately) equal weights.
    patches = np.asarray(table[1:]).reshape(4, 4, -1)
    assert np.abs(resized[1:].reshape(2, 2, -1) - patches.reshape(2, 2, 2, 2, -1).mean((1, 3))).mean() < 0.5 * np.abs(patches).mean()
    out = clip.CLIPVisionTower(**fields).apply({"params": params}, jnp.zeros((1, 16, 16, 3)))
    assert out.shape == (1, 5, 24)


def test_teacher_renormalises_the_student_view_and_runs_bf16_sharded(clip_dir):
    teacher = teachers.ClipTeacher(str(clip_dir), grid=(4, 4), student_mean=(0.5, 0.5, 0.5),
                                   student_std=(0.25, 0.25, 0.25), dtype="bfloat16")
    assert teacher.out_dim == 24 and teacher.input_size == 32
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    rules = (("embed", "fsdp"),)
    images = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype(np.float32)
    abstract = parallel.Sharding(mesh=mesh, rules=rules).abstract(teacher.init, parallel.abstract_key(), images)
    params = teacher.load(abstract, parallel.shardings_of(abstract))
    kernel = params["layers_0"]["fc1"]["kernel"]
    assert kernel.dtype == jnp.bfloat16 and kernel.sharding.spec[0] == "fsdp"
    ours = np.asarray(jax.jit(teacher)(params, jnp.asarray(images)))
    pixels = images * 0.25 + 0.5
    clip_input = (pixels - np.asarray(clip.CLIP_MEAN)) / np.asarray(clip.CLIP_STD)
    tokens, _ = _torch_reference(clip_dir, clip_input.astype(np.float32))
    cos = (ours * tokens).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(tokens, axis=-1)
    assert cos.min() > 0.99   # bf16 weights and activations


def test_offline_hub_id_names_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as err:
        clip_weights.resolve("openai/clip-vit-base-patch16", cache_dir=str(tmp_path))
    message = str(err.value)
    assert "https://huggingface.co/openai/clip-vit-base-patch16/resolve/main/model.safetensors" in message
    assert "config.json" in message and "teacher=" in message


def test_folder_without_weights_is_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"vision_config": SMALL}))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        clip_weights.resolve(str(tmp_path))


def test_checkpoint_of_another_size_is_a_clear_error(clip_dir, tmp_path):
    config = json.loads((clip_dir / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(clip_dir / "model.safetensors")
    with pytest.raises(ValueError, match="lacks 'vision_model.encoder.layers.2"):
        clip_weights.load_clip_vision(str(tmp_path))


def test_cae_v2_offline_without_teacher_weights_stops_before_training(tmp_path, monkeypatch):
    from configs import cae_v2
    from mim_jax.methods import get_method, resolve_config
    from mim_jax.training import state as state_lib
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))            # an empty cache
    config = resolve_config(cae_v2.get_config("variant=Ti"))   # the recipe's CLIP: its width is known
    config.input.update(image_size=112, batch_size=8)      # 7x7 patches
    config.model.update(depth=1)
    config.method.mask.num_masked = 10
    with pytest.raises(FileNotFoundError, match="clip-vit-base-patch16/resolve/main/model.safetensors"):
        state_lib.build(config, get_method(config), parallel.make_mesh([("data", 1), ("fsdp", 1)], jax.devices()[:1]),
                        total_steps=1, warmup_steps=0, global_batch_size=8)
