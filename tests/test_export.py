"""`python -m mim_jax.export`'s output folder: never a user's files overwritten without --overwrite,
never a half-written export (docs/weights.md)."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from mim_jax import export
from mim_jax.weights import files

RUN = pathlib.Path(__file__).parent / "fixtures" / "checkpoints_9ddba71" / "mae"


def _leftovers(parent: pathlib.Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_non_empty_out_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors").write_bytes(b"the user's own")
    with pytest.raises(export.ExportError, match=r"--out=.*mine exists and is not empty: pass --overwrite"):
        export.export(RUN, "timm", out)
    assert (out / "model.safetensors").read_bytes() == b"the user's own" and (out / "config.json").read_text() == "{}"
    export.export(RUN, "timm", out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((out / "config.json").read_text())["mim_jax"]["step"] == 2
    assert _leftovers(tmp_path) == []


def test_an_export_that_dies_half_way_leaves_nothing_in_out(tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    abandoned = tmp_path / f".out.partial-{int(dead.stdout)}"   # what a SIGKILLed export left
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half")
    real = files.write

    def write_then_die(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError("killed")   # after the weights file, before its config.json

    monkeypatch.setattr(files, "write", write_then_die)
    with pytest.raises(OSError, match="killed"):
        export.export(RUN, "timm", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    monkeypatch.setattr(files, "write", real)
    export.export(RUN, "timm", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json", "model.safetensors"]


def test_an_overwrite_killed_between_its_two_renames_gives_the_users_files_back(tmp_path):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    moved_aside = tmp_path / f".out.replaced-{dead}"   # out renamed away, the new files not yet in place
    moved_aside.mkdir()
    (moved_aside / "model.safetensors").write_bytes(b"the user's own")
    with pytest.raises(export.ExportError, match="exists and is not empty"):
        export.export(RUN, "timm", tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"the user's own"
    assert _leftovers(tmp_path) == []
    # Killed after the swap: the new export is in place, what was moved aside goes.
    moved_aside.mkdir()
    (moved_aside / "model.safetensors").write_bytes(b"old")
    export.export(RUN, "timm", tmp_path / "out", overwrite=True)
    assert _leftovers(tmp_path) == [] and (tmp_path / "out" / "config.json").exists()


@pytest.mark.slow   # a subprocess
def test_the_command_says_why_it_refuses(tmp_path):
    (tmp_path / "taken").write_text("x")
    out = subprocess.run([sys.executable, "-m", "mim_jax.export", f"--workdir={RUN}", f"--out={tmp_path}"],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         cwd=pathlib.Path(__file__).parents[1], timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"Export failed: --out={tmp_path} exists and is not empty: pass --overwrite" in out.stderr
