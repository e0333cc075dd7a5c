"""Released-weight layouts in and out: timm (= official MAE), BEiT (CAE v2), MAE-pytorch (Beyond
Masking) and Hugging Face ViT files give the same features here as in PyTorch; exports load in
timm / transformers with strict key matching; every mismatch is named."""
import argparse
import gc
import json
import os
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mim_jax import parallel, pretrained
from mim_jax.errors import UserFacingError
from mim_jax.models import layers
from mim_jax.weights import files
from mim_jax.weights import tensors as tensor_maps

timm = pytest.importorskip("timm")

IMAGE, PATCH, WIDTH, DEPTH, HEADS = 32, 8, 192, 2, 3     # ViT-Ti width: heads are known without a config.json
GRID = (IMAGE // PATCH, IMAGE // PATCH)


def _mesh():
    return parallel.make_mesh([("data", -1), ("fsdp", 1)])


def _images(channels=3, n=2, seed=0):
    return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, channels)).astype(np.float32)


def _timm_vit(**kwargs):
    torch.manual_seed(0)
    args = dict(img_size=IMAGE, patch_size=PATCH, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, num_classes=0,
                global_pool="token", qkv_bias=True)
    args.update(kwargs)
    model = timm.models.vision_transformer.VisionTransformer(**args).eval()
    with torch.no_grad():   # non-zero biases and norms, so a dropped or transposed tensor shows
        for name, p in model.named_parameters():
            if name.endswith(("bias", "norm1.weight", "norm2.weight", "norm.weight", "gamma")):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "weight" in name else 0.0))
    return model


def _set_fixed_pos(model, kind, with_cls=True):
    table = layers.positions(kind, GRID, WIDTH)
    if with_cls:
        table = np.concatenate([np.zeros((1, WIDTH), np.float32), table])
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(table[None]))


def _torch_tokens(model, images):
    with torch.no_grad():
        return model.forward_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()


def _save(state: dict, path):
    torch.save({"model": {k: v.detach().clone() for k, v in state.items()}}, str(path))
    return path


def _our_tokens(spec, images):
    weights = pretrained.load(spec, _mesh())
    out = weights.method.encode(weights.params, jnp.asarray(images))
    return np.asarray(out["encoded"]), weights


def test_official_mae_layout_gives_timms_features(tmp_path):
    model = _timm_vit()
    _set_fixed_pos(model, "sincos2d")
    path = _save(model.state_dict(), tmp_path / "mae_pretrain_vit_tiny.pth")
    images = _images()
    ours, weights = _our_tokens(f"mae:{path}", images)
    assert weights.config.model.posemb == "sincos2d" and weights.config.model.cls_token
    np.testing.assert_allclose(ours, _torch_tokens(model, images), rtol=2e-5, atol=2e-5)


def test_a_timm_vit_with_learned_positions_loads_its_table_and_cls_position(tmp_path):
    model = _timm_vit()
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)      # the [CLS] row too: it is folded into the [CLS] token
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    images = _images()
    ours, weights = _our_tokens(f"timm:{path}", images)
    assert weights.config.model.posemb == "learn"
    np.testing.assert_allclose(ours, _torch_tokens(model, images), rtol=2e-5, atol=2e-5)


