"""Flow-matching training of the ContentV MM-DiT, sharded over a device mesh.

    python -m contentv_jax.train                       # tiny preset, built-in synthetic set, this CPU
    python -m contentv_jax.train --config small/joint --mesh data=2,fsdp=-1 --steps 1000 \
        --checkpoint-dir ckpt/ --metrics-file runs/small/metrics.jsonl
    python -m contentv_jax.train --config contentv-8b/video_lowres --init-from sd35-large-converted/ ...

Pieces (each usable alone): `build_model`, `create_train_state` (eval_shape -> shardings ->
jit(init, out_shardings)), `make_train_step` (a pure function (state, batch) -> (state, metrics)),
`StepCache` (one compiled step per bucket shape, with explicit in/out shardings and donation), `train`
(the loop: checkpoints, resume, SIGTERM, non-finite skips, metrics, evaluation samples), `main` (the CLI).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contentv_common.config import ModelPreset, get_preset
from contentv_common.dataset import ON_CORRUPT
from contentv_jax import configs as configs_lib
from contentv_jax import sharding as shd
from contentv_jax.attention import ATTENTION_IMPLS
from contentv_jax.checkpoint import Checkpointer, is_checkpoint_dir
from contentv_jax.data import BATCH_KEYS, BATCH_NDIMS, BatchSource, make_source
from contentv_jax.flow import drop_captions, flow_matching_loss
from contentv_jax.metrics import MetricsWriter, peak_flops, train_step_flops
from contentv_jax.optim import apply_update, lr_schedule, make_optimizer
from contentv_jax.sampler import EvalSampler

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite losses / gradients."""


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


def build_model(config, preset: ModelPreset | None = None):
    """The linen ContentVTransformer of `config.model` (compute dtype, fp32 params, remat, attention impl)."""
    from contentv_jax.transformer import ContentVTransformer

    preset = preset or get_preset(config.model)
    if config.dtype not in DTYPES:
        raise ValueError(f"config.dtype {config.dtype!r} unknown; choose one of {sorted(DTYPES)}")
    return ContentVTransformer(
        preset.transformer, dtype=DTYPES[config.dtype], param_dtype=jnp.float32,
        remat_policy=config.remat_policy, attention_impl=config.attention_impl,
    )


def _dummy_inputs(preset: ModelPreset, batch: int = 1):
    """Smallest valid model inputs (one 2x2-patch latent frame): for init / eval_shape only."""
    cfg, t = preset.transformer, preset.text
    p = cfg.patch_size
    return (jnp.zeros((batch, 1, p, p, cfg.in_channels)), jnp.zeros((batch,)),
            jnp.zeros((batch, t.context_tokens, cfg.joint_attention_dim)), jnp.zeros((batch, cfg.pooled_projection_dim)))


