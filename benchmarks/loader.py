"""Loader throughput (samples/s from shards) against the trainer's step rate, at a preset's real shapes.

    python -m benchmarks.loader [--config small/joint] [--records 96] [--batches 40] [--train-steps 4]
                                [--store-dtype float32] [--dir /tmp/loader-bench]

1. Writes a dataset of random records at the config's buckets with the preset's real shapes
   (`small`: latents [T, H/8, W/8, 16], context [333, 4096], pooled [2048]) through `write_dataset`.
2. Times `ShardedLatentSource.next()` over --batches batches (after 2 warm-up batches), with prefetch 0 and 2
   threads. The shards were just written, so this is the warm page-cache rate (disk reads not included).
3. Times --train-steps jitted train steps per bucket through `contentv_jax.train` (build_model,
   create_train_state, make_train_step, StepCache, place_batch; compile excluded) on this machine's devices,
   fed from the same source.
Prints a table and one markdown row for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import logging
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_random_dataset(folder: Path, preset, buckets, records: int, dtype: str, seed: int = 0) -> Path:
    """`records` random records spread over the buckets in proportion to their batch sizes."""
    from contentv_common.dataset import write_dataset

    rng = np.random.default_rng(seed)
    t = preset.text
    total = sum(b.batch for b in buckets)
    counts = [max(b.batch, records * b.batch // total) for b in buckets]

    def samples():
        for b, n in zip(buckets, counts):
            shape = b.latent_shape(preset)
            for i in range(n):
                yield {"bucket": (b.frames, b.height, b.width), "latents": rng.standard_normal(shape, np.float32),
                       "context": rng.standard_normal((t.context_tokens, t.t5_hidden), np.float32),
                       "pooled": rng.standard_normal(t.pooled_dim, np.float32), "caption": f"random {i}", "source": f"r{i}"}

    return write_dataset(folder, samples(), preset.vae, dtype=dtype, shard_rows=32)


def time_loader(path, preset, buckets, batches: int, prefetch: int) -> tuple[float, float]:
    """-> (samples/s, MB/s) of next() over `batches` batches after 2 warm-up batches."""
    from contentv_common.dataset import ShardedLatentSource

    src = ShardedLatentSource(path, preset, buckets, seed=0, prefetch=prefetch)
    for _ in range(2):
        src.next()
    n = nbytes = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = src.next()
        n += b["latents"].shape[0]
        nbytes += sum(x.nbytes for x in b.values())
    dt = time.perf_counter() - t0
    src.close()
    return n / dt, nbytes / dt / 1e6


def time_train(config, path, preset, buckets, steps: int) -> dict:
    """Per bucket: seconds per jitted train step (compile excluded) and samples/s, batches from the dataset."""
    import jax

    from contentv_common.dataset import ShardedLatentSource
    from contentv_jax import sharding as shd
    from contentv_jax import train as tr
    from contentv_jax.optim import make_optimizer

    logging.getLogger("contentv_common.dataset").setLevel(logging.ERROR)  # one bucket at a time: the rest unused
    mesh = shd.create_mesh(config.mesh)
    model = tr.build_model(config, preset)
    tx = make_optimizer(config.optim, config.steps)
    state, shardings = tr.create_train_state(model, tx, preset, mesh, config.seed)
    step = tr.StepCache(tr.make_train_step(model, tx, config, preset.transformer.patch_size), shardings, mesh)
    out = {}
    for b in buckets:
        src = ShardedLatentSource(path, preset, [b], seed=0, prefetch=0)
        state, m = step(state, tr.place_batch(src.next(), mesh))  # compile
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, tr.place_batch(src.next(), mesh))
        jax.block_until_ready(m)
        dt = (time.perf_counter() - t0) / steps
        out[(b.frames, b.height, b.width, b.batch)] = (dt, b.batch / dt, float(m["loss"]))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.loader", description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="small/joint", help="trainer config <model>/<stage> (its buckets and preset)")
    ap.add_argument("--records", type=int, default=96, help="records to write (split over the buckets)")
    ap.add_argument("--batches", type=int, default=40, help="batches timed per loader setting")
    ap.add_argument("--train-steps", type=int, default=4, help="timed train steps per bucket (0: loader only)")
    ap.add_argument("--store-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--dir", default=None, help="where to write the dataset (default: a temporary folder, removed)")
    args = ap.parse_args(argv)

    from contentv_common.config import get_preset
    from contentv_jax import configs
    from contentv_jax.data import buckets_from_config

    config = configs.get_config(args.config)
    preset = get_preset(config.model)
    buckets = buckets_from_config(config.data.buckets)
    tmp = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="loader-bench-"))
    try:
        t0 = time.perf_counter()
        path = write_random_dataset(tmp / "data", preset, buckets, args.records, args.store_dtype)
        size = sum(f.stat().st_size for f in (path / "shards").iterdir())
        print(f"wrote {args.records} records ({size / 1e6:.0f} MB, {args.store_dtype}) in {time.perf_counter() - t0:.1f}s "
              f"for buckets {[tuple(b.__dict__.values()) for b in buckets]}")
        loader = {p: time_loader(path, preset, buckets, args.batches, p) for p in (0, 2)}
        for p, (sps, mbps) in loader.items():
            print(f"loader prefetch={p}: {sps:.1f} samples/s ({mbps:.0f} MB/s)")
        train = time_train(config, path, preset, buckets, args.train_steps) if args.train_steps else {}
        for b, (dt, sps, loss) in train.items():
            print(f"train step {b}: {dt * 1e3:.0f} ms/step, {sps:.1f} samples/s (loss {loss:.3f})")
        best = max(s for s, _ in loader.values())
        import jax

        dev = f"{jax.devices()[0].device_kind} x{jax.device_count()}"
        host = f"{platform.machine()} {__import__('os').cpu_count()} cores"
        if train:
            slowest_need = max(sps for _, sps, _ in train.values())
            verdict = f"{best / slowest_need:.0f}x the fastest bucket's need"
            steps = ", ".join(f"{b[0]}x{b[1]}x{b[2]} b{b[3]}: {dt * 1e3:.0f} ms ({sps:.1f} samples/s)" for b, (dt, sps, _) in train.items())
        else:
            verdict, steps = "trainer not timed", "-"
        print("\n| benchmark | config | host / device | loader samples/s (prefetch 0 / 2) | train step (per bucket) | headroom |")
        print("|---|---|---|---|---|---|")
        print(f"| loader | {args.config}, {args.store_dtype} shards, warm cache | {host} / {dev} | "
              f"{loader[0][0]:.0f} / {loader[2][0]:.0f} ({loader[2][1]:.0f} MB/s) | {steps} | {verdict} |")
    finally:
        if not args.dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
