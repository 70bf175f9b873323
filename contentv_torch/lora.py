"""LoRA adapters on the PyTorch MM-DiT: diffusers / PEFT LoRA safetensors files, applied without a second model copy.

    adapter = read_lora("style.safetensors")            # factors + per-module alpha, nothing applied yet
    check_lora(adapter, transformer)                     # every key names a Linear of the model, every shape fits
    handle = apply_lora(transformer, adapter, scale=0.8) # y = W x + b + scale * (alpha / r) * B(A(x))
    handle.remove()                                      # outputs are the base model's again, bit for bit
    merge_lora(transformer, adapter, scale=1.0)          # fold into the weights instead (in place, for parity / speed)

The file format is the one diffusers writes (`StableDiffusion3Pipeline.save_lora_weights`, `save_lora_adapter`) and
`StableDiffusion3Pipeline.load_lora_weights` reads: `transformer.<module>.lora_A.weight` [r, in] and
`transformer.<module>.lora_B.weight` [out, r] (optionally `lora_B.bias` [out], PEFT's `lora_bias`), with the PEFT
`LoraConfig` as JSON under the safetensors metadata key `lora_adapter_metadata` (its fields prefixed `transformer.`
when a pipeline wrote it). Also read: keys without the `transformer.` prefix or with PEFT's `base_model.model.`,
and a scalar `<module>.alpha` per module (kohya-style trainers). The scale of module m is, as PEFT computes it,
alpha_m / r_m (alpha_m / sqrt(r_m) with `use_rslora`), alpha_m from the metadata's `alpha_pattern` / `lora_alpha`,
else the file's `.alpha`, else r_m (diffusers' rule for a file without alphas: B A is added as it is).

Applied adapters are forward hooks on the targeted `nn.Linear`s: each adds its low-rank term in the Linear's dtype,
several adapters stack (each with its own scale), and removing the hooks leaves the module untouched. The factors
follow the activations to whatever device the Linear runs on (CUDA, NPU, CPU; model offload moves the Linear).
Only safetensors files are read (never pickle).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from contentv_common.formats.peft_lora import METADATA_KEY
from contentv_common.formats.peft_lora import PREFIX as TRANSFORMER_PREFIX

_OTHER_COMPONENTS = ("text_encoder.", "text_encoder_2.", "text_encoder_3.", "unet.")
_PEFT_MODEL_PREFIX = "base_model.model."
# <module>.<suffix> -> (factor, tensor): the PEFT names and kohya's lora_down / lora_up spellings.
_SUFFIXES = {"lora_A.weight": "down", "lora_B.weight": "up", "lora_B.bias": "up_bias",
             "lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}


@dataclass(frozen=True)
class LoraLayer:
    """One module's factors: down (lora_A) [r, in], up (lora_B) [out, r], up_bias [out] or None, scaling
    alpha / r (the file's own; the user's scale multiplies it)."""

    down: torch.Tensor
    up: torch.Tensor
    up_bias: torch.Tensor | None
    scaling: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A LoRA file read: its path and {module name in the transformer: LoraLayer}."""

    path: Path
    layers: dict[str, LoraLayer]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------
def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"LoRA file {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own types for pickles, truncated and foreign files
        raise ValueError(f"LoRA file {path}: not a readable safetensors file ({e}); only safetensors LoRA files are "
                         "read (no pickle .bin / .pt)") from None


