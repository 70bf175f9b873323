"""Text-to-video from a ContentV folder: `python -m contentv_torch.generate --model DIR --prompt "..."`.

One device:      python -m contentv_torch.generate --model ContentV-8B --prompt "a fox in snow" --seed 0
24 GB GPU:       ... --offload --tiled-vae
Several devices: torchrun --nproc-per-node 4 -m contentv_torch.generate ... --sp 2 --cfg-parallel
Ascend NPU:      ... --device npu   (imports torch_npu; attention through npu_fusion_attention)
LoRA adapters:   ... --lora style.safetensors --lora-scale 0.8 --lora motion.safetensors   (each its own scale)

Every input is checked (model folder and configs, frame count 4k+1, sizes multiple of 16, latents file and
shape, LoRA files against the model's layers, output path writable) before any weight is loaded. --latents-in / --latents-out are safetensors
files with one tensor `latents` [B, 16, T, H/8, W/8]: the initial noise in, the final latents (the DiT's
normalised space, before the VAE) out. With B > 1, videos go to OUT-0.mp4, OUT-1.mp4, ...
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from contentv_common import preflight
from contentv_common.cli import (UsageError, add_debug_flag, finite_float, guidance_scale, nonneg_int,
                                  positive_float, positive_int, run_cli)
from contentv_common.schedule import SIGMA_GRIDS
from contentv_common.step_cache import POLICIES, check_truncation, make_policy, parse_interval, read_calibration
from contentv_common.video_io import check_writable, write_mp4
from contentv_common.weights import DTYPES as WEIGHT_DTYPES
from contentv_torch.pipeline import ContentVPipeline, free_memory, read_model_info

# --dtype: the dtype names of contentv_common.weights, their short forms, and auto
DTYPES = {"auto": None, **{name: getattr(torch, name) for name in WEIGHT_DTYPES},
          "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
log = logging.getLogger("contentv_torch.generate")
PROG = "python -m contentv_torch.generate"


class _AddLora(argparse.Action):
    """--lora FILE: one more adapter, scale 1.0 until a --lora-scale after it says otherwise."""

    def __call__(self, parser, namespace, value, option_string=None):
        namespace.lora = [*(namespace.lora or []), [value, 1.0, False]]


class _SetLoraScale(argparse.Action):
    """--lora-scale S: the scale of the --lora just before it (one per file)."""

    def __call__(self, parser, namespace, value, option_string=None):
        if not namespace.lora:
            parser.error(f"argument --lora-scale: {value:g} must follow the --lora FILE it scales")
        if namespace.lora[-1][2]:
            parser.error(f"argument --lora-scale: {namespace.lora[-1][0]} has a scale already (one --lora-scale "
                         "per --lora)")
        namespace.lora[-1][1:] = [value, True]


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local ContentV folder (model_index.json, transformer/, vae/, ...)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--frames", type=positive_int, help="4k+1 frames (default: the model's, 125)")
    ap.add_argument("--height", type=positive_int, help="multiple of 16 (default: the model's, 432)")
    ap.add_argument("--width", type=positive_int, help="multiple of 16 (default: the model's, 768)")
    ap.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's, 50)")
    ap.add_argument("--guidance", type=guidance_scale,
                    help="classifier-free guidance scale >= 1, 0 or 1 = off (default: the model's, 6.0)")
    ap.add_argument("--sigma-grid", default="contentv", choices=SIGMA_GRIDS,
                    help="contentv: the released pipeline's linspace(1, 0, N+1)[:-1]; sd3: set_timesteps(N)")
    ap.add_argument("--seed", type=nonneg_int, default=0)
    ap.add_argument("--num-videos", type=positive_int, default=1, help="videos for the prompt (or the batch of --latents-in)")
    ap.add_argument("--output", default="output.mp4", help="mp4 path (written atomically)")
    ap.add_argument("--fps", type=positive_float, default=24)
    ap.add_argument("--device", default="auto", help="auto | cuda[:i] | npu[:i] | cpu")
    ap.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                    help="DiT + text encoders (auto: bf16 on GPU/NPU, fp32 on CPU)")
    ap.add_argument("--latents-in", help="safetensors with `latents` [B, 16, T, h, w]: the initial noise")
    ap.add_argument("--latents-out", help="write the final latents (before the VAE) here, key `latents`")
    ap.add_argument("--offload", action="store_true",
                    help="model CPU offload: each model on the device only while used")
    ap.add_argument("--tiled-vae", action="store_true", help="decode in overlapping spatial tiles (less memory)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    ap.add_argument("--sp", type=positive_int, default=None, help="Ulysses sequence-parallel degree (under torchrun; default: "
                                                         "world size / cfg degree)")
    ap.add_argument("--cfg-parallel", action="store_true", help="cond and uncond on two rank groups (under torchrun)")
    ap.add_argument("--cache", default="none", choices=POLICIES,
                    help="step cache: skip the DiT's blocks where they would change little (none: exact)")
    ap.add_argument("--cache-threshold", type=float,
                    help="the policy's skip threshold (>= 0; default: teacache 0.1, magcache 0.12, fbcache 0.08)")
    ap.add_argument("--guidance-interval", metavar="START,END",
                    help="apply CFG only for sigmas in [START, END] (0 <= START <= END <= 1)")
    ap.add_argument("--cfg-truncation", type=float, metavar="F",
                    help="drop the uncond pass after the first fraction F of the steps (0..1)")
    ap.add_argument("--lora", action=_AddLora, metavar="FILE", default=[],
                    help="a diffusers / PEFT LoRA safetensors file for the DiT (repeatable)")
    ap.add_argument("--lora-scale", action=_SetLoraScale, type=finite_float, metavar="S",
                    help="the scale of the --lora before it (default 1.0; 0 = off)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    args.lora = [(path, scale) for path, scale, _ in args.lora]
    try:  # our own flags' values, each error naming its flag
        args.guidance_interval = parse_interval(args.guidance_interval) if args.guidance_interval else None
        if args.cfg_truncation is not None:
            check_truncation(args.cfg_truncation)
        if args.cache != "none":
            make_policy(args.cache, args.cache_threshold, read_calibration(args.model) if args.cache == "magcache"
                        and Path(args.model).is_dir() else None)
        elif args.cache_threshold is not None:
            raise ValueError("--cache-threshold needs a --cache policy other than none")
    except ValueError as e:
        raise UsageError(str(e)) from None
    return args


def load_latents(path: str | Path) -> torch.Tensor:
    """The `latents` tensor of a safetensors file, as fp32."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--latents-in {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = sorted(f.keys())
            if "latents" in keys:
                return f.get_tensor("latents").float()
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise ValueError(f"--latents-in {path}: not a readable safetensors file ({e})") from None
    raise ValueError(f"--latents-in {path}: no tensor named 'latents' (found {keys})")