def create_train_state(model, tx, preset: ModelPreset, mesh, seed: int, rules=shd.DEFAULT_RULES,
                       compiler_options: dict | None = None):
    """(state, state_shardings): parameters are created already sharded, never whole on one host.

    1. eval_shape the boxed init (logical axis names on every parameter, optimizer moment and EMA leaf);
    2. map the names through `rules` to NamedShardings on `mesh` (unnamed leaves replicated; a RuntimeWarning
       lists every parameter over 1M elements that ends up replicated on a multi-device mesh);
    3. jit(init, out_shardings=those) so each device only ever holds its shards.
    """

    def init_boxed(rng):
        params = model.init(jax.random.fold_in(rng, 0), *_dummy_inputs(preset))["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
            ema_params=jax.tree.map(jnp.copy, params), rng=rng,
            nonfinite=jnp.zeros((), jnp.int32), skipped=jnp.zeros((), jnp.int32),
        )

    # Init runs outside the rules context: only its output shardings matter, and flax's boxed-param
    # constraints reject repeated logical names (conv kernels) that logical_shardings handles.
    rng = jax.random.PRNGKey(seed)
    abstract = jax.eval_shape(init_boxed, rng)
    shardings = shd.logical_shardings(abstract, mesh, rules)
    shd.warn_replicated(abstract.params, shardings.params, "parameter")  # large arrays no mesh axis divides
    init = jax.jit(lambda r: nn.meta.unbox(init_boxed(r)), out_shardings=shardings)
    state = init.lower(rng).compile(compiler_options)(rng)
    return state, shardings


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def make_train_step(model, tx, config, patch_size: int, null_text: tuple | None = None) -> Callable:
    """The pure train step: (state, batch) -> (state, metrics).

    batch: latents [B, T, h, w, C], context [B, L, J], pooled [B, P] (one bucket shape).
    null_text: the empty prompt's (context [L, J], pooled [P]); with `flow.caption_dropout` p > 0 each sample's
    text is replaced by it with probability p, drawn from the step key (fold_in(rng, step)): exactly resumable.
    Gradients are averaged over `optim.grad_accum` strided micro-batches (rows i*k + j form micro-batch
    j, so each stays spread over the batch shards). A non-finite loss or gradient skips the update
    (params, optimizer state and EMA keep their values) and is counted. metrics (flat, fp32 scalars):
    loss, grad_norm, param_norm, update_norm, lr, skipped (this step), nonfinite (consecutive).
    """
    k = int(config.optim.grad_accum)
    schedule = lr_schedule(config.optim, config.steps)
    p_drop = float(config.flow.get("caption_dropout", 0.0))
    if not 0.0 <= p_drop <= 1.0:
        raise ValueError(f"flow.caption_dropout={p_drop}: expected a probability in [0, 1]")
    if p_drop > 0 and null_text is None:
        raise ValueError(f"flow.caption_dropout={p_drop} needs the empty prompt's embeddings (null_text)")
    null_context, null_pooled = (np.asarray(x, np.float32) for x in null_text) if p_drop > 0 else (None, None)

    def apply_fn(params, x, t, c, p):
        return model.apply({"params": params}, x, t, c, p)

    def loss_fn(params, micro, rng):
        return flow_matching_loss(apply_fn, params, micro, rng, config.flow, patch_size)[0]

    def step_fn(state: TrainState, batch: dict):
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
            return jax.value_and_grad(loss_fn)(state.params, micro_batch, jax.random.fold_in(rng, j))

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


def batch_shardings(mesh, rules=shd.DEFAULT_RULES) -> dict:
    """NamedSharding per batch array: the leading batch axis over the mesh axes of logical 'batch'."""
    return {n: shd.batch_sharding(mesh, nd, rules) for n, nd in BATCH_NDIMS.items()}


class StepCache:
    """Compiled train steps, one per batch shape (bucket): a second bucket compiles once and never
    recompiles the first. jit with explicit in/out shardings; the state argument is donated.
    compiler_options: XLA options for every compile (tests use {"xla_backend_optimization_level": 0})."""

    def __init__(self, step_fn, state_shardings, mesh, rules=shd.DEFAULT_RULES, compiler_options: dict | None = None):
        self.mesh, self.rules, self.compiler_options = mesh, rules, compiler_options
        self.state_shardings = state_shardings
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        self._jit = jax.jit(
            step_fn,
            in_shardings=(state_shardings, batch_shardings(mesh, rules)),
            out_shardings=(state_shardings, replicated),
            donate_argnums=(0,),
        )
        self.compiled: dict[tuple, Any] = {}
        self.compiles = 0

    @staticmethod
    def key(batch) -> tuple:
        return tuple((n, tuple(batch[n].shape), str(batch[n].dtype)) for n in BATCH_KEYS)

    def __call__(self, state, batch):
        key = self.key(batch)
        fn = self.compiled.get(key)
        if fn is None:
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                fn = self._jit.lower(state, batch).compile(self.compiler_options)
            self.compiled[key] = fn
            self.compiles += 1
        with jax.transfer_guard("disallow"):  # STYLE #6: no hidden host<->device copies inside the step
            return fn(state, batch)


