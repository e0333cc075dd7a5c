"""The collectives of one step, read from its compiled HLO text: how many of each kind run and how
many bytes each moves per device, counting a loop body once per iteration (scanned blocks, gradient
accumulation), and which cross slices (multislice: the data-centre network, DCN).

A multislice step is compiled as one program per slice: inside it the collectives' replica groups
name devices of that slice, and what crosses slices is sent over DCN by host transfers the
compiler tags with the collective's kind. A collective whose replica groups mix devices of two
slices (a program compiled over several slices' devices) is counted as crossing them too."""
from __future__ import annotations

import collections
import dataclasses
import re

import numpy as np

KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b(" + "|".join(_BYTES) + r")\[([\d,]*)\]")
_HEADER = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%?([\w.\-]+) = ")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# Across slices XLA sends a collective's data over DCN as host transfers tagged with its kind.
_DCN = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_CHANNEL = re.compile(r"\bchannel_id=(\d+)")
_PARTITIONS = re.compile(r"\bnum_partitions=(\d+)")
_EXPLICIT_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


@dataclasses.dataclass
class Collectives:
    """Per kind: (count per step, bytes per device per step). `bytes` of one collective is the
    larger of its operands and results: an all-gather's gathered result, a reduce-scatter's input."""
    in_slice: dict
    across_slices: dict


def shape_bytes(shape: str) -> float:
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES[dtype]
    return total


def _split_result(text: str) -> tuple[str, str, str]:
    """'SHAPE op(operands), attributes' -> (shape, op, the rest from the operands on)."""
    if text.startswith("("):
        depth = 0
        for i, ch in enumerate(text):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                break
        shape, rest = text[:i + 1], text[i + 2:]
    else:
        shape, _, rest = text.partition(" ")
    op, _, rest = rest.partition("(")
    return shape, op, rest


def _operands(rest: str) -> list[str]:
    depth, end = 1, 0
    for end, ch in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0:
            break
    return re.findall(r"%([\w.\-]+)", rest[:end])


def replica_groups(rest: str, devices: int) -> list[list[int]]:
    """The device groups of one collective: listed (`{{0,1},{2,3}}`), or as an iota (`[2,2]<=[4]`,
    `[2,2]<=[2,2]T(1,0)`: arange, reshaped, transposed, regrouped); none given is every device."""
    iota = _IOTA_GROUPS.search(rest)
    if iota:
        shape, dims = ([int(n) for n in g.split(",")] for g in iota.group(1, 2))
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if iota.group(3):
            ids = ids.transpose([int(n) for n in iota.group(3).split(",")])
        return ids.reshape(shape).tolist()
    explicit = _EXPLICIT_GROUPS.search(rest)
    groups = [[int(n) for n in g.split(",") if n] for g in re.findall(r"\{([\d,]*)\}", explicit.group(1))] if explicit else []
    return [g for g in groups if g] or [list(range(devices))]


def parse(hlo_text: str, devices_per_slice: int | None = None) -> Collectives:
    """`devices_per_slice`: a collective whose groups span two blocks of that many device ids is
    counted across slices (None: only DCN transfers are)."""
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    shapes: dict[str, str] = {}
    entry = current = None
    partitions = _PARTITIONS.search(hlo_text.partition("\n")[0])
    devices = int(partitions.group(1)) if partitions else 1
    for line in hlo_text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = header.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            shape, op, rest = _split_result(line[m.end():])
            shapes[m.group(1)] = shape
            computations[current].append((m.group(1), shape, op, rest))

    # How often each computation runs per step: a while body `known_trip_count` times its caller.
    runs = collections.Counter()

    def visit(name: str, times: int):
        runs[name] += times
        for _, _, op, rest in computations.get(name, ()):
            trip = int(_TRIP.search(rest).group(1)) if op == "while" and _TRIP.search(rest) else 1
            for key, callee in re.findall(r"\b(body|calls|branch_computations)=\{?%([\w.\-]+)", rest):
                visit(callee, times * (trip if key == "body" else 1))
    if entry is not None:
        visit(entry, 1)

    # One collective can appear in several computations: the TPU compiler splits a collective
    # fused with its consumers over several fusions that keep its channel_id. Count it once.
    found = {}   # (place, kind, channel or instruction) -> (runs, bytes)
    for name, times in runs.items():
        for instruction, shape, op, rest in computations.get(name, ()):
            channel = _CHANNEL.search(rest)
            dcn = _DCN.search(rest)
            if op == "send" and dcn:
                buffer = _ARRAY.search(shape)
                key = ("across", dcn.group(1).lower().replace("_", "-"), channel.group(1) if channel else instruction)
                size = shape_bytes(buffer.group(0) if buffer else "")
            else:
                kind = op.removesuffix("-start")
                if kind not in KINDS or op.endswith("-done"):
                    continue
                operand_bytes = sum(shape_bytes(shapes.get(o, "")) for o in _operands(rest))
                result_bytes = shape_bytes(shape)
                if op.endswith("-start"):   # an async start's result holds its operands too
                    result_bytes -= operand_bytes
                groups = replica_groups(rest, devices) if devices_per_slice else []
                place = "across" if any(len({i // devices_per_slice for i in g}) > 1 for g in groups) else "in"
                key = (place, kind, channel.group(1) if channel else instruction)
                size = max(operand_bytes, result_bytes)
            previous = found.get(key, (0, 0.0))
            found[key] = (max(previous[0], times), max(previous[1], size))

    in_slice = collections.defaultdict(lambda: [0, 0.0])
    across = collections.defaultdict(lambda: [0, 0.0])
    for (place, kind, _), (times, size) in found.items():
        totals = in_slice[kind] if place == "in" else across[kind]
        totals[0] += times
        totals[1] += times * size
    return Collectives(in_slice={k: tuple(v) for k, v in in_slice.items()},
                       across_slices={k: tuple(v) for k, v in across.items()})
