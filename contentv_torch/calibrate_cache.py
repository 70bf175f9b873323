"""Fit the step-cache calibration on your own model and prompts: `python -m contentv_torch.calibrate_cache --model DIR
--prompt "..." [--prompt ...]`. Samples each prompt without caching, records per step and branch block 0's
modulated-input change, the blocks' output change and the residual magnitude ratio, and writes
DIR/step_cache.json: TeaCache's rescale polynomial (input change -> output change) and MagCache's mean ratios
per branch and step (resampled to any step count when sampling). `--cache teacache|magcache` then reads it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contentv_common.cli import UsageError
from contentv_common.step_cache import CALIBRATION_FILE, CachePolicy, fit_calibration
from contentv_common.weights import atomic_file


def calibrate(pipe, prompts: list[str], steps: int, guidance: float, seeds: list[int], **sizes) -> tuple[dict, int]:
    """Uncached runs of `pipe` recording the signals -> (calibration dict, number of records)."""
    from contentv_torch.step_cache import StepCache

    records = []
    for prompt in prompts:
        for seed in seeds:
            cache = StepCache(CachePolicy("none"), steps, record=True)
            pipe(prompt, steps=steps, guidance=guidance, seed=seed, output_type="latent", progress=False, cache=cache,
                 **sizes)
            records += cache.records
    return fit_calibration(records), len(records)


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m contentv_torch.calibrate_cache", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="local ContentV folder; step_cache.json is written into it")
    ap.add_argument("--prompt", action="append", required=True, help="a calibration prompt (repeat the flag)")
    ap.add_argument("--seeds", type=int, default=1, help="noise seeds per prompt (default 1)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    ap.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    ap.add_argument("--frames", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--width", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--output", help=f"where to write (default MODEL/{CALIBRATION_FILE})")
    args = ap.parse_args(argv)
    if args.seeds < 1:
        raise UsageError(f"--seeds {args.seeds}: needs at least 1")
    if args.steps is not None and args.steps < 2:
        raise UsageError(f"--steps {args.steps}: calibration needs at least 2 steps")
    from contentv_torch.pipeline import ContentVPipeline

    pipe = ContentVPipeline.from_pretrained(args.model, device=args.device)
    p = pipe.info.preset
    steps = args.steps or p.num_steps
    guidance = p.guidance_scale if args.guidance is None else args.guidance
    cal, n = calibrate(pipe, args.prompt, steps, guidance, list(range(args.seeds)),
                       frames=args.frames, height=args.height, width=args.width)
    cal["source"] = {"prompts": args.prompt, "seeds": args.seeds, "steps": steps, "guidance": guidance, "records": n}
    out = Path(args.output) if args.output else Path(args.model) / CALIBRATION_FILE
    with atomic_file(out) as tmp:
        tmp.write_text(json.dumps(cal, indent=1))
    print(f"wrote {out} ({n} records; teacache polynomial {[round(c, 4) for c in cal['teacache']['coefficients']]})")
    return out


if __name__ == "__main__":
    from contentv_common.cli import run_cli

    sys.exit(run_cli("python -m contentv_torch.calibrate_cache", main, user_errors=(ValueError,)))