def place_batch(batch: dict, mesh, rules=shd.DEFAULT_RULES) -> dict:
    """Process-local numpy rows -> global jax.Arrays sharded over the batch axes (multi-host safe)."""
    missing = [n for n in BATCH_KEYS if n not in batch]
    if missing:
        raise ValueError(f"batch lacks {missing}; a batch holds {BATCH_KEYS}")
    div = shd.batch_divisor(mesh, rules)
    out = {}
    for n, sharding in batch_shardings(mesh, rules).items():
        x = np.asarray(batch[n], np.float32)
        if x.ndim != BATCH_NDIMS[n]:
            raise ValueError(f"batch[{n!r}] has shape {x.shape}; expected {BATCH_NDIMS[n]} dims (see contentv_jax.data)")
        global_b = x.shape[0] * jax.process_count()
        if global_b % div:
            raise ValueError(f"global batch {global_b} ({n} {x.shape}) does not divide over the {div} batch shards of the mesh")
        out[n] = jax.make_array_from_process_local_data(sharding, x)
    return out


def load_init_params(path: str, abstract_params, shardings):
    """Params [the model's tree, float32, placed by `shardings`] from `--init-from`: an earlier stage's checkpoint
    dir of this trainer (its raw params, restored shard by shard), or any transformer format `python -m convert`
    reads (`convert.formats.iter_params`): a diffusers ContentV / SD3.5 folder (model_index.json + transformer/),
    a `transformer/` folder, our JAX-format folder, an SD3.5 original single file. Leaves stream one at a time
    onto their devices; every missing, unexpected or mis-shaped key is named before any is read."""
    if is_checkpoint_dir(path):
        ckpt = Checkpointer(path, every=1, async_save=False)
        try:
            return ckpt.restore_params(None, abstract_with_shardings(abstract_params, shardings))
        finally:
            ckpt.close()
    from tqdm.auto import tqdm

    from convert.formats import FormatError, iter_params

    src = Path(path)
    if (src / "model_index.json").is_file():  # a whole ContentV / SD3.5 model folder: its transformer
        src = src / "transformer"
    flat_want = flax.traverse_util.flatten_dict(abstract_params, sep="/")
    flat_sh = flax.traverse_util.flatten_dict(shardings, sep="/")
    placed = {}
    try:
        leaves = iter_params(src, dtype="float32", expected={k: tuple(v.shape) for k, v in flat_want.items()})
        for _, key, leaf in tqdm(leaves, total=len(flat_want), desc="--init-from", unit="tensor",
                                 disable=jax.process_index() != 0):
            placed[key] = jax.device_put(np.asarray(leaf, np.float32), flat_sh[key])
    except (FormatError, FileNotFoundError) as e:  # the messages name the path
        raise type(e)(f"--init-from: neither a checkpoint dir of this trainer nor a transformer format "
                      f"`python -m convert` reads: {e}") from None
    except ValueError as e:  # KeyMismatchError: every missing / unexpected / mis-shaped key by name
        raise ValueError(f"--init-from: {e}") from None
    return flax.traverse_util.unflatten_dict(placed, sep="/")


def init_params_from(path: str, state: TrainState, state_shardings: TrainState) -> TrainState:
    """`state` with its params and EMA params both set from `--init-from` `path` (`load_init_params`)."""
    params = load_init_params(path, state.params, state_shardings.params)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=state_shardings.params)
    return state.replace(params=params, ema_params=copy(params))


