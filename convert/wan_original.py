"""The original Wan2.1 VAE checkpoint (`Wan2.1_VAE.pth`, Wan2.1 `wan/modules/vae.py` names) <-> diffusers keys.

The original model keeps its blocks in flat `nn.Sequential` lists: `encoder.downsamples.N` (per level:
num_res_blocks residual blocks, then a Resample except after the last level), `decoder.upsamples.N` (per
level: num_res_blocks + 1 residual blocks, then a Resample except after the last level), `{en,de}coder.middle.
{0,1,2}` (residual, attention, residual), `{en,de}coder.head.{0,2}` (norm, conv), `conv1` / `conv2` (the
quant convs). A residual block is `residual.{0,2,3,6}` (norm, conv, norm, conv) + `shortcut` when its width
changes. diffusers `AutoencoderKLWan` names the same tensors differently and groups the decoder's flat list
into `up_blocks.i.{resnets.j, upsamplers.0}`. The table below is exact and built from the config: every
tensor is a plain rename (same layout), no substring replacement.

The checkpoint is a pickle: it is read with `torch.load(weights_only=True)` only, so a file that needs code
execution to unpickle is refused with UnsafeCheckpointError.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from contentv_common.config import VAEConfig

MARKER = "encoder.downsamples.0.residual.0.gamma"  # identifies the format


class UnsafeCheckpointError(ValueError):
    """A pickle checkpoint that cannot be read without executing code."""


def _resblock(d: str, o: str, shortcut: bool) -> dict[str, str]:
    t = {f"{d}.norm1.gamma": f"{o}.residual.0.gamma", f"{d}.norm2.gamma": f"{o}.residual.3.gamma"}
    for dn, on in (("conv1", "residual.2"), ("conv2", "residual.6")) + ((("conv_shortcut", "shortcut"),) if shortcut else ()):
        t[f"{d}.{dn}.weight"] = f"{o}.{on}.weight"
        t[f"{d}.{dn}.bias"] = f"{o}.{on}.bias"
    return t


def _attn(d: str, o: str) -> dict[str, str]:
    return {f"{d}.norm.gamma": f"{o}.norm.gamma", **{f"{d}.{n}.{p}": f"{o}.{n}.{p}" for n in ("to_qkv", "proj") for p in ("weight", "bias")}}


def _resample(d: str, o: str, temporal: bool) -> dict[str, str]:
    names = ("resample.1", "time_conv") if temporal else ("resample.1",)
    return {f"{d}.{n}.{p}": f"{o}.{n}.{p}" for n in names for p in ("weight", "bias")}


def _conv(d: str, o: str) -> dict[str, str]:
    return {f"{d}.weight": f"{o}.weight", f"{d}.bias": f"{o}.bias"}


def key_table(cfg: VAEConfig) -> dict[str, str]:
    """diffusers key -> original key for every tensor of a Wan2.1 VAE with this config."""
    if cfg.attn_scales:
        raise ValueError("Wan VAE with attn_scales is not a Wan2.1 VAE (diffusers' decoder has no per-level attention)")
    levels, r = len(cfg.dim_mult), cfg.num_res_blocks
    t: dict[str, str] = {}
    # Encoder: dims = base * [1] + dim_mult, flat list as in diffusers (same indices).
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    t |= _conv("encoder.conv_in", "encoder.conv1")
    n = 0
    for i in range(levels):
        cin, cout = dims[i], dims[i + 1]
        for _ in range(r):
            t |= _resblock(f"encoder.down_blocks.{n}", f"encoder.downsamples.{n}", cin != cout)
            cin, n = cout, n + 1
        if i != levels - 1:
            t |= _resample(f"encoder.down_blocks.{n}", f"encoder.downsamples.{n}", cfg.temperal_downsample[i])
            n += 1
    # Decoder: dims = base * [dim_mult[-1]] + reversed(dim_mult); levels after the first start at half width.
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal_up = cfg.temperal_downsample[::-1]
    t |= _conv("decoder.conv_in", "decoder.conv1")
    n = 0
    for i in range(levels):
        cin, cout = dims[i] // (2 if i > 0 else 1), dims[i + 1]
        for j in range(r + 1):
            t |= _resblock(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.upsamples.{n}", cin != cout)
            cin, n = cout, n + 1
        if i != levels - 1:
            t |= _resample(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.upsamples.{n}", temporal_up[i])
            n += 1
    for part in ("encoder", "decoder"):
        t |= _resblock(f"{part}.mid_block.resnets.0", f"{part}.middle.0", False)
        t |= _attn(f"{part}.mid_block.attentions.0", f"{part}.middle.1")
        t |= _resblock(f"{part}.mid_block.resnets.1", f"{part}.middle.2", False)
        t[f"{part}.norm_out.gamma"] = f"{part}.head.0.gamma"
        t |= _conv(f"{part}.conv_out", f"{part}.head.2")
    t |= _conv("quant_conv", "conv1")
    t |= _conv("post_quant_conv", "conv2")
    return t


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> VAEConfig:
    """Read a VAEConfig off the original checkpoint's shapes (latent mean/std: the Wan2.1 values)."""
    for k in ("encoder.conv1.weight", "conv2.weight"):
        if k not in shapes:
            raise KeyError(f"Wan VAE checkpoint: required key {k!r} is missing")
    base, z = shapes["encoder.conv1.weight"][0], shapes["conv2.weight"][0]
    idx = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.downsamples.")})
    if idx != list(range(len(idx))) or not idx:
        raise ValueError(f"Wan VAE checkpoint: encoder.downsamples indices are not 0..N-1: {idx}")
    resamples = [n for n in idx if f"encoder.downsamples.{n}.resample.1.weight" in shapes]
    levels = len(resamples) + 1
    if (len(idx) - len(resamples)) % levels:
        raise ValueError(f"Wan VAE checkpoint: {len(idx)} encoder blocks do not split into {levels} levels")
    r = (len(idx) - len(resamples)) // levels
    mult = []
    for i in range(levels):
        first = i * (r + 1)  # the first residual block of level i
        mult.append(shapes[f"encoder.downsamples.{first}.residual.2.weight"][0] // base)
    temporal = tuple(f"encoder.downsamples.{n}.time_conv.weight" in shapes for n in resamples)
    return VAEConfig(base_dim=base, z_dim=z, dim_mult=tuple(mult), num_res_blocks=r, temperal_downsample=temporal)


def load_pth(path: str | Path) -> dict:
    """The state dict of a `.pth` checkpoint, read with `torch.load(weights_only=True)` (memory-mapped when the
    file is in the zip format). A pickle that needs code execution raises UnsafeCheckpointError."""
    import pickle

    import torch

    path = Path(path)
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if "WeightsUnpickler error" in ln), str(e).splitlines()[0])
        if "global" in detail.lower():  # the pickle calls a function / builds an object: code execution
            raise UnsafeCheckpointError(
                f"{path}: refused to unpickle: the file needs code execution (only plain tensors are loaded, "
                f"torch.load(weights_only=True)). {detail}"
            ) from None
        raise ValueError(f"{path}: not a torch checkpoint (cannot unpickle: {detail})") from None
    except (EOFError, RuntimeError) as e:  # an empty / truncated file (zip or legacy format)
        raise ValueError(f"{path}: not a torch checkpoint, empty or truncated ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: not a state dict of tensors (got {type(sd).__name__})")
    return sd


def diffusers_to_original(state: Mapping[str, object], cfg: VAEConfig) -> dict[str, object]:
    """Inverse rename: a diffusers AutoencoderKLWan state dict -> the original Wan2.1 state dict."""
    table = key_table(cfg)
    missing, unexpected = sorted(set(table) - set(state)), sorted(set(state) - set(table))
    if missing or unexpected:
        raise KeyError(f"diffusers_to_original (Wan VAE): missing {missing}, unexpected {unexpected}")
    return {table[k]: state[k] for k in table}
