"""The console: one progress line per log step, no third-party INFO chatter, and command-line
mistakes as one message with the fix."""
import logging
import os
import pathlib
import subprocess
import sys

import pytest

from mim_jax.runtime import console, metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_progress_line_has_the_loss_terms_throughput_and_eta():
    line = metrics.progress_line(120, 938, {"loss": 0.81234, "mae_loss": 0.81234, "lr": 1e-3, "images_per_s": 1234.4,
                                            "mfu": 0.315, "step_time_s": 0.5})
    assert line == "step 120/938  loss 0.8123 (mae_loss 0.8123)  1,234 img/s  MFU 31.5%  ETA 6m49s"
    assert metrics.progress_line(1, 10_001, {"loss": 2.0, "step_time_s": 1.0}) == "step 1/10001  loss 2  ETA 2h46m"


def test_the_eta_includes_the_evaluations_still_to_run():
    scalars = {"loss": 2.0, "step_time_s": 1.0}
    assert metrics.progress_line(40, 100, scalars, eval_s=150.0) == "step 40/100  loss 2  ETA 3m30s"
    assert metrics.progress_line(40, 100, scalars, 0.0, 4) == "step 40/100  loss 2  ETA 1m00s + 4 evaluations"
    assert metrics.progress_line(40, 100, scalars, 0.0, 1) == "step 40/100  loss 2  ETA 1m00s + 1 evaluation"


def test_periodic_evaluations_know_what_is_left_of_them():
    from conftest import tiny_mae_config

    from mim_jax.config_defaults import periodic_eval
    from mim_jax.evaluators.periodic import PeriodicEvals
    config = tiny_mae_config()
    config.evals = {"knn": periodic_eval("knn", every_epochs=0.0, every_steps=3),
                    "linear": periodic_eval("linear_probe", every_epochs=0.0, every_steps=5)}
    evals = PeriodicEvals(config, method=None, sharding=None, steps_per_epoch=10)
    assert evals.remaining(1, 10) == (0.0, 6)      # knn at 3, 6, 9, 10; linear at 5, 10; none has run
    assert evals.estimate(["knn"]) is None
    evals._seconds.update(knn=2.0, linear=10.0)    # as run() records them
    assert evals.remaining(4, 10) == (3 * 2.0 + 2 * 10.0, 0)    # knn 6, 9, 10; linear 5, 10
    assert evals.remaining(10, 10) == (12.0, 0) and evals.estimate(["knn", "linear"]) == 12.0


def test_progress_lines_come_every_tenth_after_thirty_seconds(caplog):
    clock = [0.0]
    progress = console.Progress("train features", 60_000, "images", clock=lambda: clock[0])
    with caplog.at_level(logging.INFO):
        for done, now in [(3_000, 10.0), (4_000, 40.0), (12_000, 60.0), (13_000, 95.0), (14_000, 130.0),
                          (17_000, 396.0), (60_000, 500.0)]:
            clock[0] = now
            progress.update(done)
    assert caplog.messages == ["train features: 4,000/60,000 images (6%), 9m20s left",     # the first after 30 s
                               "train features: 13,000/60,000 images (21%), 5m43s left",   # a tenth more, 30 s on
                               "train features: 17,000/60,000 images (28%), 16m42s left"]  # 300 s, less than a tenth
    quick = console.Progress("eval features", 100, clock=lambda: 0.0)
    with caplog.at_level(logging.INFO):
        quick.update(50)
    assert len(caplog.messages) == 3                      # a task under 30 s prints nothing


def _record(path: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_only_this_packages_info_reaches_the_console():
    own_info = console._OwnInfoOnly()
    assert own_info.filter(_record(os.path.join(console.PACKAGE_DIR, "train.py"), logging.INFO))
    orbax = "/usr/lib/python3/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not own_info.filter(_record(orbax, logging.INFO))
    assert own_info.filter(_record(orbax, logging.WARNING))
    expected = _record(orbax, logging.WARNING)
    expected.msg = "Given directory is read only=%s"   # reading a finished run's checkpoints
    assert not own_info.filter(expected)


_LOG_ONE_INFO_LINE = """
from absl import app
from mim_jax.runtime import compile_cache, console
def main(argv):
    console.quiet_unless_verbose()
    compile_cache.enable({workdir!r}, None)   # logs one INFO line from this package
app.run(main)
"""


@pytest.mark.parametrize("flag, prefixed", [(None, False), ("--verbosity=0", True), ("--showprefixforinfo", True)])
def test_info_lines_are_bare_messages_on_the_console(tmp_path, flag, prefixed):
    """absl's `I1203 22:31:39.123456 12345 compile_cache.py:37] ` prefix stays off the console's INFO
    lines unless --verbosity (or --showprefixforinfo) asks for absl's format."""
    code = _LOG_ONE_INFO_LINE.format(workdir=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code, *([flag] if flag else [])], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stderr.splitlines() if "Persistent compilation cache" in line)
    assert line.startswith("Persistent compilation cache: ") != prefixed, line
    assert line.startswith("I") and "compile_cache.py:" in line if prefixed else True