class _Sigterm:
    """Turns SIGTERM into a flag the loop polls (save, then exit)."""

    def __init__(self):
        self.received = False
        self._old = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, *_):
        self.received = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def train(config, *, mesh_spec: str | None = None, checkpoint_dir: str | None = None, resume: str = "auto",
          metrics_file: str | None = None, tb_dir: str | None = None, source: BatchSource | None = None,
          log: Callable[[str], None] = print, compiler_options: dict | None = None, mesh=None) -> dict:
    """Run `config.steps` steps; returns {"state", "history" (metrics per logged step), "compiles", "stopped"}.

    mesh: a ready `Mesh` (else built from mesh_spec or config.mesh over all devices); source: a batch
    source (else `make_source(config)`); compiler_options: XLA options for every compile.
    """
    preset = get_preset(config.model)
    rules = shd.DEFAULT_RULES
    shd.check_rules(rules)
    mesh = mesh or shd.create_mesh(mesh_spec if mesh_spec is not None else config.mesh)
    model = build_model(config, preset)
    tx = make_optimizer(config.optim, config.steps)
    state, state_shardings = create_train_state(model, tx, preset, mesh, config.seed, rules, compiler_options)
    source = source or make_source(config, preset, jax.process_index(), jax.process_count())
    unreadable = source.corruption_counts()["data_unreadable_records"] if hasattr(source, "corruption_counts") else 0
    if unreadable:  # data.on_corrupt="skip" (with "error" the source raised, naming the shard)
        log(f"data: SKIPPING {unreadable} records of unreadable shards {source.ds.bad_shards} (data.on_corrupt=skip)")
    ckpt = Checkpointer(checkpoint_dir, config.keep_checkpoints, config.checkpoint_every) if checkpoint_dir else None
    writer = MetricsWriter(metrics_file, tb_dir or (Path(metrics_file).parent / "tb" if metrics_file else None),
                           enabled=jax.process_index() == 0)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    log(f"model {config.model} ({n_params:,} params) stage {config.stage or '-'} mesh {dict(mesh.shape)} "
        f"buckets {list(config.data.buckets)} steps {config.steps}")

    # Resume order (STYLE #7): the restored pieces replace the fresh ones, each result kept (Avoid #3).
    latest = ckpt.latest_step() if ckpt else None
    if resume not in ("auto", "no") and not resume.isdigit():
        raise ValueError(f"--resume {resume!r}: expected auto, no or a step number")
    if latest is not None and resume == "no":
        raise ValueError(f"--checkpoint-dir {checkpoint_dir} already holds step {latest}; use --resume auto or an empty dir")
    if resume.isdigit() and ckpt is None:
        raise ValueError(f"--resume {resume} needs --checkpoint-dir")
    resume_step = int(resume) if resume.isdigit() else latest if resume == "auto" else None
    if resume_step is not None:
        # 1. train state (params, optimizer, EMA, step, RNG, skip counters) straight into its shardings;
        state, data_state = ckpt.restore(resume_step, abstract_with_shardings(state, state_shardings))
        # 2. the data position, so the next batch is the one the killed run would have seen;
        source.restore(data_state)
        # 3. the metrics file forgets steps after the checkpoint (they are about to be redone).
        writer.truncate_after(resume_step)
        log(f"resumed from {checkpoint_dir} step {resume_step}")
    elif config.init_from:
        state = init_params_from(config.init_from, state, state_shardings)
        log(f"initialised params from {config.init_from}")

    evaluator = None
    if config.eval.every > 0:
        out_dir = Path(metrics_file).parent if metrics_file else Path(checkpoint_dir or ".")
        if not hasattr(source, "eval_prompts"):
            log("eval: the batch source has no eval_prompts(); no evaluation samples")
        else:  # every process samples (the params are sharded over all of them); write_mp4 is process 0's
            evaluator = EvalSampler(model, preset, config.eval, source.eval_prompts(config.eval.num_prompts),
                                    out_dir / "samples", config.seed)

    null_text = None
    if config.flow.get("caption_dropout", 0.0) > 0:
        if not hasattr(source, "null_text"):
            raise ValueError(f"flow.caption_dropout={config.flow.caption_dropout}: the batch source "
                             f"{type(source).__name__} has no null_text() (the empty prompt's embeddings)")
        null_text = source.null_text()
        log(f"caption dropout {config.flow.caption_dropout}: those samples train on the empty prompt's embeddings")
    steps_cache = StepCache(make_train_step(model, tx, config, preset.transformer.patch_size, null_text),
                            state_shardings, mesh, rules, compiler_options)
    peak = peak_flops(jax.devices()[0].device_kind, config.peak_tflops_per_device) * jax.device_count()
    text_tokens = preset.text.context_tokens
    sigterm = _Sigterm()
    history, stopped = [], "done"
    step = int(jax.device_get(state.step))
    window_t, window_flops, window_tokens, window_steps = time.perf_counter(), 0.0, 0, 0
    try:
        while step < config.steps:
            batch = place_batch(source.next(), mesh, rules)
            compiles = steps_cache.compiles
            state, metrics = steps_cache(state, batch)
            step += 1
            if steps_cache.compiles != compiles:  # compile time is not step time
                jax.block_until_ready(metrics)
                log(f"compiled the step for bucket {tuple(batch['latents'].shape)} (compile #{steps_cache.compiles})")
                window_t, window_flops, window_tokens, window_steps = time.perf_counter(), 0.0, 0, 0
            else:
                b, t, h, w, _ = batch["latents"].shape
                p = preset.transformer.patch_size
                window_tokens += b * t * (h // p) * (w // p)
                window_flops += train_step_flops(preset.transformer, (t, h, w), text_tokens, b)
                window_steps += 1
            if step % config.log_every == 0 or step == config.steps or sigterm.received:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.perf_counter() - window_t
                if window_steps:
                    m.update(steps_per_s=window_steps / dt, tokens_per_s=window_tokens / dt, mfu=window_flops / dt / peak)
                if hasattr(source, "corruption_counts"):  # data.on_corrupt="skip": what was skipped so far
                    m.update(source.corruption_counts())
                history.append({"step": step, **m})
                writer.write(step, m)
                log(f"step {step:>6} loss {m['loss']:.4f} grad {m['grad_norm']:.3f} lr {m['lr']:.2e}"
                    + (f" | {m['steps_per_s']:.2f} steps/s {m['tokens_per_s']:.0f} tok/s MFU {100 * m['mfu']:.2f}%"
                       if window_steps else "")
                    + (f" | skipped {int(m['nonfinite'])} in a row" if m["nonfinite"] else "")
                    + (f" | {m['data_corrupt_records']} corrupt records replaced" if m.get("data_corrupt_records") else ""))
                window_t, window_flops, window_tokens, window_steps = time.perf_counter(), 0.0, 0, 0
                if m["nonfinite"] >= config.max_nonfinite:
                    stopped = "nonfinite"
                    if ckpt is not None:
                        ckpt.wait()
                    raise NonFiniteError(
                        f"step {step}: {int(m['nonfinite'])} consecutive non-finite losses/gradients "
                        f"(max_nonfinite={config.max_nonfinite}); stopping. The last good checkpoint is "
                        f"{checkpoint_dir} step {ckpt.latest_step() if ckpt else None}."
                    )
            if evaluator is not None and (step % config.eval.every == 0 or step == config.steps):
                paths = evaluator(state.ema_params, step, write=jax.process_index() == 0)
                if paths:
                    log(f"eval: wrote {len(paths)} samples to {paths[0].parent}")
                window_t, window_flops, window_tokens, window_steps = time.perf_counter(), 0.0, 0, 0
            force = sigterm.received or step == config.steps
            if ckpt is not None and (force or step % config.checkpoint_every == 0):
                if not int(jax.device_get(state.nonfinite)):  # never checkpoint inside a run of skipped updates
                    ckpt.save(step, state, source.state(), force=force)
            if sigterm.received:
                stopped = "sigterm"
                log(f"SIGTERM: saved step {step} to {checkpoint_dir}; exiting")
                break
    finally:
        sigterm.restore()
        if ckpt is not None:
            ckpt.close()
        writer.close()
    return {"state": state, "history": history, "compiles": steps_cache.compiles, "stopped": stopped}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m contentv_jax.train",
        description="Flow-matching training of the ContentV MM-DiT on a device mesh. With no arguments: the tiny "
                    "preset on the built-in synthetic captioned set, on this machine's devices.",
    )
    p.add_argument("--config", default="tiny", help="<model>[/<stage>]: model in tiny|small|contentv-8b, stage in "
                   f"{'|'.join(configs_lib.STAGES)} (default: tiny = tiny/{configs_lib.STAGES[0]})")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--data", default=None, help="batch source: 'synthetic' (built in) or a dataset path (default: the config's)")
    p.add_argument("--steps", type=int, default=None, help="total training steps (default: the config's)")
    p.add_argument("--mesh", default=None, help="mesh axes sizes, e.g. data=2,fsdp=2,tensor=2 or fsdp=-1 "
                   "(-1 = the remaining devices; axes data,fsdp,tensor,context; default: the config's, fsdp=-1)")
    p.add_argument("--checkpoint-dir", default=None, help="orbax checkpoint directory (async, keep-N, on an interval, on SIGTERM)")
    p.add_argument("--resume", default="auto", help="auto (default: latest checkpoint in --checkpoint-dir if any), no, or a step")
    p.add_argument("--metrics-file", default=None, help="JSONL metrics, one record per logged step (step, loss, norms, "
                   "steps/s, tokens/s, mfu); TensorBoard logs go to <its dir>/tb")
    p.add_argument("--tb-dir", default=None, help="TensorBoard log dir (default: next to --metrics-file)")
    p.add_argument("--init-from", default=None, help="initial params (ignored when resuming): an earlier stage's "
                   "--checkpoint-dir, or any transformer format `python -m convert` reads: a ContentV / SD3.5 model "
                   "folder or its transformer/ folder, our JAX-format folder, sd3.5_large.safetensors")
    p.add_argument("--on-corrupt", choices=ON_CORRUPT, default=None, help="a corrupt / unreadable dataset "
                   "shard or record: error (stop, naming it) or skip (log it, count it in the metrics); default: "
                   "the config's data.on_corrupt, error")
    p.add_argument("--log-every", type=int, default=None, help="log (and write metrics) every N steps")
    p.add_argument("--checkpoint-every", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=None, help="run seed (init, noise, data order)")
    p.add_argument("--attention", default=None, choices=sorted(ATTENTION_IMPLS), help="attention backend (same as "
                   "--set attention_impl=NAME; ring / ulysses split the sequence over the mesh's context axis; "
                   "default: the config's)")
    p.add_argument("--fast-compile", action="store_true", help="XLA backend optimisation level 0: faster compiles, "
                   "slower steps (tests, quick CPU checks)")
    p.add_argument("--coordinator-address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="multi-host: host:port of process 0 (env JAX_COORDINATOR_ADDRESS); enables jax.distributed")
    p.add_argument("--num-processes", type=int, default=None, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-host: this process's index")
    return p


def config_from_args(args) -> Any:
    config = configs_lib.get_config(args.config)
    configs_lib.apply_overrides(config, args.set)
    return configs_lib.apply_flags(config, args, (
        ("data", "data.name"), ("on_corrupt", "data.on_corrupt"), ("steps", "steps"), ("init_from", "init_from"),
        ("log_every", "log_every"), ("checkpoint_every", "checkpoint_every"), ("seed", "seed"), ("attention", "attention_impl")))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.coordinator_address or args.num_processes:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    try:  # flag and config errors: one clear line, no traceback
        config = config_from_args(args)
        mesh = shd.create_mesh(args.mesh if args.mesh is not None else config.mesh)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        out = train(config, mesh=mesh, checkpoint_dir=args.checkpoint_dir, resume=args.resume,
                    metrics_file=args.metrics_file, tb_dir=args.tb_dir,
                    compiler_options={"xla_backend_optimization_level": 0} if args.fast_compile else None)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    h = out["history"]
    if h:
        print(f"done ({out['stopped']}): loss {h[0]['loss']:.4f} at step {h[0]['step']} -> {h[-1]['loss']:.4f} at step "
              f"{h[-1]['step']}; {out['compiles']} compiled step(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
