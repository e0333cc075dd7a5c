"""Entry point: `python -m mim_jax.main --config=configs/<method>.py[:args] --workdir=DIR`.

Run it again with the same workdir to resume. Multi-host: start the same command on every host;
`jax.distributed` is initialised when the environment describes several processes (TPU pods, SLURM,
Open MPI auto-detected by JAX) or when --coordinator_address/--num_processes/--process_id are given.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow only reads data set metadata here; its oneDNN notice would print at every start.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS


def _auto_detected_cluster() -> bool:
    env = os.environ
    return (int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
            or "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"])


def initialize_distributed(peer_timeout_s: float):
    """Called once in the main process only: Grain worker processes must never join the cluster.
    Returns the watch over the other processes (peers.py), or None for a single process."""
    import jax

    from mim_jax.runtime import peers
    if multiprocessing.parent_process() is not None:
        return None
    # JAX's own heartbeat check is the backstop: it aborts with a C++ fatal error that only names a
    # "task", so it is given longer than the peer watch, which names the process and the fix.
    heartbeat = max(100, int(2 * peer_timeout_s)) if peer_timeout_s else 100
    if FLAGS.coordinator_address:
        # CPU devices talk through gloo (no effect on accelerator backends); without it CPU
        # multi-process collectives are unavailable. Must be set before any backend starts.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                   heartbeat_timeout_seconds=heartbeat)
    elif _auto_detected_cluster():
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    return peers.watch(timeout_s=peer_timeout_s)


def main(argv):
    try:
        _main(argv)
    except KeyboardInterrupt:   # Ctrl-C outside the training loop (start-up, an evaluation job)
        logging.error("Interrupted (Ctrl-C). Run the same command again to go on (training resumes from its "
                      "newest complete checkpoint).")
        sys.exit(130)


def _main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from mim_jax.runtime import console
    console.quiet_unless_verbose()
    import tensorflow as tf  # TFDS/clu need TF; keep it off the accelerators.
    tf.config.set_visible_devices([], "GPU")
    watch = initialize_distributed(FLAGS.config.peer_timeout_s)
    import jax
    logging.info("Process %d/%d, %d local / %d global devices (%s).", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)
    from mim_jax.errors import UserFacingError
    from mim_jax.runtime import compile_cache
    # Before anything compiles: a restarted or resumed job reuses the compiled steps.
    compile_cache.enable(FLAGS.workdir, FLAGS.config.compilation_cache_dir)
    try:
        if "evaluator" in FLAGS.config:   # an evaluation job (config_defaults.evaluation)
            from mim_jax.evaluators import run
            run.evaluate(FLAGS.config, FLAGS.workdir)
        else:
            from mim_jax.training import train
            train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except UserFacingError as e:  # expected: the message says what to fix, a traceback adds nothing
        logging.error("%s", e)
        sys.exit(e.exit_code)
    finally:
        from mim_jax.data import pipeline
        pipeline.release_shared_memory()   # no "leaked shared_memory" report at exit
        if watch is not None:     # the others may take longer to finish their last save
            watch.stop()


def define_flags(flag_values: flags.FlagValues = FLAGS):
    """The command's flags, on `flag_values`: absl's global FLAGS when run as a command (only then,
    so the module imports beside the other entry points), a fresh FlagValues where the documented
    commands are checked (tests/test_docs.py)."""
    config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/mae.py:variant=B/16.",
                                    flag_values=flag_values, lock_config=True)
    flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and TensorBoard events go.",
                        flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.", flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process' index in a multi-process run.", flag_values=flag_values)
    flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


if __name__ == "__main__":
    from mim_jax.runtime import console
    define_flags()
    app.run(main, flags_parser=console.parse_flags)
