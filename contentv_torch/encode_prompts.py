"""Prompts -> their DiT conditioning in one safetensors file, so a JAX host (RLHF `--prompts`) needs no torch.

    python -m contentv_torch.encode_prompts --model ContentV-8B --prompts prompts.txt --output prompts.safetensors

One prompt per non-empty line of --prompts, encoded once by the folder's CLIP-L / bigG / T5 (the pipeline's
`TextEncoders`), plus the empty prompt as the CFG negative; the file's layout is
`contentv_common.dataset.write_prompt_embeddings`'.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from contentv_common.cli import UserError, add_debug_flag, run_cli
from contentv_common.dataset import write_prompt_embeddings

PROG = "python -m contentv_torch.encode_prompts"


def read_prompt_lines(path: str | Path) -> list[str]:
    """The non-empty, stripped lines of a text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file")
    prompts = [p.strip() for p in path.read_text().splitlines() if p.strip()]
    if not prompts:
        raise UserError(f"--prompts {path}: no prompts")
    return prompts


@torch.no_grad()
def encode_prompts(model: str | Path, prompts: list[str], output: str | Path, device: str = "cpu",
                   max_sequence_length: int | None = None, chunk: int = 8) -> Path:
    """Encode `prompts` and the empty prompt with `model`'s text encoders; write `output` (see module doc)."""
    from contentv_torch.pipeline import read_model_info, resolve_device
    from contentv_torch.text import TextEncoders

    info = read_model_info(model)
    n_tokens = max_sequence_length or info.preset.text.t5_max_tokens
    enc = TextEncoders.from_pretrained(model, device=resolve_device(device))

    def embed(texts):  # -> context [B, L, J], pooled [B, P] float32
        e = enc.encode(texts, do_classifier_free_guidance=False, max_sequence_length=n_tokens)
        return e.prompt_embeds.float().cpu().numpy(), e.pooled.float().cpu().numpy()

    parts = [embed(prompts[i : i + chunk]) for i in tqdm(range(0, len(prompts), chunk), desc="encoding prompts")]
    neg_context, neg_pooled = embed([""])
    return write_prompt_embeddings(output, prompts, np.concatenate([c for c, _ in parts]),
                                   np.concatenate([p for _, p in parts]), neg_context[0], neg_pooled[0])


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local ContentV / SD3.5 folder with the text encoders and tokenizers")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line")
    ap.add_argument("--output", required=True, help="safetensors file to write")
    ap.add_argument("--device", default="cpu", help="auto | cuda[:i] | npu[:i] | cpu")
    ap.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default: the model preset's)")
    add_debug_flag(ap)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    path = encode_prompts(args.model, read_prompt_lines(args.prompts), args.output, args.device, args.max_sequence_length)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(PROG, main, user_errors=(ValueError,)))
