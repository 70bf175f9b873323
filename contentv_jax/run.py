"""The run skeleton every JAX training loop shares (`contentv_jax.train`, `contentv_jax.rlhf`).

A loop builds its train state (`train.create_train_state`) and its step function, then leans on these pieces
for everything around the step, so the trainer and RLHF behave alike:
  `StepCache`        one compiled step per input shape: explicit in/out shardings, the state donated, XLA
                     compiler options, no host transfers while it runs;
  `resume_or_init`   the resume policy (`--resume auto|no|<step>`, validated) then `--init-from`;
  `Sigterm`          SIGTERM becomes a flag the loop polls: it saves and exits cleanly;
  `NonFiniteGuard`   stops the run with `NonFiniteError` after `max_nonfinite` consecutive skipped updates;
  `save_checkpoint`  on the interval, forced at the end / on SIGTERM, never inside a run of skipped updates;
  `ThroughputWindow` steps/s, tokens/s and MFU over the steps since the last log (compile time excluded);
  `Loop`             the loop itself: step, log, evaluate, checkpoint, SIGTERM, guard, in that order each step.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contentv_common.cli import UsageError, UserError
from contentv_common.formats.sources import FormatError, iter_params
from contentv_jax import sharding as shd
from contentv_jax.checkpoint import Checkpointer, check_resume, is_checkpoint_dir
from contentv_jax.checkpoint import open_source as checkpoint_source


class NonFiniteError(UserError):
    """Too many consecutive non-finite losses / gradients: the run stops (exit code 3) naming the last good
    checkpoint."""

    exit_code = 3


class StepCache:
    """Compiled steps `(state, *args) -> (state, metrics)`, one per shape of `args` (a training bucket): a second
    shape compiles once and never recompiles the first. Each compile is a jit with explicit shardings (the state's,
    and each argument leaf's own: place arguments with `place_batch` / `place` first), the state argument donated,
    under the mesh and logical-axis rules. Calls run under `jax.transfer_guard("disallow")`: an accidental
    host<->device copy inside the step is an error, not a silent slowdown.
    compiler_options: XLA options for every compile (tests use {"xla_backend_optimization_level": 0})."""

    def __init__(self, step_fn, state_shardings, mesh, rules=shd.DEFAULT_RULES, compiler_options: dict | None = None):
        self.step_fn, self.state_shardings = step_fn, state_shardings
        self.mesh, self.rules, self.compiler_options = mesh, rules, compiler_options
        self.compiled: dict[tuple, Any] = {}
        self.compiles = 0

    @staticmethod
    def key(args) -> tuple:
        """The compile key of the step's non-state arguments: tree structure, shapes and dtypes."""
        leaves, tree = jax.tree.flatten(args)
        return (str(tree), *((tuple(x.shape), str(x.dtype)) for x in leaves))

    def lower(self, state, *args):
        """The lowered step for these (concrete or abstract, sharded) arguments; `.compile()` it."""
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        jitted = jax.jit(
            self.step_fn,
            in_shardings=(self.state_shardings, *jax.tree.map(lambda x: x.sharding, args)),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=(0,),
        )
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            return jitted.lower(state, *args)

    def __call__(self, state, *args):
        key = self.key(args)
        fn = self.compiled.get(key)
        if fn is None:
            fn = self.compiled[key] = self.lower(state, *args).compile(self.compiler_options)
            self.compiles += 1
        with jax.transfer_guard("disallow"):  # a hidden host<->device copy inside the step would stall every step
            return fn(state, *args)


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (restore targets)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def load_init_params(path: str, abstract_params, shardings):
    """Params [the model's tree, in the dtypes of `abstract_params`, placed by `shardings`] from `--init-from`: an earlier stage's checkpoint
    dir of this trainer (its raw params, restored shard by shard), or any transformer format `python -m convert`
    reads (`contentv_common.formats.sources.iter_params`): a diffusers ContentV / SD3.5 folder (model_index.json +
    transformer/), a `transformer/` folder, our JAX-format folder, an SD3.5 original single file, one step dir of
    a checkpoint. Leaves stream one at a time
    onto their devices; every missing, unexpected or mis-shaped key is named before any is read."""
    if is_checkpoint_dir(path):
        ckpt = Checkpointer(path, every=1, async_save=False)
        try:
            return ckpt.restore_params(None, abstract_with_shardings(abstract_params, shardings))
        finally:
            ckpt.close()
    from tqdm.auto import tqdm

    src = Path(path)
    if (src / "model_index.json").is_file():  # a whole ContentV / SD3.5 model folder: its transformer
        src = src / "transformer"
    flat_want = flax.traverse_util.flatten_dict(abstract_params, sep="/")
    flat_sh = flax.traverse_util.flatten_dict(shardings, sep="/")
    placed = {}
    try:
        leaves = iter_params(src, dtype="float32", expected={k: tuple(v.shape) for k, v in flat_want.items()},
                             openers={"orbax": checkpoint_source})  # one step dir of a checkpoint
        for _, key, leaf in tqdm(leaves, total=len(flat_want), desc="--init-from", unit="tensor",
                                 disable=jax.process_index() != 0):
            placed[key] = jax.device_put(np.asarray(leaf, flat_want[key].dtype), flat_sh[key])
    except (FormatError, FileNotFoundError) as e:  # the messages name the path
        raise type(e)(f"--init-from: neither a checkpoint dir of this trainer nor a transformer format "
                      f"`python -m convert` reads: {e}") from None
    except ValueError as e:  # KeyMismatchError: every missing / unexpected / mis-shaped key by name
        raise ValueError(f"--init-from: {e}") from None
    return flax.traverse_util.unflatten_dict(placed, sep="/")


def init_params_from(path: str, state, state_shardings):
    """`state` with its params and EMA params both set from `--init-from` `path` (`load_init_params`)."""
    params = load_init_params(path, state.params, state_shardings.params)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=state_shardings.params)
    return state.replace(params=params, ema_params=copy(params))