def _beit_state(model):
    """timm's ViT state dict renamed to CAE's BEiT layout, written here independently of the library."""
    out = {}
    for k, v in model.state_dict().items():
        if k.endswith("attn.qkv.bias"):
            q, kb, vb = v.chunk(3)
            assert not kb.any()
            out["encoder." + k.replace("qkv.bias", "q_bias")] = q
            out["encoder." + k.replace("qkv.bias", "v_bias")] = vb
            continue
        out["encoder." + k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2")] = v
    return out


def _zero_key_bias(model):
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.bias[WIDTH:2 * WIDTH] = 0


def test_cae_v2_released_layout_gives_the_same_features(tmp_path):
    # CAE v2 Tiny as released: 12 heads (not DeiT-Ti's 3), and no config.json beside the file.
    model = _timm_vit(init_values=0.1, num_heads=12)
    _zero_key_bias(model)
    _set_fixed_pos(model, "sincos2d_rowfirst")
    state = _beit_state(model)
    state["regressor.blocks.0.norm1.weight"] = torch.ones(WIDTH)   # full CAE checkpoints carry more: ignored
    path = _save(state, tmp_path / "caev2_tiny_300ep.pth")
    images = _images()
    ours, weights = _our_tokens(f"cae_v2:{path}", images)
    m = weights.config.model
    assert (m.posemb, m.qkv_bias, m.layerscale is not None, m.num_heads) == ("sincos2d_rowfirst", "qv", True, 12)
    np.testing.assert_allclose(ours, _torch_tokens(model, images), rtol=2e-5, atol=2e-5)


def test_beyond_masking_layout_gives_the_same_features(tmp_path):
    model = _timm_vit(class_token=False, global_pool="avg", fc_norm=False)
    _zero_key_bias(model)
    _set_fixed_pos(model, "sincos1d", with_cls=False)
    state = {k: v for k, v in _beit_state(model).items() if k != "encoder.pos_embed"}   # not stored there
    state["encoder.cls_token"] = torch.zeros(1, 1, WIDTH)           # MAE-pytorch's unused [CLS]
    state["decoder.head.weight"] = torch.zeros(PATCH * PATCH * 3, 384)
    state["mask_token"] = torch.zeros(1, 1, 384)
    path = _save(state, tmp_path / "checkpoint-399.pth")
    (tmp_path / "config.json").write_text(json.dumps({"image_size": IMAGE, "num_heads": HEADS}))
    images = _images()
    weights = pretrained.load(f"beyond_masking:{path}", _mesh())
    out = weights.method.encode(weights.params, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(out["encoded"]), _torch_tokens(model, images), rtol=2e-5, atol=2e-5)
    assert "cls" in out    # Beyond Masking's global feature (mean patch token) for kNN / linear probes


def test_heads_come_from_the_layouts_known_architectures_or_are_asked_for(tmp_path):
    """The head count is in no tensor: CAE v2's Tiny and Small have 12 (configs/cae_v2.py), and a
    width none of a layout's models has is an error asking for a config.json, never a guess."""
    from configs import cae_v2
    from mim_jax.models import vit
    from mim_jax.weights import vit_layouts
    assert vit_layouts.CAE_V2_HEADS == {vit.decode_variant(f"{v}/16")["width"]: size["num_heads"]
                                        for v, size in cae_v2.SIZES.items()}
    model = _timm_vit(embed_dim=256, num_heads=4, init_values=0.1)
    state = {"encoder." + k: v for k, v in model.state_dict().items()}     # the BEiT layout's names
    path = _save(state, tmp_path / "caev2_256.pth")
    with pytest.raises(UserFacingError, match="num_heads"):
        pretrained.read_config(f"cae_v2:{path}")
    (tmp_path / "config.json").write_text(json.dumps({"num_heads": 4}))
    assert pretrained.read_config(f"cae_v2:{path}").model.num_heads == 4


def test_hugging_face_vit_folder_gives_the_same_features(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                 intermediate_size=4 * WIDTH, image_size=IMAGE, patch_size=PATCH,
                                 layer_norm_eps=1e-6, hidden_act="gelu")
    torch.manual_seed(0)
    model = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        model.embeddings.position_embeddings.normal_(0, 0.5)
    model.save_pretrained(tmp_path / "vit")
    images = _images()
    ours, weights = _our_tokens(f"hf:{tmp_path / 'vit'}", images)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5)


