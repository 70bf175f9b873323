"""The validation loss (contentv_jax.validation): held-out records never train, the split and the numbers do not
depend on seed, process count, mesh, batch composition or a resume, val_loss falls on a learnable set, and the
metrics reach the JSONL file and TensorBoard.

Datasets are written with `write_dataset` at the tiny preset's shapes; the "learnable" one holds the built-in
synthetic set's caption patterns (contentv_jax.data.SyntheticCaptionedSource) with per-record noise, so a few
training steps on some records lower the loss on the others.
"""
import json
import os
import signal

import jax
import numpy as np
import pytest

from contentv_common.config import get_preset
from contentv_common.dataset import LatentDataset, ShardedLatentSource, held_out, write_dataset
from contentv_jax import configs
from contentv_jax import sharding as shd
from contentv_jax import train as T
from contentv_jax.data import Bucket, SyntheticCaptionedSource
from contentv_jax.flow import velocity_mse
from contentv_common.cli import UsageError
from contentv_jax.validation import _NOISE_STREAM, Validator, sigma_name, validation_set

TINY = get_preset("tiny")
VIDEO, IMAGE = (9, 32, 48), (1, 32, 48)
FAST = {"xla_backend_optimization_level": 0}
FRACTION = 0.25


def _samples(n=48, buckets=(VIDEO,), seed=0):
    synth = SyntheticCaptionedSource(TINY, [Bucket(*VIDEO, 8)], num_captions=8, seed=0)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        bucket = buckets[i % len(buckets)]
        shape = Bucket(*bucket, 1).latent_shape(TINY)
        out.append({"bucket": bucket, "latents": synth.pattern(i % 8, shape) + 0.1 * rng.standard_normal(shape, np.float32),
                    "context": synth.context[i % 8], "pooled": synth.pooled[i % 8], "caption": f"caption {i % 8}",
                    "source": f"clip{i}.mp4"})
    return out


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("val") / "ds", _samples(), TINY.vae, shard_rows=16)


def _config(data, steps=8, **fields):
    c = configs.get_config("tiny")
    c.data.name, c.steps, c.log_every, c.checkpoint_every = str(data), steps, 1, 4
    c.optim.warmup_steps = 0
    c.eval.every, c.eval.num_prompts = 4, 0  # validation only: no sample videos
    c.data.val_fraction = FRACTION
    for k, v in fields.items():
        section, _, leaf = k.rpartition("__")
        (c[section] if section else c)[leaf] = v
    return c


