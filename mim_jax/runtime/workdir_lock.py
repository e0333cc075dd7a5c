"""One trainer per workdir: `WORKDIR/lock`, held with `flock` by process 0 while it trains and
naming its holder (host, pid, start time) for the error a second trainer gets.

The kernel (or the NFS server) releases a `flock` when its holder dies, however it dies, so a lock
file left by a killed trainer is stale by construction: the next trainer takes it over and says
whose it was. Object stores (`gs://`) have no such lock: a workdir there is not locked (the
trainer says so).
"""
from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import socket

from mim_jax.errors import UserFacingError

NAME = "lock"


class WorkdirBusyError(UserFacingError):
    pass


def _describe(holder: dict) -> str:
    return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _read(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return json.loads(os.read(fd, 4096) or b"{}")
    except ValueError:   # written by a holder that died mid-write
        return {}


def acquire(workdir) -> int | None:
    """Locks `workdir` (which exists) for this process: the lock file's descriptor, None where the
    filesystem cannot lock. Raises WorkdirBusyError naming the holder when another process has it."""
    path = os.path.join(os.fspath(workdir), NAME)
    if "://" in path:
        logging.warning("%s is on an object store, where no lock keeps a second trainer out: start one trainer "
                        "per workdir.", workdir)
        return None
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise WorkdirBusyError(
                f"{workdir} is in use by another trainer ({_describe(holder) if holder else 'starting up'}; "
                f"lock file {path}). One trainer writes a workdir: wait for it to finish or stop it, or pass another "
                "--workdir.") from None
        except OSError as e:   # a filesystem without locks
            os.close(fd)
            logging.warning("Cannot lock %s (%s): start one trainer per workdir.", path, e.strerror or e)
            return None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:   # not a file its previous holder unlinked while we opened it
            break
        os.close(fd)
    stale = _read(fd)
    if stale:
        logging.info("Took over the lock of %s left by %s, which is no longer running.", workdir, _describe(stale))
    me = {"host": socket.gethostname(), "pid": os.getpid(),
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    os.fsync(fd)
    return fd


def release(workdir, fd: int | None) -> None:
    if fd is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(os.fspath(workdir), NAME))   # before unlocking: no one locks a file being removed
    os.close(fd)


@contextlib.contextmanager
def held(workdir, enabled: bool = True):
    """`workdir` locked for the block (when `enabled`: process 0 of a run)."""
    fd = acquire(workdir) if enabled else None
    try:
        yield
    finally:
        release(workdir, fd)