def config_and_mesh(args, make_config: Callable[[Any], Any]):
    """(config, mesh) of a run from its parsed flags (`make_config(args)` applies --config, --set and the flags),
    validated together with --resume / --checkpoint-dir before anything is built or written: a bad flag or config
    field is a UsageError (exit 2)."""
    from contentv_jax import configs as configs_lib  # configs imports the sharding rules this module also uses

    try:
        config = configs_lib.validate_config(make_config(args))
        mesh = shd.create_mesh(args.mesh if args.mesh is not None else config.mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_resume(args.checkpoint_dir, args.resume)
    return config, mesh


def compiler_options(fast_compile: bool) -> dict | None:
    """XLA options of `--fast-compile`: backend optimisation level 0 (faster compiles, slower steps)."""
    return {"xla_backend_optimization_level": 0} if fast_compile else None


def resume_step(resume: str, ckpt: Checkpointer | None) -> int | None:
    """The step to restore for `--resume` (auto: the latest checkpoint if any; no: none, and the directory must
    hold none; <step>: that one, which needs --checkpoint-dir). Bad combinations raise UsageError."""
    try:
        check_resume(ckpt.directory if ckpt else None, resume)
    except UsageError:
        if ckpt is not None:
            ckpt.close()  # the run never starts: let orbax's threads go
        raise
    return int(resume) if resume.isdigit() else ckpt.latest_step() if resume == "auto" and ckpt else None


def resume_or_init(state, state_shardings, *, step: int | None, ckpt: Checkpointer | None, init_from: str | None,
                   restore_data: Callable[[dict], None], writer, log: Callable[[str], None]):
    """The state a run starts from: checkpoint `step` (`resume_step`, checked before any work) else `init_from`.
    Resume order (each restored piece replaces the fresh one and is kept):
    1. the train state (params, optimizer, EMA, step, RNG, skip counters) straight into its shardings;
    2. the data position (`restore_data(saved data state)`), so the next batch is the one the killed run would
       have seen;
    3. the metrics file forgets steps after the checkpoint (they are about to be redone).
    Without a checkpoint to resume, `init_from` (an earlier stage or a converted model) sets the params."""
    if step is not None:
        state, data_state = ckpt.restore(step, abstract_with_shardings(state, state_shardings))
        restore_data(data_state)
        writer.truncate_after(step)
        log(f"resumed from {ckpt.directory} step {step}")
    elif init_from:
        state = init_params_from(init_from, state, state_shardings)
        log(f"initialised params from {init_from}")
    return state


def save_checkpoint(ckpt: Checkpointer | None, step: int, state, data_state: dict, every: int, force: bool) -> bool:
    """Save on the interval (or `force`: the last step, SIGTERM) unless the state is inside a run of skipped
    non-finite updates (a restart from there would resume into the same blow-up). True if a save started."""
    if ckpt is None or not (force or step % every == 0):
        return False
    if int(jax.device_get(state.nonfinite)):
        return False
    return ckpt.save(step, state, data_state, force=force)


class NonFiniteGuard:
    """Raises NonFiniteError once `limit` consecutive updates were skipped as non-finite.

    `after_step(step, count)` takes the step's device-side `nonfinite` counter and checks the previous step's, so
    the check never waits for the step just dispatched; `flush()` checks the last one now."""

    def __init__(self, limit: int, ckpt: Checkpointer | None):
        self.limit, self.ckpt = int(limit), ckpt
        self._pending = None

    def after_step(self, step: int, count) -> None:
        pending, self._pending = self._pending, (step, count)
        if pending is not None:
            self.check(*pending)

    def flush(self) -> None:
        """Check the last step now (at a log step, where its metrics are on the host anyway, and at the end)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self.check(*pending)

    def check(self, step: int, count) -> None:
        n = int(jax.device_get(count))
        if n < self.limit:
            return
        last = None
        if self.ckpt is not None:
            self.ckpt.wait()
            last = self.ckpt.latest_step()
        where = f"{self.ckpt.directory} step {last}" if self.ckpt is not None else "none (no --checkpoint-dir)"
        raise NonFiniteError(f"step {step}: {n} consecutive non-finite losses/gradients (max_nonfinite={self.limit}); "
                             f"stopping. The last good checkpoint is {where}.")


class Sigterm:
    """Turns SIGTERM into a flag the loop polls (save, then exit); a context manager restoring the old handler."""

    def __init__(self):
        self.received = False

    def __enter__(self):
        self._old = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, *_):
        self.received = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._old)


class ThroughputWindow:
    """Steps/s, video tokens/s and MFU over the steps added since the last `reset()` (logs, compiles and
    evaluations reset it, so their time never counts as step time). peak: the mesh's peak FLOP/s (0: no MFU)."""

    def __init__(self, peak: float = 0.0):
        self.peak = peak
        self.reset()

    def reset(self) -> None:
        self.t0, self.steps, self.tokens, self.flops = time.perf_counter(), 0, 0, 0.0

    def add(self, tokens: int, flops: float = 0.0) -> None:
        self.steps, self.tokens, self.flops = self.steps + 1, self.tokens + tokens, self.flops + flops

    def rates(self) -> dict[str, float]:
        """{} before any step, else steps_per_s, tokens_per_s (+ mfu with a peak)."""
        if not self.steps:
            return {}
        dt = time.perf_counter() - self.t0
        out = {"steps_per_s": self.steps / dt, "tokens_per_s": self.tokens / dt}
        if self.peak > 0:
            out["mfu"] = self.flops / dt / self.peak
        return out

    @staticmethod
    def describe(m: dict) -> str:
        """The log line's throughput part for metrics holding `rates()`."""
        if "steps_per_s" not in m:
            return ""
        return (f" | {m['steps_per_s']:.2f} steps/s {m['tokens_per_s']:.0f} tok/s"
                + (f" MFU {100 * m['mfu']:.2f}%" if "mfu" in m else ""))


@dataclass
class Loop:
    """The step loop both trainers run (`run(state) -> (state, history, stopped)`), each step in this order:
    1. `next_args(step)` -> the step's placed arguments after the state; the compiled step (`steps`) runs;
    2. the throughput window counts the step (`work(args)` -> (video tokens, FLOPs)), or restarts after a compile;
    3. the non-finite guard sees the step's counter (read one step later, or now at a log step);
    4. every `log_every` steps, the last step and on SIGTERM: the metrics (+ `extra_metrics()`, throughput) are
       logged (`log_line(step, metrics)`), written and kept in `history`;
    5. `evaluate(step, state)` when `eval_due(step)`;
    6. a checkpoint (`save_checkpoint`, with `data_state()`), forced at the end and on SIGTERM, which then stops
       the run ("sigterm"); else it ends "done" or raises NonFiniteError.
    """

    steps: StepCache
    total_steps: int
    next_args: Callable[[int], tuple]
    data_state: Callable[[], dict]
    log_line: Callable[[int, dict], str]
    writer: Any
    log: Callable[[str], None]
    log_every: int
    checkpoint_every: int
    max_nonfinite: int
    ckpt: Checkpointer | None = None
    work: Callable[[tuple], tuple[int, float]] = lambda args: (0, 0.0)
    peak_flops: float = 0.0
    extra_metrics: Callable[[], dict] = dict
    evaluate: Callable[[int, Any], None] | None = None
    eval_due: Callable[[int], bool] = lambda step: False
    describe_args: Callable[[tuple], str] = lambda args: "new argument shapes"

    def run(self, state) -> tuple[Any, list[dict], str]:
        window, guard = ThroughputWindow(self.peak_flops), NonFiniteGuard(self.max_nonfinite, self.ckpt)
        history, stopped = [], "done"
        step = int(jax.device_get(state.step))
        with Sigterm() as sigterm:
            while step < self.total_steps:
                args = self.next_args(step)
                compiles = self.steps.compiles
                state, metrics = self.steps(state, *args)
                step += 1
                if self.steps.compiles != compiles:  # compile time is not step time
                    jax.block_until_ready(metrics)
                    self.log(f"compiled the step for {self.describe_args(args)} (compile #{self.steps.compiles})")
                    window.reset()
                else:
                    window.add(*self.work(args))
                guard.after_step(step, metrics["nonfinite"])
                if step % self.log_every == 0 or step == self.total_steps or sigterm.received:
                    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    m.update(window.rates(), **self.extra_metrics())
                    history.append({"step": step, **m})
                    self.writer.write(step, m)
                    self.log(self.log_line(step, m))
                    window.reset()
                    guard.flush()
                if self.evaluate is not None and self.eval_due(step):
                    self.evaluate(step, state)
                    window.reset()
                save_checkpoint(self.ckpt, step, state, self.data_state(), self.checkpoint_every,
                                force=sigterm.received or step == self.total_steps)
                if sigterm.received:
                    stopped = "sigterm"
                    self.log(f"SIGTERM: saved step {step} to {self.ckpt.directory if self.ckpt else None}; exiting")
                    break
            guard.flush()
        return state, history, stopped
