"""`python -m contentv_jax.train`: flags, metrics JSONL + TensorBoard, one compile per bucket, eval mp4s, errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from contentv_jax import configs
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
    ckpt = tmp_path / "ckpt"
    rc = T.main(["--config", "tiny/joint", "--steps", "6", "--log-every", "1", "--mesh", "data=2,fsdp=-1",
                 "--metrics-file", str(metrics), "--checkpoint-dir", str(ckpt), "--fast-compile", "--set", "eval.every=6", "--set", "eval.num_steps=2",
                 "--set", "eval.frames=1", "--set", "eval.num_prompts=2", "--set", "flow.caption_dropout=0.1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "caption dropout 0.1" in out  # the synthetic set's empty prompt (null_text) stands in for dropped captions
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
    from contentv_common.video_io import read_mp4

    frames, fps = read_mp4(mp4s[0])
    assert frames.shape == (1, 32, 48, 3) and fps == pytest.approx(24)

    # Next stage: --init-from the joint run's checkpoint, on an on-disk latent dataset (--data DIR).
    data = _dataset(tmp_path / "ds")
    rc = T.main(["--config", "tiny/duration", "--data", str(data), "--set", "data.buckets=[(9, 32, 48, 8)]",
                 "--init-from", str(ckpt), "--steps", "2", "--log-every", "1", "--mesh", "data=2,fsdp=-1", "--fast-compile"])
    out = capsys.readouterr().out
    assert rc == 0 and f"initialised params from {ckpt}" in out, out
    # the init really is the checkpoint's params (read back with plain orbax, not the trainer's loader)
    import orbax.checkpoint as ocp

    saved = ocp.StandardCheckpointer().restore((ckpt / "6" / "state").absolute())["params"]
    config = configs.get_config("tiny/duration")
    config.steps, config.init_from = 0, str(ckpt)
    got = T.train(config, mesh_spec="data=2,fsdp=-1", log=lambda s: None,
                  compiler_options={"xla_backend_optimization_level": 0})["state"].params
    for a, b in zip(jax.tree.leaves(jax.device_get(got)), jax.tree.leaves(saved)):
        np.testing.assert_array_equal(a, b)


def _dataset(path):
    """A small on-disk latent dataset in the dataset engineer's format (contentv_common.dataset)."""
    from contentv_common.config import get_preset
    from contentv_common.dataset import write_dataset
    from contentv_jax.data import Bucket

    preset, r = get_preset("tiny"), np.random.default_rng(0)
    shape = Bucket(9, 32, 48, 1).latent_shape(preset)
    samples = [{"bucket": (9, 32, 48), "latents": r.standard_normal(shape, np.float32),
                "context": r.standard_normal((preset.text.context_tokens, preset.text.t5_hidden), np.float32),
                "pooled": r.standard_normal(preset.text.pooled_dim, np.float32), "caption": f"c{i}", "source": f"{i}.mp4"}
               for i in range(16)]
    return write_dataset(path, samples, preset.vae, shard_rows=8)


@pytest.mark.parametrize("argv, message", [
    (["--mesh", "data=3"], "--mesh"),
    (["--mesh", "pipeline=2"], "unknown axes"),
    (["--config", "huge"], "unknown model"),
    (["--config", "tiny/rlhf"], "unknown stage"),
    (["--set", "optim.nope=1"], "optim.nope"),
])
def test_bad_flags_fail_with_a_clear_message(argv, message, capsys):
    assert T.cli(argv) == 2
    assert message in capsys.readouterr().err


