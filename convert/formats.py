"""Weight formats out: a streaming safetensors writer, `write_torch` (a diffusers folder) and `write_flax` (our
JAX format) straight from a `contentv_common.formats.sources.Source`, tensor by tensor, so converting the 16 GB
ContentV-8B needs memory for about one tensor, not for the model. And the readers of the two input formats
that need a framework (`OPENERS`, passed to the floor's `open_source` / `iter_params` / `load_params`): a
training checkpoint through `contentv_jax.checkpoint` (the format's one owner) and the Wan2.1 `.pth` pickle
through torch (imported when one is read).
"""
from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from contentv_common.config import TransformerConfig, VAEConfig
from contentv_common.formats import wan_original as wan
from contentv_common.formats.keymap import flatten
from contentv_common.formats.sources import (
    FLAX_FORMAT_TAG,
    FLAX_INDEX_NAME,
    FLAX_WEIGHTS_NAME,
    FormatError,
    Opener,
    Planned,
    Source,
    check_names,
    check_source,
    out_dtype,
    plan_flax,
)
from contentv_common.weights import CONFIG_NAME, INDEX_NAME, SAFETENSORS_DTYPES, WEIGHTS_NAME, atomic_dir

log = logging.getLogger("convert")

_ST_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class UnsafeCheckpointError(ValueError):
    """A pickle checkpoint that cannot be read without executing code."""


# ----------------------------------------------------------------------------------------------------------
# Readers that need a framework
# ----------------------------------------------------------------------------------------------------------
def load_pth(path: str | Path) -> dict:
    """The state dict of a `.pth` checkpoint, read with `torch.load(weights_only=True)` (memory-mapped when the
    file is in the zip format). A pickle that needs code execution raises UnsafeCheckpointError."""
    import pickle

    import torch

    path = Path(path)
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), str(e).splitlines()[0])
        if "global" in detail.lower():  # the pickle calls a function / builds an object: code execution
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle: the file needs code execution (only plain tensors are loaded, "
                f"torch.load(weights_only=True)). {detail}"
            ) from None
        raise ValueError(f"{path}: not a torch checkpoint (cannot unpickle: {detail})") from None
    except (EOFError, RuntimeError) as e:  # an empty / truncated file (zip or legacy format)
        raise ValueError(f"{path}: not a torch checkpoint, empty or truncated ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: not a state dict of tensors (got {type(sd).__name__})")
    return sd


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor -> numpy without a float copy (bf16 via its bits, as ml_dtypes.bfloat16)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def open_wan_original(path: Path) -> Source:
    sd = load_pth(path)
    if wan.MARKER not in sd:
        raise FormatError(f"{path}: not a Wan2.1 VAE checkpoint (no key {wan.MARKER!r}; it has e.g. {sorted(sd)[:5]})")
    oshapes = {k: tuple(v.shape) for k, v in sd.items()}
    cfg = wan.infer_config(oshapes)
    table = wan.key_table(cfg)
    check_names(set(oshapes), set(table.values()), f"{path} (Wan original keys)")
    shapes = {k: oshapes[o] for k, o in table.items()}
    dtypes = {k: torch_to_numpy(sd[o].new_empty(0)).dtype for k, o in table.items()}
    return Source("vae", "wan-original", path, cfg, shapes, dtypes, lambda k: torch_to_numpy(sd[table[k]]))



def open_orbax(path: Path, **kw) -> Source:
    from contentv_jax.checkpoint import open_source

    return open_source(path, **kw)


OPENERS: dict[str, Opener] = {"orbax": open_orbax, "wan-original": open_wan_original}


# ----------------------------------------------------------------------------------------------------------
# Streaming safetensors writer
# ----------------------------------------------------------------------------------------------------------
def _write_file(path: Path, planned: list[Planned], bar) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in planned:
        header[t.key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in planned:
            written = 0
            for c in t.chunks():
                c = np.ascontiguousarray(c)
                if c.dtype != t.dtype:
                    c = c.astype(t.dtype)
                f.write(c.reshape(-1).view(np.uint8).data)
                written += c.nbytes
            if written != t.nbytes:
                raise ValueError(f"{t.key}: wrote {written} bytes, planned {t.nbytes} for shape {t.shape} {t.dtype}")
            bar.update(1)


def write_safetensors(folder: Path, planned: list[Planned], weights_name: str, index_name: str,
                      max_shard_bytes: int = 5 * 2**30, desc: str = "tensors") -> None:
    """Write `planned` into `folder` as one safetensors file or shards + index (diffusers naming), each
    tensor streamed to disk as it is produced. `folder` should be a temporary dir (see atomic_dir)."""
    from tqdm.auto import tqdm

    shards: list[list[Planned]] = [[]]
    size = 0
    for t in planned:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    stem = weights_name[: -len(".safetensors")]
    names = [weights_name] if len(shards) == 1 else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with tqdm(total=len(planned), desc=desc, unit="tensor", disable=not log.isEnabledFor(logging.INFO)) as bar:
        for name, shard in zip(names, shards):
            _write_file(folder / name, shard, bar)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                 "weight_map": {t.key: n for n, s in zip(names, shards) for t in s}}
        (folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------
def torch_config(src: Source) -> dict[str, Any]:
    return src.config.to_diffusers_config()


def plan_torch(src: Source, dtype: str | None = None) -> list[Planned]:
    """Every tensor of the source under its diffusers key, cast to `dtype` (None: as stored)."""
    return [Planned(k, src.shapes[k], out_dtype(src.dtypes[k], dtype), (lambda k=k: iter([src.read(k)])))
            for k in (src.order or sorted(src.shapes))]


def write_torch(src: Source, folder: Path, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
                config: Mapping[str, Any] | None = None) -> None:
    """The source as a diffusers-layout folder (config.json + safetensors [+ index]) inside `folder` (which
    exists, normally an atomic_dir temp)."""
    check_source(src)
    write_safetensors(folder, plan_torch(src, dtype), WEIGHTS_NAME, INDEX_NAME, max_shard_bytes, desc=f"{src.component} -> torch")
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config or torch_config(src)), indent=2))


def write_flax(src: Source, folder: Path, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """The source as our JAX format (config.json + flax_params*.safetensors) inside `folder`."""
    check_source(src)
    _write_flax_folder(folder, plan_flax(src, dtype), torch_config(src), max_shard_bytes, f"{src.component} -> jax")


def save_flax_params(config: TransformerConfig | VAEConfig, params, folder: str | Path, overwrite: bool = False,
                     max_shard_bytes: int = 5 * 2**30) -> Path:
    """An in-memory Flax params tree (numpy / jax arrays) of a model of `config` as our JAX format at `folder`,
    atomically: what `python -m convert` reads back (`load_params`, `--to torch`)."""
    leaves = {k: np.asarray(v) for k, v in flatten(params).items()}
    planned = [Planned(k, v.shape, v.dtype, (lambda v=v: iter([v]))) for k, v in sorted(leaves.items())]
    with atomic_dir(folder, overwrite=overwrite) as root:
        _write_flax_folder(root, planned, config.to_diffusers_config(), max_shard_bytes, "params -> jax")
    return Path(folder)


def _write_flax_folder(folder: Path, planned: list[Planned], config: Mapping[str, Any], max_shard_bytes: int,
                       desc: str) -> None:
    write_safetensors(folder, planned, FLAX_WEIGHTS_NAME, FLAX_INDEX_NAME, max_shard_bytes, desc=desc)
    (folder / CONFIG_NAME).write_text(json.dumps({**config, FLAX_FORMAT_TAG: "flax"}, indent=2))
