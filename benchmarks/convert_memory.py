"""Peak memory and time of `python -m convert` on a full-width checkpoint (not a test).

    python -m benchmarks.convert_memory [--preset contentv-8b] [--dir /work/tmp-convert] [--keep]

1. writes a diffusers-layout transformer folder of the preset's exact keys and shapes in bf16 (16.1 GB for
   contentv-8b; 5 GB shards + index), filled with a tiled random pattern (no RNG over 8B values);
2. runs `python -m convert --to jax SRC JAX` as a child process and reads its peak RSS with os.wait4
   (the child's own resource usage) and its wall time;
3. deletes SRC, runs `python -m convert --to torch JAX BACK` the same way;
4. regenerates a sample of tensors and checks BACK holds them bit-exactly;
and prints one line for benchmarks/RESULTS.md. Needs about 2x the checkpoint size of free disk.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np

from contentv_common.config import get_preset
from contentv_common.weights import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, atomic_dir, iter_tensors
from convert.formats import Planned, expected_torch_shapes, write_safetensors

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


def run_child(argv: list[str]) -> tuple[float, float]:
    """(peak RSS in GiB, wall seconds) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], env={**os.environ, "JAX_PLATFORMS": "cpu"})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed with {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 2**20, wall  # ru_maxrss is in KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="contentv-8b")
    ap.add_argument("--dir", default="/work/tmp-convert-bench")
    ap.add_argument("--keep", action="store_true", help="keep the written folders")
    args = ap.parse_args()
    root = Path(args.dir)
    src, jax_dst, back = root / "torch", root / "jax", root / "back"
    for p in (src, jax_dst, back):
        shutil.rmtree(p, ignore_errors=True)
    try:
        t0 = time.perf_counter()
        n, nbytes = generate(src, args.preset)
        gen_s = time.perf_counter() - t0
        print(f"generated {n} tensors, {nbytes / 1e9:.2f} GB in {gen_s:.0f}s", flush=True)
        rss_jax, s_jax = run_child(["-m", "convert", "--to", "jax", str(src), str(jax_dst)])
        print(f"torch -> jax: peak RSS {rss_jax:.2f} GiB, {s_jax:.0f}s", flush=True)
        if not args.keep:
            shutil.rmtree(src)
        rss_back, s_back = run_child(["-m", "convert", "--to", "torch", str(jax_dst), str(back)])
        print(f"jax -> torch: peak RSS {rss_back:.2f} GiB, {s_back:.0f}s", flush=True)
        shapes = expected_torch_shapes("transformer", get_preset(args.preset).transformer)
        sample = sorted(shapes)[:: max(1, len(shapes) // 40)]
        for k, t in iter_tensors(back, framework="numpy", keys=sample):
            if t.dtype != BF16 or not np.array_equal(t.view(np.uint16), pattern(k, shapes[k]).view(np.uint16)):
                raise SystemExit(f"round trip changed {k}")
        print(f"round trip bit-exact on {len(sample)} sampled tensors", flush=True)
        print(f"| convert {args.preset} ({n} tensors, {nbytes / 1e9:.1f} GB bf16, diffusers -> jax -> torch) | "
              f"peak RSS {rss_jax:.2f} / {rss_back:.2f} GiB | {s_jax:.0f} s / {s_back:.0f} s | "
              f"{nbytes / 1e9 / s_jax:.2f} / {nbytes / 1e9 / s_back:.2f} GB/s | CPU, 2 cores |")
    finally:
        if not args.keep:
            for p in (src, jax_dst, back):
                shutil.rmtree(p, ignore_errors=True)


if __name__ == "__main__":
    main()