def _main(*args, timeout=120, module="mim_jax.main", platforms="cpu"):
    env = dict(os.environ, JAX_PLATFORMS=platforms)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("args, message", [
    (["--config=configs/capi.py:variant=X/14"], "variant='X/14'; use S/14, B/14 or L/14."),
    (["--config=configs/mae.py:local", "--config.input.nonexistent=3"],
     "--config.input.nonexistent: configs/mae.py:local has no key 'nonexistent'; --config.input has: batch_size"),
    (["--config=configs/mae.py:local", "--config.input.batch_size=abc"], "--config.input.batch_size=abc: invalid"),
])
def test_a_bad_command_line_is_one_message(tmp_path, args, message):
    out = _main(*args, f"--workdir={tmp_path}")
    assert out.returncode == 1 and message in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("module", ["mim_jax.main", "mim_jax.bench"])
def test_a_misspelled_config_file_is_one_line_listing_the_configs(tmp_path, module):
    out = _main("--config=configs/mea.py:local", f"--workdir={tmp_path}", module=module)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], out.stderr[-2000:]
    assert "--config=configs/mea.py:local: there is no file configs/mea.py; available configs: " in out.stderr
    assert "configs/mae.py" in out.stderr and "configs/cmae.py" in out.stderr and "common.py" not in out.stderr


def test_a_missing_config_outside_the_repository_lists_the_repositorys_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    message = console.missing_config_file(["main", "--config", "configs/mae.py", "--workdir=x"])
    assert message.startswith("--config=configs/mae.py: there is no file configs/mae.py; available configs: ")
    assert str(ROOT / "configs" / "mae.py") in message
    assert console.missing_config_file(["main", f"--config={ROOT / 'configs' / 'mae.py'}:local"]) is None


@pytest.mark.parametrize("config", ["configs/cae_v2.py:local,teacher=run:tests/fixtures/checkpoints_9ddba71/mae",
                                    "configs/finetune.py:init=tests/fixtures/checkpoints_9ddba71/mae,local"])
def test_configs_that_read_another_run_parse_without_orbax_warnings(tmp_path, config):
    """These configs name another run, read when the run starts, never while the config is built
    (which once printed orbax's read-only warnings and absl's "Logging before flag parsing" notice):
    an unknown key stops the command right after the config is built, in one line."""
    out = _main(f"--config={config}", "--config.nonexistent=1", f"--workdir={tmp_path}")
    assert out.returncode == 1 and out.stderr.startswith("FATAL: --config.nonexistent: "), out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]


@pytest.mark.slow
def test_a_run_prints_its_progress_and_no_third_party_info(tmp_path, fashion_mnist_dir):
    tiny = ["--config.model.depth=1", "--config.decoder.depth=1", "--config.input.batch_size=32",
            "--config.total_steps=2", "--config.log_steps=1", "--config.evals={}"]
    out = _main("--config=configs/mae.py:local", f"--workdir={tmp_path}", f"--config.input.data_dir={fashion_mnist_dir}",
                *tiny, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "step 2/2  loss " in out.stderr and "img/s  ETA " in out.stderr
    assert any(line.startswith("step 2/2  loss ") for line in out.stderr.splitlines())   # no absl prefix
    # ... nor multiprocessing's report of the data workers' batches left in shared memory.
    for chatter in ("checkpoint_manager.py", "oneDNN", "libtpu", "dataset_info.py", "logging_writer.py",
                    "leaked shared_memory"):
        assert chatter not in out.stderr, chatter


@pytest.mark.slow
def test_bench_prints_its_report_without_third_party_info():
    out = _main("--config=configs/mae.py:local", "--config.model.depth=1", "--config.decoder.depth=1",
                "--config.input.batch_size=8", "--steps=1", module="mim_jax.bench", timeout=300,
                platforms="")   # JAX probes every backend, as on a machine where nothing is set
    assert out.returncode == 0, out.stderr[-3000:]
    assert "images_per_s" in out.stdout
    assert "Unable to initialize backend" not in out.stderr and "xla_bridge.py" not in out.stderr, out.stderr
