"""Conversions as whole jobs: one component, or a whole ContentV-format model folder, written atomically.

    convert(src, dst, to, fmt=None, dtype=None, ema=False, step=None, components=None, link=False,
            overwrite=False, max_shard_bytes=5 GiB) -> Path

`to="torch"` writes diffusers layout (what `contentv_torch` and the released ContentV code
`SD3Transformer3DModel.from_pretrained` load); `to="jax"` writes our Flax safetensors format (see formats.py).
A whole model folder is written when the source is one (`contentv-folder`) or when `components` names a
ContentV-format folder whose vae/, text encoders, tokenizers, scheduler/ and model_index.json complete the
converted transformer (a trained checkpoint becomes a runnable model folder).
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from contentv_common.config import read_json
from contentv_common.weights import atomic_dir
from contentv_common.formats.sources import FormatError, Source, detect, open_source
from convert.formats import OPENERS, write_flax, write_torch

log = logging.getLogger("convert")

TARGETS = ("jax", "torch")


def _write_component(src_path: Path | Source, folder: Path, to: str, fmt: str | None, dtype: str | None,
                     max_shard_bytes: int, **kw) -> None:
    """Convert one component: a path (opened here) or an open Source (a LoRA-merged one: convert/lora.py)."""
    with (src_path if isinstance(src_path, Source) else open_source(src_path, fmt, openers=OPENERS, **kw)) as src:
        log.info("%s: %s (%s) -> %s", src.path, src.component, src.format, to)
        (write_torch if to == "torch" else write_flax)(src, folder, dtype=dtype, max_shard_bytes=max_shard_bytes)


def _model_index(folder: Path) -> dict[str, Any]:
    if not (folder / "model_index.json").is_file():
        raise FormatError(f"{folder}: not a ContentV-format model folder (no model_index.json)")
    return read_json(folder / "model_index.json")


def _place(src: Path, dst: Path, link: bool) -> None:
    if link:
        os.symlink(src.absolute(), dst, target_is_directory=src.is_dir())
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=False)
    else:
        shutil.copy2(src, dst)


def _write_model_folder(transformer: Path, components: Path, root: Path, to: str, fmt: str | None, dtype: str | None,
                        link: bool, max_shard_bytes: int, **kw) -> None:
    """root/transformer from `transformer`; the other parts named in components/model_index.json: vae/ converted
    for jax (kept as it is for torch: the VAE stays float32), the rest copied or symlinked."""
    index = _model_index(components)
    parts = sorted(k for k in index if not k.startswith("_"))
    absent = [p for p in parts if p != "transformer" and not (components / p).is_dir()]
    if absent:
        raise FileNotFoundError(f"{components}/model_index.json names components that are missing: {absent}")
    (root / "transformer").mkdir()
    _write_component(transformer, root / "transformer", to, fmt, dtype, max_shard_bytes, **kw)
    for p in parts:
        if p == "transformer":
            continue
        if p == "vae" and to == "jax":
            (root / "vae").mkdir()
            _write_component(components / "vae", root / "vae", to, None, None, max_shard_bytes)
        else:
            _place(components / p, root / p, link)
    _place(components / "model_index.json", root / "model_index.json", link=False)


def _check_writable(dst: Path) -> None:
    """Fail before any work if dst's nearest existing ancestor is not a writable folder."""
    anc = dst.absolute().parent
    while not anc.exists() and not anc.is_symlink():
        anc = anc.parent
    if not anc.is_dir() or not os.access(anc, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write {dst}: {anc} is not a writable folder")


def convert(src: str | Path, dst: str | Path, to: str, fmt: str | None = None, dtype: str | None = None,
            ema: bool = False, step: int | None = None, components: str | Path | None = None, link: bool = False,
            overwrite: bool = False, max_shard_bytes: int = 5 * 2**30, config: Any = None) -> Path:
    """Convert `src` (format `fmt`, detected when None) to `to` ("jax" | "torch") at `dst`, atomically: a
    failed run leaves no `dst`; an existing `dst` is an error unless `overwrite`."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    src, dst = Path(src), Path(dst)
    fmt = fmt or detect(src)
    kw = {"ema": ema, "step": step, "config": config} if fmt == "orbax" else {}
    if (ema or step is not None) and fmt != "orbax":
        raise ValueError(f"--ema / --step apply to training checkpoints (orbax), not to {fmt}")
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"destination {dst} is the source or inside it")
    _check_writable(dst)
    try:
        with atomic_dir(dst, overwrite=overwrite) as root:
            if fmt == "contentv-folder":
                if components is not None:
                    raise ValueError("--components applies to a single transformer source, not to a whole model folder")
                _write_model_folder(src / "transformer", src, root, to, None, dtype, link, max_shard_bytes)
            elif components is not None:
                _write_model_folder(src, Path(components), root, to, fmt, dtype, link, max_shard_bytes, **kw)
            else:
                _write_component(src, root, to, fmt, dtype, max_shard_bytes, **kw)
    except (PermissionError, NotADirectoryError) as e:
        raise PermissionError(f"cannot write {dst}: {e.strerror or e} ({e.filename or dst})") from None
    log.info("wrote %s", dst)
    return dst
