"""Cloud TPU slice names -> compile-only TPU devices, with the memory each device has.

Names are Cloud TPU's accelerator types: `v4-64` and `v5p-128` count TensorCores (two per chip),
`v5litepod-256` (= `v5e-256`) and `v6e-256` count chips. A slice's chip grid follows Cloud TPU's
shapes (v5p-128: 4x4x4, v6e-256: 16x16); `v5p:4x4x4` names a grid directly. JAX builds the devices
from the `libtpu` wheel (`pip install "jax[tpu]"`), with no TPU attached.
"""
from __future__ import annotations

import dataclasses
import os
import re

import jax

from mim_jax.errors import UserFacingError

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
    topology_prefix: str     # what libtpu's topology names start with
    names: tuple[str, ...]   # Cloud TPU's accelerator-type prefixes
    dims: int                # 2-D (v5e, v6e) or 3-D (v4, v5p) chip grid
    cores_in_name: bool      # the number in the name counts TensorCores (2 per chip), not chips
    hbm_gib_per_chip: float  # Cloud TPU's documented HBM per chip
    chips_per_host: int      # chips of one TPU VM in a multi-host slice
    single_host_chips: int   # the largest slice that is one TPU VM


GENERATIONS = {
    "v4": Generation(topology_prefix="v4", names=("v4",), dims=3, cores_in_name=True, hbm_gib_per_chip=32,
                     chips_per_host=4, single_host_chips=4),
    "v5e": Generation(topology_prefix="v5e", names=("v5litepod", "v5e"), dims=2, cores_in_name=False,
                      hbm_gib_per_chip=16, chips_per_host=4, single_host_chips=8),
    "v5p": Generation(topology_prefix="v5p", names=("v5p",), dims=3, cores_in_name=True, hbm_gib_per_chip=95,
                      chips_per_host=4, single_host_chips=4),
    "v6e": Generation(topology_prefix="v6e", names=("v6e",), dims=2, cores_in_name=False, hbm_gib_per_chip=32,
                      chips_per_host=4, single_host_chips=8),
}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str                 # as given
    generation: str           # a key of GENERATIONS
    grid: tuple[int, ...]     # chips along each ICI dimension
    num_slices: int = 1

    @property
    def chips(self) -> int:
        n = 1
        for d in self.grid:
            n *= d
        return n

    @property
    def topology_name(self) -> str:
        return f"{GENERATIONS[self.generation].topology_prefix}:{'x'.join(map(str, self.grid))}"

    @property
    def hosts(self) -> int:
        """TPU VMs (processes) of one slice: a v4/v5p-8 or v5e/v6e-8 is one VM, larger slices have
        4 chips per VM."""
        g = GENERATIONS[self.generation]
        return 1 if self.chips <= g.single_host_chips else self.chips // g.chips_per_host

    def describe(self) -> str:
        slices = f" x {self.num_slices} slices" if self.num_slices > 1 else ""
        return f"{self.name}{slices} ({self.topology_name}, {self.chips * self.num_slices} chips)"


def grid_for(chips: int, dims: int) -> tuple[int, ...]:
    """Cloud TPU's chip grid of a power-of-two slice: from 1x1(x1), double the smallest dimension,
    the last of equals first (v5p: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, ...; v5e: 2x2, 2x4, 4x4, 4x8)."""
    if chips < 1 or chips & (chips - 1):
        raise ValueError(chips)
    grid = [1] * dims
    if dims == 3 and chips >= 4:
        grid, left = [2, 2, 1], chips // 4
    else:
        left = chips
    while left > 1:
        smallest = min(grid)
        i = max(j for j, d in enumerate(grid) if d == smallest)
        grid[i] *= 2
        left //= 2
    return tuple(grid)


def parse(name: str, num_slices: int = 1) -> Slice:
    """`v5p-128`, `v5litepod-256`, `v5e-16`, `v6e-256`, `v4-64`, or `<generation>:<grid>` (`v5p:4x4x4`)."""
    known = ", ".join(f"{n}-N" for g in GENERATIONS.values() for n in g.names)
    if num_slices < 1:
        raise UserFacingError(f"--num_slices={num_slices}: give 1 or more slices.")
    explicit = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+)+)", name)
    if explicit:
        generation, grid = explicit.group(1), tuple(int(d) for d in explicit.group(2).split("x"))
        if len(grid) != GENERATIONS[generation].dims:
            raise UserFacingError(f"--topology={name}: {generation} grids have {GENERATIONS[generation].dims} "
                                  "dimensions.")
        return Slice(name=name, generation=generation, grid=grid, num_slices=num_slices)
    match = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    generation = next((key for key, g in GENERATIONS.items() if match and match.group(1) in g.names), None)
    if generation is None:
        raise UserFacingError(f"--topology={name} is not a Cloud TPU accelerator type this knows: use {known} "
                              "(e.g. v5p-128, v6e-256) or a grid such as v5p:4x4x4.")
    g, count = GENERATIONS[generation], int(match.group(2))
    chips = count // 2 if g.cores_in_name else count
    try:
        grid = grid_for(chips, g.dims)
    except ValueError:
        unit = "TensorCores (2 per chip)" if g.cores_in_name else "chips"
        raise UserFacingError(f"--topology={name}: the number counts {unit} and must give a power-of-two chip "
                              f"count; for another shape name its grid, e.g. {g.topology_prefix}:"
                              f"{'x'.join(['2'] * g.dims)}.") from None
    return Slice(name=name, generation=generation, grid=grid, num_slices=num_slices)


def _quiet_libtpu():
    # Off a TPU VM, libtpu looks for the VM's accelerator type and worker names and prints a
    # warning and an error for each; neither matters to compile-only devices.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # A second process loading libtpu (a test worker, a launch script's check) is refused without it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def devices(tpu: Slice) -> list:
    """The slice's compile-only TPU devices (every slice's, for multislice): a mesh built on them
    lowers and compiles, nothing runs."""
    _quiet_libtpu()
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise UserFacingError(f"Compiling for TPUs needs the libtpu wheel: pip install \"jax[tpu]=={jax.__version__}\" "
                              "(it needs no TPU).") from None
    from jax.experimental import topologies
    desc = topologies.get_topology_desc(platform="tpu", topology_name=tpu.topology_name, num_slices=tpu.num_slices)
    return list(desc.devices)


def hbm_bytes_per_device(tpu: Slice, devices_of_slice: list) -> float:
    """HBM of one device: a chip's, shared by the devices of a chip (v4's compile-only devices
    are its two TensorCores; v5p's one megacore device per chip)."""
    per_chip = len(devices_of_slice) // (tpu.chips * tpu.num_slices)
    return GENERATIONS[tpu.generation].hbm_gib_per_chip * GIB / max(per_chip, 1)
