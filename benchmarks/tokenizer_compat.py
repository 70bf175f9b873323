"""Tiny tokenizer folders read the same by another transformers (not a test: it needs a second interpreter).

    python -m benchmarks.tokenizer_compat --python /tmp/tf4/bin/python [--dir /tmp/tok-compat]

writes a tiny ContentV folder (`contentv_torch.tiny.make_tiny_contentv_folder`) with this environment, then loads
tokenizer/ and tokenizer_2/ with CLIPTokenizer and CLIPTokenizerFast and tokenizer_3/ with T5TokenizerFast and
T5Tokenizer, both here and in `--python` (e.g. a venv with `pip install "transformers<5" tokenizers
sentencepiece protobuf numpy`, no torch needed), and checks every load gives the same token ids. This file
imports only transformers at module level, so the other interpreter runs it by path (`--ids FOLDER`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

TEXTS = ["a red fox runs", "A cat, on the MAT!", "zebra"]
LOADS = [("tokenizer", "CLIPTokenizer"), ("tokenizer", "CLIPTokenizerFast"), ("tokenizer_2", "CLIPTokenizer"),
         ("tokenizer_2", "CLIPTokenizerFast"), ("tokenizer_3", "T5TokenizerFast"), ("tokenizer_3", "T5Tokenizer")]


def token_ids(folder: str) -> dict:
    """{"version", "loads": {"sub/Class": [class loaded, ids per text]}} with this interpreter's transformers."""
    import transformers

    out = {}
    for sub, name in LOADS:
        tok = getattr(transformers, name).from_pretrained(f"{folder}/{sub}")
        ids = [tok(t, padding="max_length", max_length=12, truncation=True)["input_ids"] for t in TEXTS]
        out[f"{sub}/{name}"] = [type(tok).__name__, ids]
    return {"version": transformers.__version__, "loads": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--python", help="the other interpreter (with its own transformers)")
    ap.add_argument("--dir", default="/tmp/tok-compat", help="where the tiny folder is written")
    ap.add_argument("--ids", metavar="FOLDER", help="print the token ids of FOLDER as JSON (what --python runs)")
    args = ap.parse_args()
    if args.ids:
        print(json.dumps(token_ids(args.ids)))
        return
    if not args.python:
        ap.error("--python is required")
    from contentv_torch.tiny import make_tiny_contentv_folder

    folder = str(make_tiny_contentv_folder(args.dir, words=["fox", "cat"]))
    here = token_ids(folder)
    run = subprocess.run([args.python, __file__, "--ids", folder], capture_output=True, text=True)
    if run.returncode:
        raise SystemExit(f"{args.python} could not read {folder}:\n{run.stderr[-3000:]}")
    there = json.loads(run.stdout.strip().splitlines()[-1])
    for key, (cls, ids) in here["loads"].items():
        other_cls, other_ids = there["loads"][key]
        same = "same ids" if ids == other_ids else "DIFFERENT ids"
        print(f"{key}: transformers {here['version']} -> {cls}, {there['version']} -> {other_cls}: {same}")
        if ids != other_ids:
            raise SystemExit(f"{key}: {ids} vs {other_ids}")


if __name__ == "__main__":
    sys.exit(main())
