"""Orbax checkpoints of the whole loop state: train state (params, optimizer, EMA, step, RNG) + data position.

Async saves (the train loop keeps running while arrays are written), keep-N, an interval, and forced
saves on SIGTERM / at the end. Each step directory holds two items: `state` (a sharded pytree, restored
straight into the target shardings: no host ever holds all parameters) and `data` (the batch source's
JSON `state()`). Orbax writes into a temporary directory and renames it, so a run killed mid-save
keeps its previous checkpoint.

This module is the one reader and writer of these checkpoints, through orbax's public API: the trainer
(`Checkpointer`), `--init-from` (`Checkpointer.restore_params`) and `python -m convert` (`open_source`: the
params of a step without a model, row by row) all go through it, so an orbax upgrade breaks or keeps all
of them together.
"""
from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath

from contentv_common.cli import UsageError, UserError
from contentv_common.formats.keymap import flatten
from contentv_common.formats.sources import (
    CHECKPOINT_STATE_ITEM,
    FormatError,
    Source,
    infer_transformer_config_from_flax,
    saved_steps,
    source_from_flax_leaves,
)


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
        return ocp.CheckpointManager(self.directory, options=self._options, item_names=(CHECKPOINT_STATE_ITEM, "data"))

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
        check_state_matches(self.directory / str(step) / CHECKPOINT_STATE_ITEM, abstract_state)
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
        item = self.directory / str(step) / CHECKPOINT_STATE_ITEM
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
        return path / str(step) / CHECKPOINT_STATE_ITEM
    if (path / CHECKPOINT_STATE_ITEM).is_dir():
        return path / CHECKPOINT_STATE_ITEM
    raise FormatError(f"{path}: not a contentv_jax checkpoint (no numbered step dirs with a 'state' item)")


def open_params(path: str | Path, ema: bool = False, step: int | None = None):
    """The raw (or EMA) params of a checkpoint, leaf by leaf, without restoring the train state or reading the
    optimizer state: (shapes {"a/b/kernel": shape}, dtypes, read_leaf_row(name, row | None) -> numpy array).

    Orbax's public API only: the shapes, dtypes and array names come from `metadata()`, and each leaf's
    tensorstore spec from `type_handlers.get_json_tspec_read` (orbax's own description of what it wrote).
    A stacked leaf is read one stored chunk of rows at a time (a chunk is decoded whole, so reading row by
    row would decode it once per row): the whole leaf when one device wrote it, a shard of layers when the
    layer axis was sharded. A partial `restore` of one leaf would hold the whole leaf (3.5 GB for a stacked
    fp32 leaf of ContentV-8B) and a copy of it."""
    item = step_item(path, step)
    meta = ocp.PyTreeCheckpointer().metadata(item).item_metadata
    tree, key = meta.tree, "ema_params" if ema else "params"
    if not isinstance(tree, Mapping) or key not in tree:
        have = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise FormatError(f"{item}: training state has no {key!r} (has {have})"
                          + ("" if ema else "; pass --ema for EMA params"))
    params = tree[key]
    if isinstance(params, Mapping) and set(params) == {"params"}:  # a {"params": {...}} variables dict
        params = params["params"]
    leaves = flatten(params)  # "a/b/kernel" -> ArrayMetadata
    item_path = epath.Path(item)
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(item_path)
    context = ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 0}})  # no cache: hold only what was asked for
    held: dict[str, Any] = {}  # the open leaf, and its rows [start, stop) last read

    def read_leaf_row(name: str, row: int | None) -> np.ndarray:
        if held.get("name") != name:  # one leaf at a time
            held.clear()
            info = ocp.type_handlers.ParamInfo(name=leaves[name].name, parent_dir=item_path,
                                               path=item_path / leaves[name].name, is_ocdbt_checkpoint=use_ocdbt,
                                               use_zarr3=meta.use_zarr3)
            spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
            held.update(name=name, array=ts.open(spec, context=context, open=True).result(), start=0, stop=0)
        arr = held["array"]
        if row is None:
            return np.asarray(arr.read().result())
        if not held["start"] <= row < held["stop"]:
            chunk = arr.chunk_layout.read_chunk.shape[0] or arr.shape[0]
            start = row - row % chunk
            held.update(start=start, stop=min(start + chunk, arr.shape[0]), rows=None)
            held["rows"] = np.asarray(arr[start:held["stop"]].read().result())
        return held["rows"][row - held["start"]]

    return ({k: tuple(m.shape) for k, m in leaves.items()}, {k: np.dtype(m.dtype) for k, m in leaves.items()},
            read_leaf_row)


def open_source(path: str | Path, ema: bool = False, step: int | None = None, config: Any = None) -> Source:
    """The raw (or EMA) transformer params of a checkpoint as a `Source` (contentv_common.formats.sources) under
    diffusers key names, read as `open_params` reads them: for `python -m convert`. The transformer config is read
    off the shapes unless `config` is given."""
    shapes, dtypes, read_leaf_row = open_params(path, ema, step)
    config = config if config is not None else infer_transformer_config_from_flax(shapes)
    return source_from_flax_leaves("transformer", "orbax", Path(path).absolute(), config, shapes, dtypes,
                                   read_leaf_row)
