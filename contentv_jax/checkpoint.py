"""Orbax checkpoints of the whole loop state: train state (params, optimizer, EMA, step, RNG) + data position.

Async saves (the train loop keeps running while arrays are written), keep-N, an interval, and forced
saves on SIGTERM / at the end. Each step directory holds two items: `state` (a sharded pytree, restored
straight into the target shardings: no host ever holds all parameters) and `data` (the batch source's
JSON `state()`). Orbax writes into a temporary directory and renames it, so a run killed mid-save
keeps its previous checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Checkpointer(directory, keep, every) -> save(step, state, data_state) / restore(step, abstract_state)."""

    def __init__(self, directory: str | Path, keep: int = 3, every: int = 50, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every), 1), create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Start an (async) save of step `step` if the interval says so or `force`; True if one started."""
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """(state, data_state) of `step`; `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings."""
        if step not in self._manager.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; have {self.all_steps()}")
        out = self._manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return out["state"], out["data"]

    def restore_params(self, step: int | None, abstract_params, use_ema: bool = False):
        """Only the (EMA) params of a checkpoint, straight into the shardings of `abstract_params` (a tree of
        ShapeDtypeStruct with shardings): initialising a later stage from an earlier one. The optimizer
        state is not read."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoints")
        key = "ema_params" if use_ema else "params"
        target = {key: abstract_params}
        restore_args = jax.tree.map(
            lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), target)
        item = self.directory / str(step) / "state"
        out = ocp.PyTreeCheckpointer().restore(
            item, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
        return out[key]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def is_checkpoint_dir(path: str | Path) -> bool:
    """True if `path` holds orbax step directories of this trainer (numbered dirs with a `state` item)."""
    path = Path(path)
    return path.is_dir() and any(p.is_dir() and p.name.isdigit() and (p / "state").exists() for p in path.iterdir())
