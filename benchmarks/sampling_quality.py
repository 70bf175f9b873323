"""What a faster sampler costs: step-cache policies and guidance schedules, speed vs quality, on one model.

    python -m benchmarks.sampling_quality --model e2e_out/ContentV-shapes-trained --steps 50 --guidance 4.0
        [--configs none teacache:0.05 teacache:0.1 magcache:0.12 fbcache:0.08 truncation:0.5]
        [--captions heldout] [--videos 8] [--out benchmarks/sampling_quality]

For every configuration and every caption of the end-to-end demo (examples.shapes; 9 x 32 x 48 videos, one
pipeline call of --videos seeds per caption), against `none` (uncached, every step guided) of the same seeds in
the same run: DiT evaluations (branch passes through the blocks), denoising wall time and its speed-up, the
final latents' relative error, the decoded frames' PSNR, and the pixel checker's colour / direction / both
accuracy (plus the last frame's colour). Writes OUT.json, OUT.md (the table) and OUT.png (speed-up vs quality).
MagCache needs MODEL/step_cache.json (`python -m contentv_torch.calibrate_cache`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import machine_info, rel_err, write_json, write_text
from benchmarks.vae_tiling import psnr
from contentv_common.cli import UsageError, run_cli
from contentv_common.step_cache import POLICIES, CachePolicy, check_truncation
from examples import shapes

FRAMES, HEIGHT, WIDTH = 9, 32, 48  # the demo's clip size
DEFAULT_CONFIGS = ["none", "teacache:0.05", "teacache:0.1", "teacache:0.2", "magcache:0.06", "magcache:0.12",
                   "magcache:0.24", "fbcache:0.05", "fbcache:0.08", "fbcache:0.15", "truncation:0.5"]


def parse_config(text: str) -> dict:
    """"none" | "POLICY:THRESHOLD" | "truncation:F" -> pipeline keyword arguments."""
    name, _, value = text.partition(":")
    try:
        if name == "truncation":
            check_truncation(float(value))
            return {"cfg_truncation": float(value)}
        if name in POLICIES and (name == "none") == (value == ""):
            if name != "none":
                CachePolicy("teacache", float(value))  # checks the threshold (magcache's ratios come later)
            return {} if name == "none" else {"cache": name, "cache_threshold": float(value)}
    except ValueError as e:
        raise UsageError(f"--configs {text!r}: {e}") from None
    raise UsageError(f"--configs {text!r}: expected none, POLICY:THRESHOLD ({'/'.join(POLICIES[1:])}) or "
                     "truncation:F")


def run(pipe, captions, kwargs: dict, steps: int, guidance: float, videos: int, seed: int, repeats: int = 1) -> dict:
    """Every caption with `kwargs` -> latents, decoded frames, evaluations, seconds (sampling to latents, the
    fastest of `repeats` passes over the captions: the least disturbed by other work on a shared CPU)."""
    times = []
    for _ in range(repeats):
        lat, evals, t0 = [], 0, time.perf_counter()
        for i, cap in enumerate(captions):
            out = pipe(cap.text, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=steps, guidance=guidance,
                       seed=seed + i, num_videos_per_prompt=videos, output_type="latent", progress=False, **kwargs)
            evals += out.dit_evaluations
            lat.append(out.latents)
        times.append(time.perf_counter() - t0)
    return {"latents": lat, "frames": [pipe.decode(x) for x in lat], "evals": evals, "seconds": min(times)}


def checker(captions, frames) -> dict:
    """The demo's pixel checker over every video: colour / direction / both accuracy and the last frame's colour."""
    rows = []
    for cap, vids in zip(captions, frames):
        for v in vids:
            s = shapes.score(cap, shapes.analyse(v))
            rows.append({**s, "last_frame_colour": shapes.analyse(v[-1:]).colour == cap.colour})
    return {k: float(np.mean([r[k] for r in rows])) for k in ("colour", "direction", "both", "last_frame_colour")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.sampling_quality", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a ContentV folder trained on the demo's shapes (examples.e2e)")
    ap.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="none | POLICY:THRESHOLD | truncation:F")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--captions", default="heldout", choices=("heldout", "train", "all"))
    ap.add_argument("--videos", type=int, default=8, help="seeds per caption (one batch)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per config (the fastest counts)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared CPU)")
    ap.add_argument("--out", default="benchmarks/sampling_quality", help="OUT.json / OUT.md / OUT.png")
    args = ap.parse_args(argv)
    configs = {c: parse_config(c) for c in args.configs}
    if args.steps < 2 or args.videos < 1 or args.repeats < 1:
        raise UsageError(f"--steps {args.steps} / --videos {args.videos} / --repeats {args.repeats}: need >= 2 "
                         "steps, >= 1 video and >= 1 repeat")
    from contentv_torch.pipeline import ContentVPipeline

    torch.set_num_threads(args.threads)
    pipe = ContentVPipeline.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    caps = shapes.captions(args.captions)
    run(pipe, caps[:1], {}, 2, args.guidance, 1, args.seed)  # warm-up (first-call allocations)
    base = run(pipe, caps, {}, args.steps, args.guidance, args.videos, args.seed, args.repeats)
    rows = []
    for name, kw in configs.items():
        r = base if name == "none" else run(pipe, caps, kw, args.steps, args.guidance, args.videos, args.seed,
                                            args.repeats)
        f = [torch.from_numpy(np.asarray(x, np.float32)) for x in (np.concatenate(r["frames"]),
                                                                   np.concatenate(base["frames"]))]
        rows.append({"config": name, "dit_evaluations": r["evals"], "eval_ratio": base["evals"] / r["evals"],
                     "seconds": r["seconds"], "speedup": base["seconds"] / r["seconds"],
                     "latent_rel_err": rel_err(torch.cat(r["latents"]), torch.cat(base["latents"])),
                     "psnr_db": psnr(f[0], f[1], 255.0), **checker(caps, r["frames"])})
        print(_row(rows[-1]), flush=True)
    result = {"machine": machine_info(), "command": "python -m benchmarks.sampling_quality " + " ".join(
        sys.argv[1:] if argv is None else argv), "model": str(args.model), "steps": args.steps,
        "guidance": args.guidance, "captions": args.captions, "videos": args.videos * len(caps), "rows": rows}
    out = Path(args.out)
    write_json(out.with_suffix(".json"), result)
    write_text(out.with_suffix(".md"), table(rows))
    plot(rows, out.with_suffix(".png"), f"{args.steps} steps, CFG {args.guidance}, {args.videos * len(caps)} videos")
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.json')}, {out.with_suffix('.png')}")
    return result


COLOURS = {"none": "k", "teacache": "C0", "magcache": "C1", "fbcache": "C2", "truncation": "C3"}
HEAD = ("| config | DiT evals | evals ratio | wall s | speed-up | latent rel err | PSNR dB | colour | direction | both "
        "| last-frame colour |\n|---|---|---|---|---|---|---|---|---|---|---|\n")


def _row(r: dict) -> str:
    return (f"| {r['config']} | {r['dit_evaluations']} | {r['eval_ratio']:.2f}x | {r['seconds']:.1f} | "
            f"{r['speedup']:.2f}x | {r['latent_rel_err']:.3g} | {r['psnr_db']:.1f} | {r['colour']:.0%} | "
            f"{r['direction']:.0%} | {r['both']:.0%} | {r['last_frame_colour']:.0%} |")


def table(rows: list[dict]) -> str:
    return HEAD + "\n".join(_row(r) for r in rows) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Speed-up (wall) against the checker's both-right accuracy and the latent rel err, one point per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "both", "checker both-right accuracy"), (axes[1], "latent_rel_err",
                                                                               "latent rel err vs uncached")):
        for r in rows:
            ax.scatter(r["speedup"], r[key], color=COLOURS[r["config"].split(":")[0]])
            ax.annotate(r["config"], (r["speedup"], r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if key == "both":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("wall-time speed-up vs --cache none")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sampling speed vs quality ({title})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(run_cli("python -m benchmarks.sampling_quality", main, user_errors=(ValueError,)))
