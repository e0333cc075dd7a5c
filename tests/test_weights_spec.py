"""Naming weights: the spec grammar (`weights.spec`), layout detection (`weights.registry`) and
which layout each method exports to."""
import importlib
import json
import pathlib

import numpy as np
import pytest
import torch

from mim_jax import pretrained
from mim_jax.errors import UserFacingError
from mim_jax.methods import REGISTRY
from mim_jax.weights import registry, spec as weight_spec
from mim_jax.weights.layout import Layout
from mim_jax.weights.spec import File, Hub, Run

from test_interop import (_beit_state, _save, _set_fixed_pos, _timm_vit, _zero_key_bias,
                          IMAGE, PATCH, WIDTH)


def test_each_form_parses_to_its_value(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    folder = tmp_path / "vit"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    assert weight_spec.parse(f"run:{workdir}") == Run(str(workdir))
    assert weight_spec.parse(str(workdir)) == Run(str(workdir))                 # the prefix may be left out
    assert weight_spec.parse("gs://bucket/runs/mae") == Run("gs://bucket/runs/mae")
    assert weight_spec.parse("mae:/ckpt/mae_pretrain_vit_base.pth") == File(
        pathlib.Path("/ckpt/mae_pretrain_vit_base.pth"), "mae")
    assert weight_spec.parse("cmae:/x/model.safetensors").layout == "cmae"     # an alias of timm's
    assert weight_spec.parse("/hub/model.safetensors") == File(pathlib.Path("/hub/model.safetensors"))
    assert weight_spec.parse("~/ViT-B-16.pt") == File(pathlib.Path("~/ViT-B-16.pt").expanduser())
    assert weight_spec.parse(str(folder)) == File(folder)                      # a model folder, not a workdir
    assert weight_spec.parse("openai/clip-vit-base-patch16") == Hub("openai/clip-vit-base-patch16")
    assert weight_spec.parse(workdir) == Run(str(workdir))                      # a pathlib.Path too


def test_an_unknown_prefix_is_one_error_naming_the_known_layouts():
    with pytest.raises(UserFacingError) as err:
        weight_spec.parse("maee:/ckpt/mae_pretrain_vit_base.pth")
    message = str(err.value)
    assert "'maee'" in message and "run:" in message
    assert all(name in message for name in ("timm", "mae", "cmae", "hf", "cae_v2", "beyond_masking", "capi",
                                            "openai_clip"))
    with pytest.raises(UserFacingError, match="'maee'"):
        pretrained.read_config("maee:/ckpt/mae_pretrain_vit_base.pth")


def test_what_a_teacher_reads_as_an_encoder():
    encoder = ["run:/runs/mae", "mae:/ckpt/mae.pth", "capi:/ckpt/capi_vitl14_lvd.pth"]
    clip = ["/ckpt/ViT-B-16.pt", "openai/clip-vit-base-patch16", "openai_clip:/ckpt/ViT-B-16.pt",
            "/models/clip/model.safetensors"]
    assert [weight_spec.names_an_encoder(weight_spec.parse(s)) for s in encoder + clip] == \
        [True] * len(encoder) + [False] * len(clip)


def _fake_state(names):
    return {n: torch.zeros(1) for n in names}


def _openai_clip_state():
    return _fake_state(["visual.conv1.weight", "visual.transformer.resblocks.0.ln_1.weight", "visual.proj",
                        "transformer.resblocks.0.ln_1.weight"])


def _capi_state():
    return _fake_state(["backbone.patch_embed.weight", "backbone.encoder.blocks.0.residual1.norm.weight"])


@pytest.fixture(scope="module")
def files_of_each_layout(tmp_path_factory):
    """A small file of every layout, written as the tests of each import write them."""
    root = tmp_path_factory.mktemp("layouts")
    model = _timm_vit()
    _set_fixed_pos(model, "sincos2d")
    beit = _timm_vit(init_values=0.1)
    _zero_key_bias(beit)
    _set_fixed_pos(beit, "sincos2d_rowfirst")
    mae_pytorch = {k: v for k, v in _beit_state(beit).items() if k != "encoder.pos_embed"}
    transformers = pytest.importorskip("transformers")
    hf = transformers.ViTModel(transformers.ViTConfig(
        hidden_size=WIDTH, num_hidden_layers=1, num_attention_heads=3, intermediate_size=4 * WIDTH, image_size=IMAGE,
        patch_size=PATCH), add_pooling_layer=False)
    hf.save_pretrained(root / "hf")
    return {"timm": _save(model.state_dict(), root / "mae_pretrain_vit_tiny.pth"),
            "cae_v2": _save(_beit_state(beit), root / "caev2.pth"),
            "beyond_masking": _save(mae_pytorch, root / "checkpoint-399.pth"),
            "hf": root / "hf",
            "capi": _save(_capi_state(), root / "capi.pth"),
            "openai_clip": _save(_openai_clip_state(), root / "ViT-B-16.pth")}


@pytest.mark.parametrize("layout", ["timm", "cae_v2", "beyond_masking", "hf", "capi", "openai_clip"])
def test_detection_picks_the_layout_of_each_kind_of_file(files_of_each_layout, layout):
    path = files_of_each_layout[layout]
    spec = weight_spec.parse(str(path))
    assert spec == File(path)                                  # no layout named: detected
    assert registry.detect(registry.read(spec.path)).name == layout


def test_a_described_file_names_its_layout_and_method(files_of_each_layout):
    (files_of_each_layout["beyond_masking"].parent / "config.json").write_text(json.dumps({"image_size": IMAGE,
                                                                                           "num_heads": 3}))
    described = {name: registry.describe(files_of_each_layout[name])
                 for name in ("timm", "cae_v2", "beyond_masking", "hf")}
    assert {k: (d.layout, d.config_name) for k, d in described.items()} == {
        "timm": ("timm", "mae"), "cae_v2": ("cae_v2", "mae"), "beyond_masking": ("beyond_masking", "beyond_masking"),
        "hf": ("hf", "mae")}
    assert registry.describe(files_of_each_layout["timm"], "mae").layout == "mae"   # same family, named
    with pytest.raises(ValueError, match="OpenAI CLIP checkpoint: use it as CAE v2's teacher"):
        pretrained.read_config(str(files_of_each_layout["openai_clip"]))


def test_every_method_exports_to_a_registered_layout():
    for name, target in REGISTRY.items():
        module, cls = target.split(":")
        layout = registry.get(getattr(importlib.import_module(module), cls).weight_layout)
        assert type(layout).from_params is not Layout.from_params, name


def test_detection_of_an_unknown_file_names_the_known_layouts():
    with pytest.raises(ValueError, match="Unrecognised weight layout.*beyond_masking"):
        registry.detect({"model.conv.weight": np.zeros(1)})
