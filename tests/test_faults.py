"""What survives which fault (docs/training.md, Faults): a corrupt newest checkpoint, a SIGKILL, a deleted
metrics file, an unwritable or full disk, a diverged run.

In-process runs train the tiny MAE on synthetic data; the subprocess ones run `mim_jax.main` on
Fashion-MNIST like tests/test_e2e.py and are marked slow.
"""
import asyncio
import collections
import contextlib
import errno
import gc
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_mae_config
from test_e2e import ROOT, TINY, run_main, steps_saved

from mim_jax import flops
from mim_jax.data import pipeline
from mim_jax.errors import ConfigError
from mim_jax.runtime import checkpoint, metrics, storage, workdir_lock
from mim_jax.training import train

# The e2e tiny model without the periodic probes, and without Grain worker processes (a SIGKILL
# would orphan them, and they would hold the test's output pipes open).
FAST = [a for a in TINY if not a.startswith("--config.evals.")] + ["--config.evals={}",
                                                                  "--config.input.num_workers=0"]


@pytest.fixture
def synthetic_data(monkeypatch):
    source = pipeline.SyntheticSource(256, image_shape=(16, 16, 1), num_classes=10, seed=0)
    monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: source)
    return source


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def loss_steps(workdir) -> list[int]:
    """The step of every row with a loss, in file order (a step logged twice appears twice)."""
    return [r["step"] for r in rows(workdir) if "loss" in r]


def tensorboard_loss_steps(workdir) -> list[int]:
    from tensorboard.backend.event_processing import event_file_loader
    return [event.step for path in sorted(pathlib.Path(workdir).glob("events.out.tfevents*"))
            for event in event_file_loader.EventFileLoader(str(path)).Load()
            if any(value.tag == "loss" for value in event.summary.value)]


def saved(directory) -> list[int]:
    return sorted(int(p.name) for p in pathlib.Path(directory).iterdir() if p.name.isdigit())