def test_hugging_face_vit_mae_for_pretraining_loads_its_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTMAEConfig(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
                                    intermediate_size=4 * WIDTH, image_size=IMAGE, patch_size=PATCH,
                                    layer_norm_eps=1e-6, mask_ratio=0.0, decoder_hidden_size=64,
                                    decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
                                    decoder_intermediate_size=128)
    torch.manual_seed(0)
    model = transformers.ViTMAEForPreTraining(cfg).eval()
    table = np.concatenate([np.zeros((1, WIDTH), np.float32), layers.positions("sincos2d", GRID, WIDTH)])
    with torch.no_grad():     # as facebook/vit-mae-* hold it (transformers builds it zero until loaded)
        model.vit.embeddings.position_embeddings.copy_(torch.from_numpy(table[None]))
    model.save_pretrained(tmp_path / "vitmae")
    images = _images()
    ours, weights = _our_tokens(str(tmp_path / "vitmae"), images)      # detected: no layout named
    assert weights.config.model.posemb == "sincos2d"
    with torch.no_grad():
        out = model.vit(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
    # ViTMAE shuffles the tokens even at mask ratio 0; ids_restore puts them back in raster order.
    restore = out.ids_restore.numpy()
    ref = out.last_hidden_state.numpy()
    ref = np.concatenate([ref[:, :1], np.take_along_axis(ref[:, 1:], restore[..., None], axis=1)], axis=1)
    np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("problem", ["missing", "extra", "shape"])
def test_a_file_that_does_not_fit_names_the_tensor(tmp_path, problem):
    model = _timm_vit()
    _set_fixed_pos(model, "sincos2d")
    state = dict(model.state_dict())
    name = "blocks.1.mlp.fc1.bias"
    if problem == "missing":
        del state[name]
    elif problem == "extra":
        name = "blocks.1.attn.relative_position_bias_table"
        state[name] = torch.zeros(3)
    else:
        state[name] = torch.zeros(7)
    path = _save(state, tmp_path / "bad.pth")
    with pytest.raises(tensor_maps.MismatchError, match=name.replace(".", r"\.")):
        pretrained.load(f"mae:{path}", _mesh())


def test_a_position_table_of_another_layout_is_an_error_not_a_silent_load(tmp_path):
    model = _timm_vit(init_values=0.1)
    _zero_key_bias(model)
    _set_fixed_pos(model, "sincos2d")          # MAE's column-first table in a BEiT-layout file
    path = _save(_beit_state(model), tmp_path / "caev2.pth")
    weights_config = pretrained.read_config(f"cae_v2:{path}")
    assert weights_config.model.posemb == "sincos2d"   # detected from the table itself, then checked
    # An expected error: one message from mim_jax.main, no traceback.
    with pytest.raises(UserFacingError, match="not mae's"):
        pretrained.read_config(f"mae:{path}")


def test_a_truncated_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(UserFacingError, match="not a readable PyTorch checkpoint"):
        files.read(path)
    safetensors = tmp_path / "broken.safetensors"
    safetensors.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UserFacingError, match="not a readable safetensors file"):
        pretrained.read_config(str(safetensors))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        files.read(tmp_path / "absent.pth")


@pytest.mark.slow   # a run of the command (about 20 s each)
@pytest.mark.parametrize("layout, content, message", [
    ("nosuch", b"", "names the layout 'nosuch', which is not one of beyond_masking, cae_v2, capi"),
    ("mae", b"PK\x03\x04 not really a zip", "is not a readable PyTorch checkpoint")])
def test_the_command_prints_a_wrong_layout_or_a_truncated_file_as_one_message(tmp_path, layout, content, message):
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    path.write_bytes(content)
    out = subprocess.run([sys.executable, "-m", "mim_jax.main", f"--workdir={tmp_path / 'run'}",
                          f"--config=configs/knn.py:init={layout}:{path}"], check=False, capture_output=True,
                         text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), cwd=pathlib.Path(__file__).parents[1],
                         timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.count(message) == 1, out.stderr[-2000:]


