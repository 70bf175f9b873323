"""Flow-matching training of the ContentV MM-DiT, sharded over a device mesh.

    python -m contentv_jax.train                       # tiny preset, built-in synthetic set, this CPU
    python -m contentv_jax.train --config small/joint --mesh data=2,fsdp=-1 --steps 1000 \
        --checkpoint-dir ckpt/ --metrics-file runs/small/metrics.jsonl
    python -m contentv_jax.train --config contentv-8b/video_lowres --init-from sd35-large-converted/ ...

Pieces (each usable alone): `build_model`, `create_train_state` (eval_shape -> shardings ->
jit(init, out_shardings)), `make_train_step` (a pure function (state, batch) -> (state, metrics)),
`StepCache` (one compiled step per bucket shape, with explicit in/out shardings and donation), `train`
(the loop: checkpoints, resume, SIGTERM, non-finite skips, metrics, evaluation samples and the validation loss of
contentv_jax.validation), `main` (the CLI).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contentv_common.cli import (add_debug_flag, comma_list, nonneg_float, nonneg_int, output_dir, output_file,
                                 positive_int, probability, run_cli)
from contentv_common.config import ModelPreset, get_preset
from contentv_common.dataset import ON_CORRUPT
from contentv_common.weights import DTYPES
from contentv_jax import configs as configs_lib
from contentv_jax import lora as lora_lib
from contentv_jax import sharding as shd
from contentv_jax.attention import ATTENTION_IMPLS
from contentv_jax.checkpoint import Checkpointer, resume_flag
from contentv_jax.data import BATCH_KEYS, BATCH_NDIMS, BatchSource, make_source
from contentv_jax.flow import drop_captions, flow_matching_loss
from contentv_jax.metrics import MetricsWriter, peak_flops, train_step_flops
from contentv_jax.optim import apply_update, lr_schedule, make_optimizer
from contentv_jax.run import (  # noqa: F401  (NonFiniteError, abstract_with_shardings, load_init_params, init_params_from: re-exported)
    Loop,
    NonFiniteError,
    StepCache,
    ThroughputWindow,
    compiler_options,
    config_and_mesh,
    abstract_with_shardings,
    init_params_from,
    load_init_params,
    resume_or_init,
    resume_step,
)
from contentv_jax.sampler import EvalSampler
from contentv_jax.validation import Validator, validation_set

PROG = "python -m contentv_jax.train"
COMPUTE_DTYPES = ("float32", "bfloat16")  # of contentv_common.weights.DTYPES; float16 would need loss scaling


@flax.struct.dataclass
class TrainState:
    """All loop state that changes per step (the data position is the batch source's `state()`).

    step: [] int32 completed steps; params / ema_params: fp32 master weights; opt_state: optax state;
    rng: the run's base key (the step key is fold_in(rng, step)); nonfinite: [] int32 consecutive
    skipped updates; skipped: [] int32 total skipped updates.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any
    rng: jax.Array
    nonfinite: jax.Array
    skipped: jax.Array


def build_model(config, preset: ModelPreset):
    """The linen ContentVTransformer of `preset` (`config.model`'s) with the config's compute dtype (fp32 params),
    remat and attention impl."""
    from contentv_jax.transformer import ContentVTransformer

    if config.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"config.dtype {config.dtype!r} unknown; choose one of {sorted(COMPUTE_DTYPES)}")
    return ContentVTransformer(
        preset.transformer, dtype=DTYPES[config.dtype], param_dtype=jnp.float32,
        remat_policy=config.remat_policy, attention_impl=config.attention_impl, lora=lora_lib.spec_from_config(config),
    )


def _dummy_inputs(preset: ModelPreset, batch: int = 1):
    """Smallest valid model inputs (one 2x2-patch latent frame): for init / eval_shape only."""
    cfg, t = preset.transformer, preset.text
    p = cfg.patch_size
    return (jnp.zeros((batch, 1, p, p, cfg.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, t.context_tokens, cfg.joint_attention_dim)), jnp.zeros((batch, cfg.pooled_projection_dim)))


