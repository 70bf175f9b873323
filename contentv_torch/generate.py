"""Text-to-video from a ContentV folder: `python -m contentv_torch.generate --model DIR --prompt "..."`.

One device:      python -m contentv_torch.generate --model ContentV-8B --prompt "a fox in snow" --seed 0
24 GB GPU:       ... --offload --tiled-vae
Several devices: torchrun --nproc-per-node 4 -m contentv_torch.generate ... --sp 2 --cfg-parallel
Ascend NPU:      ... --device npu   (imports torch_npu; attention through npu_fusion_attention)

Every input is checked (model folder and configs, frame count 4k+1, sizes multiple of 16, latents file and
shape, output path writable) before any weight is loaded. --latents-in / --latents-out are safetensors
files with one tensor `latents` [B, 16, T, H/8, W/8]: the initial noise in, the final latents (the DiT's
normalised space, before the VAE) out. With B > 1, videos go to OUT-0.mp4, OUT-1.mp4, ...
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from contentv_common.schedule import SIGMA_GRIDS
from contentv_torch.pipeline import ContentVPipeline, read_model_info
from contentv_common.video_io import check_writable, write_mp4

DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
log = logging.getLogger("contentv_torch.generate")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m contentv_torch.generate", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local ContentV folder (model_index.json, transformer/, vae/, ...)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--negative-prompt", default="")
    ap.add_argument("--frames", type=int, help="4k+1 frames (default: the model's, 125)")
    ap.add_argument("--height", type=int, help="multiple of 16 (default: the model's, 432)")
    ap.add_argument("--width", type=int, help="multiple of 16 (default: the model's, 768)")
    ap.add_argument("--steps", type=int, help="sampling steps (default: the model's, 50)")
    ap.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's, 6.0)")
    ap.add_argument("--sigma-grid", default="contentv", choices=SIGMA_GRIDS,
                    help="contentv: the released pipeline's linspace(1, 0, N+1)[:-1]; sd3: set_timesteps(N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-videos", type=int, default=1, help="videos for the prompt (or the batch of --latents-in)")
    ap.add_argument("--output", default="output.mp4", help="mp4 path (written atomically)")
    ap.add_argument("--fps", type=float, default=24)
    ap.add_argument("--device", default="auto", help="auto | cuda[:i] | npu[:i] | cpu")
    ap.add_argument("--dtype", default="auto", choices=sorted(DTYPES),
                    help="DiT + text encoders (auto: bf16 on GPU/NPU, fp32 on CPU)")
    ap.add_argument("--latents-in", help="safetensors with `latents` [B, 16, T, h, w]: the initial noise")
    ap.add_argument("--latents-out", help="write the final latents (before the VAE) here, key `latents`")
    ap.add_argument("--offload", action="store_true",
                    help="model CPU offload: each model on the device only while used")
    ap.add_argument("--tiled-vae", action="store_true", help="decode in overlapping spatial tiles (less memory)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the DiT")
    ap.add_argument("--sp", type=int, default=None, help="Ulysses sequence-parallel degree (under torchrun; default: "
                                                         "world size / cfg degree)")
    ap.add_argument("--cfg-parallel", action="store_true", help="cond and uncond on two rank groups (under torchrun)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def load_latents(path: str | Path) -> torch.Tensor:
    """The `latents` tensor of a safetensors file, as fp32."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--latents-in {path}: no such file")
    with safe_open(str(path), framework="pt") as f:
        if "latents" not in f.keys():
            raise KeyError(f"--latents-in {path}: no tensor named 'latents' (found {sorted(f.keys())})")
        return f.get_tensor("latents").float()


def save_latents(path: str | Path, latents: torch.Tensor) -> None:
    from safetensors.torch import save_file

    from contentv_common.weights import atomic_file

    with atomic_file(path) as tmp:
        save_file({"latents": latents.detach().float().cpu().contiguous()}, str(tmp))


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
    frames, height, width = args.frames or p.frames, args.height or p.height, args.width or p.width
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
    # 3. Sample (every rank), decode and write (rank 0).
    out = pipe(args.prompt, args.negative_prompt, frames=frames, height=height, width=width, steps=args.steps,
               guidance=args.guidance, seed=args.seed, latents=latents, num_videos_per_prompt=n,
               output_type="np" if rank0 else "latent", progress=not args.quiet, sigma_grid=args.sigma_grid)
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


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
