"""Per-channel latent normalisation of the Wan VAE, for any array type (numpy, JAX, torch).

normalised = (z - mean) / std, with the config's 16 `latents_mean` / `latents_std`. The trainer and
the dataset store normalised latents; the pipeline de-normalises before the VAE decode.
"""
from __future__ import annotations

import numpy as np

from contentv_common.config import VAEConfig


def _stats(z, cfg: VAEConfig, channel_axis: int):
    shape = [1] * z.ndim
    shape[channel_axis] = cfg.z_dim
    if z.shape[channel_axis] != cfg.z_dim:
        raise ValueError(f"latents have {z.shape[channel_axis]} channels on axis {channel_axis}, the VAE has {cfg.z_dim}")
    mean = np.asarray(cfg.latents_mean, np.float32).reshape(shape)
    std = np.asarray(cfg.latents_std, np.float32).reshape(shape)
    if hasattr(z, "new_tensor"):  # torch: same device and dtype as z
        return z.new_tensor(mean), z.new_tensor(std)
    return mean.astype(z.dtype), std.astype(z.dtype)


def normalize_latents(z, cfg: VAEConfig, channel_axis: int):
    """VAE posterior latents -> the DiT's latent space. channel_axis: 1 for torch (B,C,T,H,W), -1 for JAX."""
    mean, std = _stats(z, cfg, channel_axis)
    return (z - mean) / std


def denormalize_latents(z, cfg: VAEConfig, channel_axis: int):
    """The DiT's latent space -> VAE latents (inverse of normalize_latents)."""
    mean, std = _stats(z, cfg, channel_axis)
    return z * std + mean
