"""Fixed sin-cos position tables (numpy, float64 math, returned as float32).

Matches diffusers `get_1d/2d/3d_sincos_pos_embed` exactly; ContentV adds the 3D table to the
patch tokens of every input shape (no learned table).
"""
from __future__ import annotations

import numpy as np


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """pos: [M] -> [M, dim]; channels are [sin(pos * w_i) | cos(pos * w_i)], w_i = 10000^(-i / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d_from_grid(dim: int, grid_w: np.ndarray, grid_h: np.ndarray) -> np.ndarray:
    """grid_w, grid_h: [M] -> [M, dim]: first half encodes w, second half h (the diffusers order)."""
    if dim % 2:
        raise ValueError(f"2D sin-cos embedding width must be even, got {dim}")
    return np.concatenate([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], axis=1)


def sincos_3d(
    dim: int,
    frames: int,
    height: int,
    width: int,
    spatial_interpolation_scale: float = 0.5,
    temporal_interpolation_scale: float = 1.0,
) -> np.ndarray:
    """The ContentV video table for a grid of `frames x height x width` patches.

    Returns [frames * height * width, dim] float32, tokens ordered (t, h, w). Channels: temporal
    dim/4 first, then spatial 3*dim/4 (whose first half encodes w). Equal to
    `diffusers.models.embeddings.get_3d_sincos_pos_embed(dim, (width, height), frames, 0.5, 1.0)`
    reshaped to [-1, dim].
    """
    if dim % 16:
        # diffusers needs dim % 4 for the split and the 3/4 spatial part split in two even halves.
        raise ValueError(f"3D sin-cos embedding width must be divisible by 16, got {dim}")
    dim_t, dim_s = dim // 4, 3 * dim // 4
    h = np.arange(height, dtype=np.float32) / spatial_interpolation_scale
    w = np.arange(width, dtype=np.float32) / spatial_interpolation_scale
    gw, gh = np.meshgrid(w, h, indexing="xy")  # [H, W] each, row-major over (h, w)
    spatial = sincos_2d_from_grid(dim_s, gw.reshape(-1), gh.reshape(-1))  # [H*W, 3D/4]
    t = np.arange(frames, dtype=np.float32) / temporal_interpolation_scale
    temporal = sincos_1d(dim_t, t)  # [T, D/4]
    table = np.concatenate(
        [
            np.broadcast_to(temporal[:, None, :], (frames, height * width, dim_t)),
            np.broadcast_to(spatial[None, :, :], (frames, height * width, dim_s)),
        ],
        axis=-1,
    )
    return table.reshape(frames * height * width, dim).astype(np.float32)
