"""Device mesh, logical-axis rules and the shardings derived from them."""
from __future__ import annotations

import contextlib
import logging

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """`mesh_config` is [(axis_name, size), ...]; one size may be -1 (all remaining devices).

    Axis types are passed as Auto explicitly: `jax.make_mesh` defaults to Explicit axes, under
    which GSPMD-style (logical-constraint) code fails with sharding-type errors.
    """
    names = tuple(name for name, _ in mesh_config)
    sizes = [int(size) for _, size in mesh_config]
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if sizes.count(-1) > 1 or n % fixed:
        raise ValueError(f"Mesh {list(mesh_config)} does not fit {n} devices: sizes must multiply "
                         f"to {n}, with at most one -1.")
    sizes = [n // fixed if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != n:
        raise ValueError(f"Mesh {dict(zip(names, sizes))} uses {int(np.prod(sizes))} of {n} devices.")
    return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


@contextlib.contextmanager
def activate(mesh, rules):
    """Mesh + logical rules for tracing: without both, logical constraints are silently no-ops."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


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


def logical_shardings(abstract_tree, mesh, rules):
    """NamedShardings for an (abstract) pytree whose leaves may be flax LogicallyPartitioned boxes.

    Leaves without logical names (optimizer counters, scalars) are replicated.
    """
    specs = nn.get_partition_spec(abstract_tree)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    unboxed = unbox_abstract(abstract_tree)
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, _fit_to_shape(spec, x.shape, mesh)),
        mesh_specs, unboxed, is_leaf=lambda s: isinstance(s, P))


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
