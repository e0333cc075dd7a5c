"""Transformer layers shared by every model: attention, MLP, pre-norm blocks and block stacks,
norms, drop path, patchify, fixed position tables, logical-axis helpers.

Conventions:
- Parameters are fp32; matmuls run in `dtype` (bf16 on accelerators).
- Every weight carries logical axis names (`param_init`) and every activation a logical
  constraint (`constrain`); the mapping to mesh axes lives in the config, never here.
- Layers with more than three fields are always built with keyword arguments.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mim_jax import parallel
from mim_jax.models import rope as rope_lib

Dtype = Any
TOKENS = ("act_batch", "act_len", "act_emb")


def constrain(x, names: Sequence[str | None]):
    """The single place activations get their logical sharding names."""
    return nn.with_logical_constraint(x, tuple(names))


def param_init(init: Callable, names: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(names))


def l2_normalize(x, eps: float = 1e-12):
    """torch.nn.functional.normalize: x / max(||x||, eps) over the last axis."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# ---- images and positions ---------------------------------------------------------------------

def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, patch*patch*C] in raster order (row-major over the grid)."""
    b, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"Image size {h}x{w} is not divisible by the patch size {patch}.")
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches, patch: int, channels: int):
    """Inverse of `patchify` for a square grid: [B, N, p*p*C] -> [B, H, W, C]."""
    b, n, _ = patches.shape
    side = int(round(n ** 0.5))
    if side * side != n:
        raise ValueError(f"unpatchify needs a square grid, got {n} patches.")
    x = patches.reshape(b, side, side, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, side * patch, side * patch, channels)


def sincos_2d(grid_h: int, grid_w: int, width: int, row_first: bool = False) -> np.ndarray:
    """Fixed 2-D sin-cos positions [grid_h*grid_w, width], each half as [sin | cos].

    MAE's layout (default) encodes the column (w) coordinate in the first half and the row in the
    second; BEiT/CAE's (`row_first=True`) the other way round. The network learns whichever it
    was trained with, so released weights need their own layout."""
    if width % 4:
        raise ValueError(f"sin-cos positions need a width divisible by 4, got {width}.")
    quarter = width // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    hh, ww = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                         np.arange(grid_w, dtype=np.float64), indexing="ij")

    def encode(pos):
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    halves = [encode(hh), encode(ww)] if row_first else [encode(ww), encode(hh)]
    return np.concatenate(halves, axis=1).astype(np.float32)


def sincos_1d(length: int, width: int) -> np.ndarray:
    """Transformer-style fixed positions over a flattened index [length, width]: sin on even and
    cos on odd channels, channel pair j at frequency 1 / 10000^(2j/width) (MAE-pytorch's
    `get_sinusoid_encoding_table`, used by Beyond Masking's encoder and decoder)."""
    pos = np.arange(length, dtype=np.float64)[:, None]
    angles = pos / 10000 ** (2 * (np.arange(width) // 2) / width)
    table = np.where(np.arange(width) % 2 == 0, np.sin(angles), np.cos(angles))
    return table.astype(np.float32)


def positions(kind: str, grid, width: int) -> np.ndarray:
    """Fixed position table [grid_h*grid_w, width] of `kind`: 'sincos2d' (MAE), 'sincos2d_rowfirst'
    (BEiT/CAE) or 'sincos1d' (Transformer-style over the raster index)."""
    if kind == "sincos1d":
        return sincos_1d(grid[0] * grid[1], width)
    if kind in ("sincos2d", "sincos2d_rowfirst"):
        return sincos_2d(*grid, width, row_first=kind == "sincos2d_rowfirst")
    raise ValueError(f"Unknown fixed position embedding {kind!r}: use 'sincos2d', 'sincos2d_rowfirst' or 'sincos1d'.")


# ---- initialisers, norms, attention -------------------------------------------------------------

def linear_init(style: str) -> Callable:
    """Kernel init of every Linear layer in the blocks: 'xavier' (MAE, CAE), or 'trunc_normal'
    (MAE-pytorch/BEiT lineage: N(0, 0.02) truncated at +-1 std, as their `trunc_normal_` helper)."""
    if style == "xavier":
        return nn.initializers.xavier_uniform()
    if style == "trunc_normal":
        return nn.initializers.truncated_normal(0.02, lower=-1.0, upper=1.0)
    raise ValueError(f"Unknown linear init {style!r}: use 'xavier' or 'trunc_normal'.")


def trunc_normal(std: float, a: float = -2.0, b: float = 2.0) -> Callable:
    """PyTorch/timm `trunc_normal_(std=std, a=a, b=b)`: a normal of `std` cut at the ABSOLUTE
    bounds a, b. (flax's `truncated_normal(std)` cuts at +-2 std instead, leaving std 0.88 x std.)
    Bounds beyond 6 std never bind in float32 practice, e.g. the default +-2 with std 0.02, so
    that is a plain normal."""
    lower, upper = a / std, b / std
    if lower <= -6.0 and upper >= 6.0:
        return nn.initializers.normal(std)
    return nn.initializers.truncated_normal(std, lower=lower, upper=upper)


def per_projection_init(init: Callable, parts: int = 3) -> Callable:
    """Initialises a fused [D, parts*D] kernel as `parts` independent [D, D] kernels: a fused qkv
    that starts exactly like separate q, k, v Linears (xavier over [D, D] has a sqrt(2) larger
    bound than xavier over [D, 3D])."""
    def init_fn(key, shape, dtype=jnp.float32):
        fan_in, fused = shape
        keys = jax.random.split(key, parts)
        return jnp.concatenate([init(k, (fan_in, fused // parts), dtype) for k in keys], axis=1)
    return init_fn


def make_norm(kind: str, dtype: Dtype, name: str | None = None, eps: float = 1e-6, affine: bool = True) -> nn.Module:
    scale = param_init(nn.initializers.ones, ("norm",))
    if kind == "layernorm":
        return nn.LayerNorm(epsilon=eps, dtype=dtype, name=name, scale_init=scale, use_scale=affine, use_bias=affine,
                            bias_init=param_init(nn.initializers.zeros, ("norm",)))
    if kind == "rmsnorm":
        return nn.RMSNorm(epsilon=eps, dtype=dtype, name=name, scale_init=scale, use_scale=affine)
    raise ValueError(f"Unknown norm {kind!r}: use 'layernorm' or 'rmsnorm'.")


def attention_implementation(requested: str | None, dtype, head_dim: int) -> str:
    """`model.attention_impl`: None or 'auto' picks cuDNN's fused kernel on GPUs where it applies
    (bf16/fp16, head_dim a multiple of 8 up to 128) and XLA's everywhere else (jax's own None is
    always XLA); 'xla' or 'cudnn' force one."""
    if requested in ("xla", "cudnn"):
        return requested
    if requested not in (None, "auto"):
        raise ValueError(f"Unknown attention_impl {requested!r}: use 'auto', 'xla' or 'cudnn'.")
    fused = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 \
        and head_dim <= 128
    return "cudnn" if fused and jax.default_backend() == "gpu" else "xla"


def attention(q, k, v, implementation: str | None, pad_multiple: int | None = None):
    """softmax(q k^T / sqrt(d)) v over [B, T, heads, head_dim] via jax.nn.dot_product_attention.
    Keys and values may be longer or shorter than the queries (cross-attention).
    `implementation` as `attention_implementation` resolves it (None: automatic).

    cuDNN's fused kernel rejects lengths that are not a multiple of 64 (e.g. 197 = 196 + CLS), so
    for implementation='cudnn' we pad to the next multiple and pass the true lengths: the padded
    keys are masked out and the padded queries sliced away.
    """
    implementation = attention_implementation(implementation, q.dtype, q.shape[-1])
    if pad_multiple is None:
        pad_multiple = 64 if implementation == "cudnn" else 1
    b, t_q, t_kv = q.shape[0], q.shape[1], k.shape[1]
    pad_q, pad_kv = -t_q % pad_multiple, -t_kv % pad_multiple
    if not (pad_q or pad_kv):
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)

    def pad(x, n):
        return jnp.pad(x, [(0, 0), (0, n), (0, 0), (0, 0)])

    out = jax.nn.dot_product_attention(
        pad(q, pad_q), pad(k, pad_kv), pad(v, pad_kv), implementation=implementation,
        query_seq_lengths=jnp.full((b,), t_q, jnp.int32), key_value_seq_lengths=jnp.full((b,), t_kv, jnp.int32))
    return out[:, :t_q]


def cls_attention(q, k):
    """Attention weights of the first query ([CLS]) over the keys, averaged over heads:
    q, k [B, T, heads, head_dim] -> [B, T] (float32). ContrastiveCrop's heat maps read it."""
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bhd,bthd->bht", q[:, 0].astype(jnp.float32), k.astype(jnp.float32)) * scale
    return jax.nn.softmax(logits, axis=-1).mean(axis=1)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per example. `rate` may be given at call
    time (a traced per-layer rate inside a scanned stack)."""
    rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool, rate=None):
        rate = self.rate if rate is None else rate
        if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
            return x
        keep = 1.0 - rate
        mask = draw_keep_mask(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return x * mask.astype(x.dtype) / jnp.asarray(keep, x.dtype)


def draw_keep_mask(rng, keep, shape):
    """The naive form's draw: keep each example's branch with probability `keep`."""
    return jax.random.bernoulli(rng, keep, shape)


DROP_PATH_FORMS = ("naive", "subset")


def check_drop_path_form(form: str):
    if form not in DROP_PATH_FORMS:
        raise ValueError(f"Unknown drop_path_form {form!r}: use 'naive' (a Bernoulli mask per example) or "
                         "'subset' (CAPI's efficient form: each branch runs on a fixed share of the batch).")


def subset_size(local_batch: int, rate: float) -> int:
    """How many examples of a device's batch a branch runs on: the official `int(b * keep)`."""
    return max(int(local_batch * (1.0 - rate)), 1)


def draw_subsets(rng, batch: int, rate: float, groups: int):
    """[groups, n_keep] distinct row indices within each group of batch/groups consecutive rows."""
    local = batch // groups
    keys = jax.random.split(rng, groups)
    return jax.vmap(lambda k: jax.random.permutation(k, local)[:subset_size(local, rate)])(keys)


def subset_residual(x, branch, indices, *per_example):
    """x + (local / n_keep) * branch(rows `indices` of x and of `per_example`), added back at
    those rows (torch.index_add with alpha). `indices` [G, n_keep] are within each of G groups of
    consecutive rows: one group per device sharing the batch, so the gather and the scatter stay
    on the device (the official code draws per GPU, over its local batch)."""
    groups, n_keep = indices.shape
    local = x.shape[0] // groups

    def take(a):
        if a is None:
            return None
        grouped = a.reshape((groups, local) + a.shape[1:])
        picked = jax.vmap(lambda g, i: g[i])(grouped, indices)
        return picked.reshape((groups * n_keep,) + a.shape[1:])

    y = branch(take(x), *(take(a) for a in per_example))
    y = (y * jnp.asarray(local / n_keep, y.dtype)).astype(x.dtype).reshape((groups, n_keep) + x.shape[1:])
    grouped = x.reshape((groups, local) + x.shape[1:])
    out = jax.vmap(lambda g, i, r: g.at[i].add(r, unique_indices=True))(grouped, indices, y)
    return out.reshape(x.shape)


class SubsetDropPath(nn.Module):
    """CAPI's efficient stochastic depth (`EfficientResidual`): the branch runs only on a random
    `int((1 - rate) * b)` of each device's b examples and is scaled by b / n_keep, so a rate of
    0.2 saves 20% of the branch's FLOPs. Per example it is the naive form's distribution
    whenever (1 - rate) * b is whole: kept with probability n_keep / b, scaled by its inverse."""
    rate: float

    @nn.compact
    def __call__(self, x, branch, *per_example):
        batch, groups = x.shape[0], parallel.batch_shards()
        if batch % groups:
            raise ValueError(f"A batch of {batch} cannot be split over the {groups} devices that share it.")
        return subset_residual(x, branch, draw_subsets(self.make_rng("dropout"), batch, self.rate, groups),
                               *per_example)


def residual(x, branch, *per_example, rate, deterministic: bool, form: str, drop_path):
    """x + branch(x, *per_example) under stochastic depth of `rate` in `form`; `drop_path`: the
    naive DropPath to use (built by the caller, so the naive form's random draws keep their
    module paths)."""
    if form == "subset" and not deterministic:
        if not isinstance(rate, (int, float)):
            raise ValueError("drop_path_form='subset' needs a static rate per block: with scan=True, set "
                             "drop_path_uniform=True (or scan=False).")
        if rate:
            return SubsetDropPath(rate)(x, branch, *per_example)
    return x + drop_path(branch(x, *per_example), deterministic, rate)


class Attention(nn.Module):
    num_heads: int
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    implementation: str | None = None
    qkv_bias: str = "dense"     # "dense": the qkv layer's own bias (iff use_bias); "qv": BEiT's
    rope: str | None = None     # 2-D RoPE kind (models/rope.py) applied to q and k at `coords`
    kernel_init: Callable = nn.initializers.xavier_uniform()
    qkv_init: str = "fused"     # "fused": one init over [D, 3D] (timm); "per_projection": q, k, v
                                # each initialised over [D, D] (separate Linears, e.g. CAPI)

    @nn.compact
    def __call__(self, x, coords=None):
        width = x.shape[-1]
        head_dim = width // self.num_heads
        if self.qkv_init not in ("fused", "per_projection"):
            raise ValueError(f"Unknown qkv_init {self.qkv_init!r}: use 'fused' or 'per_projection'.")
        # One fused projection for q, k and v (a single larger matmul is faster than three).
        qkv_kernel = self.kernel_init if self.qkv_init == "fused" else per_projection_init(self.kernel_init)
        qkv = nn.Dense(3 * width, dtype=self.dtype, use_bias=self.use_bias and self.qkv_bias == "dense",
                       name="qkv", kernel_init=param_init(qkv_kernel, ("embed", "qkv")),
                       bias_init=param_init(nn.initializers.zeros, ("qkv",)))(x)
        if self.qkv_bias == "qv":
            # BEiT/CAE: learned q and v biases, the k bias fixed at zero (it would cancel in the
            # softmax anyway); separate parameters so released checkpoints map one to one.
            q_bias, v_bias = (self.param(n, param_init(nn.initializers.zeros, ("qkv",)), (width,))
                              for n in ("q_bias", "v_bias"))
            qkv = qkv + jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
        elif self.qkv_bias != "dense":
            raise ValueError(f"Unknown qkv_bias {self.qkv_bias!r}: use 'dense' or 'qv'.")
        qkv = qkv.reshape(*x.shape[:2], 3, self.num_heads, head_dim)
        q, k, v = (constrain(qkv[:, :, i], ("act_batch", "act_len", "act_heads", "act_kv")) for i in range(3))
        if self.rope:
            q, k = rope_lib.apply_rope(q, coords, self.rope), rope_lib.apply_rope(k, coords, self.rope)
        # Free unless the caller asks for `intermediates` (dead code otherwise).
        self.sow("intermediates", "cls_attention", cls_attention(q, k))
        out = attention(q, k, v, self.implementation).reshape(x.shape[:2] + (width,))
        return nn.Dense(width, dtype=self.dtype, use_bias=self.use_bias, name="out",
                        kernel_init=param_init(self.kernel_init, ("qkv", "embed")),
                        bias_init=param_init(nn.initializers.zeros, ("embed",)))(out)


class Mlp(nn.Module):
    mlp_dim: int
    dtype: Dtype = jnp.float32
    use_bias: bool = True
    kernel_init: Callable = nn.initializers.xavier_uniform()

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        x = nn.Dense(self.mlp_dim, dtype=self.dtype, use_bias=self.use_bias, name="fc1",
                     kernel_init=param_init(self.kernel_init, ("embed", "mlp")),
                     bias_init=param_init(nn.initializers.zeros, ("mlp",)))(x)
        x = constrain(nn.gelu(x, approximate=False), ("act_batch", "act_len", "act_mlp"))
        return nn.Dense(width, dtype=self.dtype, use_bias=self.use_bias, name="fc2",
                        kernel_init=param_init(self.kernel_init, ("mlp", "embed")),
                        bias_init=param_init(nn.initializers.zeros, ("embed",)))(x)


class Block(nn.Module):
    """Pre-norm transformer block with optional LayerScale and drop path."""
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    norm: str = "layernorm"
    use_bias: bool = True
    layerscale: float | None = None
    drop_path: float = 0.0
    attention_impl: str | None = None
    qkv_bias: str = "dense"
    qkv_init: str = "fused"
    rope: str | None = None
    norm_eps: float = 1e-6
    linear_init: str = "xavier"
    drop_path_form: str = "naive"   # or "subset" (CAPI's efficient form, see SubsetDropPath)

    @nn.compact
    def __call__(self, x, deterministic: bool = True, coords=None, drop_rate=None):
        def scaled(y, name):
            if self.layerscale is not None:
                gamma = self.param(f"{name}_scale", param_init(
                    nn.initializers.constant(self.layerscale), ("norm",)), (y.shape[-1],))
                y = y * gamma.astype(y.dtype)
            return y

        init = linear_init(self.linear_init)
        attn = Attention(num_heads=self.num_heads, dtype=self.dtype, use_bias=self.use_bias,
                         implementation=self.attention_impl, qkv_bias=self.qkv_bias, qkv_init=self.qkv_init,
                         rope=self.rope, kernel_init=init, name="attn")
        norm1 = make_norm(self.norm, self.dtype, "norm1", self.norm_eps)
        mlp = Mlp(mlp_dim=self.mlp_dim, dtype=self.dtype, use_bias=self.use_bias, kernel_init=init, name="mlp")
        norm2 = make_norm(self.norm, self.dtype, "norm2", self.norm_eps)
        rate = self.drop_path if drop_rate is None else drop_rate
        drop = dict(rate=rate, deterministic=deterministic, form=self.drop_path_form)
        x = residual(x, lambda h, c: scaled(attn(norm1(h), c), "attn"), coords, drop_path=DropPath(self.drop_path),
                     **drop)
        x = constrain(x, TOKENS)
        x = residual(x, lambda h: scaled(mlp(norm2(h)), "mlp"), drop_path=DropPath(self.drop_path), **drop)
        return constrain(x, TOKENS)


# Fields a Transformer hands to each Block unchanged.
_BLOCK_FIELDS = ("num_heads", "mlp_dim", "dtype", "norm", "use_bias", "layerscale", "attention_impl", "qkv_bias",
                 "qkv_init", "rope", "norm_eps", "linear_init", "drop_path_form")


class _ScanStep(nn.Module):
    """One block as a scan body: (carry, per-layer drop rate) -> (carry, None). `static_rate`
    replaces the traced rate where the form needs a Python number (the subset form's size)."""
    block: dict
    deterministic: bool
    static_rate: float | None = None

    @nn.compact
    def __call__(self, x, rate, coords):
        if self.static_rate is not None:
            return Block(**self.block, drop_path=self.static_rate, name="block")(x, self.deterministic, coords), None
        return Block(**self.block, name="block")(x, self.deterministic, coords, rate), None


def remat_policy(name: str | None):
    """`config.model.remat_policy` -> a jax.checkpoint policy (None: save nothing, recompute all)."""
    if name is None:
        return None
    policy = getattr(jax.checkpoint_policies, name, None)
    if policy is None:
        raise ValueError(f"Unknown remat_policy {name!r}: use a name from jax.checkpoint_policies, e.g. "
                         "'nothing_saveable', 'dots_saveable', 'dots_with_no_batch_dims_saveable'.")
    return policy


class Transformer(nn.Module):
    """A stack of blocks (encoders and decoders); returns final tokens and per-block outputs.

    `scan=True` runs the blocks as one `nn.scan` (compile time independent of depth): the params
    of all blocks are stacked on a leading `layers` axis under `blocks/block/...` instead of
    `block_0 ... block_{depth-1}` (`stack_blocks` / `unstack_blocks` convert), and per-block
    outputs are not returned."""
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Dtype = jnp.float32
    norm: str = "layernorm"
    use_bias: bool = True
    layerscale: float | None = None
    drop_path: float = 0.0          # maximum rate, linearly increasing with depth
    attention_impl: str | None = None
    remat: bool = False
    remat_policy: str | None = None
    scan: bool = False
    qkv_bias: str = "dense"
    qkv_init: str = "fused"
    rope: str | None = None
    norm_eps: float = 1e-6
    drop_path_uniform: bool = False   # CAPI: the same rate in every block instead of a linear ramp
    linear_init: str = "xavier"
    drop_path_form: str = "naive"

    def rates(self) -> list[float]:
        if self.drop_path_uniform:
            return [self.drop_path] * self.depth
        return [self.drop_path * i / max(self.depth - 1, 1) for i in range(self.depth)]

    @nn.compact
    def __call__(self, x, deterministic: bool = True, coords=None):
        check_drop_path_form(self.drop_path_form)
        fields = {name: getattr(self, name) for name in _BLOCK_FIELDS}
        if self.scan:
            return self._scanned(x, deterministic, coords, fields), {}
        policy = remat_policy(self.remat_policy)
        block_cls = nn.remat(Block, static_argnums=(2,), policy=policy) if self.remat else Block
        out = {}
        for i, rate in enumerate(self.rates()):
            x = block_cls(**fields, drop_path=rate, name=f"block_{i}")(x, deterministic, coords)
            out[f"block_{i}"] = x
        return x, out

    def _scanned(self, x, deterministic, coords, fields):
        step = _ScanStep
        if self.remat:
            step = nn.remat(step, policy=remat_policy(self.remat_policy), prevent_cse=False)
        scanned = nn.scan(step, variable_axes={"params": 0, "intermediates": 0},
                          split_rngs={"params": True, "dropout": True}, in_axes=(0, nn.broadcast),
                          length=self.depth, metadata_params={nn.PARTITION_NAME: "layers"})
        deterministic = deterministic or self.drop_path == 0.0
        static_rate = None
        if self.drop_path_form == "subset" and not deterministic:
            if len(set(self.rates())) > 1:
                raise ValueError("drop_path_form='subset' draws a fixed number of examples per block, so with "
                                 "scan=True every block needs the same rate: set drop_path_uniform=True (or "
                                 "scan=False).")
            static_rate = self.drop_path
        x, _ = scanned(block=fields, deterministic=deterministic, static_rate=static_rate, name="blocks")(
            x, jnp.asarray(self.rates(), jnp.float32), coords)
        return x


def stack_blocks(tree, depth: int):
    """Loop-layout params (`block_0 ... block_{depth-1}`) -> scan layout (`blocks/block/...`,
    leaves stacked on a leading axis), wherever a stack of `depth` blocks appears in `tree`."""
    if not isinstance(tree, dict):
        return tree
    names = [f"block_{i}" for i in range(depth)]
    out = {k: stack_blocks(v, depth) for k, v in tree.items() if k not in names}
    if all(name in tree for name in names) and not any(f"block_{depth}" == k for k in tree):
        out["blocks"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *(tree[n] for n in names))}
    return out


def unstack_blocks(tree):
    """Scan layout -> loop layout (the inverse of `stack_blocks`)."""
    if not isinstance(tree, dict):
        return tree
    out = {k: unstack_blocks(v) for k, v in tree.items() if k != "blocks"}
    if "blocks" in tree:
        stacked = tree["blocks"]["block"]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        for i in range(depth):
            out[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out
