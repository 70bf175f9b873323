"""`python -m convert --to {jax,torch} SRC DST`: every supported format in, JAX or PyTorch out."""
from __future__ import annotations

import argparse
import logging

from contentv_common.cli import UsageError, add_debug_flag, nonneg_int, positive_float, run_cli
from contentv_common.formats.sources import FORMATS
from contentv_common.weights import DTYPES

PROG = "python -m convert"

EPILOG = "source formats (detected automatically; --from forces one):\n" + "\n".join(
    f"  {k:22s} {v}" for k, v in FORMATS.items()
) + """

outputs:
  --to torch   diffusers layout: config.json + diffusion_pytorch_model*.safetensors [+ index]
               (loads in contentv_torch and in the released ContentV SD3Transformer3DModel.from_pretrained)
  --to jax     our Flax format: config.json + flax_params*.safetensors (the '/'-flattened Flax params tree,
               scanned layers stacked; read with contentv_common.formats.sources.iter_params / load_params)
  --to peft    a LoRA run's checkpoint dir -> one diffusers / PEFT LoRA .safetensors file (transformer.<module>
               .lora_A/.lora_B.weight + LoraConfig metadata): StableDiffusion3Pipeline.load_lora_weights,
               SD3Transformer2DModel.load_lora_adapter, contentv_torch.generate --lora, train --lora-init
  --to torch --merge   a LoRA run's checkpoint dir -> its base (lora.json's, or --base) with the adapter merged
  (the trainer's --init-from reads a --to torch folder or a training checkpoint dir)
  A whole ContentV folder in gives a whole folder out; --components DIR adds the other parts of a model
  folder (vae/, text encoders, tokenizers, scheduler/, model_index.json) to a converted transformer.

examples:
  python -m convert --to jax   sd3.5_large.safetensors      sd35-jax/
  python -m convert --to jax   ContentV-8B/                  contentv-jax/
  python -m convert --to torch Wan2.1_VAE.pth                vae/
  python -m convert --to torch ckpt/ out/ --ema --dtype bfloat16 --components ContentV-8B/
  python -m convert --to peft  lora-ckpt/                    lora.safetensors
  python -m convert --to torch lora-ckpt/ merged/ --merge --components ContentV-8B/
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=["jax", "torch", "peft"], help="output framework "
                   "(peft: a LoRA checkpoint's adapter as a diffusers / PEFT LoRA file)")
    p.add_argument("src", help="source file or folder")
    p.add_argument("dst", help="destination folder (written atomically; must not exist unless --overwrite)")
    p.add_argument("--from", dest="fmt", choices=sorted(FORMATS), default=None, help="force the source format")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast floating tensors (default: keep)")
    p.add_argument("--ema", action="store_true", help="training checkpoint: take the EMA params (default: raw params)")
    p.add_argument("--step", type=nonneg_int, default=None, help="training checkpoint: step to read (default: latest)")
    p.add_argument("--components", default=None, metavar="DIR",
                   help="ContentV-format folder whose other parts complete a whole model folder at DST")
    p.add_argument("--link", action="store_true", help="with --components / a model folder: symlink the copied parts")
    p.add_argument("--merge", action="store_true", help="with --to torch: a LoRA run's checkpoint merged into its base")
    p.add_argument("--base", default=None, help="with --merge: the base model (default: the one in the checkpoint's "
                   "lora.json)")
    p.add_argument("--fold-alpha", action="store_true", help="with --to peft: scale lora_B by alpha / r and write "
                   "alpha = r (for loaders that ignore the file's LoraConfig metadata)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DST (atomically)")
    p.add_argument("--max-shard-gb", type=positive_float, default=5.0, help="shard size of written safetensors (default 5)")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors")
    add_debug_flag(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from convert.export import convert
    from convert.lora import export_merged, export_peft

    if (args.merge or args.base) and args.to != "torch" or args.base and not args.merge:
        raise UsageError("--merge needs --to torch; --base needs --merge")
    if args.fold_alpha and args.to != "peft":
        raise UsageError("--fold-alpha applies to --to peft")
    if args.to == "peft":
        if args.components or args.fmt:
            raise UsageError("--to peft writes one adapter file: --components / --from do not apply")
        export_peft(args.src, args.dst, ema=args.ema, step=args.step, dtype=args.dtype, overwrite=args.overwrite,
                    fold_alpha=args.fold_alpha)
        return 0
    if args.merge:
        export_merged(args.src, args.dst, base=args.base, ema=args.ema, step=args.step, dtype=args.dtype,
                      components=args.components, link=args.link, overwrite=args.overwrite,
                      max_shard_bytes=int(args.max_shard_gb * 2**30))
        return 0
    convert(args.src, args.dst, args.to, fmt=args.fmt, dtype=args.dtype, ema=args.ema, step=args.step,
            components=args.components, link=args.link, overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_gb * 2**30))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The command line: `main` behind the shared error boundary. Bad sources, keys, shapes and formats raise
    ValueError subclasses (KeyMismatchError, FormatError, UnsafeCheckpointError) naming the culprit."""
    return run_cli(PROG, main, argv, user_errors=(ValueError, KeyError))
