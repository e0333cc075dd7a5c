"""A lost process in a multi-process run, named: every process bumps a counter in the JAX
distributed key-value store and watches the others'. When one stops for `timeout_s`, the survivors
log which process (and host) was lost and what to do, and exit; otherwise JAX's own heartbeat check
aborts them later with "The following tasks are unhealthy: 1" in a C++ fatal error.

The counters are compared with each process's own monotonic clock, so hosts' wall clocks may
disagree. If the store itself stops answering, the coordinator (process 0) is the one lost.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time

PREFIX = "mim_jax/alive/"


class PeerWatch:
    def __init__(self, client, process_id: int, num_processes: int, *, timeout_s: float,
                 interval_s: float | None = None, on_lost=None):
        self.client, self.process_id, self.num_processes = client, process_id, num_processes
        self.timeout_s = timeout_s
        self.interval_s = interval_s or max(min(timeout_s / 5, 5.0), 0.2)
        self.on_lost = on_lost or _exit_lost
        self.host = socket.gethostname()
        self._stop = threading.Event()

    def start(self) -> "PeerWatch":
        threading.Thread(target=self._run, name="peer-watch", daemon=True).start()
        return self

    def stop(self):
        self._stop.set()

    def _run(self):
        beats, last_change, count = {}, {}, 0
        coordinator_silent_since = None
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            count += 1
            try:
                self.client.key_value_set(f"{PREFIX}{self.process_id}", f"{count} {self.host}", allow_overwrite=True)
                entries = self.client.key_value_dir_get(PREFIX)
                coordinator_silent_since = None
            except Exception as error:  # noqa: BLE001 (the store's RPC errors have no common type)
                if self.process_id == 0:
                    continue
                coordinator_silent_since = coordinator_silent_since or now
                if now - coordinator_silent_since > self.timeout_s:
                    self.on_lost(0, "the coordinator", self.timeout_s, detail=str(error).splitlines()[0][:200])
                    return
                continue
            for key, value in entries:
                peer = int(key.rsplit("/", 1)[-1])
                if peer == self.process_id:
                    continue
                beat, host = value.split(" ", 1)
                if beats.get(peer) != beat:
                    beats[peer], last_change[peer] = beat, (now, host)
            for peer, (since, host) in last_change.items():
                if now - since > self.timeout_s:
                    self.on_lost(peer, host, self.timeout_s)
                    return


def _exit_lost(peer: int, host: str, timeout_s: float, detail: str = ""):
    where = f" ({detail})" if detail else ""
    logging.error(
        "Process %d (on %s) of this multi-process run stopped responding %.0f s ago%s: it was killed, crashed or "
        "lost its host. This process stops too, since every step needs all of them. Rerun the same command on "
        "every host: it resumes from the newest checkpoint. The time allowed is config.peer_timeout_s.",
        peer, host, timeout_s, where)
    logging.shutdown()
    os._exit(1)


def watch(*, timeout_s: float) -> PeerWatch | None:
    """Starts watching the other processes of an initialised jax.distributed run (None if single)."""
    import jax
    from jax._src import distributed
    client = distributed.global_state.client
    if client is None or jax.process_count() == 1 or not timeout_s:
        return None
    return PeerWatch(client, jax.process_index(), jax.process_count(), timeout_s=timeout_s).start()
