"""CAE v2's frozen feature teachers: the targets of its feature distillation (CLIP by default).

A teacher turns the student's batch into per-token target features [B, (1+)N, D] on the same
patch grid as the student. It lives in the method's `frozen` tree: sharded by logical axis names
like the student, run in its own dtype, with no gradients and no optimizer state.

`source` is a weights spec (`weights.spec`) that picks one:
- `run:DIR`: the encoder of any pre-training workdir of this project (its newest checkpoint), so
  distillation works offline with a teacher trained here;
- `<layout>:FILE`: the encoder of a released ViT checkpoint of another codebase
  (`mae:/ckpt/mae_pretrain_vit_base.pth`, `timm:`, `hf:`, `capi:`, ...; see `weights/registry.py`);
- anything else is a CLIP checkpoint: Hugging Face (`openai/clip-vit-base-patch16`, a folder with
  model.safetensors + config.json, or the .safetensors file itself) or one of OpenAI's own files
  (`ViT-B-16.pt`): see `weights/clip.py`.

A run records the teacher's output width in `config.teacher.dim` (`output_dim`, called once when
the run starts, by `CAEv2.resolve_config`); the weights are read only by `load`, so building a
method to evaluate its trained encoder never touches the teacher.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import flops, parallel, pretrained
from mim_jax.methods import get_method
from mim_jax.models import clip, vit
from mim_jax.weights import clip as clip_weights, spec as weight_spec

# The two recipe towers' shapes (their config.json): no hub request for it, and a step compiles
# (mim_jax.aot) without the weights.
CLIP_TOWERS = {
    "openai/clip-vit-base-patch16": dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072,
                                         proj_dim=512, image_size=224, layer_norm_eps=1e-5),
    "openai/clip-vit-large-patch14": dict(patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
                                          proj_dim=768, image_size=224, layer_norm_eps=1e-5),
}


def renormalize(images, src_mean, src_std, dst_mean, dst_std, size: int | None = None):
    """Re-expresses images normalised with (src_mean, src_std) in (dst_mean, dst_std), resized
    bicubically to `size` if given: the teacher sees the student's crop with its own statistics."""
    src_mean, src_std, dst_mean, dst_std = (jnp.asarray(v, jnp.float32) for v in (src_mean, src_std, dst_mean, dst_std))
    x = (images.astype(jnp.float32) * src_std + src_mean - dst_mean) / dst_std
    if size is not None and size != images.shape[1]:
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "bicubic")
    return x


class ClipTeacher:
    """OpenAI CLIP vision tower (Hugging Face weights): all tokens after ln_post and the visual
    projection, the CAE v2 target (docs/methods/cae_v2.md §2)."""

    def __init__(self, source: str, *, grid: tuple[int, int], student_mean, student_std, dtype="bfloat16",
                 out_dim: int | None = None):
        self.source, self.grid, self.dtype = source, tuple(grid), jnp.dtype(dtype)
        self.student_mean, self.student_std = student_mean, student_std
        self._out_dim = out_dim

    @functools.cached_property
    def _fields(self) -> dict:
        if self.source in CLIP_TOWERS:
            return dict(CLIP_TOWERS[self.source])
        return clip_weights.vision_fields(self.source)

    @functools.cached_property
    def tower(self):
        return clip.CLIPVisionTower(**self._fields, dtype=self.dtype)

    @property
    def out_dim(self) -> int:
        if self._out_dim is None:
            self._out_dim = self._fields["proj_dim"] or self._fields["width"]
        return self._out_dim

    has_cls = True

    @property
    def input_size(self) -> int:
        # The teacher's patch grid must be the student's: e.g. CLIP-L/14 sees 14*14 = 196 pixels
        # for a 14x14 student grid; the tower interpolates its position table to that grid.
        return self.grid[0] * self.tower.patch_size

    def init(self, rng, images):
        return self.tower.init(rng, jnp.zeros((1, self.input_size, self.input_size, 3), jnp.float32))["params"]

    def load(self, abstract, shardings):
        _, params = clip_weights.load_clip_vision(self.source)
        _check_same_shapes(params, abstract, f"CLIP weights from {self.source}")
        return parallel.place(jax.tree.map(lambda x: np.asarray(x, self.dtype), params), shardings)

    def __call__(self, params, images):
        x = renormalize(images, self.student_mean, self.student_std, clip.CLIP_MEAN, clip.CLIP_STD, self.input_size)
        return self.tower.apply({"params": params}, x.astype(self.dtype)).astype(jnp.float32)

    def forward_flops(self) -> float:
        t = self.tower
        n = self.grid[0] * self.grid[1]
        return flops.vit_forward(t, n, channels=3) + (flops.dense(n + 1, t.width, t.proj_dim) if t.proj_dim else 0.0)


