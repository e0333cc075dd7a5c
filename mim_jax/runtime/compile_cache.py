"""JAX's persistent compilation cache, so that a restarted or resumed (pod) job does not spend
minutes recompiling the programs it compiled before."""
from __future__ import annotations

import logging
import os

import jax

# Programs cheaper than this to compile are not worth a file (and a remote round trip on gs://).
MIN_COMPILE_TIME_SECS = 1.0


def enable(workdir, configured: str | None = None, *, min_compile_time_secs: float = MIN_COMPILE_TIME_SECS
           ) -> str | None:
    """Points JAX's persistent compilation cache at `configured`; when that is None, at
    $JAX_COMPILATION_CACHE_DIR if set (one cache shared by every run on a machine), else at
    WORKDIR/jax_cache; "" turns the cache off. Returns the cache path in use (None when off).

    Call it before the first compilation. The path may be local or remote (gs://...), like the
    workdir; every process of a multi-host job may share it (JAX writes entries atomically, keyed
    by program, devices and compiler version, so a changed setup simply misses).
    """
    if configured is None:
        configured = os.environ.get("JAX_COMPILATION_CACHE_DIR") or (
            os.path.join(str(workdir), "jax_cache") if workdir else "")
    if configured == "":
        logging.info("Persistent compilation cache off.")
        return None
    path = str(configured)
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:   # the cache only saves time: an unwritable place is not a reason to stop
            logging.warning("Persistent compilation cache off: cannot create %s (%s).", path, e.strerror or e)
            return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)   # any size, if slow to compile
    logging.info("Persistent compilation cache: %s (programs compiling in >= %.1fs)", path,
                 min_compile_time_secs)
    return path
