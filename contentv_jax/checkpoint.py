"""Orbax checkpoints of the whole loop state: train state (params, optimizer, EMA, step, RNG) + data position.

Async saves (the train loop keeps running while arrays are written), keep-N, an interval, and forced
saves on SIGTERM / at the end. Each step directory holds two items: `state` (a sharded pytree, restored
straight into the target shardings: no host ever holds all parameters) and `data` (the batch source's
JSON `state()`). Orbax writes into a temporary directory and renames it, so a run killed mid-save
keeps its previous checkpoint.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from contentv_common.cli import UsageError, UserError


class NotACheckpointError(ValueError):
    """A path that holds no checkpoint of this trainer (or lacks the asked-for item); the message names it."""


class Checkpointer:
    """Checkpointer(directory, keep, every) -> save(step, state, data_state) / restore(step, abstract_state)."""

    def __init__(self, directory: str | Path, keep: int = 3, every: int = 50, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(int(every), 1), create=True,
            enable_async_checkpointing=async_save,
        )
        # orbax creates the directory: a new one is made at the first save, so a run that fails before it
        # leaves no empty checkpoint dir behind
        self._manager = self._open() if self.directory.is_dir() else None
        # small files (name -> text) written next to the step dirs with the first save, when missing (a LoRA
        # run's lora.json: what export and resume need to know about the adapter)
        self.sidecars: dict[str, str] = {}

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step() if self._manager is not None else None

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps()) if self._manager is not None else []

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Start an (async) save of step `step` if the interval says so or `force`; True if one started."""
        if self._manager is None:
            self._manager = self._open()
        if jax.process_index() == 0:
            self._write_sidecars()
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def _write_sidecars(self) -> None:
        from contentv_common.weights import atomic_file

        for name, text in self.sidecars.items():
            if not (self.directory / name).is_file():
                with atomic_file(self.directory / name) as tmp:
                    tmp.write_text(text)

    def restore(self, step: int, abstract_state) -> tuple[object, dict]:
        """(state, data_state) of `step`; `abstract_state` is a tree of jax.ShapeDtypeStruct with shardings."""
        if step not in self.all_steps():
            raise FileNotFoundError(f"{self.directory}: no checkpoint at step {step}; have {self.all_steps()}")
        check_state_matches(self.directory / str(step) / "state", abstract_state)
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
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()