def official_training_checkpoint(model, path, **args):
    """As the official scripts' `utils.save_model` writes it (MAE, Beyond Masking's MAE-pytorch,
    CAE): the model, optimizer and loss-scaler states, the epoch and the argparse arguments."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-4, betas=(0.9, 0.95), weight_decay=0.05)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()     # an optimizer state with tensors, as after training
    torch.save({"model": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "epoch": 399,
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                           "_growth_tracker": 0},
                "args": argparse.Namespace(model="pretrain_mae_base_patch16_224", mask_ratio=0.75, input_size=224,
                                           output_dir=str(path.parent), resume="", **args)}, str(path))
    return path


def test_a_training_checkpoint_of_the_official_scripts_loads_without_unpickling_code(tmp_path):
    model = _timm_vit()
    _set_fixed_pos(model, "sincos2d")
    path = official_training_checkpoint(model, tmp_path / "checkpoint-399.pth")
    images = _images()
    ours, _ = _our_tokens(f"mae:{path}", images)
    np.testing.assert_allclose(ours, _torch_tokens(model, images), rtol=2e-5, atol=2e-5)

    # Any other object is refused before it is built: its code never runs.
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")
    torch.save({"model": model.state_dict(), "args": Payload()}, str(tmp_path / "evil.pth"))
    with pytest.raises(UserFacingError, match="not unpickled"):
        files.read(tmp_path / "evil.pth")
    assert not marker.exists()


def test_a_file_rewritten_at_the_same_path_is_read_again(tmp_path):
    """The file cache is keyed by path, size, mtime and inode: a re-export to the same path (same
    size) in one process loads the new tensors, not the cached ones."""
    model = _timm_vit()
    _set_fixed_pos(model, "sincos2d")
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    first = pretrained.load(f"mae:{_save(model.state_dict(), path)}", _mesh())
    time.sleep(0.05)    # past the file system's timestamp granularity (a re-export comes seconds later)
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    second = pretrained.load(f"mae:{_save(model.state_dict(), path)}", _mesh())
    np.testing.assert_array_equal(second.params["encoder"]["encoder_norm"]["scale"], model.norm.weight.detach().numpy())
    assert not np.array_equal(first.params["encoder"]["encoder_norm"]["scale"],
                              second.params["encoder"]["encoder_norm"]["scale"])

# ---- export ---------------------------------------------------------------------------------

FIXTURE_MAE = "tests/fixtures/checkpoints_9ddba71/mae"


def _tiny(name, **extra):
    from configs import common
    arg = {"mae": "local", "cmae": "local", "beyond_masking": "local",
           "cae_v2": f"local,teacher=run:{FIXTURE_MAE}"}[name]
    c = common.pretrain_config(f"{name}:{arg}")
    c.model.update(width=32, depth=2, num_heads=2, mlp_dim=64, **extra)
    return c


def _perturbed(weights, seed=0):
    """Random weights everywhere (zero-initialised biases and constant LayerScale would hide a
    dropped or misplaced tensor)."""
    leaves, tree = jax.tree.flatten(weights.params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    weights.params = jax.tree.unflatten(tree, leaves)
    return weights


def _random_weights(name, **extra):
    return _perturbed(pretrained.random_init(_tiny(name, **extra), _mesh()))


def _timm_from_export(out):
    cfg = json.loads((out / "config.json").read_text())
    model = timm.create_model(cfg["architecture"], pretrained=True, **cfg["model_args"],
                              pretrained_cfg_overlay=dict(cfg["pretrained_cfg"], file=str(out / "model.safetensors")))
    same = timm.create_model(f"local-dir:{out}", pretrained=True)      # timm's own folder format
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))
    return model.eval()


_SLOW = pytest.mark.slow   # the other methods' exports: the MAE export is in the default tier


@pytest.mark.parametrize("name,extra", [("mae", {}), pytest.param("cae_v2", {}, marks=_SLOW),
                                        pytest.param("beyond_masking", {}, marks=_SLOW),
                                        pytest.param("cmae", {}, marks=_SLOW),
                                        pytest.param("mae", {"scan": True}, marks=_SLOW)])
def test_export_to_timm_loads_strictly_and_gives_the_same_features(tmp_path, name, extra):
    from mim_jax import export
    weights = _random_weights(name, **extra)
    export.export_timm(weights, tmp_path)
    model = _timm_from_export(tmp_path)     # timm loads pretrained files with strict=True
    assert "mask_token" not in model.state_dict()
    size, channels = weights.config.input.image_size, weights.config.input.channels
    images = np.random.default_rng(1).normal(size=(2, size, size, channels)).astype(np.float32)
    ours = weights.method.encode(weights.params, jnp.asarray(images))["encoded"]
    np.testing.assert_allclose(np.asarray(ours), _torch_tokens(model, images), rtol=1e-5, atol=1e-5)
    # ... and the export imports back exactly, into the same architecture.
    back = pretrained.load(f"timm:{tmp_path / 'model.safetensors'}", _mesh())
    for key in ("posemb", "qkv_bias", "cls_token"):
        assert back.config.model[key] == weights.config.model[key]
    original = layers.unstack_blocks(weights.params["encoder"])
    jax.tree.map(np.testing.assert_array_equal, back.params["encoder"], original)


def test_the_timm_export_names_the_models_size_and_loads_strictly(tmp_path):
    """The local preset's 4-block ViT-Ti/4 at 28x28 is timm's tiny (not vit_base_patch16_224), with
    what the name does not say in the description."""
    from configs import common
    from mim_jax import export
    weights = _perturbed(pretrained.random_init(common.pretrain_config("mae:local"), _mesh()))
    config = export.export_timm(weights, tmp_path)
    description = ("ViT-Ti/4, 4 blocks (timm's tiny has 12), 28x28 pixels, 1 channel; built as "
                   "vit_tiny_patch16_224 with model_args")
    assert (config["architecture"], config["pretrained_cfg"]["description"]) == ("vit_tiny_patch16_224", description)
    model = _timm_from_export(tmp_path)
    assert model.pretrained_cfg["description"] == description
    assert (len(model.blocks), model.embed_dim, model.patch_embed.patch_size) == (4, 192, (4, 4))


@pytest.mark.parametrize("width, patch, size, name", [
    (768, 16, 224, "vit_base_patch16_224"), (384, 8, 224, "vit_small_patch8_224"),
    (1024, 16, 384, "vit_large_patch16_384"), (1024, 14, 196, "vit_large_patch14_224"),
    (192, 4, 28, "vit_tiny_patch16_224"), (32, 4, 16, "vit_base_patch16_224")])
def test_timm_architecture_is_timms_own_name_or_the_nearest_registered(width, patch, size, name):
    from types import SimpleNamespace

    from mim_jax.weights import folders
    assert folders.timm_architecture(SimpleNamespace(width=width, patch_size=patch), size) == name
    assert all(timm.is_model(arch) for arch in folders.TIMM_ARCHS)


@pytest.mark.parametrize("name", ["mae", "cae_v2", "beyond_masking", "cmae"])
def test_official_export_imports_back_exactly(tmp_path, name):
    from mim_jax import export
    weights = _random_weights(name)
    path = export.export_official(weights, tmp_path)
    keys = ("encoder", "decoder") if name == "mae" else ("encoder",)
    state = torch.load(path, weights_only=True)
    assert state["mim_jax"]["weights"] == "student" and "model" in state
    assert json.loads((tmp_path / "config.json").read_text())["num_heads"] == 2   # what tensors cannot say
    back = pretrained.load(f"{name}:{path}", _mesh(), keys=keys)     # cmae: is timm: (CMAE's official is MAE's)
    for key in keys:
        jax.tree.map(np.testing.assert_array_equal, back.params[key], weights.params[key])
    for field in ("posemb", "qkv_bias", "cls_token", "num_heads"):
        assert back.config.model[field] == weights.config.model[field]


@pytest.mark.parametrize("name", ["mae", pytest.param("cmae", marks=_SLOW)])
def test_export_to_hugging_face_gives_the_same_features(tmp_path, name):
    """transformers loads every tensor of the folder and needs no other; its features and those of
    the folder imported back (hf:) equal the run's."""
    transformers = pytest.importorskip("transformers")
    from mim_jax import export
    weights = _random_weights(name)
    export.export_hf(weights, tmp_path)
    model, info = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}     # no missing, unexpected or mis-shaped tensors
    size = weights.config.input.image_size
    images = np.random.default_rng(2).normal(size=(2, size, size, 1)).astype(np.float32)
    with torch.no_grad():
        ref = model.eval()(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2)).last_hidden_state.numpy()
    ours = weights.method.encode(weights.params, jnp.asarray(images))["encoded"]
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5)
    back, _ = _our_tokens(f"hf:{tmp_path}", images)
    np.testing.assert_allclose(back, np.asarray(ours), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, why, works", [("cae_v2", "no LayerScale", "--format=timm"),
                                              ("beyond_masking", "a [CLS] token", "--format=timm")])
