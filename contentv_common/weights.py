"""Reading and writing weight folders in the diffusers on-disk layout, streaming and atomic.

A folder holds `config.json` plus either one `diffusion_pytorch_model.safetensors` or shards
`diffusion_pytorch_model-0000k-of-0000n.safetensors` with `diffusion_pytorch_model.safetensors.index.json`
(`{"metadata": {"total_size": N}, "weight_map": {key: shard}}`). Tensors are read one at a time
through `safe_open`, so a model is never held twice in memory.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
# transformers `save_pretrained` writes the same formats under these names; read them the same way.
HF_WEIGHTS_NAME = "model.safetensors"
HF_INDEX_NAME = "model.safetensors.index.json"


# the floating dtypes a run or a conversion may be asked for by name (bfloat16 through ml_dtypes)
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}

# safetensors dtype tags -> numpy dtype names (np.dtype("bfloat16") works once ml_dtypes is imported, as above).
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def read_safetensors_header(f, size: int | None = None) -> tuple[int, dict[str, dict]]:
    """(data start offset, {key: {"dtype", "shape", "data_offsets"}}) of the safetensors file open in binary mode
    as `f` (at position 0), metadata left out. With `size` (the file's), a header longer than the file raises.
    Malformed headers raise ValueError (struct.error, JSON and Unicode errors included)."""
    raw = f.read(8)
    if len(raw) != 8:
        raise ValueError("file shorter than a safetensors header")
    (n,) = struct.unpack("<Q", raw)
    if size is not None and n > size - 8:
        raise ValueError(f"header length {n} exceeds the file size {size}")
    header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


class KeyMismatchError(ValueError):
    """Missing / unexpected keys or shape mismatches, each listed by name."""


def weight_index(path: str | Path) -> dict[str, Path]:
    """key -> safetensors file for a folder (single file or sharded with index, diffusers or transformers
    names) or a single `.safetensors` file."""
    from safetensors import safe_open

    path = Path(path)
    index_file = next((path / n for n in (INDEX_NAME, HF_INDEX_NAME) if (path / n).is_file()), None)
    weights_file = next((path / n for n in (WEIGHTS_NAME, HF_WEIGHTS_NAME) if (path / n).is_file()), None)
    if path.is_file():
        files = [path]
    elif index_file is not None:
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index_file}: not a safetensors index ({e!r})") from None
        missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
        if missing:
            raise FileNotFoundError(f"{index_file} names shards that are missing: {missing}")
        return {k: path / f for k, f in weight_map.items()}
    elif weights_file is not None:
        files = [weights_file]
    elif path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no {WEIGHTS_NAME}, {INDEX_NAME} or *.safetensors file")
    else:
        raise FileNotFoundError(f"{path}: no such file or folder")
    index: dict[str, Path] = {}
    for f in files:
        try:
            with safe_open(f, framework="numpy") as sf:
                for k in sf.keys():
                    index[k] = f
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return index


def tensor_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """key -> shape, read from the headers only."""
    from safetensors import safe_open

    out = {}
    by_file: dict[Path, list[str]] = {}
    for k, f in weight_index(path).items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        with safe_open(f, framework="numpy") as sf:
            for k in keys:
                out[k] = tuple(sf.get_slice(k).get_shape())
    return out


def iter_tensors(path: str | Path, framework: str = "pt", keys: Iterable[str] | None = None) -> Iterator[tuple[str, Any]]:
    """Yield (key, tensor) one at a time, file by file. framework: "pt" (torch, keeps bf16), "numpy", "flax"."""
    from safetensors import safe_open

    index = weight_index(path)
    wanted = set(index) if keys is None else set(keys)
    absent = sorted(wanted - set(index))
    if absent:
        raise KeyMismatchError(f"{path}: keys not found: {absent}")
    by_file: dict[Path, list[str]] = {}
    for k in sorted(wanted):
        by_file.setdefault(index[k], []).append(k)
    for f, ks in by_file.items():
        with safe_open(f, framework=framework) as sf:
            for k in ks:
                yield k, sf.get_tensor(k)


def check_keys(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise KeyMismatchError naming every missing key, unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = sorted(
        f"{k}: {tuple(found[k])} != expected {tuple(expected[k])}"
        for k in set(found) & set(expected)
        if tuple(found[k]) != tuple(expected[k])
    )
    if missing or unexpected or shapes:
        parts = [f"{what}: weights do not match the model"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {missing}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {unexpected}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {shapes}")
        raise KeyMismatchError("\n  ".join(parts))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parents(dst: Path) -> list[Path]:
    """mkdir -p dst's folder; returns the folders it made, outermost first."""
    made = [p for p in reversed(dst.absolute().parents) if not p.exists()]
    dst.parent.mkdir(parents=True, exist_ok=True)
    return made


def _remove_empty(folders: list[Path]) -> None:
    """Undo _make_parents after a failed write: a failed run leaves no new (empty) folders behind."""
    for p in reversed(folders):
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def atomic_dir(dst: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dst`; on success it replaces `dst` in one rename, on error it is removed."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass overwrite to replace it)")
    made = _make_parents(dst)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the result should have the usual permissions
    try:
        yield tmp
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
            os.rename(dst, old)
            os.rename(tmp, dst)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise


@contextlib.contextmanager
def atomic_file(dst: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `dst` (same suffix); it is renamed onto `dst` only on success."""
    dst = Path(dst)
    made = _make_parents(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.stem}.tmp-", suffix=dst.suffix, dir=dst.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should have the usual permissions
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        _remove_empty(made)
        raise


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if hasattr(t, "element_size") else int(t.nbytes)


def save_sharded(
    folder: str | Path,
    tensors: Iterable[tuple[str, Any]] | Mapping[str, Any],
    config: dict[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write tensors (all torch, or all numpy incl. ml_dtypes bfloat16) as a diffusers weight folder
    (one file, or shards + index), atomically. `tensors` may be a generator: at most one shard's
    tensors are held at a time.
    """
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        shards: list[dict[str, str]] = []  # per shard: key -> temp name
        buf: dict[str, Any] = {}
        size = total = 0

        def flush():
            nonlocal buf, size
            if buf:
                name = f"shard-{len(shards):05d}.tmp"
                if all(hasattr(v, "element_size") for v in buf.values()):
                    from safetensors.torch import save_file

                    buf = {k: v.contiguous() for k, v in buf.items()}
                else:
                    import numpy as np
                    from safetensors.numpy import save_file

                    buf = {k: np.ascontiguousarray(v) for k, v in buf.items()}
                save_file(buf, str(tmp / name), metadata={"format": "pt"})
                shards.append({k: name for k in buf})
                buf, size = {}, 0

        for k, t in items:
            n = _nbytes(t)
            if buf and size + n > max_shard_bytes:
                flush()
            if k in buf or any(k in s for s in shards):
                raise ValueError(f"duplicate tensor key {k!r}")
            buf[k] = t
            size += n
            total += n
        flush()
        if len(shards) <= 1:
            if shards:
                os.rename(tmp / next(iter(shards[0].values())), tmp / WEIGHTS_NAME)
        else:
            weight_map = {}
            for i, s in enumerate(shards):
                final = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                os.rename(tmp / next(iter(s.values())), tmp / final)
                weight_map.update({k: final for k in s})
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2))
        if config is not None:
            (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder
