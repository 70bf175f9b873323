"""Tiled against untiled Wan VAE encode / decode (PyTorch): PSNR of the difference, time and peak memory.

    python -m benchmarks.vae_tiling --json tiling.json                         # random full Wan2.1 VAE, CPU
    python -m benchmarks.vae_tiling --vae Wan2.1-VAE/vae --shape 81x480x832 --tile 256 --stride 192 --device cuda

Input: a smooth synthetic clip (soft coloured blobs drifting over a gradient, in [-1, 1]). Untiled runs first,
then tiled with the given tile size and stride (pixels). Encode compares the posterior means, decode compares
the decoded videos of the untiled latents. PSNR is over a peak-to-peak of 2 ([-1, 1]) for videos and of the
untiled mean's range for latents. Without --vae the weights are random (seeded): random weights have no spatial
locality, so the seams they show are a pessimistic bound; the real Wan2.1 weights (--vae) give the figure users see.
Each phase runs in a fresh process. Peak memory: the RSS a phase adds on CPU (sampled), `torch.cuda.max_memory_allocated` on CUDA.
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import sys
import time

import numpy as np
import torch

from benchmarks.common import GiB, RSSPeak, machine_info, markdown_table, write_json
from contentv_common.config import get_preset
from contentv_torch.vae import WanVAE


def smooth_clip(frames: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """[1, 3, F, H, W] in [-1, 1]: a colour gradient with 4 Gaussian blobs moving linearly."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames)[:, None, None] / max(frames - 1, 1)
    y, x = np.mgrid[0:height, 0:width]
    y, x = y[None] / height, x[None] / width  # [1, H, W]
    video = np.stack([0.6 * x - 0.3, 0.6 * y - 0.3, 0.3 * (x + y) - 0.3], 0).repeat(frames, 1)  # [3, F, H, W]
    for _ in range(4):
        (y0, x0), (vy, vx) = rng.uniform(0.2, 0.8, 2), rng.uniform(-0.3, 0.3, 2)
        r, colour = rng.uniform(0.08, 0.2), rng.uniform(-1, 1, 3)
        blob = np.exp(-(((y - y0 - vy * t) ** 2 + (x - x0 - vx * t) ** 2) / (2 * r * r)))
        video = video + colour[:, None, None, None] * blob[None]
    return torch.from_numpy(np.clip(video, -1, 1)[None].astype(np.float32))


def psnr(a: torch.Tensor, b: torch.Tensor, peak_to_peak: float) -> float:
    mse = torch.mean((a.double() - b.double()) ** 2).item()
    return math.inf if mse == 0 else 10 * math.log10(peak_to_peak**2 / mse)


def measure(fn, device: torch.device) -> tuple[torch.Tensor, float, float]:
    """Run fn() once: (result, seconds, peak GiB the call added)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t0, (torch.cuda.max_memory_allocated() - base) / GiB
    with RSSPeak() as peak:
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
    return out, seconds, peak.delta_bytes / GiB


def _phase(vae_dir, preset, seed, device, tile, op, tiled, x):
    """One encode or decode, tiled or not, in this (child) process: (posterior mean or video on CPU, s, GiB)."""
    device = torch.device(device)
    torch.manual_seed(seed)  # the same random weights in every child
    vae = (WanVAE.from_pretrained(vae_dir) if vae_dir else WanVAE(get_preset(preset).vae)).to(device).eval()
    x = x.to(device)
    fns = {("encode", False): lambda: vae.encode(x)[0], ("encode", True): lambda: vae.tiled_encode(x, **tile)[0],
           ("decode", False): lambda: vae.decode(x), ("decode", True): lambda: vae.tiled_decode(x, **tile)}
    with torch.no_grad():
        out, seconds, gib = measure(fns[op, tiled], device)
    return out.cpu(), seconds, gib


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vae", help="diffusers vae/ folder (default: random weights of --preset's VAE)")
    ap.add_argument("--preset", default="contentv-8b", help="without --vae: the preset whose VAE config to use "
                    "(contentv-8b: Wan2.1)")
    ap.add_argument("--shape", default="5x96x176", help="FRAMESxHEIGHTxWIDTH pixels (4k+1 frames, multiples of 8)")
    ap.add_argument("--tile", type=int, default=64, help="tile size in pixels (diffusers' default 256)")
    ap.add_argument("--stride", type=int, default=48, help="tile stride in pixels (diffusers' default 192)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    try:
        frames, height, width = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        ap.error(f"--shape {args.shape!r}: expected FRAMESxHEIGHTxWIDTH, e.g. 5x160x288")
    # Each phase in a fresh process: a CPU allocator keeps freed pages, so one process's RSS after a big
    # untiled call would hide what the tiled call needs.
    spawn = multiprocessing.get_context("spawn")
    common = (args.vae, args.preset, args.seed, args.device, dict(tile_size=args.tile, tile_stride=args.stride))

    def phase(op: str, tiled: bool, x: torch.Tensor):
        with spawn.Pool(1) as pool:
            return pool.apply(_phase, (*common, op, tiled, x))

    video = smooth_clip(frames, height, width, args.seed)
    mean, enc_s, enc_gib = phase("encode", False, video)
    tmean, tenc_s, tenc_gib = phase("encode", True, video)
    dec, dec_s, dec_gib = phase("decode", False, mean)
    tdec, tdec_s, tdec_gib = phase("decode", True, mean)
    latent_range = (mean.max() - mean.min()).item()
    rows = [
        dict(op="encode", mode="untiled", seconds=enc_s, peak_gib=enc_gib, psnr_db=None),
        dict(op="encode", mode="tiled", seconds=tenc_s, peak_gib=tenc_gib, psnr_db=psnr(tmean, mean, latent_range)),
        dict(op="decode", mode="untiled", seconds=dec_s, peak_gib=dec_gib, psnr_db=None),
        dict(op="decode", mode="tiled", seconds=tdec_s, peak_gib=tdec_gib, psnr_db=psnr(tdec, dec, 2.0)),
    ]
    title = (f"Wan VAE ({'weights ' + args.vae if args.vae else args.preset + ' config, random weights'}), {args.shape}, tile {args.tile} / "
             f"stride {args.stride}, {args.device}, fp32")
    print(f"\n### {title}\n")
    print(markdown_table(rows, [("op", "op"), ("mode", "mode"), ("seconds", "s"), ("peak_gib", "peak added GiB"),
                                ("psnr_db", "PSNR vs untiled dB")]))
    if args.json:
        write_json(args.json, dict(benchmark="vae_tiling", argv=sys.argv[1:] if argv is None else argv, title=title, machine=machine_info(), rows=rows))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