def test_the_hugging_face_export_names_the_format_that_works(tmp_path, name, why, works):
    from mim_jax import export
    with pytest.raises(ValueError) as info:
        export.export_hf(_random_weights(name), tmp_path)
    assert why in str(info.value) and works in str(info.value)


def test_the_export_command_records_run_step_and_weights(tmp_path):
    from mim_jax import export
    export.export(FIXTURE_MAE, "timm", tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())["mim_jax"]
    assert meta == {"run": FIXTURE_MAE, "step": 2, "method": "mae", "weights": "student"}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert f.metadata()["step"] == "2"


def test_a_warm_start_continues_mae_pretraining_from_the_official_full_layout(tmp_path):
    from mim_jax import export
    from mim_jax.methods import get_method
    from mim_jax.training import state as state_lib
    weights = _random_weights("mae")
    path = export.export_official(weights, tmp_path)
    config = _tiny("mae")
    config.init, config.init_keys = f"mae:{path}", ("encoder", "decoder")
    setup = state_lib.build(config, get_method(config), _mesh(), total_steps=2, warmup_steps=1,
                            global_batch_size=config.input.batch_size)
    state = setup.create(jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, state.params, weights.params)


@pytest.mark.slow   # tests/test_interop_capi.py checks the export against the official model
def test_capi_official_export_imports_back_through_the_generic_loader(tmp_path):
    """The released CAPI layout (tested against a PyTorch reference in test_interop_capi.py) also
    goes through `pretrained.load`: the architecture is read from the file, the backbone restored."""
    from configs import common
    from mim_jax import export
    config = common.pretrain_config("capi:local")
    weights = _perturbed(pretrained.random_init(config, _mesh()))
    path = export.export_official(weights, tmp_path)
    back = pretrained.load(f"capi:{path}", _mesh())
    assert back.config.input.image_size == config.input.image_size      # recorded by the export (28 px)
    for key in ("encoder", "predictor"):
        jax.tree.map(np.testing.assert_array_equal, back.params[key], layers.unstack_blocks(weights.params[key]))
    size = config.input.image_size
    images = jnp.asarray(np.random.default_rng(3).normal(size=(2, size, size, 1)), jnp.float32)
    np.testing.assert_allclose(back.method.encode(back.params, images)["cls"],
                               weights.method.encode(weights.params, images)["cls"], rtol=1e-5, atol=1e-5)


