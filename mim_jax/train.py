"""The generic pre-training loop. Methods plug in through `mim_jax.methods.Method`; nothing here
knows which method runs."""
from __future__ import annotations

import logging
import math
import signal
import time

import jax
import numpy as np
from clu import periodic_actions
from etils import epath

from mim_jax import checkpoint, config_lib, flops, metrics, parallel, state as state_lib
from mim_jax.data import pipeline
from mim_jax.evaluators.periodic import PeriodicEvals
from mim_jax.methods import get_method


class NonFiniteLossError(FloatingPointError):
    pass


class _StopSignal:
    """Turns SIGTERM into a flag checked between steps, so the loop saves and exits cleanly.

    Multi-process runs leave SIGTERM to JAX's preemption sync manager instead (orbax's
    `reached_preemption` then agrees on a common step across hosts).
    """

    def __init__(self):
        self.received = False
        if jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint after this step, then exiting.")
        self.received = True

    def restore(self):
        if jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._previous)


def durations(config, num_examples: int) -> dict:
    steps_per_epoch = num_examples / config.input.batch_size
    total = config_lib.steps(config, "total", steps_per_epoch=steps_per_epoch)
    return dict(
        steps_per_epoch=steps_per_epoch, total=total,
        warmup=config_lib.steps(config.optax, "warmup", steps_per_epoch=steps_per_epoch, total_steps=total, default=0),
        ckpt=config_lib.steps(config, "ckpt", steps_per_epoch=steps_per_epoch, default=total))


def validate(config, mesh):
    bs, n_proc = config.input.batch_size, jax.process_count()
    n_batch = parallel.batch_sharding(mesh).num_devices
    if bs % n_batch or bs % n_proc:
        raise ValueError(f"config.input.batch_size={bs} must be divisible by the {n_batch} devices that "
                         f"share the batch and by the {n_proc} processes.")
    if len(config.input.mean) != config.input.channels or len(config.input.std) != config.input.channels:
        raise ValueError(f"config.input.mean/std need {config.input.channels} values (config.input.channels).")


def train_and_evaluate(config, workdir: str) -> state_lib.TrainState:
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    # ----- mesh, method, data source ----------------------------------------------------------
    mesh = parallel.make_mesh(config.mesh)
    validate(config, mesh)
    source = pipeline.open_source(config.input.dataset, config.input.split, config.input.data_dir)
    method = get_method(config, num_examples=len(source))
    steps = durations(config, len(source))
    logging.info("Mesh %s; %d examples; %.1f steps/epoch; %d total steps.", dict(mesh.shape),
                 len(source), steps["steps_per_epoch"], steps["total"])

    # ----- state: created on its shardings, or restored onto them ----------------------------
    setup = state_lib.build(config, method, mesh, total_steps=steps["total"], warmup_steps=steps["warmup"],
                            global_batch_size=config.input.batch_size)

    def data_iterator(start_step, state):
        # The stream is a function of the step alone (any process or worker count); the transform
        # reads the host copy of the extras it needs (ContrastiveCrop's boxes).
        return pipeline.train_iterator(
            source, global_batch_size=config.input.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(), start_step=start_step,
            transform=method.train_transform(method.host_state(state.extras)), num_workers=config.input.num_workers,
            prefetch_buffer=config.input.prefetch_buffer)

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_interval_steps=steps["ckpt"],
                                   max_to_keep=config.keep_ckpts, async_save=config.async_ckpt)
    if ckpt.latest_step() is not None:
        start, state, _ = ckpt.restore(setup.abstract)
        logging.info("Resumed from step %d.", start)
    else:
        start, state = 0, setup.create(jax.random.key(config.seed))
    data = data_iterator(start, state)
    refresh_at = set(method.refresh_steps(steps["total"]))

    # ----- loop -------------------------------------------------------------------------------
    writer = metrics.create_writer(workdir)
    if start == 0:
        writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
    # Refresh passes (e.g. heat maps over the training set) amortised over the run.
    refresh = method.refresh_flops() * len(refresh_at) * len(source) / (steps["total"] * config.input.batch_size)
    throughput = flops.Throughput(config.input.batch_size, method.train_flops_per_example() + refresh,
                                  config.peak_flops)
    hooks = [periodic_actions.ReportProgress(num_train_steps=steps["total"], writer=writer,
                                             every_steps=config.log_steps)]
    if config.profile_steps and jax.process_index() == 0:
        # Steps only (no minimum duration), starting once the step is compiled.
        hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=config.profile_steps,
                                              profile_duration_ms=None, first_profile=start + 3))
    evals = PeriodicEvals(config, method, mesh=mesh, steps_per_epoch=steps["steps_per_epoch"])
    stop = _StopSignal()
    pending = []
    step = start
    try:
        while step < steps["total"]:
            t0 = time.perf_counter()
            batch = parallel.host_batch_to_global(next(data), mesh)
            throughput.add_step(time.perf_counter() - t0)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = setup.train_step(state, setup.frozen, batch)
            pending.append(step_metrics)
            step += 1
            for hook in hooks:
                hook(step)

            preempted = stop.received or ckpt.reached_preemption(step)
            if step % config.log_steps == 0 or step == steps["total"] or preempted:
                scalars = metrics.to_host_scalars(pending)
                pending = []
                _check_finite(scalars, step)
                scalars.update(throughput.report())
                writer.write_scalars(step, scalars)
            due = evals.due(step, last=step == steps["total"])
            if due:
                writer.write_scalars(step, evals.run(due, state.params))
                throughput.reset()  # evaluation time is not training time
            if step in refresh_at:   # before any checkpoint of this step, so a resume sees it
                extras, logs = method.refresh_extras(state.params, state.extras, source, mesh)
                state = state.replace(extras=parallel.place(extras, setup.shardings.extras))
                _write_logs(writer, step, logs)
                data.close()
                data = data_iterator(step, state)
            if preempted or step == steps["total"] or step % steps["ckpt"] == 0:
                if pending:  # never checkpoint a diverged state
                    _check_finite(metrics.to_host_scalars(pending[-1:]), step)
                ckpt.save(step, state, data, config, force=preempted or step == steps["total"])
            if preempted:
                logging.warning("Stopped at step %d after a preemption notice; checkpoint saved.", step)
                break
    finally:
        ckpt.wait()
        ckpt.close()
        writer.flush()
        stop.restore()
    return state


def _write_logs(writer, step: int, logs: dict):
    """A refresh's logs: scalars as scalars, 1-D arrays as histograms, under `refresh/`."""
    scalars = {f"refresh/{k}": float(v) for k, v in logs.items() if np.ndim(v) == 0}
    histograms = {f"refresh/{k}": np.asarray(v) for k, v in logs.items() if np.ndim(v) > 0}
    if scalars:
        writer.write_scalars(step, scalars)
    if histograms:
        writer.write_histograms(step, histograms)
    logging.info("Refresh at step %d: %s", step, scalars)


def _check_finite(scalars: dict, step: int):
    bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
    if bad:
        raise NonFiniteLossError(
            f"Non-finite training metrics at step {step}: {bad}. The last finite checkpoint is kept; "
            "lower config.optax.base_lr, raise warm-up, set config.optax.clip_norm, or use float32 "
            "(config.model.dtype) and resume.")
