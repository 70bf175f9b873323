"""Rectified-flow training objective (JAX).

Convention (contentv_common.schedule): x_s = (1 - s) x0 + s eps, target v = eps - x0, the model
sees timestep t = 1000 s. Images are videos with T = 1; every function here works on one static
bucket shape [B, T, h, w, C] (channels-last, normalised latents).

Timestep sampling (`cfg` is the `flow` section of a train config, contentv_jax.configs):
  timestep_sampling: "logit_normal" (s = sigmoid(N(logit_mean, logit_std))) or "uniform";
  shift_mode: "fixed" (s' = shift(s, cfg.shift)) or "tokens" (shift k = exp(mu), mu linear in the
              video token count, contentv_common.schedule.token_dependent_shift) or "none";
  loss_weighting: "none", "cosmap" (SD3's 2 / (pi (1 - 2s + 2s^2))) or "sigma_sqrt" (1 / s^2, clipped).
Caption dropout (`drop_captions`, the trainer's `flow.caption_dropout`): each sample's text embeddings are
  replaced by the empty prompt's with probability p, so the model also learns the unconditional velocity that
  classifier-free guidance needs.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from contentv_common import config as config_lib
from contentv_common.schedule import NUM_TRAIN_TIMESTEPS, shift_sigmas, token_dependent_shift

TIMESTEP_SAMPLINGS = ("logit_normal", "uniform")
SHIFT_MODES = ("none", "fixed", "tokens")
LOSS_WEIGHTINGS = ("none", "cosmap", "sigma_sqrt")


def video_tokens(latent_shape, patch_size: int) -> int:
    """Tokens of one sample of latents [B, T, h, w, C] (`contentv_common.config.video_tokens`)."""
    return config_lib.video_tokens(latent_shape[1:], patch_size)


def training_shift(cfg, num_tokens: int) -> float:
    """The schedule shift k for a bucket with `num_tokens` video tokens (a Python float, static per shape)."""
    if cfg.shift_mode == "none":
        return 1.0
    if cfg.shift_mode == "fixed":
        return float(cfg.shift)
    if cfg.shift_mode == "tokens":
        return token_dependent_shift(
            num_tokens, cfg.shift_base_tokens, cfg.shift_max_tokens, cfg.shift_base, cfg.shift_max
        )
    raise ValueError(f"flow.shift_mode {cfg.shift_mode!r} unknown; choose one of {SHIFT_MODES}")


def sample_sigmas(rng: jax.Array, batch: int, cfg, num_tokens: int) -> jax.Array:
    """Noise levels s: [batch] float32 in (0, 1), one per sample, shifted for the bucket's token count."""
    if cfg.timestep_sampling == "logit_normal":
        u = jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(rng, (batch,), jnp.float32))
    elif cfg.timestep_sampling == "uniform":
        u = jax.random.uniform(rng, (batch,), jnp.float32)
    else:
        raise ValueError(f"flow.timestep_sampling {cfg.timestep_sampling!r} unknown; choose one of {TIMESTEP_SAMPLINGS}")
    return shift_sigmas(u, training_shift(cfg, num_tokens))


def loss_weights(s: jax.Array, kind: str) -> jax.Array:
    """Per-sample loss weights [B] for noise levels s [B]."""
    if kind == "none":
        return jnp.ones_like(s)
    if kind == "cosmap":
        return 2.0 / (jnp.pi * (1.0 - 2.0 * s + 2.0 * s**2))
    if kind == "sigma_sqrt":
        return jnp.minimum(1.0 / jnp.maximum(s, 1e-3) ** 2, 1e4)
    raise ValueError(f"flow.loss_weighting {kind!r} unknown; choose one of {LOSS_WEIGHTINGS}")


def interpolate(x0: jax.Array, eps: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x0, eps: [B, T, h, w, C], s: [B] -> (x_s, v): x_s = (1 - s) x0 + s eps, v = eps - x0."""
    sb = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - sb) * x0 + sb * eps, eps - x0


def drop_captions(batch: dict, rng: jax.Array, p: float, null_context: jax.Array, null_pooled: jax.Array) -> dict:
    """Caption dropout: batch (context [B, L, J], pooled [B, P], anything else passed through) -> the batch with
    each sample's context and pooled replaced, with probability p (one draw per sample from `rng`), by the empty
    prompt's null_context [L, J] / null_pooled [P]. p <= 0 returns the batch unchanged (no draw)."""
    if p <= 0:
        return batch
    b = batch["context"].shape[0]
    drop = jax.random.uniform(rng, (b,), jnp.float32) < p  # [B]
    context = jnp.where(drop[:, None, None], jnp.asarray(null_context, batch["context"].dtype)[None], batch["context"])
    pooled = jnp.where(drop[:, None], jnp.asarray(null_pooled, batch["pooled"].dtype)[None], batch["pooled"])
    return {**batch, "context": context, "pooled": pooled}


def velocity_mse(apply_fn: Callable, params, batch: dict, s: jax.Array, eps: jax.Array) -> jax.Array:
    """The unweighted flow-matching MSE per sample at given noise: batch (latents [B,T,h,w,C] = x0, context
    [B,L,J], pooled [B,P]), noise levels s [B] and noise eps [B,T,h,w,C] -> mean((v_pred - (eps - x0))^2) [B].
    The one home of the objective: the train step (`flow_matching_loss`) and the validation loss
    (contentv_jax.validation) both call it."""
    x0 = batch["latents"].astype(jnp.float32)
    xs, target = interpolate(x0, eps, s)
    pred = apply_fn(params, xs, s * NUM_TRAIN_TIMESTEPS, batch["context"], batch["pooled"])
    if pred.shape != target.shape:
        raise ValueError(f"model output {pred.shape} != latents {target.shape}")
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=tuple(range(1, x0.ndim)))  # [B]


def flow_matching_loss(
    apply_fn: Callable, params, batch: dict, rng: jax.Array, cfg, patch_size: int
) -> tuple[jax.Array, dict]:
    """The weighted rectified-flow MSE of one batch.

    apply_fn(params, latents [B,T,h,w,C], timestep [B] in [0, 1000], context [B,L,J], pooled [B,P])
      -> velocity [B,T,h,w,C].
    batch: latents [B,T,h,w,C] (normalised x0), context [B,L,J], pooled [B,P].
    Returns (loss scalar fp32, aux {"per_sample": [B] unweighted MSE, "sigmas": [B]}).
    """
    x0 = batch["latents"].astype(jnp.float32)
    b = x0.shape[0]
    rng_s, rng_eps = jax.random.split(rng)
    s = sample_sigmas(rng_s, b, cfg, video_tokens(x0.shape, patch_size))
    eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
    per_sample = velocity_mse(apply_fn, params, batch, s, eps)
    w = loss_weights(s, cfg.loss_weighting)
    return jnp.mean(w * per_sample), {"per_sample": per_sample, "sigmas": s}