def _random_state(n: int, seed: int = 0) -> dict:
    """Incompressible arrays, so a checkpoint's size on disk is about their bytes."""
    return {"w": jnp.asarray(np.random.default_rng(seed).standard_normal(n, dtype=np.float32))}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _corrupt(step_dir: pathlib.Path):
    """Truncates the largest array file of a saved step (what a torn write leaves)."""
    chunk = max((p for p in (step_dir / "state").rglob("d/*") if p.is_file()), key=lambda p: p.stat().st_size)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _can_mount() -> str | None:
    """None when this process may mount a tmpfs (root with CAP_SYS_ADMIN), else why not."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        return "needs root (mount -t tmpfs)"
    probe = pathlib.Path(f"/tmp/mim_jax-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True,
                             text=True)
        if out.returncode:
            return f"mount -t tmpfs failed: {out.stderr.strip()}"
        subprocess.run(["umount", str(probe)], check=True)
        return None
    finally:
        probe.rmdir()


@contextlib.contextmanager
def tmpfs(directory: pathlib.Path, options: str):
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


@contextlib.contextmanager
def read_only(directory: pathlib.Path):
    """`directory` unwritable: chmod for a normal user; for root, which writes through chmod, a
    read-only tmpfs mounted over it."""
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        directory.chmod(0o555)
        try:
            yield "Permission denied"
        finally:
            directory.chmod(0o755)
        return
    why = _can_mount()
    if why:
        pytest.skip(f"running as root, where chmod does not stop writes, and {why}")
    with tmpfs(directory, "ro,size=1m"):
        yield "Read-only file system"


# ----- 1. a corrupt newest checkpoint -----------------------------------------------------------

def test_unreadable_newest_checkpoint_is_moved_aside_and_its_step_saved_again(tmp_path, caplog):
    state = _random_state(1000)
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    for step in (2, 4):
        ckpt.save(step, state, force=True)
    ckpt.close()
    _corrupt(tmp_path / "4")

    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    step, restored, _ = ckpt.restore(_abstract(state))
    assert step == 2 and ckpt.all_steps() == [2]
    [aside] = [p.name for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert aside.startswith("4.corrupt-") and saved(tmp_path) == [2]
    assert sum("moved to" in r.getMessage() for r in caplog.records) == 1
    ckpt.save(4, restored, force=True)  # what raised StepAlreadyExistsError before
    ckpt.close()
    assert checkpoint.Checkpointer(tmp_path, max_to_keep=3).all_steps() == [2, 4]


def test_reads_a_failed_restore_left_failing_are_not_reported_again(tmp_path, caplog):
    """A failed restore has many reads in flight; the ones that fail after the first are logged by
    asyncio ("Task exception was never retrieved", a traceback each) when their tasks are collected.
    The restore reported the failure once; other unretrieved errors are still shown."""
    checkpoint.Checkpointer(tmp_path)   # installs the filters, process-wide

    async def fail(message):
        raise ValueError(message)

    loop = asyncio.new_event_loop()
    tasks = [loop.create_task(fail(f"OUT_OF_RANGE: Error reading array {i} [tensorstore_spec='{{}}']"))
             for i in range(3)] + [loop.create_task(fail("an error of the user's own"))]
    loop.run_until_complete(asyncio.wait(tasks))
    loop.close()
    del tasks
    gc.collect()
    reported = [str(r.exc_info[1]) for r in caplog.records if r.name == "asyncio"]
    assert reported == ["an error of the user's own"]


def test_a_checkpoint_no_step_can_read_moves_nothing(tmp_path):
    """An incompatible config fails every step the same way: that is not corruption."""
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    for step in (2, 4):
        ckpt.save(step, _random_state(1000), force=True)
    ckpt.close()
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    with pytest.raises(checkpoint.CheckpointError, match="No readable checkpoint .* start a new --workdir"):
        ckpt.restore(_abstract(_random_state(7)))
    assert saved(tmp_path) == [2, 4]


@pytest.mark.slow
def test_corrupt_final_checkpoint_then_the_same_command_finishes(tmp_path, fashion_mnist_dir):
    command = [*FAST, "--config.total_steps=4", "--config.ckpt_steps=2"]
    out = run_main(tmp_path, fashion_mnist_dir, *command)
    assert out.returncode == 0, out.stderr[-3000:]
    _corrupt(tmp_path / "checkpoints" / "4")
    out = run_main(tmp_path, fashion_mnist_dir, *command)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resumed from step 2" in out.stderr and out.stderr.count("moved to") == 1
    assert "Traceback" not in out.stderr
    assert len(list((tmp_path / "checkpoints").glob("4.corrupt-*"))) == 1
    assert steps_saved(tmp_path) == [2, 4]
    assert loss_steps(tmp_path) == [1, 2, 3, 4]  # steps 3 and 4 logged once, not twice
    out = run_main(tmp_path, fashion_mnist_dir, *command)  # and once more: nothing left to do
    assert out.returncode == 0 and "could not be restored" not in out.stderr, out.stderr[-3000:]


# ----- 2. metrics.jsonl: every step exactly once -------------------------------------------------

def test_resume_drops_the_metrics_rows_past_its_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"hparams": {"a": "1"}}\n' + "".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in range(1, 8))
                    + '{"step": 8, "lo')  # the row a kill cut short
    writer = metrics.JsonlWriter(path, resumed_at=4)
    assert [r.get("step") for r in rows(tmp_path)] == [None, 1, 2, 3, 4]
    writer.write_scalars(5, {"loss": 2.0})
    assert [r.get("step") for r in rows(tmp_path)] == [None, 1, 2, 3, 4, 5]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()
    metrics.JsonlWriter(path, resumed_at=0)  # a fresh start (no checkpoint): everything was redone
    assert path.read_text() == ""


@pytest.mark.slow   # two runs of the trainer (about 20 s)
def test_metrics_file_deleted_mid_run_is_written_again(tmp_path, synthetic_data, monkeypatch):
    original, calls = flops.Throughput.add_step, [0]

    def add_step_deleting_the_file(self, data_wait):
        calls[0] += 1
        if calls[0] == 4:  # steps 1-3 are logged
            (tmp_path / "metrics.jsonl").unlink()
        return original(self, data_wait)

    monkeypatch.setattr(flops.Throughput, "add_step", add_step_deleting_the_file)
    train.train_and_evaluate(tiny_mae_config(log_steps=1), str(tmp_path))
    assert loss_steps(tmp_path) == [4, 5, 6]


# Runs mim_jax.main, SIGKILLed at the start of step `kill_at` once checkpoint `wait_for` is committed.
KILLED_RUN = """
import os, pathlib, signal, sys, time
from absl import app
from mim_jax import flops, main
kill_at, committed = int(sys.argv[1]), pathlib.Path(sys.argv[2])
original, calls = flops.Throughput.add_step, [0]
def add_step(self, data_wait):
    calls[0] += 1
    if calls[0] == kill_at:
        deadline = time.time() + 120
        while not committed.exists() and time.time() < deadline:  # orbax renames the folder on commit
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, data_wait)
flops.Throughput.add_step = add_step
main.define_flags()   # the command's flags, as `python -m mim_jax.main` defines them
app.run(main.main, argv=["main", *sys.argv[3:]])
"""


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_logs_every_step_once(tmp_path, fashion_mnist_dir):
    command = ["--config=configs/mae.py:local", f"--workdir={tmp_path}", f"--config.input.data_dir={fashion_mnist_dir}",
               *FAST, "--config.total_steps=8", "--config.ckpt_steps=4"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    killed = subprocess.run([sys.executable, "-c", KILLED_RUN, "7", str(tmp_path / "checkpoints" / "4"), *command],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert steps_saved(tmp_path) == [4]
    assert loss_steps(tmp_path) == [1, 2, 3, 4, 5, 6]  # on disk when killed, 5 and 6 past the checkpoint
    assert {1, 2, 3, 4} <= set(tensorboard_loss_steps(tmp_path))  # flushed before checkpoint 4
    out = run_main(tmp_path, fashion_mnist_dir, *FAST, "--config.total_steps=8", "--config.ckpt_steps=4")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Resumed from step 4" in out.stderr
    assert loss_steps(tmp_path) == list(range(1, 9))
    assert collections.Counter(r["step"] for r in rows(tmp_path) if "steps_per_sec" in r).most_common(1)[0][1] == 1


# ----- 3. an unwritable workdir or checkpoint folder ---------------------------------------------

def test_unwritable_folder_is_one_clear_error(tmp_path, monkeypatch):
    def read_only_write(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(type(storage.epath.Path(tmp_path)), "write_bytes", read_only_write)
    with pytest.raises(storage.StorageError) as error:
        storage.ensure_writable(tmp_path / "checkpoints")
    message = str(error.value)
    assert f"Cannot write to {tmp_path / 'checkpoints'}: Read-only file system (errno 30)" in message
    assert "--workdir" in message and "\n" not in message


def test_read_only_checkpoint_folder_fails_at_start_not_after_a_timeout(tmp_path, synthetic_data):
    with read_only(tmp_path / "checkpoints") as reason:
        start = time.monotonic()
        expected = re.escape(f"Cannot write to {tmp_path / 'checkpoints'}: {reason}")
        with pytest.raises(storage.StorageError, match=expected):
            train.train_and_evaluate(tiny_mae_config(), str(tmp_path))
        assert time.monotonic() - start < 60  # orbax alone waited 300 s for its step folder


def test_checkpoint_folder_turning_read_only_fails_at_the_next_save(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", max_to_keep=3)
    ckpt.save(1, _random_state(100), force=True)
    ckpt.wait()
    with read_only(tmp_path / "checkpoints") as reason:
        start = time.monotonic()
        expected = re.escape(f"Cannot write to {tmp_path / 'checkpoints'}: {reason}")
        with pytest.raises(storage.StorageError, match=expected):
            ckpt.save(2, _random_state(100), force=True)
        assert time.monotonic() - start < 60
    ckpt.close()


@pytest.mark.slow
def test_main_prints_a_storage_error_without_traceback(tmp_path, fashion_mnist_dir):
    with read_only(tmp_path / "checkpoints") as reason:
        out = run_main(tmp_path, fashion_mnist_dir, *FAST, "--config.total_steps=2", timeout=120)
    assert out.returncode == 1
    assert f"Cannot write to {tmp_path / 'checkpoints'}: {reason}" in out.stderr
    assert "Traceback" not in out.stderr


# ----- 4. a full disk -----------------------------------------------------------------------------

def test_no_space_error_names_the_filesystem_the_need_and_the_fix():
    tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database at local file "/x/3.orbax-'
                             "checkpoint-tmp/state/\": Failed to write 110794 bytes to file 6: No space left on device "
                             "[os_error_code='28']")
    for error in (OSError(errno.ENOSPC, "No space left on device"), tensorstore):
        explained = storage.explain(error, "/tmp", needed=3 * 2**20, kept=" The newest complete checkpoint, step 3, "
                                                                          "is kept.")
        message = str(explained)
        assert message.startswith("The filesystem holding /tmp is full or over its quota (")
        assert "this write needs about 3.0 MB" in message and "step 3, is kept" in message
        assert "rerun the same command" in message and "\n" not in message
    assert storage.explain(ValueError("shape mismatch"), "/tmp") is None


def test_a_space_check_that_fails_by_a_little_prints_the_numbers_that_decided(monkeypatch):
    usage = shutil.disk_usage("/tmp")._replace(free=1_468_000, total=3 * 2**20)
    monkeypatch.setattr(storage, "_usage", lambda directory: usage)
    with pytest.raises(storage.StorageError, match=r"\(1,468,000 bytes free of 3.0 MB\); this write needs about "
                                                   r"1,468,100 bytes\."):
        storage.check_space("/tmp", 1_468_100)


def test_an_unfinished_save_is_removed_at_the_next_start(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    ckpt.save(3, _random_state(100), force=True)
    ckpt.close()
    (tmp_path / "6.orbax-checkpoint-tmp" / "state").mkdir(parents=True)  # what a full disk left
    (tmp_path / "6.orbax-checkpoint-tmp" / "state" / "chunk").write_bytes(b"x" * 1000)
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    deadline = time.monotonic() + 30  # orbax removes it in the background (a save waits for it)
    while (tmp_path / "6.orbax-checkpoint-tmp").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["3"] and ckpt.all_steps() == [3]
    ckpt.close()


def test_full_disk_stops_training_with_one_message_and_keeps_the_last_checkpoint(tmp_path, synthetic_data,
                                                                                monkeypatch):
    """Simulated: the disk looks full once checkpoint 3 is written."""
    real = storage._usage

    def usage(directory):
        found = real(directory)
        return found._replace(free=1000) if (tmp_path / "checkpoints" / "3").exists() else found

    monkeypatch.setattr(storage, "_usage", usage)
    with pytest.raises(storage.StorageError) as error:
        train.train_and_evaluate(tiny_mae_config(), str(tmp_path))
    message = str(error.value)
    assert message.startswith(f"The filesystem holding {tmp_path / 'checkpoints'} is full or over its quota (1000 B "
                              "free of ") and "The newest complete checkpoint, step 3, is kept." in message
    assert saved(tmp_path / "checkpoints") == [3]
    assert not list((tmp_path / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    monkeypatch.setattr(storage, "_usage", real)
    assert int(train.train_and_evaluate(tiny_mae_config(), str(tmp_path)).step) == 6


def test_a_real_full_filesystem(tmp_path, caplog, capfd):
    """On a 3 MB tmpfs: a save whose estimate fits but whose write does not fails in orbax's
    background thread, reported as one clear error; one that cannot fit is refused before it is
    written; the last complete checkpoint stays readable and the next start removes the rest."""
    why = _can_mount()
    if why:
        pytest.skip(why)
    with tmpfs(tmp_path / "disk", "size=3m") as disk:
        directory = disk / "checkpoints"
        ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)
        small = _random_state(64 * 1024)  # 256 KB
        ckpt.save(1, small, force=True)
        ckpt.wait()
        free = shutil.disk_usage(disk).free
        (disk / "ballast").write_bytes(b"\0" * (free - 1024 * 1024))  # 1 MB left
        with pytest.raises(storage.StorageError, match=f"The filesystem holding {re.escape(str(directory))} is full "
                                                       ".* step 1, is kept"):
            ckpt.save(2, _random_state(512 * 1024), force=True)  # 2 MB: passes the estimate (step 1's size)
            ckpt.wait()
        ckpt.close()
        assert list(directory.glob("2.orbax-checkpoint-tmp*"))
        # The one StorageError, none of orbax's tracebacks from its writing threads.
        assert not [r.getMessage()[:200] for r in caplog.records if r.levelno >= logging.ERROR]
        assert "Traceback" not in capfd.readouterr().err

        ckpt = checkpoint.Checkpointer(directory, max_to_keep=3)  # the next start
        step, restored, _ = ckpt.restore(_abstract(small))
        assert step == 1
        np.testing.assert_array_equal(restored["w"], small["w"])
        deadline = time.monotonic() + 30  # orbax removes the unfinished folder in the background
        while list(directory.glob("2.orbax-checkpoint-tmp*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sorted(p.name for p in directory.iterdir()) == ["1"]
        ballast = (disk / "ballast").stat().st_size + shutil.disk_usage(disk).free - 100 * 1024
        (disk / "ballast").write_bytes(b"\0" * ballast)  # 100 KB left
        with pytest.raises(storage.StorageError, match="free of .* this write needs about"):
            ckpt.save(2, small, force=True)  # refused before writing: no folder, no tracebacks
        assert sorted(p.name for p in directory.iterdir()) == ["1"]
        ckpt.close()


# ----- 5. a diverged run --------------------------------------------------------------------------

def test_resume_step_deletes_later_checkpoints_unless_the_same_config_wrote_them(tmp_path):
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", max_to_keep=5)
    first = tiny_mae_config()
    for step in (2, 4, 6):
        ckpt.save(step, _random_state(100), config=first, metrics={"loss": float(step)}, force=True)
    ckpt.wait()
    assert ckpt.metrics(4) == {"loss": 4.0}
    with pytest.raises(checkpoint.CheckpointError, match=r"resume_step=3: .* holds \[2, 4, 6\]"):
        train._resume_step(ckpt, tiny_mae_config(resume_step=3))
    resumed = tiny_mae_config(resume_step=4)
    assert train._resume_step(ckpt, resumed) == 4 and ckpt.all_steps() == [2, 4]
    ckpt.save(6, _random_state(100), config=resumed, force=True)
    ckpt.wait()
    # The same command again (a preemption, a requeue): the resumed run goes on from its newest.
    assert train._resume_step(ckpt, resumed) is None and ckpt.all_steps() == [2, 4, 6]
    ckpt.close()


@pytest.mark.slow
def test_exploding_loss_is_not_checkpointed_and_the_named_checkpoint_resumes(tmp_path, synthetic_data):
    workdir = str(tmp_path)
    train.train_and_evaluate(tiny_mae_config(total_steps=4, ckpt_steps=2, log_steps=1), workdir)
    # The same run goes on with a learning rate that breaks it: the loss is finite but explodes.
    with pytest.raises(train.DivergenceError) as error:
        train.train_and_evaluate(tiny_mae_config(total_steps=8, ckpt_steps=2, log_steps=1,
                                                 **{"optax.base_lr": 1e4}), workdir)
    message = str(error.value)
    assert "over config.max_loss_ratio=1000" in message and "--config.resume_step=4" in message
    assert "\n" not in message
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints", read_only=True)
    assert ckpt.all_steps() == [2, 4]  # nothing diverged was saved
    assert np.isfinite(ckpt.metrics(4)["loss"]) and set(ckpt.metrics(4)) >= {"loss", "grad_norm", "update_norm"}

    # Resuming from an older step (as one would past a diverged checkpoint) deletes the later ones.
    resumed = tiny_mae_config(total_steps=8, ckpt_steps=2, log_steps=1, resume_step=2)
    assert int(train.train_and_evaluate(resumed, workdir).step) == 8
    assert saved(tmp_path / "checkpoints") == [4, 6, 8] and loss_steps(tmp_path) == list(range(1, 9))
    assert int(train.train_and_evaluate(resumed, workdir).step) == 8  # the same command: no rewind
    assert saved(tmp_path / "checkpoints") == [4, 6, 8]


def test_checkpoints_beyond_keep_ckpts_are_pruned_after_a_restore(tmp_path):
    """A run killed after a save committed but before orbax pruned (a lost host) leaves one extra;
    the next run's restore brings the folder back to keep_ckpts."""
    state = _random_state(100)
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    for step in (2, 4, 6):
        ckpt.save(step, state, force=True)
    ckpt.close()
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
    step, _, _ = ckpt.restore(_abstract(state))
    assert step == 6 and saved(tmp_path) == [2, 4, 6]
    ckpt.enforce_retention()
    ckpt.close()
    assert saved(tmp_path) == [4, 6]


