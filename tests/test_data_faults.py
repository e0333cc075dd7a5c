"""Data faults: a data set that does not match the config, a damaged shard, data workers outliving
a killed trainer."""
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mim_jax.data import pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_channels_that_do_not_match_the_data_set_are_refused(fashion_mnist_dir):
    with pytest.raises(pipeline.DataMismatchError, match=r"1-channel images, but config.input.channels=3\. "
                                                          r"Set --config.input.channels=1 with one mean"):
        pipeline.open_source("fashion_mnist", "train", fashion_mnist_dir, channels=3)
    assert len(pipeline.open_source("fashion_mnist", "train", fashion_mnist_dir, channels=1)) == 60000


def _damaged_copy(fashion_mnist_dir, tmp_path):
    data_dir = tmp_path / "tfds"
    shutil.copytree(fashion_mnist_dir, data_dir)
    shard = next(data_dir.glob("fashion_mnist/*/fashion_mnist-train.array_record-*"))
    rng = np.random.default_rng(0)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:       # garbage over one chunk of every fiftieth of the file
        for position in range(1000, size - 10000, size // 50):
            f.seek(position)
            f.write(rng.bytes(2048))
    return data_dir, shard


def test_a_damaged_shard_names_its_file_and_how_to_prepare_again(fashion_mnist_dir, tmp_path):
    data_dir, shard = _damaged_copy(fashion_mnist_dir, tmp_path)
    source = pipeline.open_source("fashion_mnist", "train", str(data_dir), channels=1)
    with pytest.raises(pipeline.CorruptDataError) as error:
        for index in range(0, len(source), 7):
            source[index]
    message = str(error.value)
    assert str(shard) in message and "Corrupted Riegeli" in message
    assert f"delete {shard.parent} and prepare it again: python -m mim_jax.data.fashion_mnist" in message
    # A batched read (what Grain and a user's bulk read use) names the same damaged file.
    with pytest.raises(pipeline.CorruptDataError, match="prepare it again") as error:
        source.__getitems__(range(len(source)))
    assert str(shard) in str(error.value)
    # Through Grain worker processes, as training reads it: the same message reaches the trainer.
    transform = pipeline.PretrainTransform(image_size=28, crop_scale=(0.35, 1.0), crop_ratio=(0.75, 1.333),
                                            flip=True, mean=(0.286,), std=(0.353,))
    stream = pipeline.train_iterator(source, global_batch_size=256, seed=0, process_index=0, process_count=1,
                                     transform=transform, num_workers=1)
    with pytest.raises(Exception, match="prepare it again") as error:
        for _ in range(len(source) // 256):
            next(stream)
    stream.close()
    assert str(shard) in str(error.value)


def _children(pid: int) -> set[int]:
    found = set()
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_data_workers_exit_when_the_trainer_is_killed():
    script = textwrap.dedent("""
        import sys, time
        from absl import flags
        from mim_jax.data import pipeline
        flags.FLAGS.mark_as_parsed()
        transform = pipeline.PretrainTransform(image_size=16, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.333),
                                                flip=True, mean=(0.5,), std=(0.5,))
        stream = pipeline.train_iterator(pipeline.SyntheticSource(512, image_shape=(16, 16, 1)),
                                         global_batch_size=16, seed=0, process_index=0, process_count=1,
                                         transform=transform, num_workers=2)
        next(stream)
        print("ready", flush=True)
        time.sleep(600)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline().strip() == "ready"
        workers = _children(trainer.pid)
        assert len(workers) >= 2, workers          # the two data workers (and a resource tracker)
        os.kill(trainer.pid, signal.SIGKILL)
        trainer.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(_running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _running(w)], "data workers outlived the killed trainer"
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_a_sigterm_to_the_whole_process_group_leaks_no_shared_memory():
    """SLURM, Kubernetes and `kill -TERM -PGID` signal the data workers too. The trainer acts on the
    notice (saves, closes its stream); the workers must not die of it with their batches still in
    shared memory, which multiprocessing's resource tracker reports as leaked at exit."""
    script = textwrap.dedent("""
        import signal, sys, time
        from absl import flags
        from mim_jax.data import pipeline
        flags.FLAGS.mark_as_parsed()
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))    # the trainer's _StopSignal
        transform = pipeline.PretrainTransform(image_size=16, crop_scale=(0.5, 1.0), crop_ratio=(0.75, 1.333),
                                                flip=True, mean=(0.5,), std=(0.5,))
        stream = pipeline.train_iterator(pipeline.SyntheticSource(512, image_shape=(16, 16, 1)),
                                         global_batch_size=16, seed=0, process_index=0, process_count=1,
                                         transform=transform, num_workers=2)
        next(stream)
        print("ready", flush=True)
        while not stop:
            next(stream)
            time.sleep(0.05)
        stream.close()
        pipeline.release_shared_memory()
        print("stopped", flush=True)
    """)
    trainer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert trainer.stdout.readline().strip() == "ready"
        time.sleep(1.0)                                  # the workers' prefetched batches are in flight
        os.killpg(trainer.pid, signal.SIGTERM)
        out, err = trainer.communicate(timeout=60)
        assert trainer.returncode == 0 and out.strip() == "stopped", err[-2000:]
        assert "leaked shared_memory" not in err, err[-2000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()


def test_training_on_data_with_other_channels_stops_before_it_starts(fashion_mnist_dir, tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "mim_jax.main", "--config=configs/mae.py:local", f"--workdir={tmp_path}",
         f"--config.input.data_dir={fashion_mnist_dir}", "--config.input.channels=3",
         "--config.input.mean=(0.5,0.5,0.5)", "--config.input.std=(0.5,0.5,0.5)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "has 1-channel images, but config.input.channels=3" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())
