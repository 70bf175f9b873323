"""`--compile` and the step caches, measured: the first call's cost and the steady-state time of the denoising loop.

    python -m benchmarks.compile_speed                                    # CPU: tiny preset, 9x32x48, 50 steps
    python -m benchmarks.compile_speed --preset small --device cuda --frames 33 --height 256 --width 448

A DiT of --preset with random weights (speed does not depend on them) runs `contentv_torch.pipeline.denoise`
(CFG, batch --batch) eager and under `torch.compile`, with and without a step cache: the first call (for compile:
compilation included) and the median of --repeats further calls. Writes --out (JSON) and prints a table.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from benchmarks.common import machine_info, time_fn, write_json
from contentv_common.cli import UsageError, run_cli
from contentv_common.config import get_preset
from contentv_common.schedule import flow_match_sigmas
from contentv_common.step_cache import make_policy


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compile_speed", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=48)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--caches", nargs="*", default=["none", "teacache:0.1", "fbcache:0.08"],
                    help="none | POLICY:THRESHOLD (magcache needs a calibration: not here)")
    ap.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=("eager", "compile"))
    ap.add_argument("--out", default="compile_speed.json")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        raise UsageError("--repeats and --steps must be >= 1")
    from contentv_torch.pipeline import denoise, resolve_device
    from contentv_torch.step_cache import StepCache
    from contentv_torch.transformer import ContentVTransformer3DModel

    preset = get_preset(args.preset)
    dev = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype, torch.float32 if dev.type == "cpu"
                                                                else torch.bfloat16)
    torch.manual_seed(0)
    dit = ContentVTransformer3DModel(preset.transformer).eval().to(dev, dtype)
    shape = (args.batch, preset.vae.z_dim, preset.vae.latent_frames(args.frames), args.height // 8, args.width // 8)
    tc = preset.text
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g).to(dev)
    ctx, neg = (torch.randn(args.batch, tc.context_tokens, tc.t5_hidden, generator=g).to(dev) for _ in range(2))
    pool, npool = (torch.randn(args.batch, tc.pooled_dim, generator=g).to(dev) for _ in range(2))
    sigmas = flow_match_sigmas(args.steps, 3.0)
    sync = (lambda r: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda r: r)
    rows = []
    for mode in args.modes:
        torch._dynamo.reset()
        fn = torch.compile(dit) if mode == "compile" else dit
        for spec in args.caches:
            name, _, th = spec.partition(":")
            policy = make_policy(name, float(th) if th else None)
            caches = []

            def run():
                cache = StepCache(policy, args.steps) if policy.active else None
                caches.append(cache)
                dit.step_cache = cache
                try:
                    return denoise(fn, x0, ctx, pool, neg, npool, sigmas, 6.0, progress=False, cache=cache)
                finally:
                    dit.step_cache = None

            t0 = time.perf_counter()
            sync(run())
            first = time.perf_counter() - t0
            steady = time_fn(run, sync, warmup=0, repeats=args.repeats)["median_s"]
            evals = caches[-1].evaluations if caches[-1] else 2 * args.steps
            rows.append({"mode": mode, "cache": spec, "first_call_s": first, "steady_s": steady, "dit_evaluations": evals})
            print(f"| {mode} | {spec} | {first:.2f} | {steady:.3f} | {evals} |", flush=True)
    base = next(r for r in rows if r["mode"] == "eager" and r["cache"] == "none") if "eager" in args.modes else rows[0]
    for r in rows:
        r["speedup_vs_eager_none"] = base["steady_s"] / r["steady_s"]
    result = {"machine": machine_info(), "command": "python -m benchmarks.compile_speed " + " ".join(
        sys.argv[1:] if argv is None else argv), "preset": args.preset, "device": str(dev), "dtype": str(dtype),
        "latent_shape": list(shape), "steps": args.steps, "rows": rows}
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    sys.exit(run_cli("python -m benchmarks.compile_speed", main, user_errors=(ValueError,)))
