"""Checkpoints: a SIGKILLed run restarted with the same command resumes and reproduces the uninterrupted
run's losses; SIGTERM saves and exits; non-finite updates are skipped, counted and stop the run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from contentv_common.config import get_preset
from contentv_jax import configs, sharding as shd
from contentv_jax import train as T
from contentv_jax.checkpoint import Checkpointer
from contentv_jax.data import BatchSource, SyntheticCaptionedSource, buckets_from_config

ROOT = Path(__file__).resolve().parents[1]
STEPS = 40


def _env(cache: Path) -> dict:
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONPATH=str(ROOT))
    return env


def _cmd(run: Path) -> list[str]:
    # 2 devices (fsdp 2: sharded checkpoints), a bucket big enough that 40 steps take a few seconds.
    return [sys.executable, "-m", "contentv_jax.train", "--steps", str(STEPS), "--log-every", "1",
            "--checkpoint-every", "5", "--mesh", "fsdp=2", "--fast-compile", "--set", "data.buckets=[(17, 64, 96, 4)]",
            "--set", "optim.warmup_steps=3", "--checkpoint-dir", str(run / "ckpt"), "--metrics-file", str(run / "m.jsonl")]


def _records(run: Path) -> list[dict]:
    path = run / "m.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _finished_steps(run: Path) -> list[int]:
    d = run / "ckpt"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _start_and_wait_for_checkpoint(run: Path, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(_cmd(run), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not _finished_steps(run) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, f"run ended before its first checkpoint:\n{proc.stdout.read()}"
    return proc


def test_sigkill_then_same_command_resumes_and_reproduces(tmp_path):
    env = _env(tmp_path / "jax_cache")
    ref = tmp_path / "ref"
    done = subprocess.run(_cmd(ref), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ref_losses = {r["step"]: r["loss"] for r in _records(ref)}
    assert sorted(ref_losses) == list(range(1, STEPS + 1))

    run = tmp_path / "killed"
    proc = _start_and_wait_for_checkpoint(run, env)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in _records(run))
    assert killed_at < STEPS, "the run finished before it could be killed"

    again = subprocess.run(_cmd(run), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = [line for line in again.stdout.splitlines() if line.startswith("resumed from")]
    assert resumed, again.stdout
    resumed_step = int(resumed[0].split()[-1])
    assert resumed_step >= 5 and resumed_step % 5 == 0
    records = _records(run)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # no step twice, none missing
    for r in records:  # the steps redone after the resume reproduce the uninterrupted run
        assert r["loss"] == pytest.approx(ref_losses[r["step"]], rel=1e-6, abs=0), r
    print(f"killed after step {killed_at}, resumed from {resumed_step}, final loss {records[-1]['loss']:.6f} "
          f"== ref {ref_losses[STEPS]:.6f}")

    # SIGTERM: save the current step and exit cleanly (same cache: no compile).
    term = tmp_path / "term"
    proc = _start_and_wait_for_checkpoint(term, env)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    last = max(r["step"] for r in _records(term))
    assert f"SIGTERM: saved step {last}" in out and _finished_steps(term)[-1] == last


class _NaNAfter(BatchSource):
    """The synthetic source, with NaN latents from batch `start` on."""

    def __init__(self, inner, start):
        self.inner, self.start, self.buckets = inner, start, inner.buckets

    def next(self):
        index = self.inner.state()["index"]
        batch = self.inner.next()
        if index >= self.start:
            batch["latents"] = np.full_like(batch["latents"], np.nan)
        return batch

    def state(self):
        return self.inner.state()

    def restore(self, state):
        self.inner.restore(state)


def test_nonfinite_updates_are_skipped_then_stop_keeping_last_good_checkpoint(tmp_path):
    config = configs.get_config("tiny")
    config.steps, config.log_every, config.checkpoint_every, config.max_nonfinite = 8, 1, 2, 3
    preset = get_preset("tiny")
    source = _NaNAfter(SyntheticCaptionedSource(preset, buckets_from_config(config.data.buckets), seed=config.seed), 3)
    logs = []
    mesh = shd.create_mesh("data=1", jax.devices()[:1])
    with pytest.raises(T.NonFiniteError, match="step 6: 3 consecutive non-finite.*step 2"):
        T.train(config, mesh=mesh, checkpoint_dir=str(tmp_path / "ckpt"), metrics_file=str(tmp_path / "m.jsonl"),
                source=source, log=logs.append, compiler_options={"xla_backend_optimization_level": 0})
    records = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [0, 0, 0, 1, 1, 1]
    assert [r["nonfinite"] for r in records] == [0, 0, 0, 1, 2, 3]
    # skipped steps leave the params alone: param_norm frozen after step 3
    assert records[3]["param_norm"] == records[4]["param_norm"] == records[5]["param_norm"] == records[2]["param_norm"]
    assert any("skipped 2 in a row" in line for line in logs)
    ckpt = Checkpointer(tmp_path / "ckpt")
    assert ckpt.all_steps() == [2]  # no checkpoint taken during the run of skipped updates (step 4 and 6)
    ckpt.close()
