"""Peak memory and time of `python -m convert` on a full-width checkpoint (not a test).

    python -m benchmarks.convert_memory [--preset contentv-8b] [--dir /work/tmp-convert] [--keep]

1. writes a diffusers-layout transformer folder of the preset's exact keys and shapes in bf16 (16.1 GB for
   contentv-8b; 5 GB shards + index), filled with a tiled random pattern (no RNG over 8B values);
2. runs `python -m convert --to jax SRC JAX` as a child process and reads its peak RSS with os.wait4
   (the child's own resource usage) and its wall time;
3. deletes SRC, runs `python -m convert --to torch JAX BACK` the same way;
4. regenerates a sample of tensors and checks BACK holds them bit-exactly;
and prints one line for benchmarks/RESULTS.md. Needs about 2x the checkpoint size of free disk.

`--source checkpoint` instead writes a training checkpoint (contentv_jax.checkpoint.Checkpointer, float32
params of the preset's width with `--layers` blocks, no optimizer state: the converter reads only the params)
and measures `python -m convert --to torch CKPT BACK`. `--code DIR` runs the children from another checkout
(e.g. the main branch) to compare two versions of the converter on the same files.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from contentv_common.config import SD3_POS_EMBED_KEY, get_preset
from contentv_common.formats import sd3_original
from contentv_common.formats.sources import Planned, expected_torch_shapes
from contentv_common.weights import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, atomic_dir, iter_tensors
from convert.formats import write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)
_BLOCK = np.random.default_rng(0).standard_normal(1 << 20).astype(BF16)


def pattern(key: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic, key-dependent, non-constant data: the random block tiled from a key-dependent offset."""
    n = int(np.prod(shape))
    start = sum(map(ord, key)) % (1 << 19)
    return np.resize(_BLOCK[start:], n).reshape(shape)


def generate(folder: Path, preset: str) -> tuple[int, int]:
    cfg = get_preset(preset).transformer
    shapes = expected_torch_shapes("transformer", cfg)
    planned = [Planned(k, s, BF16, (lambda k=k, s=s: iter([pattern(k, s)]))) for k, s in sorted(shapes.items())]
    import json

    with atomic_dir(folder) as tmp:
        write_safetensors(tmp, planned, WEIGHTS_NAME, INDEX_NAME, desc="generate")
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg.to_diffusers_config(), indent=2))
    return len(shapes), sum(t.nbytes for t in planned)


def original_shapes(preset: str) -> dict[str, tuple[int, ...]]:
    """Original single-file key (without prefix) -> shape, from the diffusers shapes (+ the 2D pos_embed table)."""
    cfg = get_preset(preset).transformer
    shapes = expected_torch_shapes("transformer", cfg)
    shapes[SD3_POS_EMBED_KEY] = (1, cfg.pos_embed_max_size**2, cfg.inner_dim)
    out = {}
    for k, piece in sd3_original.key_table(cfg, pos_embed=True).items():
        s = shapes[k]
        out[piece.original] = (3 * s[0], *s[1:]) if piece.op == "qkv" else s
    return out


def generate_sd3_original(file: Path, preset: str) -> tuple[int, int]:
    shapes = original_shapes(preset)
    planned = [Planned(sd3_original.PREFIX + k, s, BF16, (lambda k=k, s=s: iter([pattern(k, s)])))
               for k, s in sorted(shapes.items())]
    file.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(file.parent, planned, file.name, file.name + ".index.json", max_shard_bytes=2**62, desc="generate")
    return len(shapes), sum(t.nbytes for t in planned)


def expected_diffusers(key: str, shapes: dict, table: dict | None, orig: dict | None) -> np.ndarray:
    """What the diffusers tensor `key` must hold for the generated data of either source (table / orig: the SD3
    original key table and shapes, None for a diffusers source)."""
    if table is None:
        return pattern(key, shapes[key])
    piece = table[key]
    return sd3_original.apply(piece, pattern(piece.original, orig[piece.original]))


def generate_checkpoint(folder: Path, preset: str, layers: int) -> tuple[int, int]:
    """A training checkpoint (step 1) whose float32 params hold the pattern of each diffusers key."""
    from contentv_common.formats.keymap import flatten, torch_to_flax
    from contentv_common.formats.transformer_keys import transformer_rules
    from contentv_jax.checkpoint import Checkpointer

    cfg = dataclasses.replace(get_preset(preset).transformer, num_layers=layers)
    shapes = expected_torch_shapes("transformer", cfg)
    params = torch_to_flax(((k, pattern(k, s).astype(np.float32)) for k, s in sorted(shapes.items())),
                           transformer_rules(cfg))
    ckpt = Checkpointer(folder, every=1, async_save=False)
    ckpt.save(1, {"params": params, "step": np.int32(1)}, {}, force=True)
    ckpt.close()
    return len(shapes), sum(v.nbytes for v in flatten(params).values())