def saved_steps(path: str | Path) -> list[int]:
    """The steps of the orbax step directories of this trainer in `path` (numbered dirs with a `state` item),
    read without orbax (which would create the folder)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir() if p.is_dir() and p.name.isdigit() and (p / "state").exists())


def is_checkpoint_dir(path: str | Path) -> bool:
    """True if `path` holds orbax step directories of this trainer (numbered dirs with a `state` item)."""
    return bool(saved_steps(path))


def resume_flag(text: str) -> str:
    """argparse type of --resume: auto, no or a step number."""
    if text in ("auto", "no") or text.isdigit():
        return text
    raise argparse.ArgumentTypeError(f"expected auto, no or a step number, got {text!r}")


def check_resume(checkpoint_dir: str | Path | None, resume: str) -> None:
    """The --resume / --checkpoint-dir combination, checked before the run creates anything."""
    if resume not in ("auto", "no") and not resume.isdigit():
        raise UsageError(f"--resume {resume!r}: expected auto, no or a step number")
    if resume.isdigit() and not checkpoint_dir:
        raise UsageError(f"--resume {resume} needs --checkpoint-dir")
    steps = saved_steps(checkpoint_dir) if checkpoint_dir else []
    if resume == "no" and steps:
        raise UsageError(f"--checkpoint-dir {checkpoint_dir} already holds step {steps[-1]}; use --resume auto "
                         "or an empty dir")
    if resume.isdigit() and int(resume) not in steps:
        raise UsageError(f"--resume {resume}: --checkpoint-dir {checkpoint_dir} has no checkpoint at that step; "
                         f"have {steps}")


def check_state_matches(item: Path, abstract_state) -> None:
    """Compare the state a checkpoint recorded (tree paths, shapes, dtypes, from orbax's metadata only) with the
    one this run builds (the model preset's parameter shapes, the optimizer's state structure); the first
    difference raises a UserError naming it, instead of a failure deep inside orbax's restore."""
    saved = ocp.tree.to_flat_dict(ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree)
    wanted = ocp.tree.to_flat_dict(abstract_state)
    hint = "the checkpoint was written by a run of another --config (model, optimizer); use its --config or " \
           "another --checkpoint-dir"
    for key in sorted(set(saved) | set(wanted)):
        name = "/".join(map(str, key))
        if key not in saved or key not in wanted:
            where = "this run" if key in wanted else "the checkpoint"
            raise UserError(f"{item.parent}: state entry {name} is only in {where}; {hint}")
        a, b = saved[key], wanted[key]
        if tuple(a.shape) != tuple(b.shape) or str(a.dtype) != str(b.dtype):
            raise UserError(f"{item.parent}: {name} is {a.dtype}{list(a.shape)} in the checkpoint, "
                            f"{b.dtype}{list(b.shape)} in this run; {hint}")


def step_item(path: str | Path, step: int | None = None) -> Path:
    """The `state` item of checkpoint `step` (default the latest) of a checkpoint dir, or of one step dir."""
    path = Path(path).absolute()
    steps = saved_steps(path)
    if steps:
        step = steps[-1] if step is None else step
        if step not in steps:
            raise FileNotFoundError(f"{path}: no checkpoint at step {step}; have {steps}")
        return path / str(step) / "state"
    if (path / "state").is_dir():
        return path / "state"
    raise NotACheckpointError(f"{path}: not a contentv_jax checkpoint (no numbered step dirs with a 'state' item)")


def open_params(path: str | Path, ema: bool = False, step: int | None = None
                ) -> tuple[dict[str, tuple], dict[str, np.dtype], Callable[[str, int | None], np.ndarray]]:
    """The raw (or EMA) params of a checkpoint, leaf by leaf, without restoring the train state: for converters.

    Returns (shapes, dtypes, read_leaf_row), keyed by "/"-joined Flax paths; read_leaf_row(key, row) -> that
    leaf's row `row` of its leading (scanned-layer) axis, or the whole leaf for row None, as numpy. Shapes come
    from orbax's metadata; rows are read from the tensorstore array orbax wrote (a stacked fp32 leaf of
    ContentV-8B, 5 GB, is never whole in memory), which orbax's restore API cannot do. Nothing else in the
    project reads this layout, so an orbax upgrade that changes it breaks here, next to the writer."""
    item = step_item(path, step)
    meta = ocp.PyTreeCheckpointer().metadata(item)
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    tree = getattr(tree, "tree", tree)
    key = "ema_params" if ema else "params"
    if not isinstance(tree, Mapping) or key not in tree:
        have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise NotACheckpointError(f"{item}: training state has no {key!r} (has {have})"
                                  + ("" if ema else "; pass --ema for EMA params"))
    params_meta, prefix = tree[key], (key,)
    if isinstance(params_meta, Mapping) and set(params_meta) == {"params"}:  # a {"params": {...}} variables dict
        params_meta, prefix = params_meta["params"], (key, "params")
    flat = _flatten(params_meta)
    open_array = _array_opener(item)
    opened: dict[str, Any] = {}

    def read_leaf_row(name: str, row: int | None) -> np.ndarray:
        if name not in opened:  # one leaf open at a time
            opened.clear()
            opened[name] = open_array(".".join((*prefix, *name.split("/"))))
        arr = opened[name]
        return np.asarray((arr[row] if row is not None else arr).read().result())

    return ({k: tuple(m.shape) for k, m in flat.items()}, {k: np.dtype(m.dtype) for k, m in flat.items()},
            read_leaf_row)


def _flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        name = f"{prefix}{k}"
        out.update(_flatten(v, name + "/") if isinstance(v, Mapping) else {name: v})
    return out


def _array_opener(item: Path) -> Callable[[str], Any]:
    """name -> opened tensorstore array of an orbax PyTree item (its `_METADATA` says zarr2/zarr3, OCDBT or not)."""
    import json

    import tensorstore as ts

    meta = json.loads((item / "_METADATA").read_text())
    driver = "zarr3" if meta.get("use_zarr3") else "zarr"
    context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 0}})

    def open_array(name: str):
        if meta.get("use_ocdbt", True):
            kv = {"driver": "ocdbt", "base": {"driver": "file", "path": f"{item}/"}, "path": name,
                  "cache_pool": "cache_pool#ocdbt"}
        else:
            kv = {"driver": "file", "path": f"{item}/{name}/"}
        return ts.open({"driver": driver, "kvstore": kv}, context=context, open=True).result()

    return open_array
