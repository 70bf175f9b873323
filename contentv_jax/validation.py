"""Validation loss: the flow-matching loss on held-out records at fixed noise levels and fixed noise.

A number two runs can be compared by (the SD3 paper tracks one like it): every `eval.every` steps (and at step 0
and the last step) the trainer evaluates, for each validation record r and each noise level s_k of `eval.val_sigmas`,
    mse(r, k) = mean((v_theta(x_{s_k}, 1000 s_k, text_r) - (eps_{r,k} - x0_r))^2),  x_s = (1 - s) x0 + s eps,
weighted as training weights it (`flow.loss_weighting`), with eps_{r,k} drawn from a key folded from
PRNGKey(eval.val_seed), the record id r (its index in the dataset manifest) and k: the noise depends on nothing
else, never on the batch a record lands in, the mesh, the process count, --seed or a resume. The sigmas are
used as given (no schedule shift), so `val_loss/sigma_0.5000` means the same noise level in every run.
Metrics: `val_loss/sigma_<s>` = the mean over records at s_k; `val_loss` = the mean of those over the sigmas.

The records: `--val-data DIR` (a dataset folder in the `--data` format, contentv_common.dataset), or the
training dataset's records held out by `data.val_fraction` (`contentv_common.dataset.held_out`: a hash of each
record's source name; the training batches never contain them); at most `eval.val_max_records`, in manifest order.

Params: the raw params (`state.params`), not the EMA. The raw params are what the training loss measures, so the
gap between the two is the generalisation gap, and val_loss does not depend on `optim.ema_decay` (runs with
different decays compare); the EMA's quality is what the evaluation samples show.
"""
from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from contentv_common.cli import UsageError
from contentv_common.config import ModelPreset
from contentv_common.dataset import CorruptDataError, LatentDataset
from contentv_jax import sharding as shd
from contentv_jax.data import Bucket
from contentv_jax.flow import loss_weights, velocity_mse
from contentv_jax.run import StepCache

_NOISE_STREAM = 0x56414C  # "VAL": keeps the validation noise apart from any other use of PRNGKey(val_seed)


def sigma_name(s: float) -> str:
    """The metric name of one noise level: val_loss/sigma_0.5000."""
    return f"val_loss/sigma_{s:.4f}"


