"""Pod scale: the persistent compilation cache, multislice meshes, and launch/tpu_pod.sh."""
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mim_jax import parallel
from mim_jax.runtime import compile_cache

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu_pod.sh"


# --- compilation cache ---------------------------------------------------------------------------

_CACHE_RUN = textwrap.dedent("""
    import sys, jax, jax.numpy as jnp
    from mim_jax.runtime import compile_cache
    events = []
    jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
    path = compile_cache.enable(sys.argv[1], None, min_compile_time_secs=0)
    f = jax.jit(lambda x: jnp.sin(x) @ x.T + 1.0)
    f(jnp.ones((8, 8))).block_until_ready()
    print(path)
    print("hits", events.count("/jax/compilation_cache/cache_hits"))
    print("misses", events.count("/jax/compilation_cache/cache_misses"))
""")


def _cache_run(workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)   # the test session's own cache (conftest.py)
    out = subprocess.run([sys.executable, "-c", _CACHE_RUN, str(workdir)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120, check=True).stdout.split("\n")
    counts = dict(line.split() for line in out[1:] if line)
    return out[0], int(counts["hits"]), int(counts["misses"])


def test_compilation_cache_persists_across_processes(tmp_path):
    path, hits, misses = _cache_run(tmp_path)
    assert path == str(tmp_path / "jax_cache")
    entries = sorted(os.listdir(path))
    assert entries and hits == 0 and misses >= 1
    # A restarted job compiles nothing: the program comes from the cache, which stays as it was.
    _, hits, misses = _cache_run(tmp_path)
    assert hits >= 1 and misses == 0
    assert sorted(os.listdir(path)) == entries


def test_compilation_cache_paths(tmp_path, monkeypatch):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    try:
        assert compile_cache.enable(tmp_path, "") is None           # "" turns it off
        assert compile_cache.enable(None, None) is None             # no workdir, nothing configured
        assert jax.config.jax_compilation_cache_dir == before
        assert compile_cache.enable(tmp_path, None) == str(tmp_path / "jax_cache")
        shared = tmp_path / "machine_cache"    # one cache for every run on the machine
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(shared))
        assert compile_cache.enable(tmp_path, None) == str(shared) and shared.is_dir()
        assert compile_cache.enable(tmp_path, "") is None           # the config still wins
        custom = tmp_path / "elsewhere"
        assert compile_cache.enable(tmp_path, str(custom)) == str(custom) and custom.is_dir()
        assert jax.config.jax_compilation_cache_dir == str(custom)
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


# --- multislice mesh -----------------------------------------------------------------------------

class FakeDevice:
    """What mesh construction reads of a device, with a TPU multislice `slice_index`."""
    platform = device_kind = "cpu"

    def __init__(self, id, slice_index=None, per_process=4):
        self.id, self.process_index = id, id // per_process
        if slice_index is not None:
            self.slice_index = slice_index

    def __repr__(self):
        return f"FakeDevice({self.id}, slice={getattr(self, 'slice_index', None)})"


def _slices(n_slices, per_slice):
    return [FakeDevice(s * per_slice + i, s) for s in range(n_slices) for i in range(per_slice)]


def _slice_of(array):
    return np.vectorize(lambda d: d.slice_index)(array)


def test_multislice_splits_data_over_slices():
    devices = _slices(2, 8)[::-1]                                   # order of the list does not matter
    mesh = parallel.make_mesh([("data", -1), ("fsdp", 4)], devices)
    assert mesh.axis_names == ("data", "fsdp") and mesh.devices.shape == (4, 4)
    slices = _slice_of(mesh.devices)
    # Each slice a contiguous block of `data`; fsdp (the chatty axis) never leaves a slice.
    np.testing.assert_array_equal(slices, [[0] * 4, [0] * 4, [1] * 4, [1] * 4])
    assert sorted(d.id for d in mesh.devices.flat) == list(range(16))