FIXTURES = "tests/fixtures/checkpoints_9ddba71"


@pytest.mark.parametrize("run, fmt, spec", [
    ("mae", "timm", "timm:{out}/model.safetensors"),
    pytest.param("mae", "hf", "hf:{out}", marks=_SLOW),
    pytest.param("mae", "official", "mae:{out}/checkpoint.pth", marks=_SLOW),
    pytest.param("cae_v2", "timm", "timm:{out}/model.safetensors", marks=_SLOW),
    pytest.param("cae_v2", "official", "cae_v2:{out}/checkpoint.pth", marks=_SLOW)])
def test_evaluating_an_exported_file_equals_evaluating_the_run(tmp_path, fashion_mnist_dir, run, fmt, spec):
    """kNN on Fashion-MNIST from a fixture run's workdir and from its export (init=<layout>:FILE).
    The CAPI fixture run's MLPs are twice its width, which the official layout (4 x) cannot hold:
    its export's features are compared in test_capi_official_export_imports_back_through_the_generic_loader."""
    from configs import knn
    from mim_jax import export
    from mim_jax.evaluators import run as evaluate
    export.export(f"{FIXTURES}/{run}", fmt, tmp_path / fmt)
    results = {}
    for name, init in [("run", f"{FIXTURES}/{run}"), ("file", spec.format(out=tmp_path / fmt))]:
        config = knn.get_config(f"init={init},dataset=fashion_mnist")
        config.update(max_train_examples=512, max_eval_examples=256, batch_size=128, data_dir=fashion_mnist_dir)
        results[name] = evaluate.evaluate(config, tmp_path / name)
    assert results["file"]["knn_top1"] == results["run"]["knn_top1"]


