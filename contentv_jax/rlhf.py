"""Reward feedback learning (RLHF) of the ContentV MM-DiT with a differentiable image reward.

    python -m contentv_jax.rlhf --reward pickscore/ --reward-processor clip-vit-h-14/ \
        --init-from ckpt/sft/ --vae wan-vae/ --checkpoint-dir ckpt/rlhf --metrics-file runs/rlhf.jsonl
    python -m contentv_jax.rlhf --config tiny --reward tiny-clip/        # tiny preset, synthetic prompts + SFT set

Per step (ReFL, Xu et al. 2023, on ContentV's recipe): for a batch of prompts
  1. sample noise x_1 and a gradient step k uniformly from `rlhf.grad_window` (indices into the
     `rlhf.rollout_steps`-step flow-matching schedule, late steps);
  2. run the Euler sampler (CFG `rlhf.guidance`) from x_1 to x_{s_k} with stop-gradient parameters;
  3. one model call with gradients predicts x0 = x_s - s v (the same guidance), de-normalised;
  4. the Wan VAE decodes only latent frame 0 (`decode_first_frame`, remat with `rlhf.decode_remat`) to an
     image [B, H, W, 3] in [-1, 1], which the reward model scores -> r [B];
  5. loss = -lam * mean(r), plus `fm_weight` * the flow-matching loss on an SFT batch every `fm_every` steps.
The VAE and reward parameters are frozen: they are arguments of the step under `jax.lax.stop_gradient`,
never in the optimizer state or the checkpoint.

Shared with the trainer (contentv_jax.train and friends): the model builder, the sharded train state
(eval_shape -> shardings -> jit(init)), the optimizer / schedule / EMA, the flow-matching loss, the SFT
batch sources, the Checkpointer (train state + data position) and the MetricsWriter.
Metrics per logged step: loss, reward, reward_std, fm_loss (steps with the regulariser), grad_norm,
param_norm, update_norm, lr, grad_step, grad_sigma; every `rlhf.eval_every` steps the mean reward of full
`rollout_steps` samples on held-out prompts (reward_heldout) and on training prompts (reward_train_eval),
and the FM loss of a fixed SFT batch (fm_loss_eval).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contentv_common.cli import add_debug_flag, output_dir, output_file, positive_int, run_cli
from contentv_common.config import ModelPreset, get_preset
from contentv_common.dataset import read_prompt_embeddings
from contentv_common.formats.vae_keys import vae_params_from_folder
from contentv_common.latents import denormalize_latents
from contentv_common.schedule import flow_match_sigmas
from contentv_jax import configs as configs_lib
from contentv_jax import sharding as shd
from contentv_jax.checkpoint import Checkpointer, resume_flag
from contentv_jax.data import Bucket, make_source
from contentv_jax.flow import flow_matching_loss
from contentv_jax.metrics import MetricsWriter
from contentv_jax.optim import apply_update, lr_schedule, make_optimizer
from contentv_jax.reward import RewardModel
from contentv_jax.sampler import euler_sample
from contentv_jax.run import (Loop, StepCache, ThroughputWindow, compiler_options, config_and_mesh, resume_or_init,
                              resume_step)
from contentv_jax.train import TrainState, build_model, create_train_state, place_batch

PROG = "python -m contentv_jax.rlhf"
sg = jax.lax.stop_gradient


def get_config(model: str = "tiny") -> ml_collections.ConfigDict:
    """The `rlhf` stage of `model` (`contentv_jax.configs.rlhf`): `--config <model>[/rlhf]` in both CLIs."""
    return configs_lib.get_config(f"{model}/rlhf", stages=("rlhf",))


# ------------------------------------------------------------------------------------------------
# Prompts with their DiT conditioning.


@dataclass
class PromptSet:
    """prompts [N] with context [N, L, J], pooled [N, P] and the unconditional (empty prompt) embeddings
    negative_context [L, J], negative_pooled [P] for classifier-free guidance."""

    prompts: list[str]
    context: np.ndarray
    pooled: np.ndarray
    negative_context: np.ndarray
    negative_pooled: np.ndarray

    def __post_init__(self):
        n = len(self.prompts)
        if n == 0 or self.context.shape[0] != n or self.pooled.shape[0] != n:
            raise ValueError(f"PromptSet: {n} prompts, context {self.context.shape}, pooled {self.pooled.shape}")

    @classmethod
    def from_source(cls, source, n: int) -> PromptSet:
        """Up to n captions of a batch source with the trainer's `eval_prompts(n)` (the synthetic set: its
        captions, zero negatives; a dataset folder: its first readable records, its stored empty prompt)."""
        if not hasattr(source, "eval_prompts"):
            raise ValueError(f"{type(source).__name__} has no eval_prompts(n); pass --prompts FILE.safetensors")
        p = source.eval_prompts(n)
        return cls(list(p["names"]), np.asarray(p["context"]), np.asarray(p["pooled"]),
                   np.asarray(p["neg_context"][0]), np.asarray(p["neg_pooled"][0]))

    @classmethod
    def from_file(cls, path: str | Path) -> PromptSet:
        """A prompt-embeddings file written by `python -m contentv_torch.encode_prompts` (no torch needed here)."""
        d = read_prompt_embeddings(path)
        return cls(d["prompts"], d["context"], d["pooled"], d["negative_context"], d["negative_pooled"])

    def split(self, num_heldout: int) -> tuple[PromptSet, PromptSet]:
        """(train, held-out): the last `num_heldout` prompts are held out."""
        n = len(self.prompts)
        if not 0 < num_heldout < n:
            raise ValueError(f"rlhf.num_heldout={num_heldout} must be in [1, {n - 1}] for {n} prompts")
        take = lambda sl: PromptSet(self.prompts[sl], self.context[sl], self.pooled[sl],
                                    self.negative_context, self.negative_pooled)
        return take(slice(0, n - num_heldout)), take(slice(n - num_heldout, n))

    def batch(self, ids, reward: RewardModel) -> dict[str, np.ndarray]:
        """Rows `ids`: context [B, L, J], pooled [B, P], tokens [B, Lt] int32 (the reward model's)."""
        ids = np.asarray(ids)
        return {"context": self.context[ids], "pooled": self.pooled[ids],
                "tokens": reward.tokenize([self.prompts[i] for i in ids])}


# ------------------------------------------------------------------------------------------------
# The differentiable objective.


@dataclass(frozen=True)
class RLHFObjective:
    """The reward path: model + frozen VAE + reward model, the schedule and the knobs of `config.rlhf`.

    loss(params, frozen, batch, rng) -> (-lam * mean reward, aux {reward [B], grad_step [], grad_sigma []})
    sample_reward(params, frozen, batch, noise) -> reward [B] of full rollouts (no gradients).
    frozen = {"vae": VAE params, "reward": reward params}; batch = PromptSet.batch rows (+ arrays).
    """

    model: nn.Module
    vae: nn.Module
    reward: RewardModel
    preset: ModelPreset
    latent_shape: tuple[int, int, int, int]  # (T, h, w, C)
    sigmas: tuple[float, ...]
    grad_window: tuple[int, int]
    guidance: float
    lam: float
    uncond: tuple[np.ndarray, np.ndarray]

    def apply(self, params, x, t, c, p):
        return self.model.apply({"params": params}, x, t, c, p)

    def _sample(self, params, x, batch, sigmas):
        """The trainer's Euler/CFG sampler (contentv_jax.sampler.euler_sample) from sigmas[0] to sigmas[-1]."""
        neg_c = jnp.broadcast_to(jnp.asarray(self.uncond[0]), batch["context"].shape)
        neg_p = jnp.broadcast_to(jnp.asarray(self.uncond[1]), batch["pooled"].shape)
        return euler_sample(self.apply, params, x, batch["context"], batch["pooled"], neg_c, neg_p, sigmas, self.guidance)

    def decode_and_score(self, frozen, x0, tokens):
        """x0 [B, T, h, w, C] normalised latents -> reward [B] of the decoded first frame."""
        z = denormalize_latents(x0.astype(jnp.float32), self.preset.vae, channel_axis=-1)
        img = self.vae.apply({"params": sg(frozen["vae"])}, z[:, :1], method="decode_first_frame")[:, 0]  # [B, H, W, 3]
        return self.reward(sg(frozen["reward"]), img, tokens)

    def loss(self, params, frozen, batch, rng):
        sigmas = jnp.asarray(self.sigmas, jnp.float32)  # [N + 1]
        lo, hi = self.grad_window
        b = batch["context"].shape[0]
        rng_x, rng_k = jax.random.split(rng)
        noise = jax.random.normal(rng_x, (b, *self.latent_shape), jnp.float32)
        k = jax.random.randint(rng_k, (), lo, hi + 1)
        # 1. no-gradient rollout sigmas[0] -> sigmas[k]: a static hi-step schedule whose steps past k have
        #    s_next == s (x += 0 * v), so one compiled loop serves every k; params and result under stop_gradient.
        upto = jnp.where(jnp.arange(hi + 1) <= k, sigmas[: hi + 1], sigmas[k])
        xk = sg(self._sample(sg(params), noise, batch, upto))
        # 2. one step with gradients, from sigmas[k] straight to 0: x0 = x_s - s v (guided as the rollout).
        s = sigmas[k]
        x0 = self._sample(params, xk, batch, jnp.stack([s, jnp.zeros_like(s)]))
        r = self.decode_and_score(frozen, x0, batch["tokens"])
        return -self.lam * jnp.mean(r), {"reward": r, "grad_step": k, "grad_sigma": s}

    def sample_reward(self, params, frozen, batch, noise):
        """Reward [B] of full `rollout_steps` samples from `noise` [B, T, h, w, C] (no gradients needed)."""
        return self.decode_and_score(frozen, self._sample(params, noise, batch, jnp.asarray(self.sigmas, jnp.float32)), batch["tokens"])


def make_objective(config, preset: ModelPreset, model, vae, reward: RewardModel, prompts: PromptSet) -> RLHFObjective:
    """The RLHFObjective of `config.rlhf` for `model` (the trainer's, of `preset`), the VAE module and the reward
    model; the unconditional embeddings come from `prompts`."""
    r = config.rlhf
    n = int(r.rollout_steps)
    lo, hi = (int(v) for v in r.grad_window)
    if not 0 <= lo <= hi < n:
        raise ValueError(f"rlhf.grad_window {tuple(r.grad_window)} must satisfy 0 <= lo <= hi < rollout_steps={n}")
    return RLHFObjective(
        model, vae, reward, preset, Bucket(r.frames, r.height, r.width, r.batch).latent_shape(preset),
        tuple(float(s) for s in flow_match_sigmas(n, r.shift, grid=r.sigma_grid)), (lo, hi), float(r.guidance), float(r.lam),
        (prompts.negative_context, prompts.negative_pooled),
    )


def make_rlhf_step(obj: RLHFObjective, tx, config) -> Callable:
    """(state, frozen, batch, sft_batch) -> (state, metrics); sft_batch (a trainer batch) adds the flow-matching
    regulariser, None leaves it out (a different argument tree: `StepCache` compiles each variant once)."""
    r = config.rlhf
    schedule = lr_schedule(config.optim, config.steps)
    patch = obj.preset.transformer.patch_size

    def step_fn(state: TrainState, frozen, batch, sft_batch):
        rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            loss, aux = obj.loss(params, frozen, batch, jax.random.fold_in(rng, 0))
            aux = dict(aux)
            if sft_batch is not None:
                fm = flow_matching_loss(obj.apply, params, sft_batch, jax.random.fold_in(rng, 1), config.flow, patch)[0]
                loss, aux["fm_loss"] = loss + r.fm_weight * fm, fm
            return loss, aux

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state, metrics = apply_update(state, grads, loss, tx, config.optim.ema_decay, schedule)
        rew = aux.pop("reward")
        metrics.update(loss=loss, reward=jnp.mean(rew), reward_std=jnp.std(rew),
                       **{k: jnp.asarray(v, jnp.float32) for k, v in aux.items()})
        return new_state, metrics

    return step_fn


# ------------------------------------------------------------------------------------------------
# Loading the frozen parts.


def load_reward(r) -> tuple[RewardModel, dict]:
    from contentv_jax.reward import CLIPReward

    if not r.reward:
        raise ValueError("rlhf.reward: pass --reward <transformers CLIPModel folder> (e.g. PickScore_v1)")
    return CLIPReward.from_folder(r.reward, r.reward_processor or None)


def load_vae(r, preset: ModelPreset, seed: int):
    """(WanVAE module, decoder params) from rlhf.vae (a diffusers-layout Wan VAE folder), or a random stand-in
    for the preset (plumbing runs only). Only `post_quant_conv` and `decoder` are kept: RLHF never encodes."""
    from contentv_jax.vae import WanVAE, param_shapes

    if r.vae:
        cfg, params = vae_params_from_folder(r.vae)
        if cfg != preset.vae:
            raise ValueError(f"rlhf.vae {r.vae}: config {cfg} differs from the preset's {preset.vae}")
    else:
        # Random numpy weights from the abstract tree (compiling the VAE's init costs minutes on a CPU):
        # kernels ~ N(0, 1/fan_in), norm scales 1, biases 0.
        rng = np.random.default_rng(seed + 7)

        def leaf(path, x):
            name = str(getattr(path[-1], "key", path[-1]))
            if name == "kernel":
                return (rng.standard_normal(x.shape) / np.sqrt(np.prod(x.shape[:-1]))).astype(np.float32)
            return (np.ones if name == "scale" else np.zeros)(x.shape, np.float32)

        params = jax.tree_util.tree_map_with_path(leaf, param_shapes(preset.vae))
    params = {k: params[k] for k in ("post_quant_conv", "decoder")}
    return WanVAE(preset.vae, remat_decoder=bool(r.decode_remat)), params


def place(tree, mesh, rules, batch_axis: bool = True):
    """Host numpy rows -> global arrays: batch-sharded on axis 0 (this process's rows), or replicated."""

    def put(x):
        x = np.asarray(x)
        if not batch_axis:
            return jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
        return shd.place_rows(x, mesh, rules)

    return jax.tree.map(put, tree)


# ------------------------------------------------------------------------------------------------
# The loop.


class _Evaluation:
    """Every `rlhf.eval_every` steps: the mean reward of full rollouts on held-out and on training prompts (the same
    `eval_noise` fixed noises per prompt for the whole run) and the FM loss of a fixed SFT batch."""

    def __init__(self, obj: RLHFObjective, config, train_prompts: PromptSet, heldout: PromptSet, fm_batch, mesh, rules):
        r, patch = config.rlhf, obj.preset.transformer.patch_size
        self.mesh, self.rules = mesh, rules
        n = min(len(heldout.prompts), len(train_prompts.prompts))
        ids = np.tile(np.arange(n), int(r.eval_noise))
        held_b, train_b = heldout.batch(ids, obj.reward), train_prompts.batch(ids, obj.reward)
        noise = np.random.default_rng([config.seed, 5]).standard_normal((len(ids), *obj.latent_shape), np.float32)
        self.inputs = (place({k: np.concatenate([held_b[k], train_b[k]]) for k in held_b}, mesh, rules, batch_axis=False),
                       place(np.concatenate([noise, noise]), mesh, rules, batch_axis=False), fm_batch)

        @jax.jit
        def evaluate(params, frozen, rows, noise, fm_batch):  # rows: held-out then train prompts, one rollout
            rew = obj.sample_reward(params, frozen, rows, noise)
            h = rew.shape[0] // 2
            return {"reward_heldout": jnp.mean(rew[:h]), "reward_train_eval": jnp.mean(rew[h:]),
                    "fm_loss_eval": flow_matching_loss(obj.apply, params, fm_batch, jax.random.PRNGKey(1), config.flow, patch)[0]}

        self._evaluate = evaluate

    def __call__(self, params, frozen) -> dict[str, float]:
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return {k: float(v) for k, v in jax.device_get(self._evaluate(params, frozen, *self.inputs)).items()}


def rlhf(config, *, mesh_spec: str | None = None, mesh: jax.sharding.Mesh | None = None, checkpoint_dir: str | None = None,
         resume: str = "auto", metrics_file: str | None = None, reward: tuple[RewardModel, dict] | None = None,
         prompts: PromptSet | None = None, log: Callable[[str], None] = print, compiler_options: dict | None = None) -> dict:
    """Run `config.steps` RLHF steps; returns {"state", "history" (logged metrics), "evals" (eval metrics), "stopped"}.

    `reward` = (reward model, params) overrides rlhf.reward; `prompts` overrides rlhf.prompts / the SFT captions;
    `mesh` (a ready Mesh, e.g. over a subset of devices) overrides `mesh_spec` / config.mesh. The train state,
    placement, compiled steps, resume, SIGTERM, non-finite guard and checkpoints are the trainer's
    (`contentv_jax.train`, `contentv_jax.run`).
    """
    r = config.rlhf
    preset = get_preset(config.model)
    rules = shd.rules_from_config(config)
    ckpt = Checkpointer(checkpoint_dir, config.keep_checkpoints, config.checkpoint_every) if checkpoint_dir else None
    start = resume_step(resume, ckpt)  # a bad --resume fails before any work
    mesh = mesh or shd.create_mesh(mesh_spec if mesh_spec is not None else config.mesh)
    pi, pc = shd.batch_slot(mesh, rules)  # this process's share of every batch (processes may share one)
    if r.batch % shd.batch_divisor(mesh, rules) or r.batch % pc:
        raise ValueError(f"rlhf.batch {r.batch} does not divide over the {shd.batch_divisor(mesh, rules)} batch shards")
    if config.lora.rank:
        raise ValueError(f"lora.rank={config.lora.rank}: RLHF trains the full model; LoRA is the trainer's "
                         f"(python -m contentv_jax.train --lora-rank)")
    model = build_model(config, preset)
    tx = make_optimizer(config.optim, config.steps)
    state, state_shardings = create_train_state(model, tx, preset, mesh, config.seed, rules, compiler_options)
    sft_source = make_source(config, preset, pi, pc)
    reward_model, reward_params = reward if reward is not None else load_reward(r)
    if prompts is None:
        prompts = PromptSet.from_file(r.prompts) if r.prompts else PromptSet.from_source(sft_source, int(r.num_prompts))
    train_prompts, heldout = prompts.split(r.num_heldout)
    vae, vae_params = load_vae(r, preset, config.seed)
    frozen = place({"vae": vae_params, "reward": reward_params}, mesh, rules, batch_axis=False)
    obj = make_objective(config, preset, model, vae, reward_model, prompts)
    writer = MetricsWriter(metrics_file, Path(metrics_file).parent / "tb" if metrics_file else None,
                           enabled=jax.process_index() == 0)
    log(f"rlhf {config.model}: {len(train_prompts.prompts)} train / {len(heldout.prompts)} held-out prompts, "
        f"batch {r.batch} x {obj.latent_shape}, k in {list(obj.grad_window)} of {len(obj.sigmas) - 1}, lam {r.lam}, "
        f"fm every {r.fm_every}, mesh {dict(mesh.shape)}")
    # The SFT data position is the only data state (prompt draws are a function of the step).
    state = resume_or_init(state, state_shardings, step=start, ckpt=ckpt, init_from=config.init_from,
                           restore_data=lambda d: sft_source.restore(d["sft"]), writer=writer, log=log)
    evaluation = _Evaluation(obj, config, train_prompts, heldout,
                             place_batch(make_source(config, preset, pi, pc).next(), mesh, rules), mesh, rules)
    steps_cache = StepCache(make_rlhf_step(obj, tx, config), state_shardings, mesh, rules, compiler_options)
    evals = []
    rows = slice(pi * r.batch // pc, (pi + 1) * r.batch // pc)

    def next_args(step):  # (frozen, prompt rows, SFT batch or None): prompt draws are a function of (seed, step)
        ids = np.random.default_rng([config.seed, 3, step]).integers(0, len(train_prompts.prompts), r.batch)[rows]
        with_fm = bool(r.fm_every) and step % int(r.fm_every) == 0
        return (frozen, place(train_prompts.batch(ids, reward_model), mesh, rules),
                place_batch(sft_source.next(), mesh, rules) if with_fm else None)

    def evaluate(step, state):
        e = evaluation(state.params, frozen)
        evals.append({"step": step, **e})
        writer.write(step, e)
        log(f"eval step {step:>5} reward held-out {e['reward_heldout']:.4f} train {e['reward_train_eval']:.4f} "
            f"fm_loss {e['fm_loss_eval']:.4f}")

    def log_line(step, m):
        return (f"step {step:>5} loss {m['loss']:.4f} reward {m['reward']:.4f} k {int(m['grad_step'])}"
                + (f" fm {m['fm_loss']:.4f}" if "fm_loss" in m else "") + f" grad {m['grad_norm']:.3f}"
                + ThroughputWindow.describe(m) + (f" | skipped {int(m['nonfinite'])} in a row" if m["nonfinite"] else ""))

    video_tokens = r.batch * preset.transformer.video_tokens(obj.latent_shape)
    loop = Loop(
        steps_cache, config.steps, next_args=next_args, data_state=lambda: {"kind": "rlhf", "sft": sft_source.state()},
        log_line=log_line, writer=writer, log=log, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        max_nonfinite=config.max_nonfinite, ckpt=ckpt, work=lambda args: (video_tokens, 0.0),
        evaluate=evaluate if r.eval_every else None,
        eval_due=lambda step: step % r.eval_every == 0 or step == config.steps,
        describe_args=lambda args: "the RLHF step" + (" with the FM regulariser" if args[2] is not None else ""))
    try:
        if r.eval_every and int(jax.device_get(state.step)) == 0:
            evaluate(0, state)
        state, history, stopped = loop.run(state)
    finally:
        if ckpt is not None:
            ckpt.close()
        writer.close()
    return {"state": state, "history": history, "evals": evals, "stopped": stopped}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="tiny", help="<model>[/rlhf]: model in tiny|small|contentv-8b, the rlhf stage of "
                   "contentv_jax.configs (the same <model>[/<stage>] as python -m contentv_jax.train)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field, e.g. --set rlhf.lam=0.5")
    p.add_argument("--reward", default=None, help="transformers CLIPModel folder of the reward (e.g. PickScore_v1)")
    p.add_argument("--reward-processor", default=None, help="folder with its preprocessor_config.json + CLIPTokenizer (default: --reward)")
    p.add_argument("--vae", default=None, help="Wan VAE folder (diffusers layout); default: random VAE (plumbing only)")
    p.add_argument("--prompts", default=None, help="prompt-embeddings file written by `python -m "
                   "contentv_torch.encode_prompts` (on a torch host); default: the SFT source's captions")
    p.add_argument("--init-from", default=None, help="SFT checkpoint dir or converted transformer folder to start from")
    p.add_argument("--steps", type=positive_int, default=None)
    p.add_argument("--mesh", default=None, help="mesh, e.g. data=2,fsdp=-1")
    p.add_argument("--checkpoint-dir", type=output_dir, default=None,
                   help="orbax checkpoint directory (async, keep-N, on an interval, on SIGTERM)")
    p.add_argument("--resume", type=resume_flag, default="auto",
                   help="auto (default: latest checkpoint in --checkpoint-dir if any), no, or a step")
    p.add_argument("--metrics-file", type=output_file, default=None, help="JSONL metrics (TensorBoard next to it in tb/)")
    p.add_argument("--fast-compile", action="store_true", help="XLA backend optimisation level 0 (tests, quick CPU checks)")
    add_debug_flag(p)
    return p


def config_from_args(args) -> ml_collections.ConfigDict:
    config = configs_lib.get_config(args.config, stages=("rlhf",))
    configs_lib.apply_overrides(config, args.set)
    return configs_lib.apply_flags(config, args, (
        ("reward", "rlhf.reward"), ("reward_processor", "rlhf.reward_processor"), ("vae", "rlhf.vae"),
        ("prompts", "rlhf.prompts"), ("init_from", "init_from"), ("steps", "steps")))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    config, mesh = config_and_mesh(args, config_from_args)
    out = rlhf(config, mesh=mesh, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
               metrics_file=args.metrics_file, compiler_options=compiler_options(args.fast_compile))
    e = out["evals"]
    if e:
        print(f"done ({out['stopped']}): held-out reward {e[0]['reward_heldout']:.4f} (step {e[0]['step']}) -> "
              f"{e[-1]['reward_heldout']:.4f} (step {e[-1]['step']}); fm_loss_eval {e[0]['fm_loss_eval']:.4f} -> "
              f"{e[-1]['fm_loss_eval']:.4f}")
    return 0


def cli(argv=None) -> int:
    """The command line: `main` behind the shared error boundary (bad reward, VAE, prompt and checkpoint
    folders raise ValueError naming them)."""
    return run_cli(PROG, main, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(cli())
