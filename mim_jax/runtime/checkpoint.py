"""Checkpoints: orbax CheckpointManager (async, last N kept) holding the train state, the Grain
iterator state and the config. All orbax calls live here so a move to orbax v1 touches one file.

Restores always target an abstract state whose shardings come from the *current* mesh, so a run
saved on 8 devices resumes on 1 (and vice versa). Orbax writes each step into a temporary folder and
renames it on commit, so a save interrupted half-way is never mistaken for a checkpoint; such a
folder is removed when the next run starts. Each step stores the training metrics it was saved with.
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from mim_jax import config_defaults
from mim_jax.errors import UserFacingError
from mim_jax.runtime import storage


class CheckpointError(UserFacingError, RuntimeError):
    pass


def _paths(tree) -> dict:
    return {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_mismatch(stored, wanted, limit: int = 8) -> str | None:
    """A readable description of how two trees of shaped leaves differ (missing keys, unexpected
    keys, wrong shapes), or None when keys and shapes agree."""
    have, want = _paths(stored), _paths(wanted)
    problems = []
    missing = sorted(want.keys() - have.keys())
    unexpected = sorted(have.keys() - want.keys())
    wrong = [f"{k}: stored {tuple(np.shape(have[k]))}, expected {tuple(np.shape(want[k]))}"
             for k in sorted(want.keys() & have.keys()) if tuple(np.shape(have[k])) != tuple(np.shape(want[k]))]
    for what, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{len(items)} {what}: {', '.join(items[:limit])}{more}")
    return "; ".join(problems) or None


def _drop_expected_reports():
    """Drops, process-wide, what orbax and tensorstore print for a failure this module reports as
    one message (installed once):

    - a failed restore ends orbax's event loop while tensorstore still completes the step's other
      reads; each completion reports "RuntimeError: Event loop is closed" as an unraisable
      exception, a traceback per array, and the reads that failed too are logged by asyncio as
      "Task exception was never retrieved" when their tasks are collected;
    - a full or unwritable disk met by a save's background threads is logged by orbax with a
      traceback per thread and array; the next save or wait raises it as one StorageError.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable):
        if not (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True
    sys.unraisablehook = hook
    logging.getLogger("absl").addFilter(_no_storage_fault_records)   # orbax logs through absl
    logging.getLogger("asyncio").addFilter(_no_unretrieved_read_failures)


def _no_storage_fault_records(record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
        return True
    error = record.exc_info[1] if record.exc_info else RuntimeError(record.getMessage())
    return not storage.is_fault(error)


def _no_unretrieved_read_failures(record: logging.LogRecord) -> bool:
    # Only tensorstore's errors name their spec; the restore that met the first one reported it.
    error = record.exc_info[1] if record.exc_info else None
    return not (record.getMessage().startswith("Task exception was never retrieved")
                and "tensorstore_spec" in str(error))


class Checkpointer:

    def __init__(self, directory, *, save_interval_steps: int = 1, max_to_keep: int = 1, async_save: bool = True,
                 read_only: bool = False):
        """`read_only=True` opens someone else's run (evaluation, warm starts, teachers): nothing is
        created, written or deleted there."""
        _drop_expected_reports()
        self.directory = epath.Path(directory)
        self.max_to_keep = None if read_only else max_to_keep
        self._failure = None  # a save's storage error, once reported
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        else:
            options = ocp.CheckpointManagerOptions(
                save_interval_steps=save_interval_steps, create=True, enable_async_checkpointing=async_save,
                # Orbax writes a step's `metrics` only when best_fn is set; which steps are kept
                # stays "the newest max_to_keep" (preservation_policy).
                best_fn=lambda m: m.get("loss", math.inf), best_mode="min",
                preservation_policy=ocp.checkpoint_managers.LatestN(max_to_keep),
                cleanup_tmp_directories=True)  # what a full disk or a kill left half-written
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config=None, *, metrics: dict | None = None,
             force: bool = False) -> bool:
        """Saves `step` when due (or `force`); `metrics` (floats) are stored with it, see `metrics`."""
        if not force and not self.manager.should_save(step):
            return False
        # Orbax would wait for the previous save anyway; done first, its failure is reported as
        # such and the disk holds what that save wrote (and freed) when the space is checked.
        self.wait()
        # Found here, an unwritable or full disk is one clear error before orbax starts writing.
        storage.ensure_writable(self.directory)
        needed = self._bytes_needed(state)
        storage.check_space(self.directory, needed, kept=self._kept())
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config.to_dict())
        with self._explained(needed):
            return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def metrics(self, step: int) -> dict | None:
        """The metrics saved with `step` (None for checkpoints saved without)."""
        try:
            return self.manager.metrics(step)
        except Exception:  # unreadable: as good as absent
            return None

    def delete(self, steps):
        for step in steps:
            self.manager.delete(step)

    def enforce_retention(self):
        """Deletes the oldest steps beyond `max_to_keep`. Orbax prunes only after a save commits,
        so a run killed between the commit and the pruning (a lost host) leaves one extra; called
        after a successful restore, when the older ones are no longer needed as a fallback."""
        extra = self.all_steps()[:-self.max_to_keep] if self.max_to_keep else []
        if extra:
            logging.info("Deleting checkpoints %s beyond keep_ckpts=%d.", extra, self.max_to_keep)
            self.delete(extra)

    def _bytes_needed(self, state) -> int:
        """The newest checkpoint's size on disk (compression and orbax's files included), else the
        state's bytes."""
        latest = self.latest_step()
        on_disk = storage.size_on_disk(self.directory / str(latest)) if latest is not None else None
        return on_disk or sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(state))

    def _kept(self) -> str:
        latest = self.latest_step()
        return (f" The newest complete checkpoint, step {latest}, is kept." if latest is not None
                else " No checkpoint was complete yet.")

    @contextlib.contextmanager
    def _explained(self, needed: int | None = None):
        """Turns a full or unwritable disk met by orbax (also in its background thread, reported
        at the next save or wait) into one clear StorageError, raised once."""
        try:
            yield
        except Exception as e:
            error = storage.explain(e, self.directory, needed=needed, kept=self._kept())
            if error is None:
                raise
            self._failure = error
            raise error from e

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any has been asked to stop (multi-host preemption notice)."""
        return self.manager.reached_preemption(step)

    def _has_data_state(self, step: int) -> bool:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / "data" / name).exists()

    def first_readable(self, read, steps=None, *, advice: str):
        """(step, read(step)) for the newest of `steps` (default: every step) that `read` succeeds on.
        Each unreadable newer step is logged once one is found; a UserFacingError from `read` (a
        request the checkpoint cannot serve) is raised as it is. Nothing is moved or changed, so
        readers of another run use it as they are; no readable step is one CheckpointError, listing
        why each failed, followed by `advice`."""
        errors = []
        for candidate in self.all_steps()[::-1] if steps is None else steps:
            try:
                result = read(candidate)
            except UserFacingError:
                raise
            except Exception as e:  # orbax raises many types for missing/corrupt files.
                errors.append((candidate, f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"))
                continue
            for bad, message in errors:
                logging.error("Checkpoint %s step %d could not be restored: %s", self.directory, bad, message)
            if errors:
                logging.warning("Using checkpoint step %d of %s: the newer steps %s are unreadable.", candidate,
                                self.directory, [bad for bad, _ in errors])
            return candidate, result
        listed = "; ".join(f"step {bad}: {message}" for bad, message in errors) or "it holds none"
        raise CheckpointError(f"No readable checkpoint in {self.directory} ({listed}). {advice}")

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores the newest readable checkpoint (or `step`) onto `abstract_state`'s shardings.

        The Grain iterator is restored only when this checkpoint holds a state file for this
        process (same process count); otherwise the caller rebuilds the stream from the step.
        Returns (step, state, data_restored). A corrupt checkpoint is reported and the previous one
        tried, so one bad write never loses the whole run. Once an older step restores onto the same
        target, the newer unreadable ones are corrupt (not from another config) and are moved aside,
        or the next save of their step would find it taken.
        """
        def read(candidate):
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            with_data = data_iterator is not None and self._has_data_state(candidate)
            if with_data:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            return self.manager.restore(candidate, args=ocp.args.Composite(**items))["state"], with_data

        restored, (state, with_data) = self.first_readable(
            read, None if step is None else [step],
            advice="If the checkpoints were written by an incompatible config (model size, method), start a new "
                   "--workdir; if they are corrupt, move their step folders aside to start over.")
        unreadable = [s for s in self.all_steps() if s > restored] if step is None else []
        if unreadable:
            self._move_aside(unreadable, restored)
        return restored, state, with_data

    def _move_aside(self, steps, restored: int):
        """Renames unreadable step folders to `<step>.corrupt-<time>`, a name orbax never takes for a
        step, so they stay for inspection and their steps can be saved again."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for step in steps:
            target = self.directory / f"{step}.corrupt-{stamp}"
            if jax.process_index() == 0:
                try:
                    (self.directory / str(step)).rename(target)
                except Exception as e:  # e.g. a store that cannot rename folders
                    raise CheckpointError(
                        f"Checkpoint step {step} in {self.directory} is unreadable and could not be moved aside "
                        f"({type(e).__name__}: {e}): move or delete that folder, then rerun the same command.") from e
            logging.warning("Checkpoint step %d is unreadable: moved to %s for inspection; the run resumes "
                            "from step %d.", step, target, restored)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("mim_jax:moved_unreadable_checkpoints")
        self.manager.reload()

    def state_metadata(self, step: int):
        """The stored train state's tree (shapes and dtypes, no values)."""
        with ocp.PyTreeCheckpointer() as reader:
            return reader.metadata(self.directory / str(step) / "state").item_metadata.tree

    def restore_parts(self, step: int, abstract: dict, subtrees: dict | None = None) -> dict:
        """Restores only the named parts of the stored train state (e.g. {'params': ..., 'extras':
        ...}, no optimizer state) onto the shardings of `abstract`'s ShapeDtypeStructs. Every key of
        the stored parts must be expected and every expected key stored, with the same shapes:
        otherwise a CheckpointError lists what differs (orbax alone would fill or drop them).
        `subtrees` ({'params': ('encoder',)}) restricts a part to some of its top-level keys (a
        warm start reads the encoder, not the decoder)."""
        stored = self.state_metadata(step)
        for name, part in abstract.items():
            if name not in stored:
                raise CheckpointError(f"Checkpoint {self.directory}/{step} holds no {name!r} "
                                      f"(it has {sorted(stored)}).")
            have = stored[name]
            if subtrees and name in subtrees:
                missing = [k for k in subtrees[name] if k not in have]
                if missing:
                    raise CheckpointError(f"Checkpoint {self.directory}/{step}: its {name!r} have no {missing} "
                                          f"(they have {sorted(have)}).")
                have = {k: have[k] for k in subtrees[name]}
            mismatch = tree_mismatch(have, part)
            if mismatch:
                raise CheckpointError(f"Checkpoint {self.directory}/{step}: its {name!r} do not match the model "
                                      f"built from its config: {mismatch}.")
        wanted = {name: part for name, part in abstract.items() if jax.tree.leaves(part)}
        if not wanted:
            return {name: part for name, part in abstract.items()}
        args = ocp.args.PyTreeRestore(item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                                      partial_restore=True)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        return {name: restored.get(name, part) for name, part in abstract.items()}

    def restore_config(self, step: int) -> ml_collections.ConfigDict:
        """The config saved with `step`, upgraded to this version's fields (config_defaults.upgrade)."""
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        return config_defaults.upgrade(saved)

    def wait(self):
        if self._failure is None:  # orbax raises a failed save again on every wait
            with self._explained():
                self.manager.wait_until_finished()

    def close(self):
        self.wait()
        if self._failure is None:
            self.manager.close()
