"""Flow-matching Euler sampling with classifier-free guidance in JAX, and the trainer's evaluation samples.

Same math as the torch `contentv_torch.pipeline.denoise`: sigmas from
`contentv_common.schedule.flow_match_sigmas(steps, shift, grid)` ([steps + 1], 1 -> 0; grid "contentv" by default), the model fed
t = 1000 s, with guidance g > 1 one batch of [uncond; cond], v = v_u + g (v_c - v_u), x += (s_next - s) v,
all in float32 whatever the DiT's compute dtype. One `lax.scan` over the steps: one compile per shape.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contentv_common.config import ModelPreset
from contentv_common.formats.vae_keys import vae_params_from_folder
from contentv_common.latents import denormalize_latents
from contentv_common.schedule import NUM_TRAIN_TIMESTEPS, flow_match_sigmas
from contentv_common.step_cache import CachePolicy, skip_rule


def euler_sample(apply_fn: Callable, params, noise: jax.Array, context: jax.Array, pooled: jax.Array,
                 neg_context: jax.Array | None, neg_pooled: jax.Array | None, sigmas: jax.Array,
                 guidance: float, cache: CachePolicy | None = None):
    """Denoise `noise` from sigmas[0] to sigmas[-1].

    apply_fn(params, x [N,T,h,w,C], t [N] in [0, 1000], context [N,L,J], pooled [N,P]) -> v [N,T,h,w,C];
    noise [B,T,h,w,C]; context [B,L,J], pooled [B,P]; neg_*: same shapes (needed when guidance > 1);
    sigmas [steps + 1]; guidance: static Python float. Returns latents [B,T,h,w,C] float32 (normalised space).
    cache: an active step-cache policy (`contentv_common.step_cache`, static) -> returns (latents, branch passes
    through the blocks); apply_fn then also takes `residual=` and `mode=` (the DiT's step-cache modes).
    """
    cfg = guidance > 1.0
    if cfg and (neg_context is None or neg_pooled is None):
        raise ValueError(f"guidance {guidance} > 1 needs negative prompt embeddings")
    b = noise.shape[0]
    if context.shape[0] != b or pooled.shape[0] != b:
        raise ValueError(f"noise batch {b} != context batch {context.shape[0]} / pooled {pooled.shape[0]}")
    if cache is not None and cache.active:
        return _cached_euler(apply_fn, params, noise, context, pooled, neg_context, neg_pooled, sigmas, guidance, cache)
    ctx = jnp.concatenate([neg_context, context]) if cfg else context
    pool = jnp.concatenate([neg_pooled, pooled]) if cfg else pooled
    sigmas = jnp.asarray(sigmas, jnp.float32)

    def step(x, s_pair):
        s, s_next = s_pair
        x_in = jnp.concatenate([x, x]) if cfg else x
        t = jnp.full((x_in.shape[0],), s * NUM_TRAIN_TIMESTEPS, jnp.float32)
        v = apply_fn(params, x_in, t, ctx, pool).astype(jnp.float32)
        if cfg:
            v_u, v_c = jnp.split(v, 2)
            v = v_u + guidance * (v_c - v_u)
        return x + (s_next - s) * v, None

    x, _ = jax.lax.scan(step, noise.astype(jnp.float32), (sigmas[:-1], sigmas[1:]))
    return x


def _cached_euler(apply_fn, params, noise, context, pooled, neg_context, neg_pooled, sigmas, guidance,
                  policy: CachePolicy):
    """euler_sample with a step cache: each branch (uncond, cond) runs alone and keeps its own rule state, probe
    and residual; `lax.cond` runs the blocks only where `skip_rule` (the torch pipeline's rule) says compute."""
    if policy.name == "fbcache":
        raise ValueError("--cache fbcache: the JAX sampler runs its scanned blocks as one; use teacache or magcache")
    sigmas = jnp.asarray(sigmas, jnp.float32)
    n = sigmas.shape[0] - 1
    names = ("uncond", "cond") if guidance > 1.0 else ("cond",)
    conds = {"uncond": (neg_context, neg_pooled), "cond": (context, pooled)}
    x0 = noise.astype(jnp.float32)
    t0 = jnp.zeros((b := x0.shape[0],), jnp.float32)
    res_shape = jax.eval_shape(lambda: apply_fn(params, x0, t0, context, pooled, mode="compute")[1])
    zeros = jnp.zeros(res_shape.shape, res_shape.dtype)
    init = {k: ((jnp.float32(0), jnp.float32(1), jnp.int32(0)), zeros, zeros) for k in names}
    forced = jnp.asarray([policy.forced(i, n) for i in range(n)])
    ratios = {k: jnp.asarray([policy.ratio(k, i, n) if policy.name == "magcache" else 1.0 for i in range(n)],
                             jnp.float32) for k in names}

    def step(carry, xs):
        x, branch, evals = carry
        i, s, s_next = xs
        t = jnp.full((b,), s * NUM_TRAIN_TIMESTEPS, jnp.float32)
        vs, new = [], {}
        for k in names:
            ctx, pool = conds[k]
            rule, prev, residual = branch[k]
            if policy.name == "teacache":
                probe = apply_fn(params, x, t, ctx, pool, mode="probe")
                signal = jnp.sum(jnp.abs(probe - prev)) / jnp.maximum(jnp.sum(jnp.abs(prev)), 1e-30)
                prev = probe
            else:
                signal = ratios[k][i]
            compute, rule = skip_rule(policy, rule, signal, forced[i], xp=jnp)
            v, residual = jax.lax.cond(
                compute, lambda: apply_fn(params, x, t, ctx, pool, mode="compute"),
                lambda: (apply_fn(params, x, t, ctx, pool, residual=residual, mode="reuse"), residual))
            vs.append(v.astype(jnp.float32))
            new[k] = ((rule[0].astype(jnp.float32), rule[1].astype(jnp.float32), rule[2].astype(jnp.int32)),
                      prev, residual)
            evals = evals + compute.astype(jnp.int32)
        v = vs[0] + guidance * (vs[1] - vs[0]) if len(vs) == 2 else vs[0]
        return (x + (s_next - s) * v, new, evals), None

    (x, _, evals), _ = jax.lax.scan(step, (x0, init, jnp.int32(0)), (jnp.arange(n), sigmas[:-1], sigmas[1:]))
    return x, evals


def make_sampler(model, guidance: float, cache: CachePolicy | None = None) -> Callable:
    """jit(params, noise, context, pooled, neg_context, neg_pooled, sigmas) -> latents for a linen DiT
    (with an active step-cache policy: (latents, branch passes through the blocks))."""

    def apply_fn(params, x, t, c, p, **kw):
        return model.apply({"params": params}, x, t, c, p, **kw)

    return jax.jit(lambda params, noise, c, p, nc, npool, sigmas: euler_sample(apply_fn, params, noise, c, p, nc, npool, sigmas, guidance, cache))


def to_uint8(video: jax.Array) -> np.ndarray:
    """VAE output [B, F, H, W, 3] in [-1, 1] -> uint8 [B, F, H, W, 3]."""
    v = (np.asarray(jax.device_get(video), np.float32) + 1.0) * 127.5
    return np.clip(np.round(v), 0, 255).astype(np.uint8)


class EvalSampler:
    """Every K steps: a few fixed prompts sampled with the EMA params, decoded by the JAX Wan VAE, written as
    `<out_dir>/step_<n>/<i>.mp4`. `eval_cfg` is the `eval` section of a train config.

    prompts: {"names": [n], "context": [n,L,J], "pooled": [n,P], "neg_context": [n,L,J], "neg_pooled": [n,P]}
    (numpy). The VAE comes from `eval_cfg.vae` (a converted Wan VAE folder) or, if empty, is a random
    init of the preset's VAE (checks the plumbing; the videos are then noise-coloured).
    """

    def __init__(self, model, preset: ModelPreset, eval_cfg, prompts: dict, out_dir: str | Path, seed: int = 0):
        from contentv_jax.vae import WanVAE, init_params

        self.cfg, self.preset, self.prompts, self.out_dir = eval_cfg, preset, prompts, Path(out_dir)
        self.sample = make_sampler(model, float(eval_cfg.guidance))
        self.sigmas = jnp.asarray(flow_match_sigmas(int(eval_cfg.num_steps), float(eval_cfg.shift),
                                                  grid=str(eval_cfg.sigma_grid)))
        if eval_cfg.vae:
            vae_cfg, vae_params = vae_params_from_folder(eval_cfg.vae)
        else:
            vae_cfg = preset.vae
            vae_params = nn.meta.unbox(init_params(vae_cfg))["params"]
        self.vae_cfg = vae_cfg
        vae = WanVAE(vae_cfg)
        self.decode = jax.jit(lambda z: vae.apply({"params": vae_params}, denormalize_latents(z, vae_cfg, -1), method="decode"))
        n = len(prompts["names"])
        t, h, w, c = (preset.vae.latent_frames(eval_cfg.frames), eval_cfg.height // vae_cfg.spatial_factor,
                      eval_cfg.width // vae_cfg.spatial_factor, vae_cfg.z_dim)
        self.noise = jax.random.normal(jax.random.PRNGKey(seed + 7), (n, t, h, w, c), jnp.float32)  # fixed per run

    def __call__(self, params, step: int, write: bool = True) -> list[Path]:
        from contentv_common.video_io import write_mp4

        p = self.prompts
        z = self.sample(params, self.noise, p["context"], p["pooled"], p["neg_context"], p["neg_pooled"], self.sigmas)
        frames = to_uint8(self.decode(z))  # [n, F, H, W, 3]
        out = []
        if not write:
            return out
        for i, name in enumerate(p["names"]):
            out.append(write_mp4(self.out_dir / f"step_{step:07d}" / f"{i:02d}.mp4", frames[i], fps=self.cfg.fps))
        return out
