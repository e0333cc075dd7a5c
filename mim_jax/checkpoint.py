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
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
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


class Checkpointer:

    def __init__(self, directory, *, save_interval_steps: int = 1, max_to_keep: int = 1, async_save: bool = True,
                 read_only: bool = False):
        """`read_only=True` opens someone else's run (evaluation, warm starts, teachers): nothing is
        created, written or deleted there."""
        self.directory = epath.Path(directory)
        if read_only:
            options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
        else:
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

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
