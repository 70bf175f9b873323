"""Pre-flight memory checks: refuse a request that cannot fit before anything is allocated or written.

The estimates count what a request adds on top of the weights (latents, DiT activations, the decoded or input
video and the VAE's working set at full resolution). They are deliberately low (a real run needs more), so a
refusal is certain to be right and anything that passes still depends on the allocator. Framework-free: the
callers pass the bytes their device has free (`host_available_bytes` for the CPU).
"""
from __future__ import annotations

from contentv_common.cli import UserError
from contentv_common.config import TransformerConfig, VAEConfig

GIB = 2**30


def host_available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (the host RAM a new allocation can get), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def vae_full_res_bytes(vae: VAEConfig, frames: int, height: int, width: int) -> int:
    """fp32 working set of the VAE's full-resolution stage on one chunk: base_dim channels, a few live tensors,
    the causal cache's frames (decode handles one latent frame = `temporal_factor` video frames at a time)."""
    chunk = min(frames, vae.temporal_factor)
    return 4 * vae.base_dim * chunk * height * width * 4


def generate_bytes(transformer: TransformerConfig, vae: VAEConfig, latent_shape: tuple[int, ...], frames: int,
                   height: int, width: int, text_tokens: int, cfg: bool, act_bytes: int) -> int:
    """Latents + DiT activations (one block's hidden, q/k/v and MLP of the joint sequence, x2 with CFG) + the
    decoded fp32 video and its uint8 frames + the VAE's full-resolution working set."""
    b, z, t, h, w = latent_shape
    p = transformer.patch_size
    tokens = t * (h // p) * (w // p) + text_tokens
    rows = b * (2 if cfg else 1)
    latents = 4 * b * z * t * h * w * 4  # latents, noise prediction (x2 with CFG), the Euler update
    dit = rows * tokens * transformer.inner_dim * act_bytes * (1 + 3 + 4 + 2)  # hidden, qkv, mlp, attention out
    video = b * frames * height * width * 3 * (4 + 1)
    return latents + dit + video + vae_full_res_bytes(vae, frames, height, width)


def encode_bytes(vae: VAEConfig, batch: int, frames: int, height: int, width: int) -> int:
    """One VAE-encode batch of the largest bucket: the fp32 input clips (read + resized copies) + the encoder's
    full-resolution working set per clip."""
    return batch * (2 * 3 * frames * height * width * 4 + vae_full_res_bytes(vae, frames, height, width))


def check_fits(what: str, needed: int, available: int | None, where: str) -> None:
    """Raise a UserError naming the request when `needed` bytes exceed `available` (None: unknown, no check)."""
    if available is not None and needed > available:
        raise UserError(f"{what} needs at least {needed / GIB:.1f} GiB of latents and activations; "
                        f"{where} has {available / GIB:.1f} GiB available. Ask for fewer frames, a smaller size "
                        f"or batch.")
