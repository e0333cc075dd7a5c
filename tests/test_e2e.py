"""End-to-end: the README's main job, corrupt-checkpoint recovery and a real two-process run.

Slow (subprocesses that import TF and compile); run alone with `pytest -m slow`.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow
ROOT = pathlib.Path(__file__).resolve().parents[1]
# Periodic probes on a few hundred images (they run at the last step of every run).
EVALS = [f"--config.evals.{name}.max_{split}_examples=256" for name in ("knn", "linear") for split in ("train", "eval")]
# A small model so each run compiles quickly; everything else is the README's local preset.
TINY = ["--config.model.depth=2", "--config.model.width=64", "--config.model.num_heads=2",
        "--config.model.mlp_dim=128", "--config.decoder.depth=1", "--config.decoder.width=64",
        "--config.decoder.num_heads=2", "--config.decoder.mlp_dim=128", "--config.input.batch_size=32",
        "--config.log_steps=1", *EVALS]


def run_main(workdir, data_dir, *extra, devices=8, timeout=300, config="configs/mae.py:local"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, "-m", "mim_jax.main", f"--config={config}", f"--workdir={workdir}",
           f"--config.input.data_dir={data_dir}", *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def losses(workdir):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def steps_saved(workdir):
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def test_readme_main_job_runs_resumes_and_survives_a_corrupt_checkpoint(tmp_path, fashion_mnist_dir):
    out = run_main(tmp_path, fashion_mnist_dir, "--config.total_steps=4", "--config.ckpt_steps=2", "--config.log_steps=1",
                   *EVALS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(losses(tmp_path)) == [1, 2, 3, 4] and steps_saved(tmp_path) == [2, 4]
    assert list(tmp_path.glob("events.out.tfevents*"))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probe = [r for r in rows if "eval/knn/knn_top1" in r and "eval/linear/linear_top1" in r]
    assert probe and probe[-1]["step"] == 4 and 0 <= probe[-1]["eval/knn/knn_top1"] <= 1
    # Corrupt the newest checkpoint: the run reports it, resumes from step 2 and finishes.
    for chunk in (tmp_path / "checkpoints" / "4" / "state").rglob("d/*"):
        chunk.write_bytes(b"garbage")
    out = run_main(tmp_path, fashion_mnist_dir, "--config.total_steps=6", "--config.ckpt_steps=2", *EVALS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "could not be restored" in out.stderr and "Resumed from step 2" in out.stderr
    assert "Traceback" not in out.stderr   # tensorstore's late "Event loop is closed" reports are dropped

    # Fine-tune the pre-trained encoder (docs/evaluation.md) for a few steps.
    finetune = subprocess.run(
        [sys.executable, "-m", "mim_jax.main", f"--config=configs/finetune.py:init={tmp_path},local",
         f"--workdir={tmp_path / 'finetune'}", "--config.total_steps=2", "--config.log_steps=1",
         "--config.input.batch_size=32", "--config.evals.accuracy.max_eval_examples=256"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
    assert finetune.returncode == 0, finetune.stderr[-3000:]
    assert 0 <= losses(tmp_path / "finetune")[2] and "eval/accuracy/classification_top1" in (
        tmp_path / "finetune" / "metrics.jsonl").read_text()


def test_missing_dataset_is_a_clear_error(tmp_path):
    out = run_main(tmp_path / "w", tmp_path / "empty", "--config.total_steps=1")
    assert out.returncode != 0
    assert "fashion_mnist" in out.stderr and "python -m mim_jax.data.fashion_mnist" in out.stderr
    assert "Traceback" not in out.stderr and out.returncode == 1


def test_two_processes_match_one_process_and_resume_on_one(tmp_path, fashion_mnist_dir):
    common = [*TINY, "--config.total_steps=3", "--config.ckpt_steps=3"]
    single = run_main(tmp_path / "single", fashion_mnist_dir, *common)
    assert single.returncode == 0, single.stderr[-3000:]

    env = dict(os.environ, MIM_JAX_PORT=str(23000 + os.getpid() % 1000))
    multi = subprocess.run(
        ["bash", "launch/multiprocess_local.sh", "2", "4", "--config=configs/mae.py:local",
         f"--workdir={tmp_path / 'multi'}", f"--config.input.data_dir={fashion_mnist_dir}", *common],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stderr[-5000:]
    assert "Process 1/2" in multi.stderr  # both processes really ran, in one jax.distributed cluster
    np.testing.assert_allclose(list(losses(tmp_path / "multi").values()),
                               list(losses(tmp_path / "single").values()), rtol=1e-5)
    assert steps_saved(tmp_path / "multi") == [3]
    data_files = sorted(p.name for p in (tmp_path / "multi" / "checkpoints" / "3" / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]  # each process's own stream

    # One process (8 devices) resumes the two-process checkpoint; its data stream is rebuilt from
    # the step, so it continues exactly like the one-process run continued.
    for name in ("multi", "single"):
        out = run_main(tmp_path / name, fashion_mnist_dir, *TINY, "--config.total_steps=5", "--config.ckpt_steps=3")
        assert out.returncode == 0, out.stderr[-3000:]
    assert "Resumed from step 3" in out.stderr
    np.testing.assert_allclose(losses(tmp_path / "multi")[5], losses(tmp_path / "single")[5], rtol=1e-5)


def test_a_killed_process_is_named_and_the_same_command_resumes(tmp_path, fashion_mnist_dir):
    """SIGKILL of one process of two: the other names it within config.peer_timeout_s and exits;
    rerunning the same command resumes, and keep_ckpts holds."""
    args = ["--config=configs/mae.py:local", f"--workdir={tmp_path / 'w'}", f"--config.input.data_dir={fashion_mnist_dir}",
            *TINY, "--config.total_steps=16", "--config.ckpt_steps=4", "--config.keep_ckpts=2",
            "--config.peer_timeout_s=5"]
    port = 24000 + os.getpid() % 1000
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-m", "mim_jax.main", *args, f"--coordinator_address=127.0.0.1:{port}",
                               "--num_processes=2", f"--process_id={i}"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.monotonic() + 240
        metrics = tmp_path / "w" / "metrics.jsonl"
        while time.monotonic() < deadline and (not metrics.exists() or len(losses(tmp_path / "w")) < 6):
            time.sleep(0.5)
        assert len(losses(tmp_path / "w")) >= 6, "the run did not get going"
        procs[1].kill()
        start = time.monotonic()
        _, stderr = procs[0].communicate(timeout=60)
        waited = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1, stderr[-3000:]
    assert "Process 1 (on " in stderr and "stopped responding" in stderr and "Rerun the same command" in stderr
    assert waited < 30, waited

    env = dict(os.environ, MIM_JAX_PORT=str(port + 1))
    rerun = subprocess.run(["bash", "launch/multiprocess_local.sh", "2", "4", *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-5000:]
    assert "Resumed from step" in rerun.stderr
    assert steps_saved(tmp_path / "w") == [12, 16]
    assert not list((tmp_path / "w" / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert sorted(losses(tmp_path / "w")) == list(range(1, 17))
