"""Training data on disk: precomputed, normalised VAE latents + text embeddings in safetensors shards.

Numpy only (bfloat16 shards need `ml_dtypes`), so JAX trainers and torch hosts both read it. Written by
`python -m contentv_torch.encode_dataset`; read by `LatentDataset` (random access, one record at a time) and
`ShardedLatentSource` (the trainer's `BatchSource`: bucketed global batches, exact resume, multi-host slices).

A dataset folder:
  manifest.json   {"format": "contentv-latents", "version": 1, "dtype": "float32" | "bfloat16",
                   "latent_channels": C, "context_shape": [L, J], "pooled_dim": P,
                   "temporal_factor": 4, "spatial_factor": 8, "fps": 24, "model": "<encoder folder>",
                   "shards":  [{"file": "shards/<name>.safetensors", "bucket": [F, H, W], "rows": n,
                                "latent_shape": [T, h, w, C], "sha256": "<of the file>"}, ...],
                   "records": [{"shard": i, "row": r, "caption": str, "source": str, "kind": "video" | "image",
                                "crc32": int}, ...],
                   "skipped": [{"source": str, "reason": str}, ...],
                   "negative": {"file": "negative.safetensors", "prompt": ""}   (optional)}
  shards/*.safetensors   one bucket per shard, tensors
                   latents [n, T, h, w, C]  normalised VAE posterior means ((z - mean) / std), channels-last,
                   context [n, L, J]         SD3.5 prompt embeddings (L = 77 + T5 tokens, J = 4096 for the 8B),
                   pooled  [n, P]            pooled CLIP projections (P = 2048 for the 8B).
  negative.safetensors   context [1, L, J], pooled [1, P]: the empty prompt's embeddings (the CFG negative).
A record's crc32 covers its latents, context and pooled rows (stored bytes, in that order); the shard sha256
covers the whole file (`LatentDataset.verify`). Pixel buckets (F, H, W) are frames (4k+1; 1 = an image) x
height x width; the latent shape is (k+1, H/8, W/8, C).

Why not Grain: Grain (installed) samples and shards *records* per host and batches them at one fixed size.
The trainer needs *global* batches that are bucket-homogeneous, have a batch size per bucket, and are split
row-wise across processes in process order (what `jax.make_array_from_process_local_data` assembles), with a
JSON position stored in the trainer's own checkpoint. That is a custom sampler in Grain too, so the sampler
here is ~60 lines of numpy over the manifest; rows are read with `os.preadv` straight into the batch
buffers, at offsets taken from the safetensors headers. `LatentDataset` implements Grain's
`RandomAccessDataSource` protocol (`__len__`, `__getitem__`), so `grain.MapDataset.source(LatentDataset(path))` works for anyone who wants Grain's pipeline.
"""
from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import json
import logging
import os
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from contentv_common.buckets import BatchSource, Bucket
from contentv_common.weights import SAFETENSORS_DTYPES, atomic_file, read_safetensors_header

log = logging.getLogger(__name__)

FORMAT, VERSION = "contentv-latents", 1
MANIFEST_NAME = "manifest.json"
TENSORS = ("latents", "context", "pooled")  # per-row crc32 order; also the batch keys of the trainer


class CorruptDataError(ValueError):
    """A shard or record that cannot be read or fails its checksum; the message names it."""


class DatasetMismatchError(ValueError):
    """A dataset whose shapes do not fit the model config (refused before training)."""


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    if name not in ("float32", "float16"):
        raise ValueError(f"dataset dtype {name!r} unsupported; use float32, float16 or bfloat16")
    return np.dtype(name)


# ---- writing ----------------------------------------------------------------------------------------
def row_crc32(latents: np.ndarray, context: np.ndarray, pooled: np.ndarray) -> int:
    """crc32 of one record's stored bytes: latents [T, h, w, C], context [L, J], pooled [P] (in this order)."""
    crc = 0
    for a in (latents, context, pooled):
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), crc)
    return crc


