"""LoRA adapters between our JAX training checkpoints and the diffusers / PEFT LoRA safetensors layout.

    python -m convert --to peft  CKPT_DIR lora.safetensors [--step N] [--ema]     # adapter -> diffusers / PEFT
    python -m convert --to torch CKPT_DIR merged/ --merge [--base BASE] [--components ContentV-8B/]

The PEFT file holds `transformer.<diffusers module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] for every
adapted Linear, and in its safetensors metadata `lora_adapter_metadata` the LoraConfig (`transformer.r`,
`transformer.lora_alpha`, `transformer.target_modules`) exactly as diffusers' `save_lora_weights` writes it, so
`StableDiffusion3Pipeline.load_lora_weights` and `SD3Transformer2DModel.load_lora_adapter` load it with no missing or
unexpected keys and scale it by alpha / r as we do. Loaders that never read that metadata assume alpha = r (so does
diffusers' `load_lora_adapter(path)` unless given `weight_name=` / `use_safetensors=True`): our default (lora.alpha 0
-> alpha = rank) is the same either way, and `--fold-alpha` writes B * alpha / r with alpha = r for them.

The key map is derived from the transformer's (convert/transformer_keys.py): each Linear rule `<m>.weight <->
<path>/kernel` gives `<m>.lora_A.weight <-> <path>/lora_A` and `<m>.lora_B.weight <-> <path>/lora_B` (both
transposed, scanned layers stacked), so the two maps cannot drift.
"""
from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from contentv_common.config import TransformerConfig
from contentv_common.weights import KeyMismatchError, atomic_dir, atomic_file
from convert.keymap import Rule, flatten, flax_to_torch, torch_to_flax, unflatten
from convert.transformer_keys import transformer_rules

log = logging.getLogger("convert")

PREFIX = "transformer."  # the pipeline's component prefix in a diffusers LoRA file
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


def lora_rules(num_layers: int) -> list[Rule]:
    """The adapter key map of a model with `num_layers` blocks (torch keys without the "transformer." prefix)."""
    rules = []
    for r in transformer_rules(replace(TransformerConfig(), num_layers=num_layers)):
        if r.kind == "linear" and r.flax.endswith("/kernel"):
            for ab in ("lora_A", "lora_B"):
                rules.append(Rule(r.torch.removesuffix(".weight") + f".{ab}.weight",
                                  r.flax.removesuffix("/kernel") + f"/{ab}", "linear", stack=r.stack))
    return rules


def peft_state_dict(adapter, num_layers: int) -> dict[str, np.ndarray]:
    """Our adapter tree (lora_A [.., in, r], lora_B [.., r, out]) -> {"transformer.<module>.lora_X.weight": array}."""
    return {PREFIX + k: v for k, v in flax_to_torch(adapter, lora_rules(num_layers))}


def peft_metadata(tensors: dict[str, np.ndarray], rank: int, alpha: float) -> dict[str, str]:
    """The safetensors metadata diffusers writes for a transformer LoRA (its LoraConfig, prefixed)."""
    modules = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    config = {"transformer.r": int(rank), "transformer.lora_alpha": float(alpha), "transformer.target_modules": modules,
              "transformer.init_lora_weights": True, "transformer.lora_dropout": 0.0}
    return {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}


def write_peft(adapter, rank: int, alpha: float, num_layers: int, dst: str | Path, dtype: str | None = None,
               fold_alpha: bool = False) -> Path:
    """Write our adapter tree as a diffusers / PEFT LoRA safetensors file at `dst`, atomically. fold_alpha: B is
    scaled by alpha / r and alpha written as r (the same model for loaders that ignore the metadata)."""
    from safetensors.numpy import save

    tensors = peft_state_dict(adapter, num_layers)
    if fold_alpha:
        tensors = {k: v * np.float32(alpha / rank) if ".lora_B." in k else v for k, v in tensors.items()}
        alpha = float(rank)
    if dtype is not None:
        from convert.formats import DTYPES

        tensors = {k: v.astype(DTYPES[dtype]) for k, v in tensors.items()}
    with atomic_file(dst) as tmp:  # (bytes into the temp file: it keeps the permissions atomic_file gave it)
        tmp.write_bytes(save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                             metadata=peft_metadata(tensors, rank, alpha)))
    return Path(dst)