# ----- 6. Ctrl-C ------------------------------------------------------------------------------------

def start_main(workdir, data_dir, *extra) -> subprocess.Popen:
    """`mim_jax.main` in its own process group, as a terminal runs it (Ctrl-C reaches the group)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    cmd = [sys.executable, "-m", "mim_jax.main", "--config=configs/mae.py:local", f"--workdir={workdir}",
           f"--config.input.data_dir={data_dir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_for_step(workdir, step: int, proc: subprocess.Popen, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (pathlib.Path(workdir) / "metrics.jsonl").exists() and any(s >= step for s in loss_steps(workdir)):
            return
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no step {step} logged: {proc.communicate()[1][-3000:]}")


@pytest.mark.slow
def test_ctrl_c_saves_the_step_and_exits_130_without_a_traceback(tmp_path, fashion_mnist_dir):
    args = [*FAST, "--config.total_steps=200", "--config.ckpt_steps=1000", "--config.input.num_workers=2"]
    proc = start_main(tmp_path, fashion_mnist_dir, *args)
    wait_for_step(tmp_path, 2, proc)
    os.killpg(proc.pid, signal.SIGINT)   # the whole group, as a terminal's Ctrl-C
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    [saved_step] = steps_saved(tmp_path)
    assert saved_step == max(loss_steps(tmp_path)) and f"Interrupted (Ctrl-C) at step {saved_step}" in stderr

    assert "Resumed from step" in run_main(tmp_path, fashion_mnist_dir, *FAST, f"--config.total_steps={saved_step + 1}").stderr


def test_a_second_ctrl_c_exits_at_once(monkeypatch, capfd):
    exits = []
    monkeypatch.setattr(train.os, "_exit", exits.append)
    stop = train._StopSignal()
    try:
        signal.raise_signal(signal.SIGINT)
        assert stop.received == signal.SIGINT and not exits   # the first: save after this step
        signal.raise_signal(signal.SIGINT)
        assert exits == [130] and "Second Ctrl-C: exiting now, without saving" in capfd.readouterr().err
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ----- 7. one trainer per workdir -----------------------------------------------------------------

def test_a_second_trainer_on_a_workdir_is_refused_naming_the_first(tmp_path, synthetic_data):
    fd = workdir_lock.acquire(tmp_path)   # a trainer that holds it
    try:
        with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"{re.escape(str(tmp_path))} is in use by another "
                                                                rf"trainer \(pid {os.getpid()} on host .*, started 20"):
            train.train_and_evaluate(tiny_mae_config(), str(tmp_path))
        assert not (tmp_path / "checkpoints" / "3").exists()
    finally:
        workdir_lock.release(tmp_path, fd)
    assert not (tmp_path / "lock").exists()


def test_a_lock_left_by_a_dead_trainer_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "lock").write_text(json.dumps({"host": "here", "pid": int(dead.stdout), "started": "then"}))
    caplog.set_level(logging.INFO)
    fd = workdir_lock.acquire(tmp_path)
    try:
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
        assert f"left by pid {int(dead.stdout)} on host here" in caplog.text
    finally:
        workdir_lock.release(tmp_path, fd)


@pytest.mark.slow
def test_two_trainers_on_one_workdir(tmp_path, fashion_mnist_dir):
    first = start_main(tmp_path, fashion_mnist_dir, *FAST, "--config.total_steps=100000", "--config.ckpt_steps=1000")
    wait_for_step(tmp_path, 1, first)
    second = run_main(tmp_path, fashion_mnist_dir, *FAST, "--config.total_steps=8")
    assert second.returncode == 1 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert f"is in use by another trainer (pid {first.pid} on host " in second.stderr
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-3000:]
    assert loss_steps(tmp_path) == list(range(1, steps_saved(tmp_path)[-1] + 1))   # one writer: each step once
    assert not (tmp_path / "lock").exists()



# ----- 9. a config that cannot run ----------------------------------------------------------------

def test_a_config_that_cannot_run_is_one_error_before_anything_is_built(tmp_path):
    config = tiny_mae_config(**{"input.batch_size": 7, "input.channels": 3})   # 8 devices; mean/std for 1
    with pytest.raises(ConfigError) as error:
        train.train_and_evaluate(config, str(tmp_path / "workdir"))
    message = str(error.value)
    assert "batch_size=7 must be divisible by the 8 devices that share the batch and by the 1 processes: use a " \
           "multiple of 8 (--config.input.batch_size=8)" in message
    assert "config.input.channels=3 needs 3 values in config.input.mean and config.input.std (they have 1 and 1)" \
           in message and "\n" not in message
    assert not (tmp_path / "workdir").exists()