def save_latents(path: str | Path, latents: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from contentv_common.weights import atomic_file

    with atomic_file(path) as tmp:
        save_file({"latents": latents.detach().float().cpu().contiguous()}, str(tmp))


def check_loras(loras: list[tuple[str, float]], info) -> list:
    """[(file, scale)] -> [(LoraAdapter, scale)], each read and checked against the folder's DiT built on the
    meta device (layer names and shapes, no weights)."""
    from contentv_torch.lora import check_lora, read_lora
    from contentv_torch.transformer import ContentVTransformer3DModel

    if not loras:
        return []
    with torch.device("meta"):
        dit = ContentVTransformer3DModel(info.transformer)
    adapters = [(read_lora(path), scale) for path, scale in loras]
    for adapter, _ in adapters:
        check_lora(adapter, dit)
    return adapters


def video_paths(output: str | Path, n: int) -> list[Path]:
    output = Path(output)
    return [output] if n == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(n)]


def main(argv=None) -> list[Path]:
    """Run the CLI; returns the written video paths (empty on ranks other than 0)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    # 1. Everything that can be wrong is checked before any weight is read.
    info = read_model_info(args.model)
    p = info.preset
    frames = p.frames if args.frames is None else args.frames
    height = p.height if args.height is None else args.height
    width = p.width if args.width is None else args.width
    latents = None
    n = args.num_videos
    if args.latents_in:
        latents = load_latents(args.latents_in)
        if latents.ndim != 5:
            raise ValueError(f"--latents-in {args.latents_in}: latents must be [B, z, T, h, w], "
                             f"got {tuple(latents.shape)}")
        if args.num_videos not in (1, latents.shape[0]):
            raise ValueError(f"--num-videos {args.num_videos} != the batch {latents.shape[0]} "
                             f"of --latents-in {args.latents_in}")
        n = latents.shape[0]
    shape = info.latent_shape(n, frames, height, width)  # raises for bad frames / sizes
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"--latents-in {args.latents_in}: shape {tuple(latents.shape)} does not match {shape} "
                         f"= [B, z, (frames-1)/4+1, height/8, width/8] for --frames {frames} --height {height} "
                         f"--width {width}")
    guidance = p.guidance_scale if args.guidance is None else args.guidance
    act_bytes = 4 if DTYPES[args.dtype] == torch.float32 else 2  # auto: bf16 on accelerators (the lower bound)
    needed = preflight.generate_bytes(info.transformer, info.vae, shape, frames, height, width,
                                      p.text.context_tokens, guidance > 1, act_bytes)
    preflight.check_fits(f"--frames {frames} --height {height} --width {width} x {n} video(s)", needed,
                         *free_memory(args.device))
    loras = check_loras(args.lora, info)
    outputs = video_paths(args.output, n)
    for path in outputs + ([Path(args.latents_out)] if args.latents_out else []):
        check_writable(path)

    # 2. Devices (torch_npu only when asked for), the process group under torchrun, the models.
    parallel = None
    from contentv_torch import parallel as par

    if par.world_size() > 1 or args.sp or args.cfg_parallel:
        parallel = par.init_parallel(args.device, sp=args.sp, cfg_parallel=args.cfg_parallel)
        device = parallel.device
    else:
        from contentv_torch.pipeline import resolve_device

        device = resolve_device(args.device)
    rank0 = parallel is None or parallel.rank == 0
    pipe = ContentVPipeline.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=device, offload=args.offload,
                                            tiled_vae=args.tiled_vae, compile=args.compile, parallel=parallel)
    for adapter, scale in loras:
        pipe.load_lora(adapter, scale)
    # 3. Sample (every rank), decode and write (rank 0).
    out = pipe(args.prompt, args.negative_prompt, frames=frames, height=height, width=width, steps=args.steps,
               guidance=args.guidance, seed=args.seed, latents=latents, num_videos_per_prompt=n,
               output_type="np" if rank0 else "latent", progress=not args.quiet, sigma_grid=args.sigma_grid,
               cache=args.cache, cache_threshold=args.cache_threshold, guidance_interval=args.guidance_interval,
               cfg_truncation=args.cfg_truncation)
    written: list[Path] = []
    if rank0:
        if args.latents_out:
            save_latents(args.latents_out, out.latents)
        for path, video in zip(outputs, out.frames, strict=True):
            written.append(write_mp4(path, video, fps=args.fps))
            f, h, w = video.shape[:3]
            log.info("wrote %s (%d frames, %dx%d, %g fps)", path, f, w, h, args.fps)
    if parallel is not None:
        parallel.close()
    return written


def cli(argv=None) -> int:
    """The command line: `main` behind the shared error boundary (bad model folders, latents files and sizes
    raise ValueError naming them; a missing torch_npu is an ImportError that says what to install)."""
    return run_cli(PROG, main, argv, user_errors=(ValueError, ImportError))


if __name__ == "__main__":
    sys.exit(cli())
