"""LoRA adapters between our JAX training checkpoints and the diffusers / PEFT LoRA safetensors layout.

    python -m convert --to peft  CKPT_DIR lora.safetensors [--step N] [--ema]     # adapter -> diffusers / PEFT
    python -m convert --to torch CKPT_DIR merged/ --merge [--base BASE] [--components ContentV-8B/]

The file layout (and why `--fold-alpha` exists: loaders that ignore the LoraConfig metadata assume alpha = r) is
documented in contentv_common.formats.peft_lora, which owns it; this module reads our checkpoints and merges.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from contentv_common.formats.keymap import flatten, flax_to_torch, unflatten
from contentv_common.formats.peft_lora import lora_rules, merged_weight, write_peft
from contentv_common.weights import KeyMismatchError, atomic_dir

log = logging.getLogger("convert")


def read_checkpoint_adapter(ckpt: str | Path, ema: bool = False, step: int | None = None) -> tuple[dict, dict]:
    """(adapter tree of numpy arrays, lora.json record) of a LoRA run's checkpoint dir."""
    from contentv_jax.checkpoint import open_params
    from contentv_jax.lora import read_record

    ckpt = Path(ckpt)
    record = read_record(ckpt)
    shapes, _, read_leaf_row = open_params(ckpt, ema=ema, step=step)
    bad = sorted(k for k in shapes if not k.endswith(("/lora_A", "/lora_B")))
    if bad:
        raise KeyMismatchError(f"{ckpt}: the checkpoint holds non-adapter params {bad[:5]}: not a LoRA run's")
    return unflatten({k: read_leaf_row(k, None) for k in shapes}), record


def _num_layers(record: dict, adapter) -> int:
    if "num_layers" in record:
        return int(record["num_layers"])
    flat = flatten(adapter)
    stacked = [v.shape[0] for k, v in flat.items() if k.startswith("transformer_blocks/")]
    if not stacked:
        raise ValueError("lora.json has no num_layers and the adapter has no scanned blocks to read it from")
    return stacked[0] + 1


def export_peft(ckpt: str | Path, dst: str | Path, ema: bool = False, step: int | None = None,
                dtype: str | None = None, overwrite: bool = False, fold_alpha: bool = False) -> Path:
    """`python -m convert --to peft CKPT_DIR out.safetensors`: a LoRA run's adapter as a diffusers / PEFT file."""
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    if dst.suffix != ".safetensors":
        raise ValueError(f"--to peft writes one .safetensors file; {dst} has suffix {dst.suffix!r}")
    adapter, record = read_checkpoint_adapter(ckpt, ema, step)
    write_peft(adapter, record["rank"], record["alpha"], _num_layers(record, adapter), dst, dtype, fold_alpha)
    log.info("wrote %s (rank %d, alpha %g, %d modules)", dst, record["rank"], record["alpha"],
             len({k.rsplit('/', 1)[0] for k in flatten(adapter)}))
    return dst


def merged_source(base_src, adapter_torch: dict[str, np.ndarray], scale: float):
    """A convert Source reading `base_src` with every adapted Linear weight W [out, in] replaced by
    W + scale * B A (computed in float32, stored in W's dtype), tensor by tensor."""
    from dataclasses import replace as dc_replace

    modules = {k.rsplit(".lora_", 1)[0] for k in adapter_torch}
    missing = sorted(m for m in modules if f"{m}.weight" not in base_src.shapes)
    if missing:
        raise KeyMismatchError(f"{base_src.path}: the base has no Linear weights for the adapted modules {missing}")
    for m in modules:
        want = (adapter_torch[f"{m}.lora_B.weight"].shape[0], adapter_torch[f"{m}.lora_A.weight"].shape[1])
        if tuple(base_src.shapes[f"{m}.weight"]) != want:
            raise KeyMismatchError(f"{base_src.path}: {m}.weight has shape {base_src.shapes[f'{m}.weight']}, "
                                   f"the adapter expects {want}")
    read = base_src.read

    def read_merged(key: str) -> np.ndarray:
        w = read(key)
        m = key.removesuffix(".weight")
        if not key.endswith(".weight") or m not in modules:
            return w
        return merged_weight(w, adapter_torch[f"{m}.lora_A.weight"], adapter_torch[f"{m}.lora_B.weight"], scale)

    return dc_replace(base_src, read=read_merged)


def export_merged(ckpt: str | Path, dst: str | Path, base: str | Path | None = None, ema: bool = False,
                  step: int | None = None, dtype: str | None = None, components: str | Path | None = None,
                  link: bool = False, overwrite: bool = False, max_shard_bytes: int = 5 * 2**30) -> Path:
    """`python -m convert --to torch CKPT_DIR OUT/ --merge [--base BASE]`: the base (lora.json's, or `base`: any
    transformer format convert reads) with the adapter merged in, as a diffusers transformer folder (a whole model
    folder with `components`), atomically."""
    from convert.export import _check_writable, _write_model_folder
    from contentv_common.formats.sources import open_source
    from convert.formats import OPENERS, write_torch

    adapter, record = read_checkpoint_adapter(ckpt, ema, step)
    base = Path(base or record["base"])
    if not base.exists():
        raise FileNotFoundError(f"{base}: the LoRA run's base model is not there; pass --base")
    if (base / "model_index.json").is_file():
        base = base / "transformer"
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists (pass --overwrite to replace it)")
    _check_writable(dst)
    scale = float(record["alpha"]) / int(record["rank"])
    adapter_torch = dict(flax_to_torch(adapter, lora_rules(_num_layers(record, adapter))))
    with open_source(base, openers=OPENERS) as base_src, atomic_dir(dst, overwrite=overwrite) as root:
        src = merged_source(base_src, adapter_torch, scale)
        log.info("%s + LoRA %s (rank %d, alpha %g) -> merged torch", base, ckpt, record["rank"], record["alpha"])
        if components is not None:
            _write_model_folder(src, Path(components), root, "torch", None, dtype, link, max_shard_bytes)
        else:
            write_torch(src, root, dtype=dtype, max_shard_bytes=max_shard_bytes)
    log.info("wrote %s", dst)
    return dst
