"""The diffusers / PEFT LoRA safetensors layout of the MM-DiT <-> our adapter tree (numpy; no framework imports).

The file holds `transformer.<diffusers module>.lora_A.weight` [r, in] and `.lora_B.weight` [out, r] for every
adapted Linear, and in its safetensors metadata `lora_adapter_metadata` the LoraConfig (`transformer.r`,
`transformer.lora_alpha`, `transformer.target_modules`) exactly as diffusers' `save_lora_weights` writes it, so
`StableDiffusion3Pipeline.load_lora_weights` and `SD3Transformer2DModel.load_lora_adapter` load it with no missing or
unexpected keys and scale it by alpha / r as we do. Our tree: `lora_A` [.., in, r] and `lora_B` [.., r, out] next
to each adapted Dense kernel (scanned layers stacked).

The key map is derived from the transformer's (transformer_keys.py): each Linear rule `<m>.weight <->
<path>/kernel` gives `<m>.lora_A.weight <-> <path>/lora_A` and `<m>.lora_B.weight <-> <path>/lora_B` (both
transposed), so the two maps cannot drift. Used by `convert` (export, merge) and `contentv_jax.lora` (--lora-init).
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from contentv_common.config import TransformerConfig
from contentv_common.formats.keymap import Rule, flatten, flax_to_torch, torch_to_flax
from contentv_common.formats.transformer_keys import transformer_rules
from contentv_common.weights import DTYPES, KeyMismatchError, atomic_file, check_keys

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


def merged_weight(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    """W [out, in] + scale * B [out, r] A [r, in], computed in float32, returned in W's dtype."""
    return (np.asarray(w, np.float32) + scale * (b.astype(np.float32) @ a.astype(np.float32))).astype(w.dtype)


def adapter_from_peft(path: str | Path, want: dict[str, Any], rank: int, alpha: float, num_layers: int) -> dict:
    """`train --lora-init FILE`: the file's adapter as our tree, checked against the run's adapter (`want`: flat
    {path: shape}), rank and alpha; every missing / unexpected module and shape mismatch is named."""
    adapter, file_rank, file_alpha = read_peft(path, num_layers)
    if file_rank != rank or file_alpha != alpha:
        raise ValueError(f"--lora-init {path}: rank {file_rank}, alpha {file_alpha:g}; the run has --lora-rank {rank}, "
                         f"--lora-alpha {alpha:g}")
    check_keys({k: v.shape for k, v in flatten(adapter).items()}, want,
               f"--lora-init {path} vs the run's adapter (--lora-targets)")
    return adapter