class ValidationSet:
    """The validation records of a dataset folder, cut into fixed global batches.

    val_fraction: None = every readable record; else only those `held_out` by this fraction (the training source
    leaves them out). Of those, the first `max_records` (0: all) in manifest order are kept.
    Batches: per bucket (sorted), `batch` records each; the last batch of a bucket is padded with its last record
    (`batches()` says how many rows are real). process_index / process_count: this process's batch slot
    (`sharding.batch_slot`, as the training source gets): slot p of n reads rows [p B/n, (p+1) B/n) of each batch.
    `what` names the set in errors (the flag or config field it came from).
    """

    def __init__(self, path, preset: ModelPreset, batch: int, *, val_fraction: float | None = None,
                 max_records: int = 0, process_index: int = 0, process_count: int = 1, on_corrupt: str = "error",
                 what: str = "--val-data"):
        self.what, self.preset = what, preset
        try:
            self.ds = LatentDataset(path, on_corrupt)
            self.ds.check_compatible(preset)
            by_bucket = self.ds.records_by_bucket(None if val_fraction is None else self.ds.split(val_fraction)[1])
            for f, h, w in by_bucket:
                try:
                    Bucket(f, h, w, 1).latent_shape(preset)  # the model's patch size must divide the latent frame
                except ValueError as e:
                    raise ValueError(f"dataset {self.ds.path}: {e}") from None
        except (FileNotFoundError, ValueError) as e:  # the messages name the dataset, shard or record
            raise type(e)(f"{what}: {e}") from None
        kept = sorted(i for bucket_ids in by_bucket.values() for i in bucket_ids)
        if max_records:
            kept = kept[:max_records]
        if not kept:
            raise ValueError(f"{what}: dataset {path} has no validation records")
        if batch < 1 or batch % process_count:
            raise ValueError(f"eval.val_batch={batch}: must be a positive multiple of the {process_count} batch slots")
        self.batch, self.process_index, self.process_count = batch, process_index, process_count
        self._batches = []
        for bucket, bucket_ids in sorted(self.ds.records_by_bucket(kept).items()):
            for j in range(0, len(bucket_ids), batch):
                chunk = bucket_ids[j:j + batch]
                padded = np.asarray(chunk + chunk[-1:] * (batch - len(chunk)), np.int64)
                self._batches.append((bucket, padded, len(chunk)))
        self.ids = [int(i) for _, padded, real in self._batches for i in padded[:real]]  # the records, evaluation order

    def batches(self) -> list[tuple[tuple[int, int, int], np.ndarray, int]]:
        """[(bucket (F, H, W), global record ids [B] (padded), real rows)]."""
        return self._batches

    def read(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """This process's rows of a global batch of record ids: latents [b, T, h, w, C], context [b, L, J], pooled
        [b, P] float32, record_id [b] int32 (b = B / process_count). A record failing its checksum raises, naming it:
        dropping it would silently change what val_loss averages over."""
        n, p, b = self.process_count, self.process_index, len(ids)
        rows = []
        for i in ids[p * b // n:(p + 1) * b // n]:
            row = self.ds.read_row(int(i))
            if row is None:
                raise CorruptDataError(f"{self.what}: {self.ds._name(int(i))} failed its checksum")
            rows.append(row)
        out = {k: np.stack([r[k] for r in rows]).astype(np.float32) for k in ("latents", "context", "pooled")}
        out["record_id"] = np.asarray(ids[p * b // n:(p + 1) * b // n], np.int32)
        return out


def validation_set(config, preset: ModelPreset, mesh, rules=shd.DEFAULT_RULES, process_index: int = 0,
                   process_count: int = 1) -> ValidationSet | None:
    """The `ValidationSet` of a train config (`data.val_data` or `data.val_fraction`), or None when neither is set;
    process_index / process_count: this process's `sharding.batch_slot`.
    Built before the model, so a bad validation set stops the run before any work: a bad combination of fields is a
    UsageError, a bad dataset a FileNotFoundError / ValueError naming it."""
    val_data, fraction = config.data.get("val_data", ""), float(config.data.get("val_fraction", 0.0))
    if not val_data and fraction <= 0:
        return None
    if val_data and fraction > 0:
        raise UsageError(f"--val-data {val_data} and data.val_fraction={fraction}: give one validation set, not both")
    if config.eval.every <= 0:
        raise UsageError(f"{'--val-data' if val_data else 'data.val_fraction'}: the validation loss runs every "
                         f"eval.every steps, which is {config.eval.every}; set --eval-every N")
    divisor = shd.batch_divisor(mesh, rules)
    batch = int(config.eval.val_batch) or divisor
    if batch % divisor:
        raise UsageError(f"eval.val_batch={batch} does not divide over the {divisor} batch shards of the mesh")
    common = dict(max_records=int(config.eval.val_max_records), process_index=process_index,
                  process_count=process_count)
    if val_data:
        return ValidationSet(val_data, preset, batch, **common)
    if config.data.name == "synthetic":
        raise UsageError(f"data.val_fraction={fraction}: the synthetic set has no records to hold out; give a dataset "
                         f"folder (--data DIR) or a validation set (--val-data DIR)")
    return ValidationSet(config.data.name, preset, batch, val_fraction=fraction,
                         on_corrupt=config.data.get("on_corrupt", "error"), what=f"data.val_fraction={fraction}",
                         **common)


def make_val_step(apply_fn: Callable, sigmas: Sequence[float], loss_weighting: str, val_seed: int) -> Callable:
    """(params, batch) -> per-record weighted losses [B, S] at the S fixed `sigmas`.

    apply_fn: the train step's (params, x, t, context, pooled) -> velocity; batch: latents [B,T,h,w,C], context
    [B,L,J], pooled [B,P], record_id [B] int32. The sigmas run one after another (lax.map), so memory is one
    forward pass of the batch."""
    sig = jnp.asarray(sigmas, jnp.float32)  # [S]
    weights = loss_weights(sig, loss_weighting)  # [S]
    base = jax.random.fold_in(jax.random.PRNGKey(val_seed), _NOISE_STREAM)

    def val_step(params, batch):
        x0 = batch["latents"]
        b = x0.shape[0]

        def at_sigma(k):  # -> [B]
            keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r), k))(batch["record_id"])
            eps = jax.vmap(lambda key: jax.random.normal(key, x0.shape[1:], jnp.float32))(keys)  # [B,T,h,w,C]
            eps = shd.constrain(eps, ("batch",) + (None,) * (x0.ndim - 1))
            return velocity_mse(apply_fn, params, batch, jnp.full((b,), sig[k]), eps)

        return (jax.lax.map(at_sigma, jnp.arange(sig.shape[0])) * weights[:, None]).T  # [S, B] -> [B, S]

    return val_step


class Validator:
    """`validator(params, step) -> metrics`: the validation loss of `params` over `val_set` (see the module doc).

    One compiled function per bucket shape (as the train step's `StepCache`: jit with the params' shardings and
    batch-sharded inputs, under the mesh and logical-axis rules, no host transfers while it runs); params are read,
    never donated. Every process runs it (the params are sharded over all of them) and gets the same numbers.
    `history`: [{"step", **metrics}] of every evaluation."""

    def __init__(self, val_set: ValidationSet, apply_fn: Callable, param_shardings, mesh, rules, config,
                 compiler_options: dict | None = None):
        self.val_set, self.param_shardings, self.mesh, self.rules = val_set, param_shardings, mesh, rules
        self.sigmas = [float(s) for s in config.eval.val_sigmas]
        self.step_fn = make_val_step(apply_fn, self.sigmas, config.flow.loss_weighting, int(config.eval.val_seed))
        self.compiler_options = compiler_options
        self.compiled: dict[tuple, object] = {}
        self.history: list[dict] = []

    def _place(self, rows: dict) -> dict:
        """This process's rows (`ValidationSet.read`) -> global arrays [B, ...] sharded over the batch axes."""
        return {k: shd.place_rows(v, self.mesh, self.rules) for k, v in rows.items()}

    def _compiled(self, params, batch):
        key = StepCache.key(batch)
        if key not in self.compiled:
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            in_shardings = (self.param_shardings, jax.tree.map(lambda x: x.sharding, batch))
            jitted = jax.jit(self.step_fn, in_shardings=in_shardings, out_shardings=replicated)
            with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
                self.compiled[key] = jitted.lower(params, batch).compile(self.compiler_options)
        return self.compiled[key]

    def per_record(self, params) -> np.ndarray:
        """[N, S] float64: each validation record's weighted loss at each sigma, rows in `val_set.ids` order."""
        from tqdm.auto import tqdm

        out = []
        for _, ids, real in tqdm(self.val_set.batches(), desc="val_loss", unit="batch", leave=False,
                                 disable=jax.process_index() != 0 or len(self.val_set.batches()) < 2):
            batch = self._place(self.val_set.read(ids))
            fn = self._compiled(params, batch)
            with jax.transfer_guard("disallow"):
                losses = fn(params, batch)
            out.append(np.asarray(jax.device_get(losses), np.float64)[:real])  # padding rows dropped
        return np.concatenate(out)

    def __call__(self, params, step: int) -> dict[str, float]:
        per_sigma = self.per_record(params).mean(axis=0)  # [S]
        metrics = {"val_loss": float(per_sigma.mean()),
                   **{sigma_name(s): float(v) for s, v in zip(self.sigmas, per_sigma)}}
        self.history.append({"step": int(step), **metrics})
        return metrics

    def describe(self, step: int, metrics: dict) -> str:
        """The log line of one evaluation."""
        by_sigma = " ".join(f"{s:g}:{metrics[sigma_name(s)]:.4f}" for s in self.sigmas)
        return (f"step {step:>6} val_loss {metrics['val_loss']:.4f} ({len(self.val_set.ids)} records x "
                f"{len(self.sigmas)} sigmas; by sigma {by_sigma})")