def _peft_config(path: Path, metadata: dict[str, str]) -> dict | None:
    """The transformer's LoraConfig fields from the `lora_adapter_metadata` JSON (prefix `transformer.` removed;
    a file written by a model's own save_lora_adapter has no prefix), or None without metadata."""
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return None
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"LoRA file {path}: metadata {METADATA_KEY!r} is not JSON ({e})") from None
    if not isinstance(fields, dict):
        raise ValueError(f"LoRA file {path}: metadata {METADATA_KEY!r} must be a JSON object")
    ours = {k[len(TRANSFORMER_PREFIX):]: v for k, v in fields.items() if k.startswith(TRANSFORMER_PREFIX)}
    if ours:
        return ours
    return None if any(k.startswith(_OTHER_COMPONENTS) for k in fields) else fields


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's `get_pattern_key` rule: the first pattern p with re.match(f"(.*\\.)?({p})$", module) wins."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_name(path: Path, key: str) -> tuple[str, str]:
    """A file key -> (module name in the transformer, factor name); anything else raises naming the key."""
    name = key[len(TRANSFORMER_PREFIX):] if key.startswith(TRANSFORMER_PREFIX) else key
    name = name[len(_PEFT_MODEL_PREFIX):] if name.startswith(_PEFT_MODEL_PREFIX) else name
    if key.startswith(_OTHER_COMPONENTS):
        raise ValueError(f"LoRA file {path}: key {key!r} is for another component than the transformer; only "
                         "transformer LoRAs are supported")
    for suffix, factor in _SUFFIXES.items():
        if name.endswith("." + suffix):
            return name[: -len(suffix) - 1], factor
    raise ValueError(f"LoRA file {path}: key {key!r} is not a LoRA tensor (expected [transformer.]<module>."
                     f"{{lora_A.weight, lora_B.weight, lora_B.bias, alpha}})")


def read_lora(path: str | Path) -> LoraAdapter:
    """Read a diffusers / PEFT LoRA safetensors file. Malformed files raise ValueError naming the file and key."""
    path = Path(path)
    tensors, metadata = _read_safetensors(path)
    if not tensors:
        raise ValueError(f"LoRA file {path}: holds no tensors")
    config = _peft_config(path, metadata)
    if config and (config.get("use_dora") or config.get("use_qalora")):
        raise ValueError(f"LoRA file {path}: DoRA / QALoRA adapters are not supported (metadata use_dora / use_qalora)")
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        module, factor = _module_name(path, key)
        if factor in groups.setdefault(module, {}):
            raise ValueError(f"LoRA file {path}: keys {groups[module][factor][0]!r} and {key!r} give the same tensor")
        groups[module][factor] = (key, t)
    layers = {}
    for module, g in sorted(groups.items()):
        if "down" not in g or "up" not in g:
            have = ", ".join(repr(k) for k, _ in g.values())
            raise ValueError(f"LoRA file {path}: module {module!r} needs both lora_A.weight and lora_B.weight, "
                             f"found only {have}")
        (kd, down), (ku, up) = g["down"], g["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise ValueError(f"LoRA file {path}: {kd!r} {tuple(down.shape)} and {ku!r} {tuple(up.shape)} are not "
                             "the factors [r, in] and [out, r] of one rank r (only Linear LoRAs are supported)")
        r = down.shape[0]
        alpha = float(g["alpha"][1].item()) if "alpha" in g else float(r)
        if config is not None:
            want_r = _pattern_value(config.get("rank_pattern"), module, config.get("r", r))
            if want_r != r:
                raise ValueError(f"LoRA file {path}: {kd!r} has rank {r}, its metadata {METADATA_KEY} says r={want_r}")
            alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", alpha)))
        rslora = bool(config and config.get("use_rslora"))
        bias = g["up_bias"][1] if "up_bias" in g else None
        if bias is not None and tuple(bias.shape) != (up.shape[0],):
            raise ValueError(f"LoRA file {path}: {g['up_bias'][0]!r} has shape {tuple(bias.shape)}, expected "
                             f"({up.shape[0]},) for {ku!r} {tuple(up.shape)}")
        layers[module] = LoraLayer(down, up, bias, alpha / (math.sqrt(r) if rslora else r))
    return LoraAdapter(path, layers)


