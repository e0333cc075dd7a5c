"""Fault harness (docs/training.md, Faults): random SIGKILL/SIGTERM/SIGINT trials against `mim_jax.main`,
and a SIGKILL during `mim_jax.export`.

One uninterrupted reference run, then N trials. Each trial draws its own plan from its seed: 1-3
interruptions, each a SIGKILL, a SIGTERM or a SIGINT (Ctrl-C) sent at a random moment (during start-up and restore, a
random delay after the run's first logged step, or just after a random step is logged, when an
async checkpoint save is often in flight; the windows scale with the reference run's own timing),
each followed by the same command again; the last run goes to completion. Checked after every interruption:

- every committed checkpoint (numeric step folder) restores, all its arrays, metrics, config and
  data-iterator state; none was moved aside as `<step>.corrupt-*` (a kill must never corrupt one);
- metrics.jsonl holds steps 1..k once each (only the row a SIGKILL cut short may be torn), with k at
  least the newest checkpoint's step; a SIGTERM or Ctrl-C that stopped the run saved the step it
  stopped at (Ctrl-C: exit 130);

and at the end of every trial:

- the final run exits 0 and leaves no unfinished save (`*.orbax-checkpoint-tmp`);
- every step the reference checkpointed is checkpointed, and each checkpoint both runs have equals
  the reference's leaf for leaf, bit for bit (the final one included);
- metrics.jsonl holds each training step 1..T exactly once (no (step, metric) twice, one hparams
  row), with the reference's losses, norms and learning rates exactly;
- an export of the run SIGKILLed at a random moment leaves no file in its --out (or the whole
  export), and the next export to it writes the reference's tensors and no leftover folder.

    pytest -m slow tests/test_fault_harness.py -rA                        # 2 trials (CI)
    MIM_JAX_FAULT_TRIALS=20 pytest -m slow tests/test_fault_harness.py -rA
    MIM_JAX_FAULT_SEED=7 MIM_JAX_FAULT_TRIALS=1 pytest -m slow tests/test_fault_harness.py -rA

Trial seeds are MIM_JAX_FAULT_SEED (default 0) .. +N-1, one test each (`test_trial[seed7]`); `-rA`
prints each trial's plan and what every interruption met. The moment a signal lands depends on
timing, so a seed reproduces the plan, not always the exact instant: a failure message lists both.
The runs use one CPU device (8 virtual devices on 2 cores made each run ~35 s instead of ~20 s;
MIM_JAX_FAULT_DEVICES changes it).
"""
import collections
import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_e2e import ROOT
from test_faults import FAST

from mim_jax.runtime import checkpoint

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("MIM_JAX_FAULT_TRIALS", "2"))
FIRST_SEED = int(os.environ.get("MIM_JAX_FAULT_SEED", "0"))
DEVICES = int(os.environ.get("MIM_JAX_FAULT_DEVICES", "1"))
T = 12
# The tiny e2e model, no periodic evals, no Grain workers; a checkpoint every 2 steps, all kept;
# async checkpointing is the default.
ARGS = [*FAST, f"--config.total_steps={T}", "--config.ckpt_steps=2", "--config.log_steps=1",
        "--config.keep_ckpts=100"]
# The metrics that depend only on the state and the data (not on timing).
EXACT = ("loss", "mae_loss", "grad_norm", "param_norm", "update_norm", "lr")
RUN_TIMEOUT = 300


@dataclasses.dataclass
class Interruption:
    signal: str  # SIGKILL | SIGTERM | SIGINT
    when: str    # startup | after_first_step | after_step
    u: float     # where in that window (0..1)

    def describe(self) -> str:
        return f"{self.signal} {self.when} u={self.u:.3f}"


def draw_plan(seed: int) -> list[Interruption]:
    rng = random.Random(seed)
    return [Interruption(rng.choice(["SIGKILL", "SIGTERM", "SIGINT"]),
                         rng.choices(["startup", "after_first_step", "after_step"], weights=[1, 2, 3])[0],
                         rng.random())
            for _ in range(rng.randint(1, 3))]