def test_init_from_reads_every_transformer_format(tmp_path):
    """`--init-from` goes through the converter (`convert.formats.iter_params`): an SD3.5 diffusers folder, the SD3.5
    original single file, a whole model folder (model_index.json + transformer/) and the JAX format written by
    `python -m convert` all land, sharded, as the same params; a mismatched model names the key."""
    import dataclasses
    import inspect

    import flax.linen as nn
    import torch
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    from contentv_common.config import get_preset
    from contentv_jax import sharding as shd
    from contentv_common.formats import sd3_original
    from convert.cli import main as convert_main
    from contentv_common.formats.sources import load_params

    preset = get_preset("tiny")
    model = T.build_model(configs.get_config("tiny"), preset)
    mesh = shd.create_mesh("fsdp=2,tensor=2", jax.devices()[:4])
    abstract = jax.eval_shape(lambda r: model.init(r, *T._dummy_inputs(preset))["params"], jax.random.PRNGKey(0))
    shardings, abstract = shd.logical_shardings(abstract, mesh), nn.meta.unbox(abstract)

    def sd35(cfg, seed):  # diffusers SD3Transformer2DModel (the SD3.5 Large layout, learned 2D pos_embed)
        kw = {k: v for k, v in cfg.to_diffusers_config().items()
              if k in inspect.signature(SD3Transformer2DModel.__init__).parameters}
        torch.manual_seed(seed)
        return SD3Transformer2DModel(**kw).eval()

    m = sd35(preset.transformer, 1)
    m.save_pretrained(tmp_path / "sd35" / "transformer", max_shard_size="30KB")  # sharded + index
    (tmp_path / "sd35" / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(sd3_original.diffusers_to_original(state, preset.transformer), tmp_path / "sd3.5_large.safetensors")
    assert convert_main(["-q", "--to", "jax", str(tmp_path / "sd35" / "transformer"), str(tmp_path / "jax")]) == 0

    want = load_params(tmp_path / "sd35" / "transformer", dtype="float32")[1]
    for src in ("sd35", "sd35/transformer", "sd3.5_large.safetensors", "jax"):
        got = T.load_init_params(str(tmp_path / src), abstract, shardings)
        leaves = jax.tree_util.tree_leaves_with_path(got)
        assert len(leaves) == len(jax.tree.leaves(want)), src
        for (path, a), b, s in zip(leaves, jax.tree.leaves(want), jax.tree.leaves(shardings), strict=True):
            assert a.sharding == s and a.dtype == np.float32, (src, path)
            np.testing.assert_array_equal(np.asarray(a), b, err_msg=f"{src} {jax.tree_util.keystr(path)}")
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(got))  # really placed in shards

    wrong = dataclasses.replace(preset.transformer, joint_attention_dim=2 * preset.transformer.joint_attention_dim)
    sd35(wrong, 2).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="(?s)--init-from: .*wide.*context_embedder/kernel: \\(64, 32\\) != expected \\(32, 32\\)"):
        T.load_init_params(str(tmp_path / "wide"), abstract, shardings)
    with pytest.raises(FileNotFoundError, match="--init-from: .*nowhere"):
        T.load_init_params(str(tmp_path / "nowhere"), abstract, shardings)


def _corrupt_row(shard: Path, row: int) -> None:
    """Flip bytes inside `row` of the shard's latents (a valid safetensors file whose data no longer matches)."""
    raw = bytearray(shard.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    t = json.loads(raw[8:8 + n])["latents"]
    row_bytes = (t["data_offsets"][1] - t["data_offsets"][0]) // t["shape"][0]
    at = 8 + n + t["data_offsets"][0] + row * row_bytes + 16
    raw[at:at + 8] = bytes(b ^ 0xFF for b in raw[at:at + 8])
    shard.write_bytes(bytes(raw))


def test_data_on_corrupt_error_or_skip(tmp_path, capsys):
    """data.on_corrupt (--on-corrupt): "error" (default) stops naming the shard file and record; "skip" drops an
    unreadable shard, replaces a row failing its checksum, logs them and counts both in the metrics."""
    from contentv_common.dataset import MANIFEST_NAME, CorruptDataError

    data = _dataset(tmp_path / "ds")  # 16 records of bucket (9, 32, 48) in two shards of 8 rows
    manifest = json.loads((data / MANIFEST_NAME).read_text())
    first, second = (data / s["file"] for s in manifest["shards"])
    rec = next(i for i, r in enumerate(manifest["records"]) if r["shard"] == 0 and r["row"] == 3)
    _corrupt_row(first, 3)
    argv = ["--data", str(data), "--set", "data.buckets=[(9, 32, 48, 8)]", "--steps", "2", "--log-every", "1",
            "--mesh", "data=2,fsdp=-1", "--fast-compile"]
    with pytest.raises(CorruptDataError, match=rf"record {rec} .*{first.name} row 3: checksum mismatch"):
        T.main(argv)
    second.write_bytes(second.read_bytes()[:100])  # truncated: unreadable
    with pytest.raises(CorruptDataError, match=rf"shard .*{second.name}"):
        T.main(argv + ["--on-corrupt", "error"])

    metrics = tmp_path / "m.jsonl"
    assert T.main(argv + ["--on-corrupt", "skip", "--metrics-file", str(metrics)]) == 0
    out = capsys.readouterr().out
    assert "SKIPPING 8 records of unreadable shards" in out and second.name in out, out
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    # one readable shard = one batch of 8 per epoch, holding the corrupt row: replaced once per step
    assert [(r["data_unreadable_records"], r["data_corrupt_records"]) for r in records] == [(8, 1), (8, 2)]
    assert all(np.isfinite(r["loss"]) for r in records)
    with pytest.raises(ValueError, match="data.on_corrupt='maybe'"):
        T.train(configs.apply_overrides(configs.get_config("tiny"), [f"data.name={data}", "data.on_corrupt=maybe"]))
