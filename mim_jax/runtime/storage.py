"""Storage faults as one clear message. An unwritable folder is found by a probe file at start-up and
before each checkpoint (orbax would wait 300 s for a step folder its background thread failed to
create, then report only a TimeoutError); a full disk names the filesystem, the space needed and the
fix instead of tensorstore's RESOURCE_EXHAUSTED buried in "Event loop is closed" tracebacks."""
from __future__ import annotations

import errno
import os
import pathlib
import re
import shutil

import jax
from etils import epath

from mim_jax.errors import UserFacingError

_FULL = (errno.ENOSPC, errno.EDQUOT)
_DENIED = (errno.EROFS, errno.EACCES, errno.EPERM)
# Tensorstore (orbax's array writer) reports the OS error inside a ValueError's text.
_TENSORSTORE_ERRNO = re.compile(r"os_error_code='(\d+)'")


class StorageError(UserFacingError):
    pass


def ensure_writable(directory) -> None:
    """Creates `directory` if needed and writes and deletes a probe file there (one per process)."""
    directory = epath.Path(directory)
    probe = directory / f".write-probe-{jax.process_index()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # OSError locally; cloud filesystems raise their own types
        raise (explain(e, directory) or unwritable(directory, e)) from e


def unwritable(directory, error: BaseException) -> StorageError:
    reason = f"{error.strerror} (errno {error.errno})" if isinstance(error, OSError) and error.strerror else error
    return StorageError(
        f"Cannot write to {directory}: {reason}. Training writes its checkpoints and metrics there: make "
        "it writable (remount it read-write, fix its owner or permissions) or pass a writable --workdir, "
        "then rerun the same command.")


def full(directory, *, needed: int | None = None, kept: str = "") -> StorageError:
    usage = _usage(directory)
    free, need = size_text(usage.free) if usage else None, size_text(needed) if needed else None
    if usage and needed and free == need:   # close: the exact numbers that decided
        free, need = f"{usage.free:,} bytes", f"{needed:,} bytes"
    space = f" ({free} free of {size_text(usage.total)})" if usage else ""
    need = f"; this write needs about {need}" if needed else ""
    return StorageError(
        f"The filesystem holding {directory} is full or over its quota{space}{need}.{kept} Free space there "
        "(e.g. lower config.keep_ckpts) or move the workdir to a bigger disk, then rerun the same command: it "
        "resumes from the newest complete checkpoint and removes any half-written *.orbax-checkpoint-tmp folder.")


def check_space(directory, needed: int, *, kept: str = "") -> None:
    """Raises `full(...)` before a write of `needed` bytes that cannot fit (local filesystems only):
    stopping before the write leaves no half-written folder and none of tensorstore's tracebacks."""
    usage = _usage(directory)
    if usage and needed > usage.free:
        raise full(directory, needed=needed, kept=kept)


def explain(error: BaseException, directory, *, needed: int | None = None, kept: str = "") -> StorageError | None:
    """The clear message for a full disk or an unwritable folder anywhere in `error`'s chain, else None."""
    code = _errno(error)
    if code in _FULL:
        return full(directory, needed=needed, kept=kept)
    if code in _DENIED:
        return unwritable(directory, OSError(code, os.strerror(code)))
    return None


def is_full(error: BaseException) -> bool:
    return _errno(error) in _FULL


def is_fault(error: BaseException) -> bool:
    """A full disk or an unwritable folder (what `explain` turns into one message)."""
    return _errno(error) in _FULL + _DENIED


def size_on_disk(path) -> int | None:
    """Bytes under a local folder (None elsewhere)."""
    local = pathlib.Path(os.fspath(path))
    if not local.is_dir():
        return None
    return sum(f.stat().st_size for f in local.rglob("*") if f.is_file())


def _errno(error: BaseException | None) -> int | None:
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        match = _TENSORSTORE_ERRNO.search(str(error))
        if match:
            return int(match.group(1))
        error = error.__cause__ or error.__context__
    return None


def _usage(directory):
    try:
        return shutil.disk_usage(os.fspath(directory))
    except (OSError, TypeError):  # not a local path (gs://...) or not there yet
        return None


def size_text(n: float) -> str:
    """Bytes as a short text in powers of 1024 ("1.5 GB")."""
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"