def test_held_out_records_never_train_and_the_split_is_stable(learnable, tmp_path):
    ds = LatentDataset(learnable)
    train_ids, val_ids = ds.split(FRACTION)
    assert 6 <= len(val_ids) <= 18 and sorted(train_ids + val_ids) == list(range(48)), val_ids
    # the split is a function of each record's source name: the same clips are held out from a re-ordered dataset
    reordered = write_dataset(tmp_path / "rev", _samples()[::-1], TINY.vae, shard_rows=16)
    rev = LatentDataset(reordered)
    assert {rev.records[i]["source"] for i in rev.split(FRACTION)[1]} == {ds.records[i]["source"] for i in val_ids}
    assert {ds.records[i]["source"] for i in val_ids} == {f"clip{i}.mp4" for i in range(48)
                                                           if held_out(f"clip{i}.mp4", FRACTION)}

    # the training batches, read for three epochs, on 1 and 2 processes and two seeds, hold every training record
    # and no held-out one (rows matched to records by their exact bytes)
    by_bytes = {ds[i]["latents"].tobytes(): i for i in range(len(ds))}
    for seed in (0, 1):
        for n in (1, 2):
            served = set()
            for p in range(n):
                src = ShardedLatentSource(learnable, TINY, [Bucket(*VIDEO, 4)], seed=seed, process_index=p,
                                          process_count=n, val_fraction=FRACTION, prefetch=0)
                for _ in range(3 * len(train_ids) // 4):
                    served |= {by_bytes[x.tobytes()] for x in src.next()["latents"]}
            assert served == set(train_ids), (seed, n, sorted(served & set(val_ids)))

    # the trainer's validation set is exactly the held-out records, the same for every process count
    mesh = shd.create_mesh("data=1", jax.devices()[:1])
    for n in (1, 2):
        vs = validation_set(_config(learnable, eval__val_batch=2), TINY, mesh, process_index=0, process_count=n)
        assert sorted(vs.ids) == val_ids
    # a data position saved with one hold-out does not resume a source with another
    src = ShardedLatentSource(learnable, TINY, [Bucket(*VIDEO, 4)], val_fraction=FRACTION, prefetch=0)
    state = src.state()
    with pytest.raises(ValueError, match="val_fraction"):
        ShardedLatentSource(learnable, TINY, [Bucket(*VIDEO, 4)], prefetch=0).restore(state)


def _validator(config, mesh_spec, n_devices):
    mesh = shd.create_mesh(mesh_spec, jax.devices()[:n_devices])
    model = T.build_model(config, TINY)
    tx = T.make_optimizer(config.optim, config.steps)
    state, shardings = T.create_train_state(model, tx, TINY, mesh, config.seed, compiler_options=FAST)
    val_set = validation_set(config, TINY, mesh)
    return Validator(val_set, T.apply_fn_of(model), shardings.params, mesh, shd.DEFAULT_RULES, config, FAST), state, model


def test_same_val_loss_on_one_device_and_a_data_fsdp_mesh(tmp_path):
    """Two buckets (video + image), an odd number of records per bucket (padded batches): per-record values agree
    on 1 device (batch 1) and on data=2 x fsdp=2 (batch 4) within 1e-6, and match a plain model call."""
    data = write_dataset(tmp_path / "two", _samples(14, (VIDEO, IMAGE), seed=3), TINY.vae, shard_rows=4)
    config = _config(data, data__val_data=str(data), data__val_fraction=0.0)  # all 14 records: 7 per bucket
    one, state1, model = _validator(config, "data=1", 1)
    ref = one.per_record(state1.params)
    n_val = len(one.val_set.ids)
    assert ref.shape == (n_val, 8) == (14, 8) and np.isfinite(ref).all()
    assert len(one.compiled) == 2  # one compile per bucket
    v4, state4, _ = _validator(config, "data=2,fsdp=2", 4)
    assert v4.val_set.batch == 4  # default: one record per batch shard; 7 records per bucket -> a padded batch
    np.testing.assert_allclose(v4.per_record(state4.params), ref, rtol=1e-6, atol=0)
    assert v4(state4.params, 0)["val_loss"] == pytest.approx(ref.mean(), rel=1e-6)

    # record j at sigma k is the trainer's objective at s_k with the noise of (val_seed, record id, k)
    import jax.numpy as jnp

    j, k = 1, 5
    rid = one.val_set.ids[j]
    row = LatentDataset(data)[rid]
    batch = {n: jnp.asarray(row[n])[None] for n in ("latents", "context", "pooled")}
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), _NOISE_STREAM), rid), k)
    eps = jax.random.normal(key, batch["latents"].shape[1:])[None]
    s = config.eval.val_sigmas[k]
    want = velocity_mse(T.apply_fn_of(model), jax.device_get(state1.params), batch, jnp.full((1,), s), eps)
    assert ref[j, k] == pytest.approx(float(want[0]), rel=1e-6)
    assert ref[:, k].std() > 0 and abs(ref[:, 0].mean() - ref[:, -1].mean()) > 1e-3  # records and sigmas differ


class _SigtermAfter(ShardedLatentSource):
    """The dataset source, sending this process SIGTERM once it has served `stop` batches (a preempted run)."""

    def __init__(self, *args, stop: int, **kw):
        super().__init__(*args, **kw)
        self.stop = stop

    def next(self):
        batch = super().next()
        if self.state()["step"] == self.stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return batch


def _val_records(path):
    return [r for r in map(json.loads, path.read_text().splitlines()) if "val_loss" in r]


