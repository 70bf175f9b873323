"""`python -m contentv_jax.train`: flags, metrics JSONL + TensorBoard, one compile per bucket, eval mp4s, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from contentv_jax import train as T

ROOT = Path(__file__).resolve().parents[1]


def test_help_documents_the_flags():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "contentv_jax.train", "--help"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--config", "--data", "--steps", "--mesh", "--checkpoint-dir", "--resume", "--metrics-file",
                 "--init-from", "--set", "--coordinator-address"):
        assert flag in out.stdout, flag
    assert "synthetic" in out.stdout and "data=2,fsdp=2,tensor=2" in out.stdout


def test_joint_buckets_metrics_tensorboard_and_eval_samples(tmp_path, capsys):
    metrics = tmp_path / "run" / "metrics.jsonl"
    rc = T.main(["--config", "tiny/joint", "--steps", "6", "--log-every", "1", "--mesh", "data=2,fsdp=-1",
                 "--metrics-file", str(metrics), "--fast-compile", "--set", "eval.every=6", "--set", "eval.num_steps=2",
                 "--set", "eval.frames=1", "--set", "eval.num_prompts=2"])
    out = capsys.readouterr().out
    assert rc == 0, out
    # two bucket shapes (video T=3 batch 8, image T=1 batch 16) alternate A B A B B B: exactly two compiles
    assert out.count("compiled the step for bucket") == 2 and "2 compiled step(s)" in out, out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for r in records:
        for key in ("loss", "grad_norm", "param_norm", "update_norm", "lr", "skipped"):
            assert key in r and r[key] == r[key], (key, r)  # present and not NaN
    assert any("steps_per_s" in r and "tokens_per_s" in r and "mfu" in r for r in records)
    assert list((metrics.parent / "tb").glob("events.out.tfevents.*"))
    mp4s = sorted((metrics.parent / "samples" / "step_0000006").glob("*.mp4"))
    assert len(mp4s) == 2
    from contentv_torch.video_io import read_mp4

    frames, fps = read_mp4(mp4s[0])
    assert frames.shape == (1, 32, 48, 3) and fps == pytest.approx(24)


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=3"], "--mesh"),
    (["--mesh", "pipeline=2"], "unknown axes"),
    (["--config", "huge"], "unknown model"),
    (["--config", "tiny/rlhf"], "unknown stage"),
    (["--set", "optim.nope=1"], "optim.nope"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys):
    assert T.main(argv) == 2
    assert message in capsys.readouterr().err
