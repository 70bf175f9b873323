"""Optimizer, learning-rate schedule and parameter EMA (optax).

`cfg` is the `optim` section of a train config (contentv_jax.configs): AdamW on fp32 master weights
with a linear warmup then `decay` ("cosine" | "linear" | "constant" | "rsqrt") to `lr * end_lr_ratio`
at `total_steps`, global-norm clipping, and no weight decay on biases, norm scales and other vectors.
Gradient accumulation is done by the train step (micro-batches), so one optimizer update = one step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

DECAYS = ("cosine", "linear", "constant", "rsqrt")
_NO_DECAY_NAMES = ("bias", "scale")


def lr_schedule(cfg, total_steps: int) -> optax.Schedule:
    """step -> learning rate: linear 0 -> lr over warmup_steps, then the decay to lr * end_lr_ratio."""
    warm = int(cfg.warmup_steps)
    rest = max(int(total_steps) - warm, 1)
    end = cfg.lr * cfg.end_lr_ratio
    if cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, rest, alpha=cfg.end_lr_ratio)
    elif cfg.decay == "linear":
        after = optax.linear_schedule(cfg.lr, end, rest)
    elif cfg.decay == "constant":
        after = optax.constant_schedule(cfg.lr)
    elif cfg.decay == "rsqrt":
        after = lambda n: cfg.lr * jax.lax.rsqrt(1.0 + n / max(warm, 1))  # noqa: E731
    else:
        raise ValueError(f"optim.decay {cfg.decay!r} unknown; choose one of {DECAYS}")
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), after], [warm])


def _path_names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]


def decay_mask(params):
    """True where weight decay applies: matmul / conv kernels and embeddings; False for biases, norm
    scales and anything under a module whose name contains 'norm' (works on boxed or plain trees)."""

    def keep(path, _):
        names = [n.lower() for n in _path_names(path) if n != "value"]
        return not (names and names[-1] in _NO_DECAY_NAMES or any("norm" in n for n in names))

    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm(clip_norm) -> AdamW(schedule, b1, b2, eps, weight_decay on decay_mask)."""
    parts = []
    if cfg.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.clip_norm))
    parts.append(
        optax.adamw(
            lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
            weight_decay=cfg.weight_decay, mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params (fp32 trees of the same structure); returns the new ema."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), ema, params)


def apply_update(state, grads, loss: jax.Array, tx: optax.GradientTransformation, ema_decay: float,
                 schedule: optax.Schedule):
    """One optimizer + EMA update of a train state, skipped when the loss or gradients are not finite.

    state: a `contentv_jax.train.TrainState` (step, params, opt_state, ema_params, nonfinite, skipped);
    grads: like params; loss: [] fp32. On a non-finite loss / gradient norm, params, optimizer state and EMA
    keep their values, `nonfinite` (consecutive) and `skipped` (total) count it; `step` always advances.
    Returns (new_state, metrics): flat fp32 scalars loss, grad_norm, param_norm, update_norm, lr, skipped
    (this step), nonfinite (consecutive). Used by the train step and the RLHF step (contentv_jax.rlhf).
    """
    grad_norm = tree_norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    new_ema = ema_update(state.ema_params, new_params, ema_decay)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_state = state.replace(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        ema_params=keep(new_ema, state.ema_params),
        nonfinite=jnp.where(ok, 0, state.nonfinite + 1),
        skipped=state.skipped + (~ok).astype(jnp.int32),
    )
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "param_norm": tree_norm(new_state.params),
        "update_norm": jnp.where(ok, tree_norm(updates), 0.0),
        "lr": jnp.asarray(schedule(state.step - state.skipped), jnp.float32),
        "skipped": (~ok).astype(jnp.float32),
        "nonfinite": new_state.nonfinite.astype(jnp.float32),
    }
    return new_state, metrics


def tree_norm(tree) -> jax.Array:
    """Global L2 norm of a tree, in fp32."""
    return optax.tree.norm(jax.tree.map(lambda x: x.astype(jnp.float32), tree))