class RunTeacher:
    """The encoder of a pre-training workdir of this project, or of a released ViT file (a weights
    spec): its final-norm tokens ([CLS] first if it has one; registers dropped). Only the encoder
    is held and loaded (a decoder or predictor would be dead weight)."""

    def __init__(self, workdir: str, *, grid: tuple[int, int], student_mean, student_std, out_dim: int | None = None):
        self.workdir, self.grid = workdir, tuple(grid)
        self.student_mean, self.student_std = student_mean, student_std
        self._out_dim = out_dim

    @functools.cached_property
    def config(self):
        return pretrained.read_config(self.workdir)

    @functools.cached_property
    def method(self):
        method = get_method(self.config)
        if method.encoder is None:
            raise ValueError(f"The run in {self.workdir} ({self.config.method.name}) has no ViT encoder to distil from.")
        return method

    @property
    def out_dim(self) -> int:
        if self._out_dim is None:
            self._out_dim = self.method.encoder.width
        return self._out_dim

    @property
    def has_cls(self) -> bool:
        return self.method.encoder.cls_token

    @property
    def input_size(self) -> int:
        return self.grid[0] * self.method.encoder.patch_size

    def _batch(self, images):
        size, channels = self.input_size, self.config.input.channels
        return {"image": jnp.zeros((images.shape[0], size, size, channels), jnp.float32),
                "label": jnp.zeros(images.shape[0], jnp.int32), "index": jnp.arange(images.shape[0], dtype=jnp.int32)}

    def init(self, rng, images):
        return {"encoder": self.method.init_params(rng, self._batch(images))["encoder"]}

    def load(self, abstract, shardings):
        if self.out_dim != self.method.encoder.width:
            raise ValueError(f"config.teacher.dim={self.out_dim}, but the encoder in {self.workdir} is "
                             f"{self.method.encoder.width} wide: leave config.teacher.dim unset, and the run "
                             "reads it from the teacher when it starts.")
        weights = pretrained.load(self.workdir, jax.tree.leaves(shardings)[0].mesh, keys=("encoder",))
        params = {"encoder": weights.params["encoder"]}    # CAPI's evaluation weights also hold its EMA predictor
        _check_same_shapes(params, abstract, f"the encoder in {weights.description}")
        return jax.device_put(params, shardings)

    def __call__(self, params, images):
        inp = self.config.input
        if images.shape[-1] != inp.channels:
            raise ValueError(f"The teacher in {self.workdir} takes {inp.channels}-channel images, "
                             f"the student {images.shape[-1]}.")
        x = renormalize(images, self.student_mean, self.student_std, inp.mean, inp.std, self.input_size)
        _, out = self.method.encoder.apply({"params": params["encoder"]}, x)
        tokens = out["patch_tokens"]
        if self.has_cls:
            tokens = jnp.concatenate([out["cls"][:, None], tokens], axis=1)
        return tokens.astype(jnp.float32)

    def forward_flops(self) -> float:
        return flops.vit_forward(self.method.encoder, self.grid[0] * self.grid[1], self.config.input.channels)


def _check_same_shapes(params, abstract, what: str):
    flat = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    want = dict(jax.tree_util.tree_flatten_with_path(abstract)[0])
    if flat.keys() != want.keys():
        missing = sorted(jax.tree_util.keystr(k) for k in want.keys() - flat.keys())[:5]
        extra = sorted(jax.tree_util.keystr(k) for k in flat.keys() - want.keys())[:5]
        raise ValueError(f"{what} do not match the teacher architecture: missing {missing}, unexpected {extra}.")
    bad = [f"{jax.tree_util.keystr(k)}: {np.shape(flat[k])} != {want[k].shape}" for k in want
           if tuple(np.shape(flat[k])) != tuple(want[k].shape)]
    if bad:
        raise ValueError(f"{what} have the wrong shapes for the teacher: {bad[:5]}.")


def _check_source(source: str) -> None:
    if not source:
        raise ValueError("config.teacher.source is empty: give a CLIP checkpoint (e.g. "
                         "'openai/clip-vit-base-patch16' or a local folder) or run:<pre-training workdir>.")


def output_dim(source: str) -> int:
    """Width of the target tokens of the teacher `source`, read from its config (a run's saved
    config, or the CLIP config.json; online, a hub id fetches only that file). Called once when a
    run starts, so the run records its target width and its trained model can be rebuilt later
    without the teacher."""
    _check_source(source)
    if weight_spec.names_an_encoder(weight_spec.parse(source)):
        model = pretrained.read_config(source).model
        return model.width or vit.decode_variant(model.variant)["width"]
    fields = CLIP_TOWERS.get(source) or clip_weights.vision_fields(source)
    return fields["proj_dim"] or fields["width"]


def from_config(teacher_config, *, grid, student_mean, student_std):
    """`config.teacher` = {source, dtype, dim} -> a teacher on the student's patch grid."""
    source = teacher_config.source
    _check_source(source)
    common = dict(grid=grid, student_mean=student_mean, student_std=student_std, out_dim=teacher_config.dim)
    if weight_spec.names_an_encoder(weight_spec.parse(source)):
        return RunTeacher(source, **common)
    return ClipTeacher(source, dtype=teacher_config.dtype, **common)