def start(workdir: pathlib.Path, data_dir: str, log_path: pathlib.Path) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES}")
    cmd = [sys.executable, "-m", "mim_jax.main", "--config=configs/mae.py:local", f"--workdir={workdir}",
           f"--config.input.data_dir={data_dir}", *ARGS]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def tail(log_path: pathlib.Path, n: int = 2500) -> str:
    lines = [line for line in log_path.read_text(errors="replace").splitlines()
             if "checkpoint_manager.py" not in line and "checkpoint.py:459" not in line]
    return "\n".join(lines)[-n:]


def committed(workdir: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def read_state(step_dir: pathlib.Path) -> dict:
    """Every array of a checkpoint's train state, as numpy, by tree path (no model needed)."""
    path = step_dir / "state"
    with ocp.PyTreeCheckpointer() as reader:
        tree = reader.metadata(path).item_metadata.tree
        args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        restored = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(restored)[0]}


@contextlib.contextmanager
def quiet_orbax():
    """Without orbax's warnings about reading a folder read-only and a sub-item's metadata."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@quiet_orbax()
def check_checkpoints(workdir: pathlib.Path, context: str) -> dict:
    """Every committed checkpoint restores; none was moved aside. Returns {step: state}."""
    directory = workdir / "checkpoints"
    corrupt = sorted(p.name for p in directory.iterdir() if ".corrupt-" in p.name)
    assert not corrupt, f"{context}: a resume found committed checkpoints unreadable and moved them aside: {corrupt}"
    steps = committed(workdir)
    ckpt = checkpoint.Checkpointer(directory, read_only=True)
    assert ckpt.all_steps() == steps, f"{context}: orbax lists {ckpt.all_steps()}, the folder holds {steps}"
    states = {}
    for step in steps:
        where = f"{context}: committed checkpoint {directory / str(step)}"
        try:
            states[step] = read_state(directory / str(step))
            config = ckpt.restore_config(step)
            data = json.loads((directory / str(step) / "data" / "process_0-of-1.json").read_text())
        except Exception as e:  # noqa: BLE001 - any failure to read is the finding
            pytest.fail(f"{where} is unreadable: {type(e).__name__}: {' '.join(str(e).split())[:500]}")
        stored = int(states[step]["['step']"])
        assert stored == step, f"{where} holds the state of step {stored}"
        assert config["total_steps"] == T and data, f"{where}: config or data state missing"
        assert ckpt.metrics(step) is not None, f"{where}: its metrics are unreadable"
    return states


def metric_rows(workdir: pathlib.Path, *, allow_torn_last: bool) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines() if (workdir / "metrics.jsonl").exists() else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            assert allow_torn_last and i == len(lines) - 1, f"metrics.jsonl line {i + 1} is not JSON: {line[:200]!r}"
    return rows


def loss_rows(rows) -> list[dict]:
    return [r for r in rows if "loss" in r]


class Progress:
    """The steps this run has logged to metrics.jsonl so far (the file is the harness' clock: no
    log format is read). Rows a killed run left past the step this one resumes from are not its
    own: they count once the file has changed (rewritten without them, or appended to)."""

    def __init__(self, path: pathlib.Path, resumed: int):
        self._path, self._resumed = path, resumed
        self._before, self._changed = self._signature(), False

    def _signature(self):
        try:
            st = self._path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def poll(self) -> list[int]:
        self._changed = self._changed or self._signature() != self._before
        if not self._changed:
            return []
        try:
            lines = self._path.read_text().splitlines()
        except FileNotFoundError:  # between a rewrite's steps
            return []
        steps = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:  # a row being written
                continue
            if isinstance(row, dict) and "loss" in row and row.get("step", 0) > self._resumed:
                steps.append(row["step"])
        return steps


def run_to_end(workdir, data_dir, log_path) -> tuple[int, float | None, float]:
    """Runs the command to its end: (exit status, seconds to its first logged step, seconds in all)."""
    t0 = time.monotonic()
    progress, first = Progress(workdir / "metrics.jsonl", resumed_from(workdir)), None
    proc = start(workdir, data_dir, log_path)
    try:
        while proc.poll() is None and time.monotonic() - t0 < RUN_TIMEOUT:
            if first is None and progress.poll():
                first = time.monotonic() - t0
            time.sleep(0.02)
        rc = proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, first, time.monotonic() - t0


def resumed_from(workdir: pathlib.Path) -> int:
    """The step the next run will resume from, unless its newest checkpoint proves unreadable."""
    return max(committed(workdir), default=0) if (workdir / "checkpoints").exists() else 0


def interrupt(workdir, data_dir, log_path, item: Interruption, timing: dict) -> tuple[str, bool]:
    """Starts the command, sends `item`'s signal at its moment, waits for the exit; returns what
    happened (for the plan's record) and whether a SIGTERM or Ctrl-C stopped it cleanly after saving
    its step (exit 0; Ctrl-C: 130 and its one line). The moments
    scale with the reference run's `timing`: startup (start-up, restore, compile) is u x its time to
    the first step; after_first_step is u x its time from the first step to the end."""
    resumed = resumed_from(workdir)
    span = max(T - resumed, 1)
    target = resumed + 1 + min(int(item.u * span), span - 1)  # after_step: this step is logged, then
    extra = (item.u * span) % 1 * 0.3                           # this many seconds
    sig = getattr(signal, item.signal)
    t0 = time.monotonic()
    progress = Progress(workdir / "metrics.jsonl", resumed)
    proc = start(workdir, data_dir, log_path)
    fire_at = t0 + timing["startup_s"] * item.u if item.when == "startup" else None
    sent, first_step_at = None, None
    try:
        while proc.poll() is None:
            now, steps = time.monotonic(), progress.poll()
            if steps and first_step_at is None:
                first_step_at = now
            if fire_at is None and item.when == "after_first_step" and first_step_at is not None:
                fire_at = first_step_at + timing["train_s"] * item.u
            if fire_at is None and item.when == "after_step" and steps and max(steps) >= target:
                fire_at = now + extra
            if fire_at is not None and now >= fire_at:
                proc.send_signal(sig)
                sent = (now - t0, max(steps, default=None))
                break
            assert now - t0 < RUN_TIMEOUT, f"run did not reach its moment within {RUN_TIMEOUT} s:\n{tail(log_path)}"
            time.sleep(0.02)
        rc = proc.wait(timeout=RUN_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    logged = progress.poll()
    if sent is None:
        what = f"exited on its own (rc {rc}) before the signal"
        expected = {0}
    else:
        what = f"sent {sent[0]:.1f} s after start, after step {sent[1]} was logged, rc {rc}"
        # SIGTERM: a clean stop (0), or -15 before the loop installed its handler (start-up); Ctrl-C:
        # 130, or -2 while Python starts, before main runs.
        expected = {signal.SIGKILL: {-9}, signal.SIGTERM: {0, -15}, signal.SIGINT: {130, -2}}[sig]
    aim = f", target step {target}" if item.when == "after_step" else ""
    summary = (f"{item.describe()} (resumed from {resumed}{aim}): {what}; this run logged "
               f"steps {logged[:1] + ['..'] + logged[-1:] if len(logged) > 2 else logged}")
    assert rc in expected, f"{summary}: unexpected exit status, log {log_path}:\n{tail(log_path)}"
    if sig == signal.SIGINT and sent is not None:
        assert "Traceback" not in log_path.read_text(errors="replace"), f"{summary}: a traceback:\n{tail(log_path)}"
    saved_its_step = (rc == 0 if sig == signal.SIGTERM else
                      rc == 130 and "Interrupted (Ctrl-C) at step" in log_path.read_text(errors="replace"))
    return summary, sig != signal.SIGKILL and sent is not None and saved_its_step


def start_export(workdir: pathlib.Path, out: pathlib.Path, log_path: pathlib.Path, *extra) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "mim_jax.export", f"--workdir={workdir}", "--format=timm",
                                 f"--out={out}", *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def exported(out: pathlib.Path) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(out / "model.safetensors"))


def kill_an_export(workdir: pathlib.Path, out: pathlib.Path, log_path: pathlib.Path, seed: int,
                   export_s: float) -> str:
    """SIGKILLs an export at a moment drawn from `seed`: anywhere in its run, or while it writes
    (once its partial folder exists)."""
    rng = random.Random(f"export-{seed}")
    while_writing, u = rng.random() < 0.5, rng.random()
    t0 = time.monotonic()
    proc = start_export(workdir, out, log_path)
    try:
        if while_writing:
            while proc.poll() is None and not list(out.parent.glob(f".{out.name}.partial-*")):
                time.sleep(0.001)
            time.sleep(u * 0.2)
        else:
            time.sleep(u * export_s)
        proc.kill()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return (f"export SIGKILLed {'while writing, ' if while_writing else ''}u={u:.3f}, "
            f"{time.monotonic() - t0:.1f} s after start, rc {rc}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fashion_mnist_dir):
    workdir = tmp_path_factory.mktemp("reference")
    rc, first, total = run_to_end(workdir, fashion_mnist_dir, workdir.parent / "reference.log")
    assert rc == 0 and first is not None, tail(workdir.parent / "reference.log")
    timing = dict(startup_s=first, train_s=total - first)
    print(f"reference run: {total:.1f} s, its first step logged after {first:.1f} s")
    assert committed(workdir) == list(range(2, T + 1, 2))
    rows = metric_rows(workdir, allow_torn_last=False)
    assert [r["step"] for r in loss_rows(rows)] == list(range(1, T + 1))
    t0 = time.monotonic()
    out = workdir.parent / "reference_export"
    assert start_export(workdir, out, workdir.parent / "export.log").wait(timeout=RUN_TIMEOUT) == 0, (
        tail(workdir.parent / "export.log"))
    return dict(workdir=workdir, states=check_checkpoints(workdir, "reference run"), rows=rows, timing=timing,
                export=exported(out), export_s=time.monotonic() - t0)


@pytest.mark.parametrize("seed", range(FIRST_SEED, FIRST_SEED + TRIALS), ids=lambda s: f"seed{s}")
def test_trial(seed, reference, fashion_mnist_dir, tmp_path):
    plan = draw_plan(seed)
    workdir, record = tmp_path / "workdir", []
    t0 = time.monotonic()

    def context():
        lines = "\n  ".join(f"#{i + 1} {line}" for i, line in enumerate(record))
        return (f"seed {seed} (MIM_JAX_FAULT_SEED={seed} MIM_JAX_FAULT_TRIALS=1), plan "
                f"{[p.describe() for p in plan]}, workdir {workdir}; happened:\n  {lines}\n")

    for i, item in enumerate(plan):
        log_path = tmp_path / f"run{i + 1}.log"
        what, clean_stop = interrupt(workdir, fashion_mnist_dir, log_path, item, reference["timing"])
        record.append(what)
        if not (workdir / "checkpoints").exists():
            continue
        check_checkpoints(workdir, context())
        steps = committed(workdir)
        logged = [r["step"] for r in loss_rows(metric_rows(workdir, allow_torn_last=True))]
        assert logged == list(range(1, len(logged) + 1)), f"{context()}metrics.jsonl loss rows: {logged}"
        assert len(logged) >= max(steps, default=0), (
            f"{context()}metrics.jsonl ends at step {len(logged)}, before checkpoint {max(steps)}")
        if clean_stop:  # SIGTERM, Ctrl-C: a checkpoint after the current step, then exit (or it had finished)
            assert steps and max(steps) == len(logged), (
                f"{context()}a SIGTERM or Ctrl-C stop must save the step it stopped at: checkpoints {steps}, rows to "
                f"{len(logged)}")
        record[-1] += f"; checkpoints {steps}, rows 1..{len(logged)}"

    log_path = tmp_path / "final.log"
    rc, _, _ = run_to_end(workdir, fashion_mnist_dir, log_path)
    record.append(f"final run rc {rc}")
    assert rc == 0, f"{context()}log {log_path}:\n{tail(log_path)}"

    # (b) every checkpoint readable, none corrupt, no unfinished save left.
    leftovers = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*orbax-checkpoint-tmp*"))
    assert not leftovers, f"{context()}unfinished saves left after the final run: {leftovers}"
    assert not (workdir / "metrics.jsonl.tmp").exists(), context()
    states = check_checkpoints(workdir, context())
    missing = sorted(set(reference["states"]) - set(states))
    assert not missing, f"{context()}checkpoints {missing} of the reference were never saved: {sorted(states)}"

    # (a) bit-identical: every checkpoint both runs hold, the final one included.
    for step in sorted(set(states) & set(reference["states"])):
        ours, theirs = states[step], reference["states"][step]
        assert ours.keys() == theirs.keys(), f"{context()}step {step}: other leaves"
        for key, value in theirs.items():
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, f"{context()}{key}"
            np.testing.assert_array_equal(ours[key], value, err_msg=f"{context()}checkpoint {step} leaf {key}")

    # (c) metrics.jsonl: each step exactly once, the reference's values exactly.
    rows = metric_rows(workdir, allow_torn_last=False)
    assert [r["step"] for r in loss_rows(rows)] == list(range(1, T + 1)), (
        f"{context()}loss rows: {[r['step'] for r in loss_rows(rows)]}")
    assert sum("hparams" in r for r in rows) == 1 and "hparams" in rows[0], f"{context()}hparams rows"
    twice = [k for k, n in collections.Counter((r["step"], k) for r in rows if "step" in r
                                               for k in r if k != "step").items() if n > 1]
    assert not twice, f"{context()}(step, metric) written more than once: {twice}"
    assert max(r.get("step", 0) for r in rows) == T, context()
    ours = {r["step"]: r for r in loss_rows(rows)}
    for ref_row in loss_rows(reference["rows"]):
        for key in EXACT:
            if key in ref_row:
                mine = ours[ref_row["step"]].get(key)
                assert mine == ref_row[key] or (math.isnan(mine) and math.isnan(ref_row[key])), (
                    f"{context()}step {ref_row['step']} {key}: {mine!r}, the reference logged {ref_row[key]!r}")

    # (d) an export SIGKILLed at a random moment: --out holds nothing or the whole export; the next
    # export (--overwrite: it may have finished) writes the reference's tensors and leaves nothing else.
    out = tmp_path / "export"
    record.append(kill_an_export(workdir, out, tmp_path / "export_killed.log", seed, reference["export_s"]))
    if out.exists():
        assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"], context()
        json.loads((out / "config.json").read_text())
    log_path = tmp_path / "export.log"
    rc = start_export(workdir, out, log_path, "--overwrite").wait(timeout=RUN_TIMEOUT)
    assert rc == 0, f"{context()}log {log_path}:\n{tail(log_path)}"
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".export"))
    assert not leftovers, f"{context()}left beside --out: {leftovers}"
    ours, theirs = exported(out), reference["export"]
    assert ours.keys() == theirs.keys(), context()
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value, err_msg=f"{context()}export {key}")
    print(f"{context()}  final: checkpoints {sorted(states)}, all equal to the reference, and so is the export; "
          f"{time.monotonic() - t0:.1f} s")
