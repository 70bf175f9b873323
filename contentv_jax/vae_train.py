"""Training the Wan2.1 VAE (`contentv_jax.vae.WanVAE`) from scratch: reconstruction + KL, Adam, one jitted step.

    loss_fn(model, params, video [B, F, H, W, 3] in [-1, 1], rng, kl_weight, sample=True) -> (loss, metrics)
        sample z ~ N(mean, exp(logvar)) from encode(video) (sample=False: z = mean), decode(z) -> recon
        [B, F, H, W, 3];
        loss = mean((recon - video)^2) + kl_weight * KL(q(z|x) || N(0, 1)) summed over z channels, averaged
        over (B, T, h, w) latent positions.
    VAETrainer(config, lr=1e-3, kl_weight=1e-6, seed=0, sample=True, compiler_options=None): .params (plain tree),
        .step(video) -> metrics (floats). Windows of 9 frames (the first chunk + two cached chunks) are the
        shortest that train every part of the causal chunked path: with 5, the decoder's temporal upsamples only
        ever see a zero cache, so their oldest cache tap stays at its random init (tests/test_e2e.py).
    latent_stats(config, params, videos [N, F, H, W, 3], batch) -> (mean [z], std [z]) of the posterior means:
        the per-channel `latents_mean` / `latents_std` a trained VAE's config needs, so that normalised latents
        ((z - mean) / std) are about unit variance for the DiT.
The trained params are written in our JAX format with `convert.formats.save_flax_params(config, params, folder)`;
`python -m convert --to torch folder vae/` makes the diffusers `vae/` of a ContentV folder from it.
Used by examples/e2e.py, which trains a tiny Wan VAE on synthetic clips on a CPU.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from contentv_common.config import VAEConfig
from contentv_jax.vae import WanVAE, init_params


def loss_fn(model: WanVAE, params, video: jax.Array, rng: jax.Array, kl_weight: float, sample: bool = True):
    """video [B, F, H, W, 3] in [-1, 1] -> (scalar loss, {"loss", "recon", "kl"}).
    sample False decodes the posterior mean (a KL-regularised autoencoder; what encode_dataset stores).
    The reconstruction is the decoder's unclamped output: clamped pixels would get no gradient."""
    mean, logvar = model.apply({"params": params}, video, method="encode")  # each [B, T, h, w, z]
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype) if sample else mean
    recon = model.apply({"params": params}, z, False, method="decode")  # [B, F, H, W, 3], unclamped
    rec = jnp.mean(jnp.square(recon - video))
    kl = jnp.mean(0.5 * jnp.sum(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar, axis=-1))
    loss = rec + kl_weight * kl
    return loss, {"loss": loss, "recon": rec, "kl": kl}


class VAETrainer:
    """Adam (with global-norm clipping) on a WanVAE of `config`, from a random init of `seed`.
    sample: decode a posterior sample (a VAE) or the posterior mean (an autoencoder with a KL penalty: from a
      random init, where logvar ~ 0 buries the mean under unit noise, it learns in far fewer steps).
    compiler_options: XLA options for the step's compile (e.g. {"xla_backend_optimization_level": 0}).

    step(video [B, F, H, W, 3] float32 in [-1, 1]) -> {"loss", "recon", "kl"} as Python floats; a non-finite
    loss raises naming the step."""

    def __init__(self, config: VAEConfig, lr: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0, sample: bool = True,
                 compiler_options: dict | None = None):
        self.config, self.kl_weight, self.step_count = config, float(kl_weight), 0
        self.model = WanVAE(config)
        self.params = nn.meta.unbox(init_params(config, jax.random.key(seed, impl="rbg")))["params"]
        self.tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
        self.opt_state = self.tx.init(self.params)
        self._rng = jax.random.key(seed + 1, impl="rbg")

        def step(params, opt_state, video, rng):
            grads, metrics = jax.grad(lambda p: loss_fn(self.model, p, video, rng, self.kl_weight, sample), has_aux=True)(params)
            updates, opt_state = self.tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, metrics

        self._step = jax.jit(step, donate_argnums=(0, 1), compiler_options=compiler_options)

    def step(self, video: np.ndarray) -> dict[str, float]:
        video = np.asarray(video, np.float32)
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"VAETrainer.step: video must be [B, F, H, W, 3] in [-1, 1], got shape {video.shape}")
        self._rng, rng = jax.random.split(self._rng)
        self.params, self.opt_state, metrics = self._step(self.params, self.opt_state, jnp.asarray(video), rng)
        metrics = {k: float(v) for k, v in metrics.items()}
        self.step_count += 1
        if not np.isfinite(metrics["loss"]):
            raise FloatingPointError(f"VAETrainer: non-finite loss {metrics['loss']} at step {self.step_count}")
        return metrics


def latent_stats(config: VAEConfig, params, videos: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """videos [N, F, H, W, 3] in [-1, 1] -> per-channel (mean [z], std [z]) of the posterior means over all
    latent positions of all videos (std floored at 1e-3)."""
    model = WanVAE(config)
    encode = jax.jit(lambda p, v: model.apply({"params": p}, v, method="encode")[0])
    zs = [np.asarray(encode(params, jnp.asarray(videos[i:i + batch], jnp.float32))) for i in range(0, len(videos), batch)]
    z = np.concatenate(zs).reshape(-1, config.z_dim)  # [N * T * h * w, z]
    return z.mean(0), np.maximum(z.std(0), 1e-3)


def with_latent_stats(config: VAEConfig, mean, std) -> VAEConfig:
    """The config with `latents_mean` / `latents_std` replaced (z floats each)."""
    mean, std = [float(v) for v in np.ravel(mean)], [float(v) for v in np.ravel(std)]
    return dataclasses.replace(config, latents_mean=tuple(mean), latents_std=tuple(std))