def test_a_beyond_masking_timm_export_keeps_the_methods_global_feature(tmp_path):
    """Beyond Masking has no [CLS]: its global feature is the mean patch token, imported from a timm
    export as from the run (the kNN and linear probes read feature='cls')."""
    from mim_jax import export
    from mim_jax.evaluators import encoder as encoder_lib
    weights = _random_weights("beyond_masking")
    export.export_timm(weights, tmp_path)
    init = f"timm:{tmp_path / 'model.safetensors'}"
    assert pretrained.read_config(init).method.name == "beyond_masking"
    size, channels = weights.config.input.image_size, weights.config.input.channels
    images = jnp.asarray(np.random.default_rng(4).normal(size=(2, size, size, channels)), jnp.float32)
    features = encoder_lib.load(init, _mesh(), feature="cls").features(images)
    expected = weights.method.encode(weights.params, images)["cls"]
    np.testing.assert_allclose(np.asarray(features), np.asarray(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.slow   # trains CAE v2 from an exported MAE file (about 15 s)
def test_a_released_mae_file_is_a_cae_v2_teacher(tmp_path):
    """teacher=mae:FILE distils the file's encoder: its targets are that encoder's tokens."""
    from configs import cae_v2
    from mim_jax import export
    from mim_jax.methods import get_method, resolve_config
    from mim_jax.training import state as state_lib
    weights = _random_weights("mae")
    path = export.export_official(weights, tmp_path)
    config = cae_v2.get_config(f"local,teacher=mae:{path}")
    config.model.update(width=32, depth=2, num_heads=2, mlp_dim=64)
    config.regressor.update(width=16, num_heads=2)
    config = resolve_config(config)
    assert config.teacher.dim == 32                     # read from the file when the run starts
    method = get_method(config)
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    setup = state_lib.build(config, method, mesh, total_steps=2, warmup_steps=1, global_batch_size=8)
    assert set(setup.frozen["teacher"]) == {"encoder"}  # the decoder in the file is not loaded
    size = config.input.image_size
    images = jax.random.normal(jax.random.key(0), (8, size, size, 1))
    _, out = weights.method.encoder.apply({"params": weights.params["encoder"]}, images)
    expected = np.concatenate([out["cls"][:, None], out["patch_tokens"]], 1)
    np.testing.assert_allclose(method.teacher(setup.frozen["teacher"], images), expected, atol=1e-5)


def test_a_warm_start_at_another_resolution_resamples_learned_positions_as_timm(tmp_path):
    from configs import common
    from mim_jax.methods import get_method
    from mim_jax.training import state as state_lib
    model = _timm_vit(in_chans=1)
    with torch.no_grad():
        model.pos_embed.normal_(0, 0.5)
    path = _save(model.state_dict(), tmp_path / "vit.pth")
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.5], "std": [0.5]}}))
    config = common.pretrain_config("mae:local")
    config.model.update(variant="Ti/8", depth=DEPTH, posemb="learn")
    config.input.image_size = 48                         # 6 x 6 patches instead of the file's 4 x 4
    config.init = f"timm:{path}"
    setup = state_lib.build(config, get_method(config), _mesh(), total_steps=2, warmup_steps=1,
                            global_batch_size=config.input.batch_size)
    table = np.asarray(setup.create(jax.random.key(0)).params["encoder"]["pos_embedding"])
    ref = timm.layers.resample_abs_pos_embed(model.pos_embed[:, 1:].detach(), new_size=(6, 6), old_size=GRID,
                                             num_prefix_tokens=0, interpolation="bicubic", antialias=False)
    np.testing.assert_allclose(table, ref[0].numpy(), rtol=1e-5, atol=1e-5)