def test_multislice_explicit_dcn_axis():
    devices = _slices(4, 4)
    mesh = parallel.make_mesh([("dcn", -1), ("data", 2), ("fsdp", 2)], devices)
    assert dict(mesh.shape) == {"dcn": 4, "data": 2, "fsdp": 2}
    slices = _slice_of(mesh.devices)
    for s in range(4):
        assert (slices[s] == s).all()
    # The batch is split over dcn too (slice-major), and rules naming `data` follow onto dcn.
    assert parallel.batch_sharding(mesh).spec == P(("dcn", "data", "fsdp"))
    assert parallel.batch_shards(mesh) == 16
    rules = (("act_batch", ("data", "fsdp")), ("embed", "fsdp"), ("x", "data"), ("y", None))
    assert parallel.rules_for_mesh(rules, mesh) == (
        ("act_batch", ("dcn", "data", "fsdp")), ("embed", "fsdp"), ("x", ("dcn", "data")), ("y", None))
    with pytest.raises(ValueError, match="4 slices"):
        parallel.make_mesh([("dcn", 2), ("data", -1)], devices)
    with pytest.raises(ValueError, match="divisible"):
        parallel.make_mesh([("data", 2), ("fsdp", -1)], devices)


def test_single_slice_unchanged():
    devices = jax.devices()
    mesh = parallel.make_mesh([("data", 2), ("fsdp", -1)])
    expected = jax.make_mesh((2, len(devices) // 2), ("data", "fsdp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)
    assert mesh == expected
    same_slice = [FakeDevice(i, 0) for i in range(8)]        # one slice index: no hybrid mesh
    assert [d.id for d in parallel.make_mesh([("data", -1)], same_slice).devices.flat] == list(range(8))
    no_slice = [FakeDevice(i) for i in range(8)]
    assert parallel.make_mesh([("data", 4), ("fsdp", 2)], no_slice).devices.shape == (4, 2)
    assert parallel.batch_sharding(mesh).spec == P(("data", "fsdp"))
    rules = (("act_batch", ("data", "fsdp")),)
    assert parallel.rules_for_mesh(rules, mesh) is rules


# --- launch/tpu_pod.sh ---------------------------------------------------------------------------

TRICKY = ["--config=configs/mae.py:variant=L/16", "--workdir=gs://bucket/my run",
          """--config.mesh=[("data",2),("fsdp",4)]""", "--note=it's \"quoted\" $HOME `x` *"]


def _bash_words(line):
    """The words bash makes of a printed command line."""
    out = subprocess.run(["bash", "-c", 'eval "words=($1)"; printf "%s\\0" "${words[@]}"', "_", line],
                         capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def _dry_run(*args):
    out = subprocess.run(["bash", str(SCRIPT), "--dry_run", *args], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return [line for line in out.splitlines() if line.startswith(("gcloud", "("))]


def _remote_command(words):
    return words[words.index("--command") + 1]


def _run_remote(command, tmp_path):
    """Runs a remote command as the worker's shell would, with a python3 that prints its argv."""
    home, bin_dir = tmp_path / "home", tmp_path / "fakebin"
    (home / "mim_jax").mkdir(parents=True)
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{bin_dir}:{os.environ['PATH']}")
    out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, check=True).stdout
    return out.split("\0")[:-1]


def test_pod_script_quotes_arguments_and_copies_code(tmp_path):
    lines = _dry_run("my-tpu", "us-central2-b", *TRICKY)
    commands = [_bash_words(line) for line in lines if line.startswith("gcloud")]
    assert not any("queued-resources" in c for c in commands)       # not asked for
    scp = [c for c in commands if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == "scp"]
    assert scp and "--worker=all" in scp[0] and any(w.startswith("my-tpu:") for w in scp[0])
    ssh = [c for c in commands if c[4:5] == ["ssh"]]
    install, launch = _remote_command(ssh[0]), _remote_command(ssh[-1])
    assert "tar -xzf" in install and "pip install" in install and "requirements.txt" in install
    assert all("--worker=all" in c for c in ssh)
    # The remote shell gets back every argument exactly as given.
    assert launch.startswith("cd ~/mim_jax && python3 -m mim_jax.main ")
    assert _run_remote(launch, tmp_path) == ["-m", "mim_jax.main", *TRICKY]
    assert any(line.startswith("(cd ") and "tar" in line for line in lines)   # the archive step


def test_pod_script_queued_spot():
    lines = _dry_run("--spot", "--accelerator_type=v4-32", "--project=proj", "pod", "zone-a", "--x=1")
    commands = [_bash_words(line) for line in lines if line.startswith("gcloud")]
    create = [c for c in commands if c[3:5] == ["queued-resources", "create"]]
    assert len(create) == 1
    create = create[0]
    assert create[5] == "pod" and "--spot" in create
    for flag, value in [("--node-id", "pod"), ("--zone", "zone-a"), ("--accelerator-type", "v4-32"),
                        ("--project", "proj")]:
        assert create[create.index(flag) + 1] == value
    names = [" ".join(c[3:5]) for c in commands]
    assert names.index("queued-resources create") < names.index("tpu-vm scp") < len(names) - 1
    assert _remote_command(commands[-1]).endswith("python3 -m mim_jax.main --x=1")


def test_pod_script_needs_accelerator_type_for_queued():
    r = subprocess.run(["bash", str(SCRIPT), "--dry_run", "--queued", "pod", "zone"], capture_output=True, text=True)
    assert r.returncode == 2 and "accelerator_type" in r.stderr


def test_pod_script_relaunches_after_preemption(tmp_path):
    """A fake gcloud: the first launch dies with the TPU preempted; the script recreates the queued
    resource and relaunches the same command, which then finishes."""
    log, state = tmp_path / "log", tmp_path / "state"
    state.write_text("READY")
    fake = tmp_path / "bin" / "gcloud"
    fake.parent.mkdir()
    fake.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        printf '%s\\n' "$*" >> {log}
        case "$*" in
          *"tpu-vm describe"*) cat {state} ;;
          *"queued-resources describe"*) echo ACTIVE ;;
          *"queued-resources create"*) echo READY > {state} ;;
          *"--command cd"*)
            if [[ ! -e {tmp_path}/launched ]]; then touch {tmp_path}/launched; echo PREEMPTED > {state}; exit 1; fi ;;
        esac
        exit 0
    """))
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}", TPU_POD_RETRY_SLEEP="0")
    r = subprocess.run(["bash", str(SCRIPT), "--spot", "--accelerator_type=v4-8", "pod", "zone", "--a=b c"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    launches = [c for c in calls if "--command cd" in c]
    assert len(launches) == 2 and launches[0] == launches[1]
    assert sum("queued-resources create" in c for c in calls) == 1     # only after the preemption
    assert sum("tpu-vm scp" in c for c in calls) == 2                  # fresh workers get the code
    assert "Run finished (attempt 2)" in r.stdout


@pytest.mark.parametrize("fits", [False, True])
def test_pod_script_check_compiles_for_the_slice_first_and_creates_nothing_when_it_does_not_fit(tmp_path, fits):
    """--check runs `python3 -m mim_jax.aot --topology=<accelerator type>` with the run's arguments
    (without --workdir) before any gcloud command; a python3 and a gcloud that log their argv stand
    in for both."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for tool, status in (("python3", 0 if fits else 1), ("gcloud", 0)):
        (bin_dir / tool).write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> {log}\nexit {status}\n')
        (bin_dir / tool).chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TPU_POD_RETRY_SLEEP="0")
    out = subprocess.run(["bash", str(SCRIPT), "--check", "--accelerator_type=v5p-128", "--max_attempts=1",
                          "pod", "zone-a", "--config=configs/capi.py", "--workdir", "gs://b/run", "--config.seed=3"],
                         env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    assert calls[0] == "python3 -m mim_jax.aot --topology=v5p-128 --config=configs/capi.py --config.seed=3"
    if fits:
        assert any(c.startswith("gcloud compute tpus") for c in calls[1:])
    else:
        assert out.returncode == 1 and calls == calls[:1] and "nothing was created" in out.stderr