def train_state_init(model, tx, preset: ModelPreset, collection: str = "params") -> Callable:
    """rng -> a fresh TrainState whose leaves are boxed with their logical axis names (eval_shape it for the
    abstract state and its shardings; unbox it under jit for the real one). collection: the variables trained
    ("lora" for a LoRA model: the state holds only the adapter; the base params are an input of the step)."""

    def init_boxed(rng):
        params = model.init(jax.random.fold_in(rng, 0), *_dummy_inputs(preset))[collection]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params), rng=rng,
            nonfinite=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
        )

    return init_boxed


def create_train_state(model, tx, preset: ModelPreset, mesh, seed: int, rules=shd.DEFAULT_RULES,
                       compiler_options: dict | None = None, collection: str = "params"):
    """(state, state_shardings): parameters are created already sharded, never whole on one host.

    1. eval_shape the boxed init (logical axis names on every parameter, optimizer moment and EMA leaf);
    2. map the names through `rules` to NamedShardings on `mesh` (unnamed leaves replicated; a RuntimeWarning
       lists every parameter over 1M elements that ends up replicated on a multi-device mesh);
    3. jit(init, out_shardings=those) so each device only ever holds its shards.
    """

    init_boxed = train_state_init(model, tx, preset, collection)
    # Init runs outside the rules context: only its output shardings matter, and flax's boxed-param
    # constraints reject repeated logical names (conv kernels) that logical_shardings handles.
    rng = jax.random.PRNGKey(seed)
    abstract = jax.eval_shape(init_boxed, rng)
    shardings = shd.logical_shardings(abstract, mesh, rules)
    shd.warn_replicated(abstract.params, shardings.params, "parameter")  # large arrays no mesh axis divides
    init = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings)
    state = init.lower(rng).compile(compiler_options)(rng)
    return state, shardings


def apply_fn_of(model, base=None) -> Callable:
    """(params, x [B,T,h,w,C], t [B], context [B,L,J], pooled [B,P]) -> velocity: the model call the train step and
    the validation loss share. base: a LoRA run's frozen base params (params is then the adapter)."""

    def apply_fn(params, x, t, c, p):
        return model.apply(lora_lib.variables(params, base), x, t, c, p)

    return apply_fn


