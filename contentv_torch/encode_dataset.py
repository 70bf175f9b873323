"""Videos and images with captions -> a training dataset of latents (the format of `contentv_common.dataset`).

    python -m contentv_torch.encode_dataset --model ContentV-8B --captions clips.jsonl --output data/ \
        --buckets 121x480x832,61x480x832,1x480x832 --fps 24 --batch-size 4 --device cuda

clips.jsonl holds one JSON object per line: {"file": "a.mp4", "caption": "..."}; files are relative to the
jsonl's folder (or --root). Each file is fitted to a bucket (frames x height x width; 1 frame = images):
images take the 1-frame bucket, videos the video bucket that fits their length at --fps, both with the
nearest aspect ratio (then the most frames). The frame count F is 4k+1; F frames are sampled at --fps from
the start of the clip; frames are resized to cover the bucket (antialiased bilinear) and center-cropped.
Encoding: the PyTorch Wan VAE (fp32) gives the posterior mean [B, 16, T, h, w], normalised per channel and
stored channels-last [B, T, h, w, 16]; the three SD3.5 text encoders give context [B, 77 + L_t5, 4096] and
pooled [B, 2048] (tiny models: their widths). Unreadable, missing or too-short files are skipped, logged and
listed under "skipped" in the manifest. The empty prompt's embeddings are stored too (negative.safetensors).

Work is cut into chunks of --shard-size input lines; chunk k writes one shard per bucket
(`shards/c<k>-<F>x<H>x<W>.safetensors`) and then `chunks/c<k>.json`, both atomically. A rerun with the same
settings skips finished chunks (resume); manifest.json is written last, from all chunk files. `--part I/N`
splits the chunks over N processes (e.g. one per GPU) writing the same --output.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from contentv_common import dataset as fmt
from contentv_common import preflight
from contentv_common.cli import UsageError, add_debug_flag, output_dir, positive_float, positive_int, run_cli
from contentv_common.latents import normalize_latents
from contentv_common.weights import atomic_file

log = logging.getLogger("contentv_torch.encode_dataset")
PROG = "python -m contentv_torch.encode_dataset"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


class SkipFile(Exception):
    """An input file that is skipped (unreadable, missing, too short, no bucket); the message says why."""


# ---- inputs -------------------------------------------------------------------------------------------
def parse_buckets(text: str, multiple: int, temporal: int) -> list[tuple[int, int, int]]:
    """'17x128x128,1x128x128' -> [(17, 128, 128), (1, 128, 128)]; errors name the bad entry."""
    out = []
    for item in text.split(","):
        try:
            f, h, w = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"--buckets entry {item!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 17x128x128") from None
        if f < 1 or (f - 1) % temporal:
            raise ValueError(f"--buckets entry {item!r}: frames must be {temporal}k+1 (1 = images)")
        if h <= 0 or w <= 0 or h % multiple or w % multiple:
            raise ValueError(f"--buckets entry {item!r}: height and width must be positive multiples of {multiple}")
        out.append((f, h, w))
    if len(set(out)) != len(out):
        raise ValueError(f"--buckets {text!r}: duplicate buckets")
    return out


def read_captions(path: str | Path, root: str | Path | None = None) -> list[dict]:
    """The jsonl list -> [{"file": path, "source": as written, "caption": str}]; errors name the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--captions {path}: no such file")
    root = Path(root) if root else path.parent
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            file, caption = d["file"], d["caption"]
            if not isinstance(file, str) or not isinstance(caption, str):
                raise TypeError("file and caption must be strings")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} line {n}: expected {{\"file\": ..., \"caption\": ...}} ({e!r})") from None
        items.append({"file": root / file, "source": file, "caption": caption})
    if not items:
        raise ValueError(f"{path}: no entries")
    return items


def load_media(path: Path) -> tuple[np.ndarray, float | None]:
    """-> (frames [N, H, W, 3] uint8, fps; None for images). Raises SkipFile for missing / unreadable files."""
    if not path.is_file():
        raise SkipFile("file missing")
    try:
        if path.suffix.lower() in IMAGE_SUFFIXES:
            from PIL import Image

            with Image.open(path) as im:
                return np.asarray(im.convert("RGB"))[None], None
        from contentv_common.video_io import read_mp4

        frames, fps = read_mp4(path)
        return frames, fps
    except Exception as e:  # noqa: BLE001  (decoders raise many types for broken files)
        raise SkipFile(f"unreadable ({type(e).__name__}: {e})") from None


def available_frames(n_src: int, src_fps: float, fps: float) -> int:
    """Frames of a clip of n_src frames at src_fps when resampled to fps (from its first frame)."""
    if not math.isfinite(src_fps) or src_fps <= 0:
        src_fps = fps
    return math.floor((n_src - 1) * fps / src_fps + 1e-6) + 1


def choose_bucket(frames: int | None, height: int, width: int, buckets) -> tuple[int, int, int]:
    """Images (frames None) -> 1-frame buckets; videos of `frames` frames (at the target fps) -> video buckets
    with F <= frames. Nearest aspect ratio first, then the most frames. SkipFile when none fits."""
    if frames is None:
        fits = [b for b in buckets if b[0] == 1]
        if not fits:
            raise SkipFile("an image, but there is no 1-frame bucket")
    else:
        video = [b for b in buckets if b[0] > 1]
        if not video:
            raise SkipFile("a video, but there are only image buckets")
        fits = [b for b in video if b[0] <= frames]
        if not fits:
            raise SkipFile(f"too short: {frames} frames at the target fps, the shortest bucket needs {min(b[0] for b in video)}")
    aspect = math.log(width / height)
    return min(fits, key=lambda b: (round(abs(math.log(b[2] / b[1]) - aspect), 6), -b[0]))


def fit_clip(frames: np.ndarray, src_fps: float | None, bucket, fps: float) -> torch.Tensor:
    """frames [N, H0, W0, 3] uint8 -> video [3, F, H, W] float32 in [-1, 1] for bucket (F, H, W): F frames at
    `fps` from the start, resized (antialiased bilinear) to cover H x W, center-cropped."""
    f, h, w = bucket
    if src_fps is None:
        idx = np.zeros(f, np.int64)
    else:
        src = src_fps if math.isfinite(src_fps) and src_fps > 0 else fps
        idx = np.minimum(np.floor(np.arange(f) * src / fps + 1e-6).astype(np.int64), len(frames) - 1)  # frame shown at i/fps
    x = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2).float()  # [F, 3, H0, W0]
    h0, w0 = x.shape[-2:]
    scale = max(h / h0, w / w0)
    size = (max(h, round(h0 * scale)), max(w, round(w0 * scale)))
    if size != (h0, w0):
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - h) // 2, (size[1] - w) // 2
    x = x[:, :, top:top + h, left:left + w]
    return (x / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()  # [3, F, H, W]


def prepare(item: dict, buckets, fps: float) -> tuple[tuple[int, int, int], torch.Tensor, str]:
    """One input -> (bucket, video [3, F, H, W] in [-1, 1], "image" | "video"); SkipFile explains a skip."""
    frames, src_fps = load_media(item["file"])
    n, h0, w0 = frames.shape[:3]
    if src_fps is None:
        bucket = choose_bucket(None, h0, w0, buckets)
    else:
        bucket = choose_bucket(available_frames(n, src_fps, fps) if n > 1 else 1, h0, w0, buckets)
    return bucket, fit_clip(frames, src_fps, bucket, fps), "image" if src_fps is None else "video"


# ---- encoding -------------------------------------------------------------------------------------
class Encoder:
    """The Wan VAE (fp32) and the SD3.5 text encoders of a ContentV folder on one device."""

    def __init__(self, model: str | Path, device="auto", text_dtype: torch.dtype = torch.float32,
                 max_sequence_length: int | None = None):
        from contentv_torch.pipeline import read_model_info, resolve_device
        from contentv_torch.text import TextEncoders
        from contentv_torch.vae import WanVAE

        self.info = read_model_info(model)
        self.device = resolve_device(device)
        self.vae_config = self.info.vae
        self.max_sequence_length = max_sequence_length or self.info.preset.text.t5_max_tokens
        self.vae = WanVAE.from_pretrained(Path(model) / "vae", dtype=torch.float32, device=self.device)
        self.text = TextEncoders.from_pretrained(model, dtype=text_dtype, device=self.device)

    @torch.no_grad()
    def encode_text(self, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions [B] -> context [B, 77 + L, J], pooled [B, P] float32 numpy."""
        e = self.text.encode(captions, do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        return e.prompt_embeds.float().cpu().numpy(), e.pooled.float().cpu().numpy()

    @torch.no_grad()
    def encode_video(self, videos: torch.Tensor) -> np.ndarray:
        """videos [B, 3, F, H, W] in [-1, 1] -> normalised posterior means [B, T, H/8, W/8, z] float32 numpy."""
        mean, _ = self.vae.encode(videos.to(self.device, torch.float32))
        z = normalize_latents(mean, self.vae_config, channel_axis=1)  # [B, z, T, h, w]
        return z.permute(0, 2, 3, 4, 1).float().cpu().numpy()


def _settings(args, items) -> dict:
    """What determines the output (a resumed run must match it)."""
    digest = hashlib.sha256("\n".join(f"{i['source']}\t{i['caption']}" for i in items).encode()).hexdigest()
    return {"model": str(Path(args.model).resolve()), "captions_sha256": digest, "buckets": args.buckets,
            "fps": args.fps, "shard_size": args.shard_size, "dtype": args.store_dtype, "text_dtype": args.text_dtype,
            "max_sequence_length": args.max_sequence_length, "posterior": "mean"}


def _write_json(path: Path, obj) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1))


def encode_chunk(enc: Encoder, items: list[dict], k: int, out: Path, buckets, args, bar) -> dict:
    """Encode chunk k (its input items) -> its chunk record {"shards", "records", "skipped"}; shards are written."""
    pending: dict[tuple, list] = {}  # bucket -> [(item, video, kind)] waiting for a full batch
    done: dict[tuple, list] = {}  # bucket -> [(item, kind, latents [T,h,w,C], context [L,J], pooled [P])]
    skipped = []

    def flush(bucket):
        group, pending[bucket] = pending.get(bucket, []), []
        if not group:
            return
        latents = enc.encode_video(torch.stack([v for _, v, _ in group]))
        context, pooled = enc.encode_text([it["caption"] for it, _, _ in group])
        done.setdefault(bucket, []).extend((it, kind, latents[j], context[j], pooled[j]) for j, (it, _, kind) in enumerate(group))

    for item in items:
        try:
            bucket, video, kind = prepare(item, buckets, args.fps)
            pending.setdefault(bucket, []).append((item, video, kind))
            if len(pending[bucket]) >= args.batch_size:
                flush(bucket)
        except SkipFile as e:
            skipped.append({"source": item["source"], "reason": str(e)})
            log.warning("skipping %s: %s", item["file"], e)
        bar.update(1)
    for bucket in list(pending):
        flush(bucket)
    chunk = {"shards": [], "records": [], "skipped": skipped}
    for bucket in sorted(done):
        rows = done[bucket]
        name = f"shards/c{k:05d}-{'x'.join(map(str, bucket))}.safetensors"
        entry, crcs = fmt.write_shard(out / name, np.stack([r[2] for r in rows]), np.stack([r[3] for r in rows]),
                                      np.stack([r[4] for r in rows]), dtype=args.store_dtype)
        chunk["shards"].append({"file": name, "bucket": list(bucket), **entry})
        chunk["records"] += [{"shard": len(chunk["shards"]) - 1, "row": j, "caption": it["caption"], "source": it["source"],
                              "kind": kind, "crc32": crc} for j, ((it, kind, *_), crc) in enumerate(zip(rows, crcs))]
    _write_json(out / "chunks" / f"c{k:05d}.json", chunk)
    return chunk


def _finished_chunks(out: Path, n: int) -> list[dict | None]:
    """Chunk records of chunks 0..n-1 whose json and shards all exist; None for the others."""
    chunks = []
    for k in range(n):
        cpath = out / "chunks" / f"c{k:05d}.json"
        c = json.loads(cpath.read_text()) if cpath.is_file() else None
        if c is not None and not all((out / s["file"]).is_file() for s in c["shards"]):
            c = None  # a shard went missing: redo the chunk
        chunks.append(c)
    return chunks


def _part(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--part {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--part {text!r}: need 0 <= I < N")
    return i, n


def encode_dataset(args, encoder: Encoder | None = None) -> dict | None:
    """Run the encoding (see the module docstring) for parsed CLI `args`; returns the manifest (None when this
    --part finished while other parts still have chunks to do).
    `encoder`: an already loaded Encoder of args.model (else one is loaded when any chunk is left to do)."""
    from safetensors import safe_open

    from contentv_torch.pipeline import free_memory, read_model_info

    info = read_model_info(args.model)  # checks the folder before anything is loaded
    vae = info.vae
    args.max_sequence_length = args.max_sequence_length or info.preset.text.t5_max_tokens
    try:
        buckets = parse_buckets(args.buckets, vae.spatial_factor * info.transformer.patch_size, vae.temporal_factor)
    except ValueError as e:  # a bad flag value: exit 2, as argparse's own checks
        raise UsageError(str(e)) from None
    items = read_captions(args.captions, args.root)
    f, h, w = max(buckets, key=lambda b: b[0] * b[1] * b[2])
    preflight.check_fits(f"--buckets {f}x{h}x{w} x --batch-size {args.batch_size}",
                         preflight.encode_bytes(vae, args.batch_size, f, h, w), *free_memory(args.device))
    out = Path(args.output)
    settings = _settings(args, items)
    spath = out / "encode_settings.json"
    if args.overwrite and args.part[1] > 1:
        raise ValueError("--overwrite with --part would delete the other parts' work; start over without --part")
    if args.overwrite:
        for name in ("shards", "chunks"):
            shutil.rmtree(out / name, ignore_errors=True)
        for name in (fmt.MANIFEST_NAME, spath.name):
            (out / name).unlink(missing_ok=True)
    if spath.is_file():
        old = json.loads(spath.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(f"--output {out} was encoded with other settings (differ: {diff}); use another --output "
                             "or --overwrite")
    elif out.exists() and any(not p.name.startswith(".") for p in out.iterdir()):  # (.tmp files: a part starting)
        raise FileExistsError(f"--output {out} exists and is not a dataset being encoded; use another folder or --overwrite")

    chunks_in = [items[i:i + args.shard_size] for i in range(0, len(items), args.shard_size)]
    chunks = _finished_chunks(out, len(chunks_in))
    part, parts = args.part
    todo = [k for k, c in enumerate(chunks) if c is None and k % parts == part]
    if any(c is not None for c in chunks):
        log.info("resuming: %d of %d chunks already done", sum(c is not None for c in chunks), len(chunks))
    enc = encoder
    if todo and enc is None:
        enc = Encoder(args.model, args.device, getattr(torch, args.text_dtype), args.max_sequence_length)
    _write_json(spath, settings)  # only now: a model that fails to load leaves no --output behind
    with tqdm(total=len(items), desc="encode", unit="file", disable=args.quiet) as bar:
        bar.update(sum(len(chunks_in[k]) for k in range(len(chunks)) if chunks[k] is not None))
        for k in todo:
            chunks[k] = encode_chunk(enc, chunks_in[k], k, out, buckets, args, bar)

    if parts > 1:
        chunks = _finished_chunks(out, len(chunks_in))  # the other parts' work so far
        left = sum(c is None for c in chunks)
        if left:
            log.info("part %d/%d done; %d chunk(s) left to the other parts (the last part to finish writes %s)",
                     part, parts, left, fmt.MANIFEST_NAME)
            return None
    shards, records, skipped = [], [], []
    for c in chunks:
        base = len(shards)
        shards += c["shards"]
        records += [{**r, "shard": base + r["shard"]} for r in c["records"]]
        skipped += c["skipped"]
    if not records:
        raise ValueError(f"--output {out}: every input was skipped; nothing to write")
    with safe_open(out / shards[0]["file"], framework="numpy") as f:  # text shapes from a shard header
        context_shape, pooled_dim = f.get_slice("context").get_shape()[1:], f.get_slice("pooled").get_shape()[1]
    if enc is not None or not (out / "negative.safetensors").is_file():  # the CFG negative: the empty prompt
        enc = enc or Encoder(args.model, args.device, getattr(torch, args.text_dtype), args.max_sequence_length)
        neg_context, neg_pooled = enc.encode_text([""])
        negative = fmt.write_negative(out, neg_context[0], neg_pooled[0], args.store_dtype)
    else:
        negative = {"file": "negative.safetensors", "prompt": ""}
    manifest = fmt.make_manifest(shards, records, vae, context_shape, pooled_dim, args.store_dtype, skipped,
                                 fps=args.fps, model=settings["model"], buckets=[list(b) for b in buckets],
                                 negative=negative)
    fmt.write_manifest(out, manifest)
    counts: dict[str, int] = {}
    for s in shards:
        key = "x".join(map(str, s["bucket"]))
        counts[key] = counts.get(key, 0) + s["rows"]
    log.info("wrote %s: %d records %s, %d skipped", out, len(records), counts, len(skipped))
    for s in skipped:
        log.info("  skipped %s: %s", s["source"], s["reason"])
    return manifest


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local ContentV folder (vae/, text_encoder*/, tokenizer*/, ...)")
    ap.add_argument("--captions", required=True, help="jsonl: one {\"file\": ..., \"caption\": ...} per line")
    ap.add_argument("--root", default=None, help="folder the jsonl's files are relative to (default: the jsonl's folder)")
    ap.add_argument("--output", required=True, type=output_dir, help="dataset folder to write (or resume)")
    ap.add_argument("--buckets", required=True, help="FxHxW,... pixel buckets; F = 4k+1 frames, 1 for images; H, W "
                                                     "multiples of 16, e.g. 17x128x128,17x128x224,1x128x128")
    ap.add_argument("--fps", type=positive_float, default=24, help="frame rate clips are sampled at (default 24)")
    ap.add_argument("--batch-size", type=positive_int, default=4, help="clips per VAE / text-encoder batch")
    ap.add_argument("--shard-size", type=positive_int, default=64, help="input lines per chunk (one shard per bucket per chunk)")
    ap.add_argument("--device", default="auto", help="auto | cuda[:i] | npu[:i] | cpu")
    ap.add_argument("--text-dtype", default="float32", choices=["float32", "bfloat16"], help="text encoders' dtype")
    ap.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16"], help="dtype in the shards")
    ap.add_argument("--max-sequence-length", type=positive_int, default=None, help="T5 tokens (default: the model preset's, 256)")
    ap.add_argument("--part", type=_part, default=(0, 1), metavar="I/N", help="encode only chunks k with k %% N == I "
                    "(N processes or devices share one --output; the last to finish writes the manifest)")
    ap.add_argument("--overwrite", action="store_true", help="start over, deleting an earlier run's shards in --output")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    add_debug_flag(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    encode_dataset(args)
    return 0


def cli(argv=None) -> int:
    """The command line: `main` behind the shared error boundary (bad model folders, caption files and buckets
    raise ValueError naming them; a missing torch_npu is an ImportError that says what to install)."""
    return run_cli(PROG, main, argv, user_errors=(ValueError, ImportError))


if __name__ == "__main__":
    sys.exit(cli())