def check_lora(adapter: LoraAdapter, model: nn.Module) -> None:
    """Raise ValueError naming the file, key and shapes where the adapter does not fit `model` (a key naming no
    module, a module that is not an nn.Linear, factor shapes that disagree with the Linear's). Works on a model
    built on the meta device (shapes only), so it runs before any weight is loaded."""
    modules = dict(model.named_modules())
    for name, layer in adapter.layers.items():
        where = f"LoRA file {adapter.path}: {TRANSFORMER_PREFIX}{name}"
        target = modules.get(name)
        if target is None:
            near = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear) and n.split(".")[-1] == name.split(".")[-1])
            raise ValueError(f"{where}.lora_A.weight names no module of the transformer"
                             + (f" (Linear layers with that name: {near[:3]}...)" if near else ""))
        if not isinstance(target, nn.Linear):
            raise ValueError(f"{where}: the module is a {type(target).__name__}, LoRA applies to nn.Linear only")
        want_down, want_up = (layer.rank, target.in_features), (target.out_features, layer.rank)
        if tuple(layer.down.shape) != want_down or tuple(layer.up.shape) != want_up:
            raise ValueError(f"{where}: lora_A.weight {tuple(layer.down.shape)} / lora_B.weight "
                             f"{tuple(layer.up.shape)} do not fit the Linear [{target.out_features}, "
                             f"{target.in_features}]: expected {want_down} / {want_up}")


# ---------------------------------------------------------------------------------------------
# Applying
# ---------------------------------------------------------------------------------------------
class _LoraHook:
    """The forward hook of one adapter on one Linear: output + scale * scaling * (x A^T) B^T (+ bias)."""

    def __init__(self, layer: LoraLayer, handle: LoraHandle, weight: torch.Tensor):
        self.down = layer.down.to(weight.device, weight.dtype)
        self.up = layer.up.to(weight.device, weight.dtype)
        self.bias = None if layer.up_bias is None else layer.up_bias.to(weight.device, weight.dtype)
        self.scaling, self.handle = layer.scaling, handle

    def __call__(self, module: nn.Linear, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
        s = self.handle.scale * self.scaling
        if s == 0:
            return output
        x = inputs[0]
        if self.down.device != x.device:  # the Linear moved (offload): the factors follow, once
            self.down, self.up = self.down.to(x.device), self.up.to(x.device)
            self.bias = None if self.bias is None else self.bias.to(x.device)
        return output + F.linear(F.linear(x.to(self.down.dtype), self.down), self.up, self.bias).to(output.dtype) * s


class LoraHandle:
    """An applied adapter: `scale` may be changed between calls; `remove()` (or leaving a `with` block) takes it
    off again."""

    def __init__(self, adapter: LoraAdapter, scale: float):
        self.adapter, self.scale = adapter, float(scale)
        self._hooks: list = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def __enter__(self) -> LoraHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_lora(model: nn.Module, adapter: LoraAdapter | str | Path, scale: float = 1.0) -> LoraHandle:
    """Hook the adapter onto `model`'s Linears (checked first with `check_lora`); returns the handle that removes
    it. The factors are copied once to each Linear's device and dtype; the base weights are not touched."""
    adapter = adapter if isinstance(adapter, LoraAdapter) else read_lora(adapter)
    check_lora(adapter, model)
    if not math.isfinite(scale):
        raise ValueError(f"LoRA scale for {adapter.path} must be finite, got {scale}")
    handle = LoraHandle(adapter, scale)
    modules = dict(model.named_modules())
    for name, layer in adapter.layers.items():
        target = modules[name]
        handle._hooks.append(target.register_forward_hook(_LoraHook(layer, handle, target.weight)))
    return handle


@torch.no_grad()
def merge_lora(model: nn.Module, adapter: LoraAdapter | str | Path, scale: float = 1.0, sign: float = 1.0) -> None:
    """Fold the adapter into the weights in place: W += sign * scale * scaling * B A (bias likewise), computed in
    fp32 and rounded to W's dtype. sign=-1 unmerges (exact up to that rounding, unlike `apply_lora(...).remove()`)."""
    adapter = adapter if isinstance(adapter, LoraAdapter) else read_lora(adapter)
    check_lora(adapter, model)
    modules = dict(model.named_modules())
    for name, layer in adapter.layers.items():
        lin = modules[name]
        s = sign * scale * layer.scaling
        delta = layer.up.float().to(lin.weight.device) @ layer.down.float().to(lin.weight.device)
        lin.weight.copy_(lin.weight.float() + s * delta)
        if layer.up_bias is not None:
            if lin.bias is None:
                raise ValueError(f"LoRA file {adapter.path}: {name} has a lora_B.bias but the Linear has no bias "
                                 "to merge it into")
            lin.bias.copy_(lin.bias.float() + s * layer.up_bias.float().to(lin.bias.device))