def make_train_step(model, tx, config, patch_size: int, null_text: tuple | None = None) -> Callable:
    """The pure train step: (state, batch[, base]) -> (state, metrics).

    batch: latents [B, T, h, w, C], context [B, L, J], pooled [B, P] (one bucket shape).
    null_text: the empty prompt's (context [L, J], pooled [P]); with `flow.caption_dropout` p > 0 each sample's
    text is replaced by it with probability p, drawn from the step key (fold_in(rng, step)): exactly resumable.
    Gradients are averaged over `optim.grad_accum` strided micro-batches (rows i*k + j form micro-batch
    j, so each stays spread over the batch shards). A non-finite loss or gradient skips the update
    (params, optimizer state and EMA keep their values) and is counted. metrics (flat, fp32 scalars):
    loss, grad_norm, param_norm, update_norm, lr, skipped (this step), nonfinite (consecutive).
    base: a LoRA run's frozen base params (state.params is then the adapter, the only thing differentiated).
    """
    k = int(config.optim.grad_accum)
    schedule = lr_schedule(config.optim, config.steps)
    p_drop = float(config.flow.get("caption_dropout", 0.0))
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"flow.caption_dropout={p_drop}: expected a probability in [0, 1]")
    if p_drop > 0 and null_text is None:
        raise ValueError(f"flow.caption_dropout={p_drop} needs the empty prompt's embeddings (null_text)")
    null_context, null_pooled = (np.asarray(x, np.float32) for x in null_text) if p_drop > 0 else (None, None)

    def loss_fn(params, micro, rng, base):
        apply_fn = apply_fn_of(model, base)
        return flow_matching_loss(apply_fn, params, micro, rng, config.flow, patch_size)[0]

    def step_fn(state: TrainState, batch: dict, base=None):
        rng = jax.random.fold_in(state.rng, state.step)
        b = batch["latents"].shape[0]
        if b % k:
            raise ValueError(f"batch {b} does not divide into optim.grad_accum={k} micro-batches")
        # Its own key (the micro-batches use fold_in(rng, j) for j < k); p = 0 draws nothing.
        batch = drop_captions(batch, jax.random.fold_in(rng, 1 << 30), p_drop, null_context, null_pooled)

        def micro(j):  # [B, ...] -> rows j, j+k, ... : [B/k, ...]
            return {n: shd.constrain(x.reshape(b // k, k, *x.shape[1:])[:, j], ("batch",) + (None,) * (x.ndim - 1))
                    for n, x in batch.items()}

        def grad_of(micro_batch, j):
            return jax.value_and_grad(loss_fn)(state.params, micro_batch, jax.random.fold_in(rng, j), base)

        if k == 1:
            loss, grads = grad_of(batch, 0)
        else:
            def accumulate(carry, j):
                return jax.tree.map(jnp.add, carry, grad_of(micro(j), j)), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            loss, grads = jax.lax.scan(accumulate, zeros, jnp.arange(k))[0]
            loss, grads = loss / k, jax.tree.map(lambda g: g / k, grads)
        return apply_update(state, grads, loss, tx, config.optim.ema_decay, schedule)

    return step_fn


def place_batch(batch: dict, mesh, rules=shd.DEFAULT_RULES) -> dict:
    """Process-local numpy rows (this process's `shd.batch_slot` of the global batch) -> global jax.Arrays sharded
    over the batch axes (multi-host safe)."""
    missing = [n for n in BATCH_KEYS if n not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a batch holds {BATCH_KEYS}")
    div = shd.batch_divisor(mesh, rules)
    slots = shd.batch_slot(mesh, rules)[1]
    out = {}
    for n, ndim in BATCH_NDIMS.items():
        x = np.asarray(batch[n], np.float32)
        if x.ndim != ndim:
            raise ValueError(f"batch[{n!r}] has shape {x.shape}; expected {ndim} dims (see contentv_jax.data)")
        global_b = x.shape[0] * slots
        if global_b % div:
            raise ValueError(f"global batch {global_b} ({n} {x.shape}) does not divide over the {div} batch shards of the mesh")
        out[n] = shd.place_rows(x, mesh, rules)
    return out


def _evaluator(config, model, preset, source: BatchSource, out_dir: Path, log) -> EvalSampler | None:
    """The evaluation sampler of `config.eval` (None when off, eval.num_prompts = 0 or the source has no prompts).
    Every process samples (the params are sharded over all of them); only process 0 writes."""
    if config.eval.every <= 0 or config.eval.num_prompts <= 0:
        return None
    prompts = source.eval_prompts(config.eval.num_prompts)
    if prompts is None:
        log("eval: the batch source has no evaluation prompts; no evaluation samples")
        return None
    return EvalSampler(model, preset, config.eval, prompts, out_dir / "samples", config.seed)


def _null_text(config, source: BatchSource, log) -> tuple | None:
    """The empty prompt's embeddings when `flow.caption_dropout` > 0 (the source must have them)."""
    p = config.flow.get("caption_dropout", 0.0)
    if p <= 0:
        return None
    null_text = source.null_text()
    if null_text is None:
        raise ValueError(f"flow.caption_dropout={p}: the batch source {type(source).__name__} has no empty-prompt "
                         f"embeddings (null_text)")
    log(f"caption dropout {p}: those samples train on the empty prompt's embeddings")
    return null_text


def _log_line(step: int, m: dict) -> str:
    return (f"step {step:>6} loss {m['loss']:.4f} grad {m['grad_norm']:.3f} lr {m['lr']:.2e}"
            + ThroughputWindow.describe(m)
            + (f" | skipped {int(m['nonfinite'])} in a row" if m["nonfinite"] else "")
            + (f" | {m['data_corrupt_records']} corrupt records replaced" if m.get("data_corrupt_records") else ""))


def train(config, *, mesh_spec: str | None = None, checkpoint_dir: str | None = None, resume: str = "auto",
          metrics_file: str | None = None, tb_dir: str | None = None, source: BatchSource | None = None,
          log: Callable[[str], None] = print, compiler_options: dict | None = None, mesh=None,
          base_params=None) -> dict:
    """Run `config.steps` steps; returns {"state", "history" (metrics per logged step), "val_history" (metrics per
    validation), "compiles", "stopped"}.

    mesh: a ready `Mesh` (else built from mesh_spec or config.mesh over all devices); source: a batch
    source (else `make_source(config)`); compiler_options: XLA options for every compile.
    LoRA (config.lora.rank > 0): the state holds the adapter only; the frozen base comes from config.init_from on
    every start, resume included (or `base_params`, a params tree), and is an input of each step.
    The run skeleton (resume, SIGTERM, non-finite guard, checkpoints, throughput) is `contentv_jax.run`'s.
    """
    preset = get_preset(config.model)
    rules = shd.rules_from_config(config)
    ckpt = Checkpointer(checkpoint_dir, config.keep_checkpoints, config.checkpoint_every) if checkpoint_dir else None
    start = resume_step(resume, ckpt)  # a bad --resume fails before any work
    mesh = mesh or shd.create_mesh(mesh_spec if mesh_spec is not None else config.mesh)
    val_set = validation_set(config, preset, mesh, rules, *shd.batch_slot(mesh, rules))  # checked before any work
    model = build_model(config, preset)
    tx = make_optimizer(config.optim, config.steps)
    base = None if model.lora is None else lora_lib.load_base(  # (checks the targets first)
        config, model, preset, mesh, rules, ckpt=ckpt, base_params=base_params, log=log)
    state, state_shardings = create_train_state(model, tx, preset, mesh, config.seed, rules, compiler_options,
                                                collection="params" if model.lora is None else "lora")
    source = source or make_source(config, preset, *shd.batch_slot(mesh, rules))
    unreadable = source.corruption_counts().get("data_unreadable_records", 0)
    if unreadable:  # data.on_corrupt="skip" (with "error" the source raised, naming the shard)
        log(f"data: SKIPPING {unreadable} records of unreadable shards {source.unreadable_shards()} (data.on_corrupt=skip)")
    writer = MetricsWriter(metrics_file, tb_dir or (Path(metrics_file).parent / "tb" if metrics_file else None),
                           enabled=jax.process_index() == 0)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log(f"model {config.model} ({n_params:,} {'adapter ' if base is not None else ''}params) stage "
        f"{config.stage or '-'} mesh {dict(mesh.shape)} buckets {list(config.data.buckets)} steps {config.steps}")
    state = resume_or_init(state, state_shardings, step=start, ckpt=ckpt,
                           init_from=config.init_from if base is None else None,  # LoRA: the base is not the state
                           restore_data=source.restore, writer=writer, log=log)
    if base is not None and start is None and config.lora.init:
        state = lora_lib.init_adapter(config.lora.init, state, state_shardings, model.lora, preset.transformer.num_layers)
        log(f"initialised the LoRA adapter from {config.lora.init}")
    eval_model = model if base is None else model.clone(lora=None)  # LoRA: samples with the merged params
    evaluator = _evaluator(config, eval_model, preset, source, Path(metrics_file).parent if metrics_file
                           else Path(checkpoint_dir or "."), log)
    # (LoRA: the validation loss of the base + adapter variables, both read with their own shardings)
    validator = None if val_set is None else Validator(
        val_set, apply_fn_of(model) if base is None else model.apply, state_shardings.params if base is None
        else lora_lib.variables(state_shardings.params, jax.tree.map(lambda x: x.sharding, base)), mesh, rules,
        config, compiler_options)
    steps_cache = StepCache(make_train_step(model, tx, config, preset.transformer.patch_size, _null_text(config, source, log)),
                            state_shardings, mesh, rules, compiler_options)
    transformer, text_tokens = preset.transformer, preset.text.context_tokens

    def work(args):  # (video tokens, model FLOPs) of one step on a batch
        b, *latent_shape = args[0]["latents"].shape
        return b * transformer.video_tokens(latent_shape), train_step_flops(transformer, latent_shape, text_tokens, b)

    merge = jax.jit(lambda b, a: lora_lib.merge_params(b, a, model.lora.scale)) if base is not None else None

    def validate(step, state):  # the raw params, as the training loss (contentv_jax.validation says why)
        metrics = validator(state.params if base is None else lora_lib.variables(state.params, base), step)
        writer.write(step, metrics)
        log(validator.describe(step, metrics))

    def evaluate(step, state):
        if validator is not None:
            validate(step, state)
        if evaluator is not None:
            params = state.ema_params if base is None else merge(base, state.ema_params)
            paths = evaluator(params, step, write=jax.process_index() == 0)
            if paths:
                log(f"eval: wrote {len(paths)} samples to {paths[0].parent}")

    loop = Loop(
        steps_cache, config.steps,
        next_args=lambda step: (place_batch(source.next(), mesh, rules),) + ((base,) if base is not None else ()),
        data_state=source.state, log_line=_log_line, writer=writer, log=log, log_every=config.log_every,
        checkpoint_every=config.checkpoint_every, max_nonfinite=config.max_nonfinite, ckpt=ckpt, work=work,
        peak_flops=peak_flops(jax.devices()[0].device_kind, config.peak_tflops_per_device) * jax.device_count(),
        extra_metrics=source.corruption_counts, evaluate=evaluate if evaluator or validator else None,
        eval_due=lambda step: step % config.eval.every == 0 or step == config.steps,
        describe_args=lambda args: f"bucket {tuple(args[0]['latents'].shape)}")
    try:
        if validator is not None and int(jax.device_get(state.step)) == 0:  # the starting point (base model for LoRA)
            validate(0, state)
        state, history, stopped = loop.run(state)
    finally:
        if ckpt is not None:
            ckpt.close()
        writer.close()
    return {"state": state, "history": history, "val_history": validator.history if validator else [],
            "compiles": steps_cache.compiles, "stopped": stopped}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Flow-matching training of the ContentV MM-DiT on a device mesh. With no arguments: the tiny "
                    "preset on the built-in synthetic captioned set, on this machine's devices.",
    )
    p.add_argument("--config", default="tiny", help="<model>[/<stage>]: model in tiny|small|contentv-8b, stage in "
                   f"{'|'.join(configs_lib.STAGES)} (default: tiny = tiny/{configs_lib.STAGES[0]})")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--data", default=None, help="batch source: 'synthetic' (built in) or a dataset path (default: the config's)")
    p.add_argument("--steps", type=positive_int, default=None, help="total training steps (default: the config's)")
    p.add_argument("--mesh", default=None, help="mesh axes sizes, e.g. data=2,fsdp=2,tensor=2 or fsdp=-1 "
                   "(-1 = the remaining devices; axes data,fsdp,tensor,context; default: the config's, fsdp=-1)")
    p.add_argument("--checkpoint-dir", type=output_dir, default=None, help="orbax checkpoint directory (async, keep-N, on an interval, on SIGTERM)")
    p.add_argument("--resume", type=resume_flag, default="auto", help="auto (default: latest checkpoint in --checkpoint-dir if any), no, or a step")
    p.add_argument("--metrics-file", type=output_file, default=None, help="JSONL metrics, one record per logged step (step, loss, norms, "
                   "steps/s, tokens/s, mfu); TensorBoard logs go to <its dir>/tb")
    p.add_argument("--tb-dir", type=output_dir, default=None, help="TensorBoard log dir (default: next to --metrics-file)")
    p.add_argument("--val-data", default=None, help="validation dataset folder (the --data format): its flow-matching "
                   "loss at fixed sigmas and noise every --eval-every steps, written as val_loss and "
                   "val_loss/sigma_<s> (same as --set data.val_data=DIR)")
    p.add_argument("--val-fraction", type=probability, default=None, help="instead of --val-data: hold out this "
                   "fraction of the --data records (by a hash of each record's source; they never train) for the "
                   "validation loss (data.val_fraction)")
    p.add_argument("--eval-every", type=nonneg_int, default=None, help="validation loss and evaluation samples "
                   "every N steps, at step 0 (validation) and at the last step; 0 = none (eval.every)")
    p.add_argument("--init-from", default=None, help="initial params (ignored when resuming): an earlier stage's "
                   "--checkpoint-dir, or any transformer format `python -m convert` reads: a ContentV / SD3.5 model "
                   "folder or its transformer/ folder, our JAX-format folder, sd3.5_large.safetensors")
    p.add_argument("--lora-rank", type=nonneg_int, default=None, help="LoRA: train rank-R adapters on the frozen "
                   "--init-from base (0 = full fine-tuning, the default; config lora.rank)")
    p.add_argument("--lora-alpha", type=nonneg_float, default=None, help="LoRA: the update is scaled by alpha / rank "
                   "(default: alpha = rank)")
    p.add_argument("--lora-targets", type=comma_list, default=None, metavar="PATTERN,...",
                   help="LoRA: Dense layers to adapt, by module-path pattern, ours (attn/to_q, ff/proj_in) or "
                   "diffusers' (attn.to_q, ff.net.0.proj); fnmatch wildcards (default: attention q/k/v/out of both "
                   "streams and both feed-forwards)")
    p.add_argument("--lora-init", default=None, metavar="FILE", help="LoRA: start the adapter from a diffusers / "
                   "PEFT LoRA .safetensors (python -m convert --to peft, or a diffusers-trained one; ignored when "
                   "resuming); its rank, alpha and modules must match --lora-rank/--lora-alpha/--lora-targets")
    p.add_argument("--lora-base-dtype", choices=sorted(DTYPES), default=None, help="LoRA: dtype the frozen base is "
                   "held in (default: bfloat16 for contentv-8b, float32 otherwise)")
    p.add_argument("--on-corrupt", choices=ON_CORRUPT, default=None, help="a corrupt / unreadable dataset "
                   "shard or record: error (stop, naming it) or skip (log it, count it in the metrics); default: "
                   "the config's data.on_corrupt, error")
    p.add_argument("--log-every", type=positive_int, default=None, help="log (and write metrics) every N steps")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, help="checkpoint every N steps")
    p.add_argument("--seed", type=nonneg_int, default=None, help="run seed (init, noise, data order)")
    p.add_argument("--attention", default=None, choices=sorted(ATTENTION_IMPLS), help="attention backend (same as "
                   "--set attention_impl=NAME; ring / ulysses split the sequence over the mesh's context axis; "
                   "default: the config's)")
    p.add_argument("--fast-compile", action="store_true", help="XLA backend optimisation level 0: faster compiles, "
                   "slower steps (tests, quick CPU checks)")
    p.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="multi-host: host:port of process 0 (env JAX_COORDINATOR_ADDRESS); enables jax.distributed")
    p.add_argument("--num-processes", type=positive_int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=nonneg_int, default=None, help="multi-host: this process's index")
    add_debug_flag(p)
    return p


def config_from_args(args) -> Any:
    config = configs_lib.get_config(args.config)
    configs_lib.apply_overrides(config, args.set)
    return configs_lib.apply_flags(config, args, (
        ("data", "data.name"), ("val_data", "data.val_data"), ("val_fraction", "data.val_fraction"),
        ("eval_every", "eval.every"), ("on_corrupt", "data.on_corrupt"), ("steps", "steps"), ("init_from", "init_from"),
        ("log_every", "log_every"), ("checkpoint_every", "checkpoint_every"), ("seed", "seed"), ("attention", "attention_impl"),
        ("lora_rank", "lora.rank"), ("lora_alpha", "lora.alpha"), ("lora_targets", "lora.targets"),
        ("lora_base_dtype", "lora.base_dtype"), ("lora_init", "lora.init")))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.coordinator_address or args.num_processes:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    config, mesh = config_and_mesh(args, config_from_args)
    out = train(config, mesh=mesh, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                metrics_file=args.metrics_file, tb_dir=args.tb_dir, compiler_options=compiler_options(args.fast_compile))
    h = out["history"]
    if h:
        print(f"done ({out['stopped']}): loss {h[0]['loss']:.4f} at step {h[0]['step']} -> {h[-1]['loss']:.4f} at step "
              f"{h[-1]['step']}; {out['compiles']} compiled step(s)")
    v = out["val_history"]
    if v:
        print(f"val_loss {v[0]['val_loss']:.4f} at step {v[0]['step']} -> {v[-1]['val_loss']:.4f} at step {v[-1]['step']}")
    return 0


def cli(argv=None) -> int:
    """The command line: `main` behind the shared error boundary (bad data, checkpoints and --init-from
    folders raise ValueError naming them)."""
    return run_cli(PROG, main, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(cli())
