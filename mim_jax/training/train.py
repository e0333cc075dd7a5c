"""The generic pre-training loop. Methods plug in through `mim_jax.methods.Method`; nothing here
knows which method runs."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time

import jax
import numpy as np
from clu import periodic_actions
from etils import epath

from mim_jax import config_lib, flops, parallel
from mim_jax.data import pipeline
from mim_jax.errors import ConfigError, UserFacingError
from mim_jax.evaluators.periodic import PeriodicEvals
from mim_jax.methods import get_method, resolve_config
from mim_jax.methods.base import RefreshInterrupted
from mim_jax.runtime import checkpoint, console, metrics, storage, workdir_lock
from mim_jax.training import state as state_lib


class DivergenceError(UserFacingError, FloatingPointError):
    pass


class Interrupted(UserFacingError):
    """Ctrl-C stopped the run after saving its step: the shell's 128 + SIGINT."""
    exit_code = 130


class _StopSignal:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag checked between steps, so the loop saves
    and exits cleanly; a second Ctrl-C exits at once, without saving.

    Multi-process runs leave both signals alone: JAX's preemption sync manager handles SIGTERM
    (orbax's `reached_preemption` then agrees on a common step across hosts).
    """

    def __init__(self):
        self.received = None   # the signal that asked to stop
        self._previous = {}
        if jax.process_count() == 1:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            sys.stderr.write("Second Ctrl-C: exiting now, without saving; the same command resumes from the newest "
                             "complete checkpoint.\n")
            sys.stderr.flush()
            os._exit(130)
        name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        again = " (Ctrl-C again exits at once, without saving)" if signum == signal.SIGINT else ""
        logging.warning("%s received: saving a checkpoint after this step, then exiting%s.", name, again)
        self.received = signum

    def restore(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


def durations(config, num_examples: int) -> dict:
    steps_per_epoch = num_examples / config.input.batch_size
    total = config_lib.steps(config, "total", steps_per_epoch=steps_per_epoch)
    return dict(
        steps_per_epoch=steps_per_epoch, total=total,
        warmup=config_lib.steps(config.optax, "warmup", steps_per_epoch=steps_per_epoch, total_steps=total, default=0),
        ckpt=config_lib.steps(config, "ckpt", steps_per_epoch=steps_per_epoch, default=total))


def validate(config, mesh):
    """What would otherwise fail after the data, the model and the compilation were set up, as one
    ConfigError naming every problem and its fix."""
    problems = []
    bs, n_proc = config.input.batch_size, jax.process_count()
    n_batch = parallel.batch_sharding(mesh).num_devices
    if bs % n_batch or bs % n_proc:
        multiple = math.lcm(n_batch, n_proc)
        problems.append(f"config.input.batch_size={bs} must be divisible by the {n_batch} devices that share the "
                        f"batch and by the {n_proc} processes: use a multiple of {multiple} "
                        f"(--config.input.batch_size={max(multiple, bs // multiple * multiple)})")
    channels, mean, std = config.input.channels, config.input.mean, config.input.std
    if len(mean) != channels or len(std) != channels:
        problems.append(f"config.input.channels={channels} needs {channels} values in config.input.mean and "
                        f"config.input.std (they have {len(mean)} and {len(std)}): set both to the data set's "
                        "per-channel statistics in [0, 1], e.g. --config.input.mean='(0.5,)' for one channel "
                        "(python -m mim_jax.data.prepare_folder prints them for a folder of images)")
    if problems:
        raise ConfigError("The config cannot run: " + "; ".join(problems) + ".")


def train_and_evaluate(config, workdir: str) -> state_lib.TrainState:
    workdir = epath.Path(workdir)
    try:
        return _train(config, workdir)
    except UserFacingError:
        raise
    except Exception as e:  # metrics.jsonl or TensorBoard events on a full disk
        if not storage.is_full(e):
            raise
        raise storage.explain(e, workdir) from e


def _train(config, workdir: epath.Path) -> state_lib.TrainState:
    # Before anything else: a missing teacher or init run is the first error, and the checkpoints
    # save the resolved config, which later rebuilds the model without those files.
    config = resolve_config(config)
    mesh = parallel.make_mesh(config.mesh)
    validate(config, mesh)
    # An unwritable workdir is one clear error now, not a timeout at the first checkpoint.
    storage.ensure_writable(workdir)
    storage.ensure_writable(workdir / "checkpoints")
    with workdir_lock.held(workdir, enabled=jax.process_index() == 0):   # one trainer per workdir
        return _train_locked(config, workdir, mesh)


def _train_locked(config, workdir: epath.Path, mesh) -> state_lib.TrainState:
    # ----- method, data source -------------------------------------------------------------------
    source = pipeline.open_source(config.input.dataset, config.input.split, config.input.data_dir,
                                  channels=config.input.channels)
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
            transform=method.train_transform(method.host_state.read(state.extras) if method.host_state else None),
            num_workers=config.input.num_workers, prefetch_buffer=config.input.prefetch_buffer)

    ckpt = checkpoint.Checkpointer(workdir / "checkpoints", save_interval_steps=steps["ckpt"],
                                   max_to_keep=config.keep_ckpts, async_save=config.async_ckpt)
    resume_step = _resume_step(ckpt, config)
    if resume_step is not None or ckpt.latest_step() is not None:
        stored = _stored_config(ckpt, ckpt.latest_step() if resume_step is None else resume_step)
        _check_batch_size(stored, config, workdir)
        try:
            start, state, _ = ckpt.restore(setup.abstract, step=resume_step)
        except checkpoint.CheckpointError as e:
            changes = _model_changes(stored, config)
            if not changes:
                raise
            raise checkpoint.CheckpointError(
                f"The checkpoints in {ckpt.directory} do not fit the model this config builds; these config fields "
                f"differ from the checkpoint's saved config: {'; '.join(changes)}. Rerun with the checkpoint's "
                f"values, or pass a new --workdir (--config.init={workdir} starts a new run from its weights).") from e
        if start >= steps["total"]:   # nothing to train: say so rather than just "Resumed"
            logging.info("%s", _complete_message(workdir, start, steps["total"]))
            ckpt.close()
            return state
        logging.info("Resumed from step %d.", start)
        ckpt.enforce_retention()
    else:
        logging.info("Initialising the model (compiling its initialisation).")
        start, state = 0, setup.create(jax.random.key(config.seed))
    data = data_iterator(start, state)
    refresh_at = set(method.refresh.steps(steps["total"])) if method.refresh else set()

    # ----- loop -------------------------------------------------------------------------------
    writer = metrics.create_writer(workdir, resumed_at=start)
    if start == 0:
        writer.write_hparams({k: v for k, v in config.to_dict().items() if not isinstance(v, dict)})
    # Refresh passes (e.g. heat maps over the training set) amortised over the run.
    refresh = (method.refresh.flops() * len(refresh_at) * len(source) / (steps["total"] * config.input.batch_size)
               if refresh_at else 0.0)
    throughput = flops.Throughput(config.input.batch_size, method.train_flops_per_example() + refresh,
                                  config.peak_flops)
    hooks = [periodic_actions.ReportProgress(num_train_steps=steps["total"], writer=writer,
                                             every_steps=config.log_steps)]
    if config.profile_steps and jax.process_index() == 0:
        # Steps only (no minimum duration), starting once the step is compiled.
        hooks.append(periodic_actions.Profile(logdir=str(workdir), num_profile_steps=config.profile_steps,
                                              profile_duration_ms=None, first_profile=start + 3))
    evals = PeriodicEvals(config, method, sharding=setup.sharding, steps_per_epoch=steps["steps_per_epoch"])
    divergence = _DivergenceCheck(config.max_loss_ratio, start)
    stop = _StopSignal()
    pending = []
    step = start
    compiling = _CompileNotice()
    try:
        stopped = False
        if _refresh_missing(method, state.extras, refresh_at, start):   # a preemption stopped it
            logging.info("Step %d's refresh was stopped by a preemption before its checkpoint: doing it now.", start)
            state, refreshed = _refresh(method, state, setup, source, writer, start, stop)
            if refreshed:
                data.close()
                data = data_iterator(start, state)
            else:
                stopped = True
                logging.warning("Stopped at step %d after a preemption notice; its checkpoint is unchanged.", start)
        while not stopped and step < steps["total"]:
            t0 = time.perf_counter()
            batch = parallel.host_batch_to_global(next(data), mesh)
            throughput.add_step(time.perf_counter() - t0)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, step_metrics = setup.train_step(state, setup.frozen, batch)
            compiling.first_step_done(step_metrics)
            pending.append(step_metrics)
            step += 1
            for hook in hooks:
                hook(step)
            if step in refresh_at:   # before this step's checkpoint, so a resume sees the new extras
                state, refreshed = _refresh(method, state, setup, source, writer, step, stop)
                if refreshed:
                    data.close()
                    data = data_iterator(step, state)

            preempted = stop.received is not None or ckpt.reached_preemption(step)
            saving = preempted or step == steps["total"] or step % steps["ckpt"] == 0
            if saving:  # this step's own metrics, stored with its checkpoint
                latest = metrics.to_host_scalars(pending[-1:])
            if step % config.log_steps == 0 or step == steps["total"] or preempted:
                scalars = metrics.to_host_scalars(pending)
                pending = []
                divergence.check(scalars, step, ckpt)
                scalars.update(throughput.report())
                writer.write_scalars(step, scalars)
                if jax.process_index() == 0:
                    logging.info("%s", metrics.progress_line(step, steps["total"], scalars,
                                                             *evals.remaining(step, steps["total"])))
            due = evals.due(step, last=step == steps["total"])
            if due:
                _announce_evaluations(step, due, evals.estimate(due))
                results = evals.run(due, state.params)
                writer.write_scalars(step, results)
                images = evals.images(state.params)
                if images:
                    writer.write_images(step, images)
                logging.info("step %d evaluation: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
                throughput.reset()  # evaluation time is not training time
            if saving:
                divergence.check(latest, step, ckpt)  # never checkpoint a diverged state
                writer.flush()  # the metrics up to a checkpoint are on disk before it is
                ckpt.save(step, state, data, config, metrics=latest, force=preempted or step == steps["total"])
            if preempted:
                if stop.received != signal.SIGINT:   # Ctrl-C: `Interrupted` says it
                    logging.warning("Stopped at step %d after a preemption notice; checkpoint saved.", step)
                break
    finally:
        try:
            ckpt.close()  # waits for the last save
        finally:
            writer.flush()
            stop.restore()
            data.close()  # stops the data workers and frees their shared-memory batches
    if stop.received == signal.SIGINT:
        raise Interrupted(f"Interrupted (Ctrl-C) at step {step}: its checkpoint is saved; run the same command to "
                          "resume from it.")
    return state


class _CompileNotice:
    """The first step compiles the train step, which can take minutes (CAPI, CMAE on a CPU)
    before any progress line: said when it starts, and how long it took."""

    def __init__(self):
        cache = jax.config.jax_compilation_cache_dir   # compile_cache.enable's, where main enabled it
        reuse = f"; restarts take it from the compilation cache in {cache}" if cache else ""
        logging.info("Compiling the train step: the first step waits for it%s.", reuse)
        self.start = time.perf_counter()

    def first_step_done(self, step_metrics):
        if self.start is None:
            return
        jax.block_until_ready(step_metrics)   # the step is dispatched before it is compiled and run
        logging.info("First step done in %s (compilation included).",
                     console.duration(time.perf_counter() - self.start))
        self.start = None


def _complete_message(workdir: epath.Path, step: int, total: int) -> str:
    """The same command run again on a finished run: where its outputs are and how to go on."""
    done = f"step {step} of {total}" if step == total else f"step {step}, past its {total} total steps"
    return (f"The run in {workdir} is already complete ({done}): nothing to train. Its checkpoints are in "
            f"{workdir / 'checkpoints'}, its metrics in {workdir / 'metrics.jsonl'} (and TensorBoard: "
            f"tensorboard --logdir {workdir}). To train it longer, run the same command with "
            f"--config.total_steps=N (N > {step}); to start anew, give another --workdir.")


def _announce_evaluations(step: int, names: list[str], seconds: float | None):
    """Evaluations can take minutes on a CPU: say they start (and how long the last ones took)."""
    took = f" (about {console.duration(seconds)}, as the last time)" if seconds is not None else ""
    logging.info("step %d: evaluating %s%s.", step, ", ".join(names), took)


def _resume_step(ckpt: checkpoint.Checkpointer, config) -> int | None:
    """The step `config.resume_step` asks to restore (None: the newest). Its later checkpoints
    (a diverged run's) are deleted so the run continues from it and saves those steps again;
    unless the newest was written by this very config: that is a restart of the resumed run
    (e.g. after a preemption), which continues from the newest."""
    step, steps = config.resume_step, ckpt.all_steps()
    if step is None:
        return None
    if steps and steps[-1] > step and _stored_config(ckpt, steps[-1]) == _as_saved(config):
        logging.info("config.resume_step=%d: checkpoint %d was written by this same config after resuming "
                     "from it; continuing from %d.", step, steps[-1], steps[-1])
        return None
    if step not in steps:
        raise checkpoint.CheckpointError(
            f"--config.resume_step={step}: {ckpt.directory} holds no checkpoint of that step (it holds "
            f"{steps or 'none'}). Pass one of those, or leave resume_step unset to continue from the newest.")
    later = [s for s in steps if s > step]
    if later:
        logging.warning("config.resume_step=%d: deleting the later checkpoints %s; the run continues from "
                        "step %d.", step, later, step)
        ckpt.delete(later)
    return step


def _check_batch_size(stored: dict | None, config, workdir):
    """A resume keeps the global batch size: the data stream's position, the lr schedule and every
    count in steps are per batch of that size."""
    saved = stored["input"]["batch_size"] if stored else None
    if saved is not None and saved != config.input.batch_size:
        raise checkpoint.CheckpointError(
            f"The run in {workdir} was trained with config.input.batch_size={saved}, this command gives "
            f"{config.input.batch_size}: its data position, lr schedule and step counts are per batch of {saved}. "
            f"Resume with --config.input.batch_size={saved} (--config.grad_accum_steps=k splits it into k "
            f"micro-batches when memory is short), or pass a new --workdir (--config.init={workdir} starts a new "
            "run from its weights).")


def _model_changes(stored: dict | None, config, limit: int = 10) -> list[str]:
    """The config fields, outside the run-length and evaluation settings, whose values differ from
    the stored config ('model.width: 64 in the checkpoint, 32 here')."""
    if stored is None:
        return []
    theirs, mine = _flat(stored), _flat(_as_saved(config))
    changed = [f"{k}: {theirs.get(k, 'absent')} in the checkpoint, {mine.get(k, 'absent')} here"
               for k in sorted(theirs.keys() | mine.keys())
               if "." in k and not k.startswith("evals.") and theirs.get(k, "absent") != mine.get(k, "absent")]
    return changed[:limit] + ([f"{len(changed) - limit} more"] if len(changed) > limit else [])


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _as_saved(config) -> dict:
    return json.loads(json.dumps(config.to_dict()))


def _stored_config(ckpt, step: int) -> dict | None:
    try:
        return _as_saved(ckpt.restore_config(step))
    except Exception:  # unreadable: not this config's
        return None


class _DivergenceCheck:
    """Stops the run on non-finite metrics, or on a loss over `max_loss_ratio` x this run's first
    loss (0 or None: off), so finite but exploding states (base_lr=1e4 passes a loss of 1e12 within
    three steps) are never checkpointed; the error names a checkpoint to resume from."""

    def __init__(self, max_loss_ratio: float | None, start: int):
        self.max_ratio, self.start = max_loss_ratio or 0.0, start
        self.first = None       # (step, loss): this run's first positive loss
        self.last_sane = None   # the last step whose metrics passed

    def problem(self, scalars: dict) -> str | None:
        bad = {k: v for k, v in scalars.items() if not math.isfinite(v)}
        if bad:
            return f"non-finite metrics {bad}"
        loss = scalars.get("loss")
        if self.max_ratio and self.first and loss is not None and loss > self.max_ratio * self.first[1]:
            return (f"the loss {loss:.3g} is over config.max_loss_ratio={self.max_ratio:g} x this run's first "
                    f"loss {self.first[1]:.4g} (step {self.first[0]}; raise the ratio, or 0 to disable it, if "
                    "such a rise is expected)")
        return None

    def check(self, scalars: dict, step: int, ckpt: checkpoint.Checkpointer):
        problem = self.problem(scalars)
        if problem is None:
            if self.first is None and scalars.get("loss", 0.0) > 0:
                self.first = (step, scalars["loss"])
            self.last_sane = step
            return
        raise DivergenceError(f"Training diverged at step {step}: {problem}. {self._advice(ckpt)}")

    def _advice(self, ckpt: checkpoint.Checkpointer) -> str:
        fix = ("lower config.optax.base_lr (or raise the warm-up, set config.optax.clip_norm, use float32 "
               "config.model.dtype)")
        ckpt.wait()
        sane = [s for s in reversed(ckpt.all_steps())
                if (m := ckpt.metrics(s)) is not None and self.problem(m) is None]
        # A checkpoint's metrics come from the step that wrote it, not from its new weights: it is
        # known to be sane only once a later step's metrics were (with base_lr=1e4 step 2 still
        # has a sane loss, but its update already broke the weights).
        known = [s for i, s in enumerate(sane) if i > 0 or (self.last_sane is not None and s < self.last_sane)]
        if not known:
            return (f"No checkpoint is known to be sane (one is once a later step's metrics were): {fix} and "
                    "start again in a new --workdir.")
        where = " (where this run started)" if known[0] == self.start else ""
        return (f"The newest checkpoint known to be sane is step {known[0]}{where}: {fix} and rerun with "
                f"--config.resume_step={known[0]}, which restores it and deletes the later checkpoints.")


def _refresh(method, state, setup, source, writer, step: int, stop: _StopSignal):
    """The method's refresh after `step` (a pass over the training set, minutes on a CPU), its
    extras placed on their shardings: (state, True); or (state unchanged, False) when a SIGTERM
    stopped it, so the step is saved without it and a resume redoes it (`_refresh_missing`).
    Multi-process runs leave SIGTERM to JAX's preemption sync manager: their refresh finishes
    before the preemption is acted on."""
    try:
        extras, logs = method.refresh.run(state.params, state.extras, source, setup.sharding,
                                           should_stop=lambda: stop.received is not None)
    except RefreshInterrupted as interrupted:
        logging.warning("The refresh after step %d stopped at %d of %d examples for the preemption notice: step %d "
                        "is saved without it, and resuming redoes it.", step, interrupted.done, interrupted.total,
                        step)
        return state, False
    _write_logs(writer, step, logs)
    return state.replace(extras=parallel.place(extras, setup.shardings.extras)), True


def _refresh_missing(method, extras, refresh_at: set[int], start: int) -> bool:
    """Whether the checkpoint a run resumes from is a refresh step saved without its refresh (a
    preemption stopped it): its extras hold fewer refreshes than the schedule has up to it."""
    return start in refresh_at and method.refresh.applied(extras) < sum(1 for s in refresh_at if s <= start)


def _write_logs(writer, step: int, logs: dict):
    """A refresh's logs: scalars as scalars, 1-D arrays as histograms, under `refresh/`."""
    scalars = {f"refresh/{k}": float(v) for k, v in logs.items() if np.ndim(v) == 0}
    histograms = {f"refresh/{k}": np.asarray(v) for k, v in logs.items() if np.ndim(v) > 0}
    if scalars:
        writer.write_scalars(step, scalars)
    if histograms:
        writer.write_histograms(step, histograms)
    logging.info("Refresh at step %d: %s", step, scalars)