def read_peft(path: str | Path, num_layers: int) -> tuple[dict, int, float]:
    """A diffusers / PEFT LoRA safetensors file of the transformer -> (our adapter tree of numpy arrays, rank, alpha).

    Keys may carry the "transformer." prefix (pipeline files) or not (`save_lora_adapter` without a prefix);
    alpha comes from the `lora_adapter_metadata` LoraConfig (alpha = rank without one, as diffusers assumes).
    Other components' keys (text encoders), non-LoRA keys, per-module ranks or alphas and unknown modules are
    errors naming them."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such LoRA file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ValueError(f"{path}: not a safetensors file ({e})") from None
    tensors = {k.removeprefix(PREFIX): v for k, v in raw.items()}
    others = sorted(k for k in tensors if ".lora_A.weight" not in k and ".lora_B.weight" not in k)
    if others:
        raise KeyMismatchError(f"{path}: keys that are not transformer LoRA lora_A / lora_B weights: {others[:10]}"
                               + (f" (+{len(others) - 10} more)" if len(others) > 10 else ""))
    ranks = {v.shape[0] for k, v in tensors.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise ValueError(f"{path}: the adapters have ranks {sorted(ranks)}; one rank for every module is supported")
    rank = ranks.pop()
    config = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {}
    config = {k.removeprefix(PREFIX): v for k, v in config.items()}
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise ValueError(f"{path}: per-module rank_pattern / alpha_pattern are not supported")
    if int(config.get("r", rank)) != rank:
        raise ValueError(f"{path}: metadata says r={config['r']}, the tensors have rank {rank}")
    alpha = float(config.get("lora_alpha", rank))
    adapter = torch_to_flax(((k, v.astype(np.float32)) for k, v in tensors.items()), lora_rules(num_layers), str(path))
    return adapter, rank, alpha


# ----------------------------------------------------------------------------------------------------------
# Checkpoint side


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


def merged_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W [out, in] + scale * B [out, r] A [r, in], computed in float32, returned in W's dtype."""
    return (np.asarray(w, np.float32) + scale * (b.astype(np.float32) @ a.astype(np.float32))).astype(w.dtype)


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
    from convert.formats import open_source, write_torch

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
    with open_source(base) as base_src, atomic_dir(dst, overwrite=overwrite) as root:
        src = merged_source(base_src, adapter_torch, scale)
        log.info("%s + LoRA %s (rank %d, alpha %g) -> merged torch", base, ckpt, record["rank"], record["alpha"])
        if components is not None:
            _write_model_folder(src, Path(components), root, "torch", None, dtype, link, max_shard_bytes)
        else:
            write_torch(src, root, dtype=dtype, max_shard_bytes=max_shard_bytes)
    log.info("wrote %s", dst)
    return dst


def adapter_from_peft(path: str | Path, want: dict[str, Any], rank: int, alpha: float, num_layers: int) -> dict:
    """`train --lora-init FILE`: the file's adapter as our tree, checked against the run's adapter (`want`: flat
    {path: shape}), rank and alpha; every missing / unexpected module and shape mismatch is named."""
    from contentv_common.weights import check_keys

    adapter, file_rank, file_alpha = read_peft(path, num_layers)
    if file_rank != rank or file_alpha != alpha:
        raise ValueError(f"--lora-init {path}: rank {file_rank}, alpha {file_alpha:g}; the run has --lora-rank {rank}, "
                         f"--lora-alpha {alpha:g}")
    check_keys({k: v.shape for k, v in flatten(adapter).items()}, want,
               f"--lora-init {path} vs the run's adapter (--lora-targets)")
    return adapter
