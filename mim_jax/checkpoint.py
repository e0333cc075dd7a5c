"""Checkpoints: orbax CheckpointManager (async, last N kept) holding the train state, the Grain
iterator state and the config. All orbax calls live here so a move to orbax v1 touches one file.

Restores always target an abstract state whose shardings come from the *current* mesh, so a run
saved on 8 devices resumes on 1 (and vice versa). Orbax writes each step into a temporary folder and
renames it on commit, so a save interrupted half-way is never mistaken for a checkpoint.
"""
from __future__ import annotations

import logging

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
    pass


class Checkpointer:

    def __init__(self, directory, *, save_interval_steps: int, max_to_keep: int, async_save: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=save_interval_steps, max_to_keep=max_to_keep, create=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, config=None, *, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if config is not None:
            items["config"] = ocp.args.JsonSave(config.to_dict())
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once any has been asked to stop (multi-host preemption notice)."""
        return self.manager.reached_preemption(step)

    def _has_data_state(self, step: int) -> bool:
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        return (self.directory / str(step) / "data" / name).exists()

    def restore(self, abstract_state, data_iterator=None, step: int | None = None):
        """Restores the newest readable checkpoint (or `step`) onto `abstract_state`'s shardings.

        The Grain iterator is restored only when this checkpoint holds a state file for this
        process (same process count); otherwise the caller rebuilds the stream from the step.
        Returns (step, state, data_restored). A corrupt checkpoint is reported and the previous one
        tried, so one bad write never loses the whole run.
        """
        candidates = [step] if step is not None else self.all_steps()[::-1]
        errors = []
        for candidate in candidates:
            items = {"state": ocp.args.StandardRestore(abstract_state)}
            with_data = data_iterator is not None and self._has_data_state(candidate)
            if with_data:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=ocp.args.Composite(**items))
            except Exception as e:  # orbax raises many types for missing/corrupt files.
                message = f"step {candidate}: {type(e).__name__}: {str(e)[:300]}"
                logging.error("Checkpoint %s could not be restored: %s", self.directory, message)
                errors.append(message)
                continue
            if errors:
                logging.warning("Restored older checkpoint %d because newer ones were unreadable.", candidate)
            return candidate, restored["state"], with_data
        raise CheckpointError(
            f"No readable checkpoint in {self.directory}:\n  " + "\n  ".join(errors) +
            "\nIf the checkpoint was written by an incompatible config (model size, method), start a "
            "new --workdir; if it is corrupt, delete that step's folder to resume from an older one.")

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