def test_cli_val_loss_falls_and_a_resumed_run_writes_the_same(learnable, tmp_path, capsys):
    """`--val-fraction` through the CLI (JSONL, TensorBoard, log lines), then the same run on the same mesh
    preempted (SIGTERM after step 6) and resumed: the same val_loss records within 1e-6."""
    help_text = T.build_parser().format_help()
    assert all(flag in help_text for flag in ("--val-data", "--val-fraction", "--eval-every"))
    c = T.config_from_args(T.build_parser().parse_args(["--val-data", "v/", "--val-fraction", "0.1", "--eval-every", "3"]))
    assert (c.data.val_data, c.data.val_fraction, c.eval.every) == ("v/", 0.1, 3)
    ref = tmp_path / "ref" / "m.jsonl"
    rc = T.main(["--data", str(learnable), "--val-fraction", str(FRACTION), "--eval-every", "4", "--steps", "12",
                 "--log-every", "1", "--checkpoint-every", "4", "--mesh", "data=2,fsdp=-1", "--fast-compile",
                 "--set", "eval.num_prompts=0", "--set", "optim.warmup_steps=0", "--metrics-file", str(ref)])
    out = capsys.readouterr().out
    assert rc == 0, out
    ref_val = _val_records(ref)
    assert [r["step"] for r in ref_val] == [0, 4, 8, 12]
    for r in ref_val:
        per_sigma = [r.pop(sigma_name(s)) for s in configs.get_config("tiny").eval.val_sigmas]
        assert set(r) == {"step", "val_loss"} and r["val_loss"] == pytest.approx(np.mean(per_sigma), rel=1e-12)
    n_val = len(LatentDataset(learnable).split(FRACTION)[1])
    assert f"step      4 val_loss {ref_val[1]['val_loss']:.4f} ({n_val} records x 8 sigmas; by sigma 0.0625:" in out
    assert f"val_loss {ref_val[0]['val_loss']:.4f} at step 0 -> {ref_val[-1]['val_loss']:.4f} at step 12" in out
    assert ref_val[-1]["val_loss"] < 0.9 * ref_val[0]["val_loss"], ref_val  # it learns the held-out captions' patterns
    events = b"".join(p.read_bytes() for p in (ref.parent / "tb").glob("events.out.tfevents.*"))
    assert b"val_loss/sigma_0.5625" in events and b"val_loss" in events
    assert not (ref.parent / "samples").exists()  # eval.num_prompts = 0: validation without sample videos

    config = _config(learnable, steps=12)
    mesh = shd.create_mesh("data=2,fsdp=-1")
    run, ckpt = tmp_path / "run", str(tmp_path / "run" / "ckpt")
    src = _SigtermAfter(learnable, TINY, [Bucket(*VIDEO, 8)], stop=6, val_fraction=FRACTION)
    first = T.train(config, mesh=mesh, checkpoint_dir=ckpt, metrics_file=str(run / "m.jsonl"), source=src,
                    log=lambda s: None, compiler_options=FAST)
    assert first["stopped"] == "sigterm" and int(first["state"].step) == 6
    again = T.train(config, mesh=mesh, checkpoint_dir=ckpt, metrics_file=str(run / "m.jsonl"),
                    log=lambda s: None, compiler_options=FAST)
    assert again["stopped"] == "done" and [r["step"] for r in again["val_history"]] == [8, 12]  # no step-0 rerun
    got = _val_records(run / "m.jsonl")
    assert [r["step"] for r in got] == [0, 4, 8, 12]
    for a, b in zip(got, _val_records(ref)):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=0), (a["step"], key)


@pytest.mark.parametrize("fields, message", [
    ({"data__val_data": "{other}"}, "not both"),
    ({"eval__every": 0}, "eval.every steps, which is 0"),
    ({"data__name": "synthetic"}, "synthetic set has no records"),
    ({"eval__val_batch": 3}, "eval.val_batch=3 does not divide over the 2 batch shards"),
    ({"data__val_data": "{wide}", "data__val_fraction": 0.0}, "latent_channels 8 (model: 16)"),
    ({"data__val_data": "{odd}", "data__val_fraction": 0.0}, "dataset {odd}: bucket"),
])
def test_bad_validation_settings_are_named(fields, message, learnable, tmp_path):
    import dataclasses

    paths = {"other": str(learnable)}
    if "{wide}" in str(fields.values()):  # a dataset of another VAE (8 latent channels)
        vae = dataclasses.replace(TINY.vae, z_dim=8, latents_mean=TINY.vae.latents_mean[:8],
                                  latents_std=TINY.vae.latents_std[:8])
        s = [{**x, "latents": x["latents"][..., :8]} for x in _samples(4)]
        paths["wide"] = str(write_dataset(tmp_path / "wide", s, vae))
    if "{odd}" in str(fields.values()):  # 40 px high: 5 latent rows, which the 2x2 patches do not divide
        s = [{**x, "bucket": (9, 40, 48), "latents": np.zeros((3, 5, 6, 16), np.float32)} for x in _samples(2)]
        paths["odd"] = str(write_dataset(tmp_path / "odd", s, TINY.vae))
    config = _config(learnable, **{k: v.format(**paths) if isinstance(v, str) else v for k, v in fields.items()})
    with pytest.raises((ValueError, UsageError)) as e:
        validation_set(config, TINY, shd.create_mesh("data=2", jax.devices()[:2]))
    assert message.format(**paths) in str(e.value), str(e.value)
