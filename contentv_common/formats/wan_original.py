"""The original Wan2.1 VAE checkpoint (`Wan2.1_VAE.pth`, Wan2.1 `wan/modules/vae.py` names) <-> diffusers keys.

The original model keeps its blocks in flat `nn.Sequential` lists: `encoder.downsamples.N` (per level:
num_res_blocks residual blocks, then a Resample except after the last level), `decoder.upsamples.N` (per
level: num_res_blocks + 1 residual blocks, then a Resample except after the last level), `{en,de}coder.middle.
{0,1,2}` (residual, attention, residual), `{en,de}coder.head.{0,2}` (norm, conv), `conv1` / `conv2` (the
quant convs). A residual block is `residual.{0,2,3,6}` (norm, conv, norm, conv) + `shortcut` when its width
changes. diffusers `AutoencoderKLWan` names the same tensors differently and groups the decoder's flat list
into `up_blocks.i.{resnets.j, upsamplers.0}`. The table below is exact and built from the config: every
tensor is a plain rename (same layout), no substring replacement; with the shapes the config implies, it is
also where the expected VAE shapes come from (`vae_keys.vae_shapes`).

The checkpoint itself is a pickle, read with torch (`convert.formats.load_pth`).
"""
from __future__ import annotations

from typing import Mapping

from contentv_common.config import VAEConfig

MARKER = "encoder.downsamples.0.residual.0.gamma"  # identifies the format


Table = dict[str, tuple[str, tuple[int, ...]]]  # diffusers key -> (original key, shape)


def _conv(d: str, o: str, cout: int, cin: int, *kernel: int) -> Table:
    return {f"{d}.weight": (f"{o}.weight", (cout, cin, *kernel)), f"{d}.bias": (f"{o}.bias", (cout,))}


def _gamma(d: str, o: str, dim: int, spatial: int = 3) -> Table:
    return {f"{d}.gamma": (f"{o}.gamma", (dim, *(1,) * spatial))}


def _resblock(d: str, o: str, cin: int, cout: int) -> Table:
    t = {**_gamma(f"{d}.norm1", f"{o}.residual.0", cin), **_conv(f"{d}.conv1", f"{o}.residual.2", cout, cin, 3, 3, 3),
         **_gamma(f"{d}.norm2", f"{o}.residual.3", cout), **_conv(f"{d}.conv2", f"{o}.residual.6", cout, cout, 3, 3, 3)}
    if cin != cout:
        t |= _conv(f"{d}.conv_shortcut", f"{o}.shortcut", cout, cin, 1, 1, 1)
    return t


def _attn(d: str, o: str, dim: int) -> Table:
    return {**_gamma(f"{d}.norm", f"{o}.norm", dim, 2), **_conv(f"{d}.to_qkv", f"{o}.to_qkv", 3 * dim, dim, 1, 1),
            **_conv(f"{d}.proj", f"{o}.proj", dim, dim, 1, 1)}


def _resample(d: str, o: str, dim: int, up: bool, temporal: bool) -> Table:
    """A Resample of `dim` channels: up halves them (2D conv), its time conv doubles them; down keeps them."""
    t = _conv(f"{d}.resample.1", f"{o}.resample.1", dim // 2 if up else dim, dim, 3, 3)
    if temporal:
        t |= _conv(f"{d}.time_conv", f"{o}.time_conv", 2 * dim if up else dim, dim, 3, 1, 1)
    return t


def layout(cfg: VAEConfig) -> Table:
    """diffusers key -> (original key, shape) for every tensor of a Wan2.1 VAE with this config (the original
    names the same tensors in the same layout)."""
    if cfg.attn_scales:
        raise ValueError("Wan VAE with attn_scales is not a Wan2.1 VAE (diffusers' decoder has no per-level attention)")
    levels, r, z = len(cfg.dim_mult), cfg.num_res_blocks, cfg.z_dim
    # Encoder: dims = base * [1] + dim_mult, flat list as in diffusers (same indices).
    dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
    t = _conv("encoder.conv_in", "encoder.conv1", dims[0], 3, 3, 3, 3)
    n = 0
    for i in range(levels):
        cin, cout = dims[i], dims[i + 1]
        for _ in range(r):
            t |= _resblock(f"encoder.down_blocks.{n}", f"encoder.downsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != levels - 1:
            t |= _resample(f"encoder.down_blocks.{n}", f"encoder.downsamples.{n}", cout, False, cfg.temperal_downsample[i])
            n += 1
    enc_out = dims[-1]
    # Decoder: dims = base * [dim_mult[-1]] + reversed(dim_mult); levels after the first start at half width.
    dims = [cfg.base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
    temporal_up = cfg.temperal_downsample[::-1]
    t |= _conv("decoder.conv_in", "decoder.conv1", dims[0], z, 3, 3, 3)
    n = 0
    for i in range(levels):
        cin, cout = dims[i] // (2 if i > 0 else 1), dims[i + 1]
        for j in range(r + 1):
            t |= _resblock(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.upsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != levels - 1:
            t |= _resample(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.upsamples.{n}", cout, True, temporal_up[i])
            n += 1
    for part, mid, out, cout in (("encoder", enc_out, enc_out, 2 * z), ("decoder", dims[0], dims[-1], 3)):
        t |= _resblock(f"{part}.mid_block.resnets.0", f"{part}.middle.0", mid, mid)
        t |= _attn(f"{part}.mid_block.attentions.0", f"{part}.middle.1", mid)
        t |= _resblock(f"{part}.mid_block.resnets.1", f"{part}.middle.2", mid, mid)
        t |= _gamma(f"{part}.norm_out", f"{part}.head.0", out)
        t |= _conv(f"{part}.conv_out", f"{part}.head.2", cout, out, 3, 3, 3)
    t |= _conv("quant_conv", "conv1", 2 * z, 2 * z, 1, 1, 1)
    t |= _conv("post_quant_conv", "conv2", z, z, 1, 1, 1)
    return t


def key_table(cfg: VAEConfig) -> dict[str, str]:
    """diffusers key -> original key for every tensor of a Wan2.1 VAE with this config."""
    return {k: o for k, (o, _) in layout(cfg).items()}


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


def diffusers_to_original(state: Mapping[str, object], cfg: VAEConfig) -> dict[str, object]:
    """Inverse rename: a diffusers AutoencoderKLWan state dict -> the original Wan2.1 state dict."""
    table = key_table(cfg)
    missing, unexpected = sorted(set(table) - set(state)), sorted(set(state) - set(table))
    if missing or unexpected:
        raise KeyError(f"diffusers_to_original (Wan VAE): missing {missing}, unexpected {unexpected}")
    return {table[k]: state[k] for k in table}