def write_shard(path: str | Path, latents: np.ndarray, context: np.ndarray, pooled: np.ndarray,
                dtype: str = "float32") -> tuple[dict, list[int]]:
    """Write one shard atomically. latents [n, T, h, w, C], context [n, L, J], pooled [n, P], cast to `dtype`.
    Returns (shard entry without "file"/"bucket": rows, latent_shape, sha256; the n record crc32s)."""
    from safetensors.numpy import save_file

    dt = _np_dtype(dtype)
    arrays = {k: np.ascontiguousarray(np.asarray(a, np.float32).astype(dt)) for k, a in zip(TENSORS, (latents, context, pooled))}
    n = arrays["latents"].shape[0]
    if arrays["latents"].ndim != 5 or arrays["context"].ndim != 3 or arrays["pooled"].ndim != 2 or n == 0 \
            or any(a.shape[0] != n for a in arrays.values()):
        raise ValueError(f"write_shard {path}: need latents [n, T, h, w, C], context [n, L, J], pooled [n, P] with the "
                         f"same n >= 1, got {[a.shape for a in arrays.values()]}")
    crcs = [row_crc32(*(arrays[k][i] for k in TENSORS)) for i in range(n)]
    with atomic_file(path) as tmp:
        save_file(arrays, str(tmp), metadata={"format": FORMAT})
        sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    return {"rows": n, "latent_shape": list(arrays["latents"].shape[1:]), "sha256": sha}, crcs


def make_manifest(shards: list[dict], records: list[dict], vae_config, context_shape, pooled_dim: int,
                  dtype: str = "float32", skipped: list[dict] | None = None, **extra) -> dict:
    """The manifest dict (see the module docstring) of shard entries and records; `extra` adds fields (fps, model)."""
    return {"format": FORMAT, "version": VERSION, "dtype": dtype, "latent_channels": vae_config.z_dim,
            "context_shape": [int(v) for v in context_shape], "pooled_dim": int(pooled_dim),
            "temporal_factor": vae_config.temporal_factor, "spatial_factor": vae_config.spatial_factor,
            **extra, "shards": shards, "records": records, "skipped": skipped or []}


def write_dataset(folder: str | Path, samples, vae_config, dtype: str = "float32", shard_rows: int = 64) -> Path:
    """Write already-encoded samples as a dataset folder (tests, benchmarks, conversions of other datasets).
    samples: iterable of dicts {"bucket": (F, H, W), "latents": [T, h, w, C], "context": [L, J], "pooled": [P],
    "caption": str, "source": str}; consecutive samples of one bucket share shards of up to `shard_rows` rows."""
    folder = Path(folder)
    shards, records, pending = [], [], {}
    context_shape = pooled_dim = None

    def flush(bucket):
        rows = pending.pop(bucket)
        name = f"shards/s{len(shards):05d}-{'x'.join(map(str, bucket))}.safetensors"
        entry, crcs = write_shard(folder / name, *(np.stack([r[k] for r in rows]) for k in TENSORS), dtype=dtype)
        shards.append({"file": name, "bucket": list(bucket), **entry})
        records.extend({"shard": len(shards) - 1, "row": j, "caption": r["caption"], "source": r["source"],
                        "kind": "image" if bucket[0] == 1 else "video", "crc32": c} for j, (r, c) in enumerate(zip(rows, crcs)))

    for smp in samples:
        bucket = tuple(int(v) for v in smp["bucket"])
        context_shape, pooled_dim = np.shape(smp["context"]), np.shape(smp["pooled"])[0]
        pending.setdefault(bucket, []).append(smp)
        if len(pending[bucket]) >= shard_rows:
            flush(bucket)
    for bucket in list(pending):
        flush(bucket)
    if not records:
        raise ValueError(f"write_dataset {folder}: no samples")
    write_manifest(folder, make_manifest(shards, records, vae_config, context_shape, pooled_dim, dtype))
    return folder


PROMPTS_KEY = "prompts"  # prompt-embeddings files: the header metadata entry holding the prompts
PROMPT_TENSORS = ("context", "pooled", "negative_context", "negative_pooled")


def write_negative(folder: str | Path, context: np.ndarray, pooled: np.ndarray, dtype: str = "float32",
                   prompt: str = "") -> dict:
    """Write the negative (empty) prompt's embeddings context [L, J], pooled [P] atomically; returns the
    manifest's "negative" entry."""
    from safetensors.numpy import save_file

    dt = _np_dtype(dtype)
    with atomic_file(Path(folder) / "negative.safetensors") as tmp:
        save_file({"context": np.asarray(context, np.float32)[None].astype(dt),
                   "pooled": np.asarray(pooled, np.float32)[None].astype(dt)}, str(tmp))
    return {"file": "negative.safetensors", "prompt": prompt}


