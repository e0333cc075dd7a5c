"""Compiles a config's train step (and its evaluation feature step) for a Cloud TPU slice on this
machine, with no TPU attached, and says whether it fits: run it before paying for a slice.

  python -m mim_jax.aot --config=configs/mae.py --topology=v5p-128
  python -m mim_jax.aot --config=configs/capi.py --topology=v6e-256 --num_slices=2
  python -m mim_jax.aot --config=configs/mae.py:variant=L/16 --topology=v5e-256 --find_batch --mesh=1,4,16

Prints the compile time; memory per device (parameters, optimizer state, frozen weights, batch,
temporaries) against the chip's HBM; XLA's FLOP count against the analytic one; the collectives
of one step (count and bytes per device, and which cross slices); and a verdict, `fits` or `does
not fit by X GiB`, with exit status 1 when it does not. `--find_batch` finds the largest batch
per device that fits, with and without `model.remat`, for each `--mesh` candidate (the size of
the fsdp axis; data takes the rest). Needs the libtpu wheel: pip install "jax[tpu]" (no TPU).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
import sys

# This command never runs on the local accelerator (on a TPU VM it would take the chips).
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
GIB = 2 ** 30


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def check(config, tpu, devices, *, eval_batch_size: int | None = None) -> dict:
    """The report of one config on one slice: every number `main` prints, as a dict."""
    from mim_jax import parallel
    from mim_jax.tpu import collectives, steps, topology

    hbm = topology.hbm_bytes_per_device(tpu, devices)
    head = dict(topology=tpu.describe(), devices=len(devices), hosts=tpu.hosts * tpu.num_slices,
                mesh=dict(parallel.make_mesh(config.mesh, devices=devices).shape), batch_size=config.input.batch_size,
                hbm_per_device=hbm)
    try:
        train = steps.compile_train_step(config, devices)
    except steps.DoesNotFit as e:
        return dict(head, fits=False, refused=str(e), needed=e.needed, available=e.available)
    memory = train.memory()
    hlo = train.compiled.as_text()
    report = dict(
        head, batch_per_device=train.batch_size / train.batch_devices,
        compile_s=train.compile_s, memory=memory, argument_parts=train.argument_parts, param_bytes=train.param_bytes,
        fits=memory["total"] <= hbm, xla_flops=train.xla_flops(len(devices)), analytic_flops=train.analytic_flops,
        collectives=collectives.parse(hlo, devices_per_slice=len(devices) // tpu.num_slices).__dict__,
        # XLA's cost analysis counts a loop body once (model.scan, gradient accumulation).
        loops=bool(re.search(r'"known_trip_count":\{"n":"([2-9]|\d\d+)"', hlo)))
    if eval_batch_size:
        try:
            features = steps.compile_feature_step(config, devices, eval_batch_size)
            report["features"] = dict(batch_size=eval_batch_size, compile_s=features.compile_s,
                                      memory=features.memory(), fits=features.memory()["total"] <= hbm)
        except steps.DoesNotFit as e:
            report["features"] = dict(batch_size=eval_batch_size, fits=False, refused=str(e))
        report["fits"] = report["fits"] and report["features"]["fits"]
    return report


def verdict(report: dict) -> str:
    if "refused" in report:
        short = f" by {_gib(report['needed'] - report['available'])}" if report["needed"] else ""
        return f"does not fit{short} per device: the TPU compiler refused the train step ({report['refused']})"
    if "refused" in report.get("features", {}):
        return f"does not fit: the TPU compiler refused the feature step ({report['features']['refused']})"
    need = max(report["memory"]["total"], report.get("features", {}).get("memory", {}).get("total", 0))
    if report["fits"]:
        return f"fits ({_gib(report['hbm_per_device'] - need)} of {_gib(report['hbm_per_device'])} free per device)"
    return (f"does not fit by {_gib(need - report['hbm_per_device'])} per device "
            f"(needs {_gib(need)}, has {_gib(report['hbm_per_device'])})")


def describe(report: dict) -> str:
    from mim_jax.runtime import storage
    per_device = report["batch_size"] / math.prod(report["mesh"].values())
    header = (f"{report['topology']}: {report['devices']} devices, {report['hosts']} host{'s' if report['hosts'] > 1 else ''}; mesh {report['mesh']}; "
              f"batch {report['batch_size']} ({per_device:g} per device)")
    if "refused" in report:
        return header + "\n" + verdict(report)
    m, parts = report["memory"], report["argument_parts"]
    lines = [
        header,
        f"train step compiled in {report['compile_s']:.1f} s",
        f"memory per device: {_gib(m['total'])} of {_gib(report['hbm_per_device'])} HBM = arguments "
        f"{_gib(m['arguments'])} (" + ", ".join(f"{k} {_gib(v)}" for k, v in parts.items()) + f"), temporaries "
        f"{_gib(m['temporaries'])}, outputs {_gib(m['outputs'])} less {_gib(m['aliased'])} donated, code {_gib(m['code'])}",
        f"FLOPs per step: XLA {report['xla_flops']:.4g}, analytic {report['analytic_flops']:.4g} "
        f"(XLA / analytic {report['xla_flops'] / max(report['analytic_flops'], 1):.3f}"
        + ("; XLA counts each loop body once, so its count is low here)" if report["loops"] else ")"),
    ]
    for where, kinds in (("in slice", report["collectives"]["in_slice"]),
                         ("across slices", report["collectives"]["across_slices"])):
        if kinds:
            lines.append(f"collectives per step {where} (per device): " + ", ".join(
                f"{kind} {count} x, {storage.size_text(size)}" for kind, (count, size) in sorted(kinds.items())))
    gathered = report["collectives"]["in_slice"].get("all-gather", (0, 0.0))[1]
    # Across slices, all-gathers also finish the gradients' all-reduce (reduce-scatter in a slice,
    # all-reduce over DCN, all-gather back): the ratio is about the weights on one slice only.
    if gathered and report["mesh"].get("fsdp", 1) > 1 and not report["collectives"]["across_slices"]:
        lines.append(f"all-gathered per step: {gathered / max(report['param_bytes'], 1):.2f} x the parameters' "
                     f"{storage.size_text(report['param_bytes'])}")
    if "features" in report and "refused" not in report["features"]:
        f = report["features"]
        lines.append(f"feature step (evaluations, batch {f['batch_size']}): compiled in {f['compile_s']:.1f} s, "
                     f"{_gib(f['memory']['total'])} per device")
    lines.append(verdict(report))
    return "\n".join(lines)


def overridden(config, *, batch_size: int | None = None, remat: bool | None = None, fsdp: int | None = None):
    config = copy.deepcopy(config)
    with config.unlocked():
        if batch_size is not None:
            config.input.batch_size = batch_size
        if remat is not None:
            config.model.remat = remat
        if fsdp is not None:
            config.mesh = (("data", -1), ("fsdp", fsdp))
    return config


def find_batch(config, tpu, devices, *, limit: int = 4096) -> tuple[int, dict | None]:
    """The largest batch per device whose train step fits (doubling, then bisecting; every mesh
    here splits the batch over all devices) and its report; (0, None) when one example does not."""
    reports = {}

    def fits(per_device: int) -> bool:
        if per_device not in reports:
            reports[per_device] = check(overridden(config, batch_size=per_device * len(devices)), tpu, devices)
            logging.info("batch %d per device: %s", per_device,
                         "fits" if reports[per_device]["fits"] else "does not fit")
        return reports[per_device]["fits"]

    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, high * 2
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low, reports.get(low)


def mesh_table(config, tpu, devices, candidates) -> list[str]:
    """One row per (fsdp size, remat): the largest batch per device that fits, printed as found."""
    rows = ["| fsdp | remat | largest batch per device | memory per device at it |", "|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    for fsdp in candidates:
        size = len(devices) // tpu.num_slices if fsdp == -1 else fsdp
        for remat in (False, True):
            best, report = find_batch(overridden(config, remat=remat, fsdp=size), tpu, devices)
            memory = _gib(report["memory"]["total"]) if report else "-"
            rows.append(f"| {size} | {remat} | {best} | {memory} |")
            print(rows[-1], flush=True)
    return rows


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mim_jax.runtime import console
    console.quiet_unless_verbose()
    from mim_jax.errors import UserFacingError
    from mim_jax.methods import resolve_config
    from mim_jax.tpu import topology
    try:
        tpu = topology.parse(FLAGS.topology, FLAGS.num_slices)
        devices = topology.devices(tpu)
        config = resolve_config(FLAGS.config)
        if FLAGS.find_batch:
            candidates = [int(m) for m in FLAGS.mesh] or [dict(config.mesh).get("fsdp", 1)]
            print(f"{tpu.describe()}: the largest batch per device that fits, per mesh and remat")
            mesh_table(config, tpu, devices, candidates)
            return
        report = check(config, tpu, devices, eval_batch_size=FLAGS.eval_batch_size)
    except UserFacingError as e:
        logging.error("%s", e)
        sys.exit(e.exit_code)
    print(describe(report))
    if FLAGS.json_out:
        with open(FLAGS.json_out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    sys.exit(0 if report["fits"] else 1)


def define_flags(flag_values: flags.FlagValues = FLAGS):
    config_flags.DEFINE_config_file("config", None, "Config file, as for mim_jax.main.", flag_values=flag_values,
                                    lock_config=True)
    flags.DEFINE_string("topology", None, "Cloud TPU accelerator type (v4-64, v5litepod-256 or v5e-256, v5p-128, "
                        "v6e-256) or a chip grid (v5p:4x4x4).", flag_values=flag_values)
    flags.DEFINE_integer("num_slices", 1, "Slices of that type (multislice over DCN).", flag_values=flag_values)
    flags.DEFINE_integer("eval_batch_size", 256, "Batch of the evaluation feature step (0: skip it).",
                         flag_values=flag_values)
    flags.DEFINE_bool("find_batch", False, "Find the largest batch per device that fits, with and without "
                      "model.remat, for each --mesh candidate.", flag_values=flag_values)
    flags.DEFINE_list("mesh", [], "Mesh candidates for --find_batch: sizes of the fsdp axis (-1: a whole slice).",
                      flag_values=flag_values)
    flags.DEFINE_string("json_out", None, "Also write the report as JSON here.", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "topology"], flag_values=flag_values)


if __name__ == "__main__":
    define_flags()
    from mim_jax.runtime import console
    app.run(main, flags_parser=console.parse_flags)
