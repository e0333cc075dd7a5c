"""Device mesh, logical-axis rules and the shardings derived from them."""
from __future__ import annotations

import dataclasses
import functools
import logging

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

# `dcn` (an explicit across-slices axis, see make_mesh) first: each slice gets a contiguous block.
BATCH_AXES = ("dcn", "data", "fsdp")
DCN_AXIS = "dcn"


def _resolve_sizes(mesh_config, n: int):
    names = tuple(name for name, _ in mesh_config)
    sizes = [int(size) for _, size in mesh_config]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or n % fixed:
        raise ValueError(f"Mesh {list(mesh_config)} does not fit {n} devices: sizes must multiply "
                         f"to {n}, with at most one -1.")
    sizes = [n // fixed if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != n:
        raise ValueError(f"Mesh {dict(zip(names, sizes))} uses {int(np.prod(sizes))} of {n} devices.")
    return names, sizes


def num_slices(devices) -> int:
    """Distinct `slice_index` values of the devices (TPU multislice); 1 where devices carry none."""
    return len({getattr(d, "slice_index", None) for d in devices})


def hybrid_shapes(names, sizes, slices: int):
    """(ici_shape, dcn_shape) for a multislice mesh of the given global axis sizes.

    With a `dcn` axis in the config, that axis spans the slices (its size must be the slice count)
    and every other axis lies inside a slice. Without one, the `data` axis is split: slices along
    its outer part, each slice's devices a contiguous block of it; axis names stay as configured.
    """
    ici, dcn = list(sizes), [1] * len(sizes)
    if DCN_AXIS in names:
        i = names.index(DCN_AXIS)
        if sizes[i] != slices:
            raise ValueError(f"Mesh axis {DCN_AXIS!r} has size {sizes[i]}, but the devices span "
                             f"{slices} slices (use -1 or {slices}).")
    elif "data" in names and sizes[names.index("data")] % slices == 0:
        i = names.index("data")
    else:
        raise ValueError(f"Mesh {dict(zip(names, sizes))} over {slices} slices: give a "
                         f"({DCN_AXIS!r}, {slices}) axis, or a 'data' axis divisible by {slices}.")
    ici[i], dcn[i] = sizes[i] // slices, slices
    return tuple(ici), tuple(dcn)


def mesh_devices(mesh_config, devices=None):
    """(axis names, device ndarray) of the mesh: `jax.make_mesh`'s topology-aware order on one
    slice; across TPU slices (devices with several `slice_index`es) `create_hybrid_device_mesh`,
    so only the slice-spanning axis crosses the slow data-centre network."""
    from jax.experimental import mesh_utils
    devices = list(devices) if devices is not None else jax.devices()
    names, sizes = _resolve_sizes(mesh_config, len(devices))
    slices = num_slices(devices)
    if slices == 1:
        mesh = jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)
        return names, mesh.devices
    ici, dcn = hybrid_shapes(names, sizes, slices)
    split = devices[0].device_kind in (getattr(mesh_utils, "_TPU_V5_LITE", None), getattr(mesh_utils, "_TPU_V5E", None))
    logging.info("Multislice mesh: %d slices, ICI %s, DCN %s over %s", slices, ici, dcn, names)
    return names, mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=split)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """`mesh_config` is ((axis_name, size), ...) (a tuple or list); one size may be -1 (all remaining devices).
    Sizes are global (over all devices of all slices); see `mesh_devices` for multislice.

    Axis types are passed as Auto explicitly: `jax.make_mesh` defaults to Explicit axes, under
    which GSPMD-style (logical-constraint) code fails with sharding-type errors.
    """
    names, array = mesh_devices(mesh_config, devices)
    return jax.sharding.Mesh(array, names, axis_types=(AxisType.Auto,) * len(names))


def rules_for_mesh(rules, mesh):
    """Logical rules for `mesh`: with a `dcn` axis, whatever maps to `data` maps to (dcn, data)
    too, so activations stay sharded across slices without separate rules per mesh."""
    if DCN_AXIS not in mesh.axis_names:
        return rules
    adapted = []
    for name, target in rules:
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if "data" in axes and DCN_AXIS not in axes:
            axes = (DCN_AXIS,) + axes
            target = axes
        adapted.append((name, target))
    return type(rules)(adapted) if isinstance(rules, (list, tuple)) else adapted


@dataclasses.dataclass(frozen=True)
class Sharding:
    """The mesh and logical rules that every function of a run is traced under: flax's logical
    constraints (activations, `nn.unbox`) are silently no-ops without both, so code jits through
    `jit` and takes shapes through `abstract` instead of entering them by hand."""
    mesh: jax.sharding.Mesh
    rules: tuple      # config.sharding_rules, adapted to the mesh (rules_for_mesh)

    @classmethod
    def of(cls, config, mesh) -> Sharding:
        return cls(mesh=mesh, rules=rules_for_mesh(tuple(tuple(r) for r in config.sharding_rules), mesh))

    def traced(self, fn):
        """`fn` run under the rules and the mesh (its abstract view: the one allowed inside a trace),
        whoever calls it: jit, eval_shape, grad."""
        @functools.wraps(fn)
        def under_rules(*args, **kwargs):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh), nn.logical_axis_rules(self.rules):
                return fn(*args, **kwargs)
        return under_rules

    def jit(self, fn, **jit_kwargs):
        return jax.jit(self.traced(fn), **jit_kwargs)

    def abstract(self, fn, *args):
        """`fn(*args)` as ShapeDtypeStructs on the shardings their logical names give (leaves without
        names, such as counters, replicated), flax boxes stripped: shapes only, nothing runs."""
        boxed = jax.eval_shape(self.traced(fn), *args)
        specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), self.rules)
        return jax.tree.map(lambda spec, x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(self.mesh, _fit_to_shape(spec, x.shape, self.mesh))),
            specs, unbox_abstract(boxed), is_leaf=lambda s: isinstance(s, P))


def abstract_key() -> jax.ShapeDtypeStruct:
    """A PRNG key's shape and dtype, for shapes computed without creating a key on a device."""
    return jax.eval_shape(jax.random.key, 0)


def shardings_of(tree):
    return jax.tree.map(lambda x: x.sharding, tree)


def _fit_to_shape(spec: P, shape, mesh) -> P:
    """Replicates dimensions whose size the mesh axes do not divide (tiny test models, odd widths)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        if size > 1 and dim % size:
            logging.debug("Replicating a dim of size %d not divisible by %s=%d", dim, names, size)
            axes = None
        fitted.append(axes)
    return P(*fitted)


def unbox_abstract(tree):
    """Strips flax partitioning boxes without applying sharding constraints (abstract values)."""
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.meta.AxisMetadata) else x,
                        tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) axis split over every data-parallel axis present in the mesh."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_batch_to_global(local_batch: dict, mesh) -> dict:
    """The model inputs of a host batch as global arrays sharded over the batch axes (host-only
    keys such as `_mask` dropped)."""
    from mim_jax.data import pipeline
    return pipeline.to_global_batch({k: v for k, v in local_batch.items() if not k.startswith("_")}, mesh,
                                    BATCH_AXES)


def place(tree, shardings):
    """Puts each leaf on its sharding: device arrays already there are kept; host arrays become
    global arrays, each process building its own shards from its (identical) host copy."""
    def put(x, sharding):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])
    return jax.tree.map(put, tree, shardings)


def batch_shards(mesh=None) -> int:
    """How many devices the batch is split over (the batch axes of `mesh`, or of the mesh being
    traced under): the groups of per-device operations such as per-GPU contrastive negatives."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names])) if mesh.axis_names else 1
