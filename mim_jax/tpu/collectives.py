"""The collectives of one step, read from its compiled HLO text: how many of each kind run and how
many bytes each moves per device, counting a loop body once per iteration (scanned blocks, gradient
accumulation), and which cross slices (multislice: the data-centre network, DCN)."""
from __future__ import annotations

import collections
import dataclasses
import re

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


def parse(hlo_text: str) -> Collectives:
    computations: dict[str, list[tuple[str, str, str, str]]] = {}
    shapes: dict[str, str] = {}
    entry = current = None
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
                key = ("in", kind, channel.group(1) if channel else instruction)
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