def check_sample(what: str, folder: Path, shapes: dict, want, extra: list[str] = ()) -> None:
    """Compare a sample of the tensors of `folder` (every 40th key of `shapes`, plus `extra`) bit for bit with
    want(key)."""
    sample = sorted(shapes)[:: max(1, len(shapes) // 40)] + list(extra)
    for k, t in iter_tensors(folder, framework="numpy", keys=sample):
        w = want(k)
        if t.dtype != w.dtype or not np.array_equal(t.view(np.uint8), w.view(np.uint8)):
            raise SystemExit(f"{folder}: {k} is not what was generated")
    print(f"{what} bit-exact on {len(sample)} sampled tensors", flush=True)


def remove(*paths: Path) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def run_child(argv: list[str], cwd: str | None = None) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one child process (run from `cwd`: its packages are imported)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=cwd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed with {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 2**20, wall  # ru_maxrss is in KiB on Linux


def run_convert(what: str, to: str, src: Path, dst: Path, cwd: str | None = None) -> tuple[float, float]:
    """`python -m convert --to TO SRC DST` as a child (from the checkout `cwd`): its (peak RSS GiB, wall s), printed."""
    rss, wall = run_child(["-m", "convert", "--to", to, str(src), str(dst)], cwd=cwd)
    print(f"{what}: peak RSS {rss:.2f} GiB, {wall:.0f}s", flush=True)
    return rss, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="contentv-8b")
    ap.add_argument("--source", choices=["diffusers", "sd3-original", "checkpoint"], default="diffusers")
    ap.add_argument("--layers", type=int, default=4, help="--source checkpoint: transformer blocks (full width)")
    ap.add_argument("--code", default=None, help="run the converter children from this checkout")
    ap.add_argument("--dir", default="/work/tmp-convert-bench")
    ap.add_argument("--keep", action="store_true", help="keep the written folders")
    args = ap.parse_args()
    root = Path(args.dir).absolute()
    if args.source == "checkpoint":
        return checkpoint_main(args, root)
    src = root / ("sd3.5_large.safetensors" if args.source == "sd3-original" else "torch")
    jax_dst, back = root / "jax", root / "back"
    remove(src, jax_dst, back)
    try:
        t0 = time.perf_counter()
        if args.source == "sd3-original":
            n, nbytes = generate_sd3_original(src, args.preset)
        else:
            n, nbytes = generate(src, args.preset)
        gen_s = time.perf_counter() - t0
        print(f"generated {n} tensors, {nbytes / 1e9:.2f} GB in {gen_s:.0f}s", flush=True)
        rss_jax, s_jax = run_convert(f"{args.source} -> jax", "jax", src, jax_dst)
        if not args.keep:
            shutil.rmtree(src) if src.is_dir() else src.unlink()
        rss_back, s_back = run_convert("jax -> torch", "torch", jax_dst, back)
        cfg = get_preset(args.preset).transformer
        shapes = expected_torch_shapes("transformer", cfg)
        table = orig = None
        if args.source == "sd3-original":
            table, orig = sd3_original.key_table(cfg, pos_embed=False), original_shapes(args.preset)
        check_sample("round trip", back, shapes, lambda k: expected_diffusers(k, shapes, table, orig),
                     ["norm_out.linear.weight", "transformer_blocks.0.attn.to_v.bias"])
        print(f"| convert {args.preset} ({n} tensors, {nbytes / 1e9:.1f} GB bf16, {args.source} -> jax -> torch) | "
              f"peak RSS {rss_jax:.2f} / {rss_back:.2f} GiB | {s_jax:.0f} s / {s_back:.0f} s | "
              f"{nbytes / 1e9 / s_jax:.2f} / {nbytes / 1e9 / s_back:.2f} GB/s | CPU, 2 cores |")
    finally:
        if not args.keep:
            remove(src, jax_dst, back)


def checkpoint_main(args, root: Path) -> None:
    ckpt, back = root / "ckpt", root / "back"
    remove(ckpt, back)
    try:
        t0 = time.perf_counter()
        # in a spawned process: a child forked from a parent holding the params would count them in its peak RSS
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            n, nbytes = pool.submit(generate_checkpoint, ckpt, args.preset, args.layers).result()
        print(f"checkpoint of {n} tensors, {nbytes / 1e9:.2f} GB float32 in {time.perf_counter() - t0:.0f}s", flush=True)
        rss, wall = run_convert("checkpoint -> torch", "torch", ckpt, back, cwd=args.code)
        cfg = dataclasses.replace(get_preset(args.preset).transformer, num_layers=args.layers)
        shapes = expected_torch_shapes("transformer", cfg)
        check_sample("checkpoint -> torch", back, shapes, lambda k: pattern(k, shapes[k]).astype(np.float32))
        print(f"| convert a {args.preset}-width training checkpoint ({args.layers} blocks, {n} tensors, "
              f"{nbytes / 1e9:.1f} GB fp32) -> torch, code {args.code or 'this checkout'} | peak RSS {rss:.2f} GiB | "
              f"{wall:.0f} s | CPU, 2 cores |")
    finally:
        if not args.keep:
            remove(ckpt, back)


if __name__ == "__main__":
    main()
