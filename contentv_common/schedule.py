"""Flow-matching noise schedules shared by the samplers and the trainer (numpy).

Convention (rectified flow): x_s = (1 - s) * x0 + s * eps, velocity target v = eps - x0, the model
is fed timestep t = 1000 * s. An Euler step from s to s_next is x += (s_next - s) * v.
"""
from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas, shift: float):
    """s' = k s / (1 + (k - 1) s): pushes the schedule towards high noise for k > 1 (SD3's shift)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


SIGMA_GRIDS = ("contentv", "sd3")
DEFAULT_SIGMA_GRID = "contentv"  # every sampler's default: the torch pipeline, generate, the JAX sampler, RLHF


def flow_match_sigmas(
    num_steps: int, shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, grid: str = DEFAULT_SIGMA_GRID
) -> np.ndarray:
    """The sampling sigmas of diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps`.

    Returns [num_steps + 1] float32 from 1 down to a terminal 0; the timesteps fed to the model are
    `1000 * sigmas[:-1]`. The grid is shifted after it is laid out:
      grid="contentv" (default): `set_timesteps(sigmas=np.linspace(1, 0, num_steps + 1)[:-1])`, as the
          released ContentV pipeline calls it: 1, 1 - 1/N, ..., 1/N.
      grid="sd3": `set_timesteps(num_steps)`, as the SD3 pipeline calls it: the grid runs linearly from 1
          to the shifted smallest training sigma (shift(1 / num_train_timesteps)).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if grid == "sd3":
        sigma_min = float(shift_sigmas(np.float32(1.0 / num_train_timesteps), shift))
        ts = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, num_steps, dtype=np.float32)
        grid_sigmas = ts / num_train_timesteps
    elif grid == "contentv":
        grid_sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1].astype(np.float32)
    else:
        raise ValueError(f"unknown sigma grid {grid!r}; choose one of {SIGMA_GRIDS}")
    sigmas = shift_sigmas(grid_sigmas, shift).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def token_dependent_shift(
    num_tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5, max_shift: float = 1.15
) -> float:
    """Resolution-dependent shift k = exp(mu), mu linear in the token count (SD3/Flux `calculate_shift`)."""
    m = (max_shift - base_shift) / (max_tokens - base_tokens)
    mu = base_shift + m * (num_tokens - base_tokens)
    return float(np.exp(mu))