def test_a_warm_start_from_a_file_of_another_architecture_names_what_differs(tmp_path):
    """Shapes do not show a sin-cos table of the other layout or another head count: a warm start
    compares every fact the file's description states with the run's model."""
    from configs import common
    from mim_jax.training import state as state_lib
    from mim_jax.methods import get_method
    model = _timm_vit(in_chans=1)
    _set_fixed_pos(model, "sincos2d")        # MAE's column-first table, 3 heads
    path = _save(model.state_dict(), tmp_path / "mae_pretrain_vit_tiny.pth")
    (tmp_path / "config.json").write_text(json.dumps({"pretrained_cfg": {"mean": [0.5], "std": [0.5]}}))

    def warm_start(**model_fields):
        config = common.pretrain_config("mae:local")
        config.model.update(variant="Ti/8", depth=DEPTH, **model_fields)
        config.input.image_size = IMAGE
        config.init = f"mae:{path}"
        setup = state_lib.build(config, get_method(config), _mesh(), total_steps=2, warmup_steps=1,
                                global_batch_size=config.input.batch_size)
        return setup.create(jax.random.key(0))
    with pytest.raises(UserFacingError) as info:
        warm_start(posemb="sincos2d_rowfirst", num_heads=6)
    message = str(info.value)
    assert "model.posemb (the file's 'sincos2d', this run's 'sincos2d_rowfirst')" in message
    assert "model.num_heads (the file's 3, this run's 6)" in message
    assert "qkv_bias" not in message
    warm_start(posemb="sincos2d", num_heads=HEADS)      # the file's architecture starts
    # MAE's decoder, where it is loaded: its sizes too.
    from mim_jax import export
    (tmp_path / "full").mkdir()
    export.export_official(_random_weights("mae"), tmp_path / "full")
    file = f"mae:{tmp_path / 'full' / 'checkpoint.pth'}"
    desc = pretrained.load(file, _mesh(), keys=("encoder", "decoder")).imported
    assert desc.extra["decoder"]["posemb"] == "sincos2d" and desc.extra["decoder"]["embed_bias"] is True
    for key, stated in [("encoder", desc.model), ("decoder", desc.extra["decoder"])]:   # every fact is compared
        assert set(stated) <= set(pretrained.STATED[key][1].values())
    config = _tiny("mae")
    config.decoder.update(num_heads=1, posemb="sincos1d", embed_bias=False)
    config.init, config.init_keys = file, ("encoder", "decoder")
    setup = state_lib.build(config, get_method(config), _mesh(), total_steps=2, warmup_steps=1,
                            global_batch_size=config.input.batch_size)
    with pytest.raises(UserFacingError) as info:
        setup.create(jax.random.key(0))
    for part in ["decoder.num_heads (the file's 4, this run's 1)", "decoder.posemb (the file's 'sincos2d', this run's "
                 "'sincos1d')", "decoder.embed_bias (the file's True, this run's False)"]:
        assert part in str(info.value)


@pytest.mark.slow
def test_vit_large_converts_on_the_host_and_lands_sharded_on_an_fsdp_mesh(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0).eval()
    table = np.concatenate([np.zeros((1, 1024), np.float32), layers.positions("sincos2d", (14, 14), 1024)])
    with torch.no_grad():
        model.pos_embed.copy_(torch.from_numpy(table[None]))
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    images = np.random.default_rng(0).normal(size=(1, 224, 224, 3)).astype(np.float32)
    expected = _torch_tokens(model, images)
    del model   # 1.2 GB: the test's peak memory stays near one copy of the weights per framework
    gc.collect()
    mesh = parallel.make_mesh([("data", 2), ("fsdp", 4)])
    weights = pretrained.load(f"mae:{tmp_path / 'model.safetensors'}", mesh)
    assert weights.method.encoder.depth == 24
    qkv = weights.params["encoder"]["encoder"]["block_23"]["attn"]["qkv"]["kernel"]
    assert qkv.shape == (1024, 3072) and qkv.sharding.spec[0] == "fsdp"   # weights sharded, not replicated
    assert {s.data.shape for s in qkv.addressable_shards} == {(256, 3072)}
    # Compiled as one program, as the evaluators run it: op-by-op dispatch of sharded arrays on
    # jaxlib 0.10.2's CPU client aborted the process about one run in eight.
    ours = jax.jit(weights.method.encode)(weights.params, jnp.asarray(images))["encoded"]
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-4, atol=1e-4)


def test_fine_tuning_starts_from_a_released_file(tmp_path):
    from configs import finetune
    from mim_jax import export
    from mim_jax.methods import get_method, resolve_config
    from mim_jax.training import state as state_lib
    weights = _random_weights("mae")
    export.export_timm(weights, tmp_path)
    config = finetune.get_config(f"init=timm:{tmp_path / 'model.safetensors'},dataset=fashion_mnist,local")
    config = resolve_config(config)
    assert config.method.num_classes == 10 and config.input.mean == weights.config.input.mean
    setup = state_lib.build(config, get_method(config), _mesh(), total_steps=2, warmup_steps=1,
                            global_batch_size=config.input.batch_size)
    encoder = setup.create(jax.random.key(0)).params["encoder"]
    jax.tree.map(np.testing.assert_array_equal, encoder, weights.params["encoder"])