def write_prompt_embeddings(path: str | Path, prompts: Sequence[str], context: np.ndarray, pooled: np.ndarray,
                            negative_context: np.ndarray, negative_pooled: np.ndarray) -> Path:
    """One safetensors file of prompts with their DiT conditioning (RLHF's `--prompts`), written atomically:
    context [N, L, J], pooled [N, P], negative_context [L, J], negative_pooled [P] (the empty prompt) float32;
    the prompts (JSON list) in the header's metadata."""
    from safetensors.numpy import save_file

    n = len(prompts)
    if n == 0 or np.shape(context)[0] != n or np.shape(pooled)[0] != n:
        raise ValueError(f"{n} prompts with context {np.shape(context)}, pooled {np.shape(pooled)}")
    tensors = {"context": context, "pooled": pooled, "negative_context": negative_context, "negative_pooled": negative_pooled}
    path = Path(path)
    with atomic_file(path) as tmp:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp),
                  metadata={PROMPTS_KEY: json.dumps(list(prompts))})
    return path


def read_prompt_embeddings(path: str | Path) -> dict:
    """`write_prompt_embeddings`' file -> {"prompts": [N] str, "context", "pooled", "negative_context",
    "negative_pooled"} (float32 numpy); a file that is not one raises ValueError naming it."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with safe_open(path, framework="numpy") as f:
            meta = f.metadata() or {}
            out = {k: f.get_tensor(k).astype(np.float32) for k in PROMPT_TENSORS}
    except Exception as e:  # a text file or a safetensors file of another kind: name what it must be
        raise ValueError(f"{path}: not a prompt-embeddings file (write one with `python -m "
                         f"contentv_torch.encode_prompts`): {e}") from None
    if PROMPTS_KEY not in meta:
        raise ValueError(f"{path}: no {PROMPTS_KEY!r} metadata; not written by contentv_torch.encode_prompts")
    return {"prompts": json.loads(meta[PROMPTS_KEY]), **out}


def write_manifest(folder: str | Path, manifest: dict) -> Path:
    """Write `folder/manifest.json` atomically (the dataset exists for readers once this file does)."""
    path = Path(folder) / MANIFEST_NAME
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1))
    return path


# ---- reading ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Tensor:
    offset: int  # absolute byte offset of row 0 in the file
    row_bytes: int
    shape: tuple[int, ...]  # whole tensor, [n, ...]


def _read_header(path: Path, dtype: np.dtype) -> dict[str, _Tensor]:
    """Parse a shard's safetensors header and check it against the file size; errors name the shard."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            base, header = read_safetensors_header(f, size)
    except FileNotFoundError:
        raise CorruptDataError(f"shard {path}: file missing") from None
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
        raise CorruptDataError(f"shard {path}: not a readable safetensors file ({e})") from None
    out = {}
    for k in TENSORS:
        if k not in header:
            raise CorruptDataError(f"shard {path}: tensor {k!r} missing (has {sorted(x for x in header if x != '__metadata__')})")
        h = header[k]
        a, b = h["data_offsets"]
        shape = tuple(h["shape"])
        if SAFETENSORS_DTYPES.get(h["dtype"]) != dtype.name or b - a != int(np.prod(shape)) * dtype.itemsize or base + b > size:
            raise CorruptDataError(f"shard {path}: tensor {k!r} ({h['dtype']} {list(shape)}, bytes {a}..{b}) does not "
                                   f"match the manifest dtype {dtype.name} or the file size {size}")
        out[k] = _Tensor(base + a, (b - a) // max(shape[0], 1), shape)
    return out


def held_out(source: str, val_fraction: float) -> bool:
    """Whether a record is in the validation split of `val_fraction` (the trainer's data.val_fraction): its
    `source` hashed to [0, 1) falls below the fraction. A pure function of the source name, so the split is the same
    for every seed, process count, mesh and resume, and for a re-encoded or extended dataset; every encoding of one
    clip (e.g. at two buckets) lands on the same side."""
    h = int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big")
    return h < val_fraction * 2.0**64


ON_CORRUPT = ("error", "skip")  # the policy for a corrupt / unreadable shard or record (the trainer's data.on_corrupt)


class LatentDataset:
    """Random access to the records of a dataset folder (Grain `RandomAccessDataSource` protocol).

    ds[i] -> {"latents": [T, h, w, C], "context": [L, J], "pooled": [P]} float32, plus "caption", "source".
    on_corrupt: "error" (default) raises `CorruptDataError` naming the shard (and row / record); "skip" drops
    the records of unreadable shards at open (counted in `skipped_records`) and lets `read_rows` substitute
    records that fail their checksum (counted by the caller).
    """

    def __init__(self, path: str | Path, on_corrupt: str = "error"):
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt={on_corrupt!r}: use one of {ON_CORRUPT}")
        self.path, self.on_corrupt = Path(path), on_corrupt
        mpath = self.path / MANIFEST_NAME
        if not mpath.is_file():
            raise FileNotFoundError(f"dataset {self.path}: no {MANIFEST_NAME} (not a dataset folder, or its encoding "
                                    "has not finished)")
        try:
            m = json.loads(mpath.read_text())
            if m.get("format") != FORMAT:
                raise ValueError(f"format {m.get('format')!r} is not {FORMAT!r}")
            if m.get("version") != VERSION:
                raise ValueError(f"version {m.get('version')!r} unsupported (this reader: {VERSION})")
            self.shards, self.records = m["shards"], m["records"]
            self.dtype = _np_dtype(m["dtype"])
            self.latent_channels, self.context_shape = int(m["latent_channels"]), tuple(m["context_shape"])
            self.pooled_dim = int(m["pooled_dim"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise CorruptDataError(f"dataset {self.path}: bad {MANIFEST_NAME} ({e!r})") from None
        self.manifest = m
        self.id = hashlib.sha256(mpath.read_bytes()).hexdigest()[:16]  # names this exact dataset in data states
        self._headers: dict[int, dict[str, _Tensor]] = {}
        self.bad_shards: list[str] = []
        for i, s in enumerate(self.shards):
            try:
                hdr = _read_header(self.path / s["file"], self.dtype)
                want = {"latents": (s["rows"], *s["latent_shape"]), "context": (s["rows"], *self.context_shape),
                        "pooled": (s["rows"], self.pooled_dim)}
                got = {k: hdr[k].shape for k in TENSORS}
                if got != want:
                    raise CorruptDataError(f"shard {self.path / s['file']}: shapes {got} differ from the manifest's {want}")
                self._headers[i] = hdr
            except CorruptDataError:
                if on_corrupt == "error":
                    raise
                self.bad_shards.append(s["file"])
                log.warning("dataset %s: skipping unreadable shard %s", self.path, s["file"])
        self.valid = [i for i, r in enumerate(self.records) if r["shard"] in self._headers]
        self.skipped_records = len(self.records) - len(self.valid)

    def __len__(self) -> int:
        return len(self.records)

    def bucket_of(self, i: int) -> tuple[int, int, int]:
        return tuple(self.shards[self.records[i]["shard"]]["bucket"])

    def records_by_bucket(self, ids: Sequence[int] | None = None) -> dict[tuple[int, int, int], list[int]]:
        """(F, H, W) -> record ids (default: every readable one), in manifest order."""
        out: dict[tuple[int, int, int], list[int]] = {}
        for i in self.valid if ids is None else ids:
            out.setdefault(self.bucket_of(i), []).append(i)
        return out

    def split(self, val_fraction: float) -> tuple[list[int], list[int]]:
        """(training ids, held-out validation ids) of the readable records, in manifest order (`held_out`)."""
        train, val = [], []
        for i in self.valid:
            (val if held_out(self.records[i]["source"], val_fraction) else train).append(i)
        return train, val

    def _name(self, i: int) -> str:
        r = self.records[i]
        return f"record {i} ({r['source']!r}) in shard {self.path / self.shards[r['shard']]['file']} row {r['row']}"

    def row_shapes(self, i: int) -> dict[str, tuple[int, ...]]:
        """Shapes of record i's tensors: latents [T, h, w, C], context [L, J], pooled [P]."""
        hdr = self._headers.get(self.records[i]["shard"])
        if hdr is None:
            raise CorruptDataError(f"{self._name(i)}: its shard is unreadable")
        return {k: hdr[k].shape[1:] for k in TENSORS}

    def read_into(self, i: int, out: dict[str, np.ndarray]) -> bool:
        """Read record i into `out` (C-contiguous arrays of the stored dtype and `row_shapes(i)`), straight from
        the file (one copy). False when its crc32 fails and on_corrupt="skip"; CorruptDataError otherwise."""
        if not 0 <= i < len(self.records):
            raise IndexError(f"dataset {self.path}: record {i} out of range ({len(self.records)} records)")
        r = self.records[i]
        hdr = self._headers.get(r["shard"])
        if hdr is None:
            raise CorruptDataError(f"{self._name(i)}: its shard is unreadable")
        crc = 0
        with open(self.path / self.shards[r["shard"]]["file"], "rb", buffering=0) as f:
            for k in TENSORS:
                t = hdr[k]
                if not out[k].flags.c_contiguous:
                    raise ValueError(f"read_into: out[{k!r}] must be C-contiguous")
                buf = memoryview(out[k].reshape(-1).view(np.uint8))
                if buf.nbytes != t.row_bytes:
                    raise ValueError(f"read_into: out[{k!r}] has {buf.nbytes} bytes, record {i} needs {t.row_bytes}")
                if os.preadv(f.fileno(), [buf], t.offset + r["row"] * t.row_bytes) != t.row_bytes:
                    raise CorruptDataError(f"{self._name(i)}: file truncated")
                crc = zlib.crc32(buf, crc)
        if crc != r["crc32"]:
            if self.on_corrupt == "skip":
                return False
            raise CorruptDataError(f"{self._name(i)}: checksum mismatch (crc32 {crc} != {r['crc32']}): corrupt data")
        return True

    def read_row(self, i: int) -> dict[str, np.ndarray] | None:
        """Record i as stored-dtype arrays; None (on_corrupt="skip") or CorruptDataError when its crc32 fails."""
        out = {k: np.empty(s, self.dtype) for k, s in self.row_shapes(i).items()}
        return out if self.read_into(i, out) else None

    def __getitem__(self, i: int) -> dict:
        row = self.read_row(int(i))
        if row is None:
            raise CorruptDataError(f"{self._name(int(i))}: checksum mismatch: corrupt data")
        r = self.records[int(i)]
        return {**{k: v.astype(np.float32) for k, v in row.items()}, "caption": r["caption"], "source": r["source"]}

    def negative_prompt(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(context [L, J], pooled [P]) float32 of the stored negative (empty) prompt; None if the dataset has none."""
        entry = self.manifest.get("negative")
        if not entry:
            return None
        from safetensors import safe_open

        path = self.path / entry["file"]
        try:
            with safe_open(path, framework="numpy") as f:
                context, pooled = f.get_tensor("context")[0], f.get_tensor("pooled")[0]
        except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
            raise CorruptDataError(f"dataset {self.path}: negative prompt file {path} unreadable ({e})") from None
        if context.shape != self.context_shape or pooled.shape != (self.pooled_dim,):
            raise CorruptDataError(f"{path}: shapes {context.shape} {pooled.shape} differ from the manifest's")
        return context.astype(np.float32), pooled.astype(np.float32)

    def verify(self) -> list[str]:
        """Full check: every shard's sha256 against the manifest. Returns the shard files that fail."""
        bad = []
        for s in self.shards:
            p = self.path / s["file"]
            if not p.is_file() or hashlib.sha256(p.read_bytes()).hexdigest() != s["sha256"]:
                bad.append(s["file"])
        return bad

    def check_compatible(self, preset) -> None:
        """Refuse (DatasetMismatchError naming the dataset and both shapes) a dataset the model cannot train on:
        latent channels, VAE factors, context [L, J] and pooled width must be the preset's."""
        t, x, v = preset.text, preset.transformer, preset.vae
        m = self.manifest
        want = {"latent_channels": v.z_dim, "context_shape": (t.context_tokens, x.joint_attention_dim),
                "pooled_dim": x.pooled_projection_dim, "temporal_factor": v.temporal_factor,
                "spatial_factor": v.spatial_factor}
        got = {"latent_channels": self.latent_channels, "context_shape": self.context_shape, "pooled_dim": self.pooled_dim,
               "temporal_factor": m.get("temporal_factor"), "spatial_factor": m.get("spatial_factor")}
        bad = [f"{k} {got[k]} (model: {want[k]})" for k in want if got[k] != want[k]]
        for s in self.shards:
            f, h, w = s["bucket"]
            expect = list(v.latent_shape(f, h, w, patch_size=1))  # encoded sizes: multiples of the VAE factor
            if list(s["latent_shape"]) != expect:
                bad.append(f"shard {s['file']} latent shape {s['latent_shape']} for bucket {s['bucket']} (model: {expect})")
                break
        if bad:
            raise DatasetMismatchError(f"dataset {self.path} does not fit model {preset.name}: " + "; ".join(bad))


# ---- buckets and the trainer's batch source ---------------------------------------------------------
def dynamic_batch_sizes(shapes: Sequence[tuple[int, int, int]], preset, tokens_per_step: int, multiple: int = 1) -> list:
    """The paper's dynamic batch: per pixel shape (F, H, W), the batch whose video tokens per step
    (batch * T * (h/p) * (w/p)) come nearest to `tokens_per_step` from below, a multiple of `multiple`
    (at least `multiple`). -> [Bucket(F, H, W, batch)]."""
    out = []
    for f, h, w in shapes:
        tokens = Bucket(f, h, w, 1).video_tokens(preset)
        out.append(Bucket(f, h, w, max(multiple, tokens_per_step // tokens // multiple * multiple)))
    return out


class ShardedLatentSource(BatchSource):
    """The trainer's `BatchSource` over a dataset folder (see contentv_jax.data for the protocol).

    buckets: the trainer's `Bucket`s (frames, height, width, global batch); dataset records of other shapes are
        unused (logged); None = every bucket of the dataset (then `tokens_per_step` gives the batches).
    tokens_per_step: if set, each bucket's batch comes from this token budget (`dynamic_batch_sizes`),
        rounded to a multiple of process_count.
    val_fraction: records `held_out` for validation (the trainer's data.val_fraction) never enter a batch.
    image_ratio: None (or < 0, the config's default) = one stream over all buckets (every record once per epoch, images and videos in their
        natural proportion); r in [0, 1] = two streams, the image buckets (1 frame) and the video buckets, each
        with its own epochs, and each step draws an image batch with probability r.
    Epoch e of a stream: each bucket's records permuted by (seed, stream, e), cut into global batches (the
    remainder is dropped), the batches of all its buckets permuted. Step k's stream is drawn from (seed, k).
    Process p of n gets rows [p B/n, (p+1) B/n) of each global batch and reads only those records.
    state() = {"kind", "dataset" (manifest hash), "seed", "buckets" (per stream, + weights), "val_fraction" (if > 0),
               "step", "streams": [[epoch, batch index] per stream]}; restore() refuses a state of another plan.
    next() -> {"latents": [B_local, T, h, w, C], "context": [B_local, L, J], "pooled": [B_local, P]} float32;
    `prefetch` batches are read ahead on threads (the position still counts only returned batches).
    """

    def __init__(self, path: str | Path, preset, buckets: Sequence | None = None, *, seed: int = 0,
                 process_index: int = 0, process_count: int = 1, image_ratio: float | None = None,
                 tokens_per_step: int | None = None, on_corrupt: str = "error", prefetch: int = 2,
                 val_fraction: float = 0.0):
        self.ds = LatentDataset(path, on_corrupt)
        self.ds.check_compatible(preset)
        self.seed, self.process_index, self.process_count = int(seed), int(process_index), int(process_count)
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(f"process_index {process_index} not in [0, {process_count})")
        self.val_fraction = float(val_fraction)
        by_bucket = self.ds.records_by_bucket(self.ds.split(self.val_fraction)[0])
        if buckets is None:
            if not tokens_per_step:
                raise ValueError("ShardedLatentSource: give buckets (with batch sizes) or tokens_per_step")
            buckets = [Bucket(*s, 1) for s in sorted(by_bucket)]
        if tokens_per_step:
            buckets = dynamic_batch_sizes([(b.frames, b.height, b.width) for b in buckets], preset, int(tokens_per_step),
                                          self.process_count)
        unused = {s: len(ids) for s, ids in by_bucket.items() if s not in {(b.frames, b.height, b.width) for b in buckets}}
        if unused:
            log.warning("dataset %s: records of buckets %s are not in the training buckets; unused", self.ds.path, unused)
        self.buckets, self._ids = [], []
        for b in buckets:
            b.latent_shape(preset)
            if b.batch % self.process_count:
                raise ValueError(f"bucket {b}: batch {b.batch} does not divide over {self.process_count} processes")
            ids = by_bucket.get((b.frames, b.height, b.width), [])
            if len(ids) < b.batch:
                log.warning("dataset %s: bucket %s has %d records, fewer than one batch; unused", self.ds.path, b, len(ids))
                continue
            self.buckets.append(b)
            self._ids.append(np.asarray(ids, np.int64))
        if not self.buckets:
            raise ValueError(f"dataset {self.ds.path}: no training bucket {list(buckets)} has a full batch of records "
                             f"(dataset buckets: { {s: len(v) for s, v in by_bucket.items()} })")
        images = [i for i, b in enumerate(self.buckets) if b.frames == 1]
        videos = [i for i, b in enumerate(self.buckets) if b.frames != 1]
        if image_ratio is None or float(image_ratio) < 0:
            self.streams, self.weights = [list(range(len(self.buckets)))], np.ones(1)
        else:
            r = float(image_ratio)
            if not 0.0 <= r <= 1.0:
                raise ValueError(f"image_ratio {image_ratio} must be in [0, 1]")
            pairs = [(s, w) for s, w in ((images, r), (videos, 1.0 - r)) if w > 0]
            for s, w in pairs:
                if not s:
                    kind = "image" if s is images else "video"
                    raise ValueError(f"image_ratio {r}: the dataset {self.ds.path} has no full {kind} bucket among {list(buckets)}")
            self.streams, self.weights = [s for s, _ in pairs], np.asarray([w for _, w in pairs])
        self.weights = self.weights / self.weights.sum()
        self.prefetch = int(prefetch)
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, self.prefetch)) if self.prefetch > 0 else None
        self._plans: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}
        self.corrupt_records = 0  # records replaced after a failed checksum (on_corrupt="skip")
        self._pos = self._start()
        self._queue: collections.deque = collections.deque()
        self._ahead = self._pos

    # ---- the plan: a pure function of (seed, position) ----
    def _start(self) -> dict:
        return {"step": 0, "streams": [[0, 0] for _ in self.streams]}

    def epoch_plan(self, stream: int, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The global batches of one stream's epoch: [(bucket index, record ids [B])]."""
        key = (stream, epoch)
        if key not in self._plans:
            rng = np.random.default_rng([self.seed, 7, stream, epoch])
            batches = []
            for bi in self.streams[stream]:
                perm, n = rng.permutation(self._ids[bi]), self.buckets[bi].batch
                batches += [(bi, perm[j * n:(j + 1) * n]) for j in range(len(perm) // n)]
            self._plans = {k: v for k, v in self._plans.items() if k[0] != stream or k[1] >= epoch - 1}
            self._plans[key] = [batches[j] for j in rng.permutation(len(batches))]
        return self._plans[key]

    def _advance(self, pos: dict) -> tuple[int, np.ndarray, dict]:
        """position -> (bucket index, this process's record ids, next position)."""
        k = pos["step"]
        s = 0 if len(self.streams) == 1 else int(np.random.default_rng([self.seed, 11, k]).choice(len(self.streams), p=self.weights))
        streams = [list(x) for x in pos["streams"]]
        epoch, idx = streams[s]
        plan = self.epoch_plan(s, epoch)
        bi, ids = plan[idx]
        streams[s] = [epoch, idx + 1] if idx + 1 < len(plan) else [epoch + 1, 0]
        n, p, b = self.process_count, self.process_index, len(ids)
        return bi, ids[p * b // n:(p + 1) * b // n], {"step": k + 1, "streams": streams}

    def _read(self, ids: np.ndarray) -> tuple[dict[str, np.ndarray], int]:
        """Record ids -> stacked float32 arrays, read straight into the batch buffers; rows failing their
        checksum (skip mode) are replaced by a good row of the slice. Returns (batch, number replaced)."""
        shapes = self.ds.row_shapes(int(ids[0]))
        batch = {k: np.empty((len(ids), *s), self.ds.dtype) for k, s in shapes.items()}
        ok = [self.ds.read_into(int(i), {k: v[j] for k, v in batch.items()}) for j, i in enumerate(ids)]
        good = [j for j, o in enumerate(ok) if o]
        if not good:
            raise CorruptDataError(f"dataset {self.ds.path}: every record of a batch slice is corrupt: {list(ids)}")
        bad = [j for j, o in enumerate(ok) if not o]
        for n, j in enumerate(bad):
            for v in batch.values():
                v[j] = v[good[n % len(good)]]
            log.warning("dataset %s: %s failed its checksum; replaced", self.ds.path, self.ds._name(int(ids[j])))
        if self.ds.dtype != np.float32:
            batch = {k: v.astype(np.float32) for k, v in batch.items()}
        return batch, len(bad)

    # ---- BatchSource ----
    def next(self) -> dict[str, np.ndarray]:
        while len(self._queue) < max(1, self.prefetch):
            _, ids, self._ahead = self._advance(self._ahead)
            job = self._pool.submit(self._read, ids) if self._pool else ids
            self._queue.append((self._ahead, job))
        pos, job = self._queue.popleft()
        batch, replaced = job.result() if self._pool else self._read(job)
        self.corrupt_records += replaced
        self._pos = pos
        return batch

    def corruption_counts(self) -> dict[str, int]:
        """For the trainer's metrics (on_corrupt="skip"): records of shards found unreadable at open (never served)
        and records replaced in served batches after a failed checksum, so far (this process)."""
        return {"data_unreadable_records": self.ds.skipped_records, "data_corrupt_records": self.corrupt_records}

    def unreadable_shards(self) -> list[str]:
        return list(self.ds.bad_shards)

    def null_text(self) -> tuple[np.ndarray, np.ndarray]:
        """The empty prompt's (context [L, J], pooled [P]) float32 from negative.safetensors (caption dropout);
        raises naming the dataset if it has none."""
        neg = self.ds.negative_prompt()
        if neg is None:
            raise ValueError(f"dataset {self.ds.path}: no negative (empty prompt) embeddings in its manifest, which "
                             f"caption dropout needs; re-encode it with contentv_torch.encode_dataset or set "
                             f"flow.caption_dropout=0")
        return neg

    def eval_prompts(self, n: int) -> dict:
        """The trainer's evaluation prompts: the first n readable records' captions ("names") and embeddings
        (context [n, L, J], pooled [n, P]); negatives = the stored empty prompt, or zeros if the dataset has none."""
        ids = self.ds.valid[:n]
        rows = [self.ds[i] for i in ids]
        context, pooled = np.stack([r["context"] for r in rows]), np.stack([r["pooled"] for r in rows])
        neg = self.ds.negative_prompt()
        neg_c, neg_p = (np.zeros_like(context[0]), np.zeros_like(pooled[0])) if neg is None else neg
        return {"names": [r["caption"] for r in rows], "context": context, "pooled": pooled,
                "neg_context": np.broadcast_to(neg_c, context.shape).copy(),
                "neg_pooled": np.broadcast_to(neg_p, pooled.shape).copy()}

    def peek(self, count: int) -> list[tuple]:
        """(Bucket, this process's record ids) of the next `count` batches; nothing is read, the position stays."""
        pos, out = self._pos, []
        for _ in range(count):
            bi, ids, pos = self._advance(pos)
            out.append((self.buckets[bi], ids))
        return out

    def state(self) -> dict:
        held = {"val_fraction": self.val_fraction} if self.val_fraction > 0 else {}  # older states: none held out
        return {"kind": "shards", "dataset": self.ds.id, "seed": self.seed, "buckets": self._bucket_key(), **held,
                **json.loads(json.dumps(self._pos))}

    def _bucket_key(self) -> list:
        """What the plan depends on besides seed and dataset: [[F, H, W, batch], ...] per stream, and the weights."""
        return [[[self.buckets[i].frames, self.buckets[i].height, self.buckets[i].width, self.buckets[i].batch]
                 for i in s] for s in self.streams] + [[round(float(w), 9) for w in self.weights]]

    def restore(self, state: dict) -> None:
        if state.get("kind") != "shards" or state.get("dataset") != self.ds.id or state.get("seed") != self.seed:
            raise ValueError(f"data state {state} is not a position of dataset {self.ds.path} (id {self.ds.id}) "
                             f"with seed {self.seed}")
        if state.get("buckets") != self._bucket_key():
            raise ValueError(f"data state {state}: saved with buckets / image_ratio {state.get('buckets')}, this source has "
                             f"{self._bucket_key()}; the position would not continue the same sequence")
        if float(state.get("val_fraction", 0.0)) != self.val_fraction:
            raise ValueError(f"data state {state}: saved with data.val_fraction {state.get('val_fraction', 0.0)}, this "
                             f"source holds out {self.val_fraction}; the position would not continue the same sequence")
        streams = state["streams"]
        for f in self._queue:
            if self._pool:
                f[1].cancel()
        self._queue.clear()
        self._pos = {"step": int(state["step"]), "streams": [[int(e), int(i)] for e, i in streams]}
        self._ahead = self._pos

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=False, cancel_futures=True)
