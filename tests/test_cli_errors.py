"""Every CLI answers bad input with one named line: exit 2 for a bad flag, 1 for a bad file or request, no
traceback, nothing written, found before any model loads (except the few component-loading cases).

CASES is the table (cli, argv, exit code, text the last stderr line must hold); `{x}` in argv is a path of the
`ws` fixture. Each case runs in-process through the CLI's `cli(argv)` (= `run_cli(prog, main, argv)`); a few
run as `python -m` subprocesses to prove the same end to end. The checkpoint-resume case builds the tiny train
state once (a few seconds); every other case fails at parse or validation time.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_folder  # noqa: F401  (session fixture)

from benchmarks import parity
from contentv_jax import rlhf, train
from contentv_torch import encode_dataset, generate
from convert import cli as convert_cli

ROOT = Path(__file__).resolve().parents[1]
CLIS = {"generate": generate, "train": train, "rlhf": rlhf, "encode": encode_dataset, "convert": convert_cli,
        "parity": parity}
PROGS = {"generate": "python -m contentv_torch.generate", "train": "python -m contentv_jax.train",
         "rlhf": "python -m contentv_jax.rlhf", "encode": "python -m contentv_torch.encode_dataset",
         "convert": "python -m convert", "parity": "python -m benchmarks.parity"}
GEN = ["--model", "{model}", "--prompt", "a cat", "--output", "{out}/v.mp4", "--quiet"]
ENC = ["--model", "{model}", "--captions", "{captions}", "--output", "{out}/ds", "--buckets", "9x32x48", "--quiet"]


def _gen(*extra, model="{model}"):
    return [*GEN[:1], model, *GEN[2:], *extra]


def _enc(*extra, model="{model}"):
    argv = [*ENC[:1], model, *ENC[2:]]
    for flag, value in zip(extra[::2], extra[1::2]):  # a given flag replaces the default one
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


CASES = [
    # ---- generate: numbers checked by argparse (exit 2), never replaced by a default
    *[("generate", _gen(flag, v), 2, f"argument {flag}") for flag, values in {
        "--frames": ["0", "-1", "abc", "9.5"], "--height": ["0", "-8", "abc"], "--width": ["0", "-16", "1e3"],
        "--steps": ["0", "-1", "1.5", "abc"], "--guidance": ["nan", "inf", "-inf", "-1", "0.5", "abc"],
        "--num-videos": ["0", "-2"], "--fps": ["0", "-24", "nan", "inf"], "--seed": ["-1", "x"],
        "--sp": ["0", "-1"], "--dtype": ["int8"], "--sigma-grid": ["karras"]}.items() for v in values],
    ("generate", ["--model", "{model}", "--output", "{out}/v.mp4"], 2, "--prompt"),
    # ---- generate: requests and files (exit 1)
    ("generate", _gen("--frames", "10"), 1, "frame count 10"),
    ("generate", _gen("--height", "24"), 1, "multiples of 16"),
    ("generate", _gen("--width", "50"), 1, "multiples of 16"),
    ("generate", _gen("--frames", "100001", "--height", "432", "--width", "768"), 1, "--frames 100001"),
    ("generate", _gen("--frames", "1000001"), 1, "GiB"),
    ("generate", _gen("--num-videos", "100000", "--height", "1024", "--width", "1024"), 1, "GiB"),
    ("generate", _gen(model="{missing}"), 1, "model folder not found"),
    ("generate", _gen(model="{empty}"), 1, "model folder not found"),
    ("generate", _gen(model="{txt_dir}"), 1, "model_index.json"),
    ("generate", _gen(model="{bad_te3}"), 1, "text_encoder_3"),
    ("generate", _gen(model="{bad_te}"), 1, "text_encoder"),
    ("generate", _gen(model="{bad_vae}"), 1, "vae"),
    ("generate", _gen(model="{bad_dit}"), 1, "transformer"),
    ("generate", _gen(model="{bad_tok}"), 1, "tokenizer_3"),
    ("generate", _gen("--latents-in", "{missing}"), 1, "--latents-in"),
    ("generate", _gen("--latents-in", "{empty}"), 1, "--latents-in"),
    ("generate", _gen("--latents-in", "{txt}"), 1, "--latents-in"),
    ("generate", _gen("--latents-in", "{lat_key}"), 1, "no tensor named 'latents'"),
    ("generate", _gen("--latents-in", "{lat_4d}"), 1, "--latents-in"),
    ("generate", _gen("--latents-in", "{lat_shape}"), 1, "does not match"),
    ("generate", _gen("--latents-in", "{lat_shape}", "--num-videos", "3"), 1, "--num-videos 3"),
    ("generate", _gen("--output", "{txt}/v.mp4"), 1, "not writable"),
    ("generate", _gen("--output", "{dir}"), 1, "is a directory"),
    ("generate", _gen("--latents-out", "{txt}/l.safetensors"), 1, "not writable"),
    ("generate", _gen("--device", "tpu"), 1, "unknown device"),
    ("generate", _gen("--device", "cuda:0"), 1, "cuda"),
    # ---- generate --lora: flags (exit 2), then files checked against the DiT's layers (exit 1)
    ("generate", _gen("--lora-scale", "0.5"), 2, "must follow the --lora FILE"),
    ("generate", _gen("--lora", "{lora_key}", "--lora-scale", "nan"), 2, "argument --lora-scale"),
    ("generate", _gen("--lora", "{lora_key}", "--lora-scale", "abc"), 2, "argument --lora-scale"),
    ("generate", _gen("--lora", "{lora_key}", "--lora-scale", "1", "--lora-scale", "2"), 2, "has a scale already"),
    ("generate", _gen("--lora", "{missing}"), 1, "no such file"),
    ("generate", _gen("--lora", "{evil_pth}"), 1, "not a readable safetensors file"),
    ("generate", _gen("--lora", "{lora_key}"), 1, "transformer_blocks.9.attn.to_q.lora_A.weight names no module"),
    ("generate", _gen("--lora", "{lora_shape}"), 1, "do not fit the Linear [32, 32]"),
    ("generate", _gen("--lora", "{lat_key}"), 1, "'noise' is not a LoRA tensor"),
    # ---- train: flags (exit 2)
    *[("train", [flag, v], 2, f"argument {flag}") for flag, values in {
        "--steps": ["0", "-5", "abc", "1.5"], "--log-every": ["0", "-1"], "--checkpoint-every": ["0", "-3"],
        "--seed": ["-1"], "--resume": ["abc", "-1"], "--on-corrupt": ["maybe"], "--num-processes": ["0"],
        "--process-id": ["-1"], "--checkpoint-dir": ["{txt}"], "--metrics-file": ["{dir}", "{txt}/m.jsonl"],
        "--tb-dir": ["{txt}"]}.items() for v in values],
    # ---- train: config fields after --set / flags (exit 2), before anything is built or written
    *[("train", ["--set", item], 2, item.partition("=")[0]) for item in [
        "optim.lr=-1", "optim.lr=0", "optim.lr=1e999", "optim.lr=abc", "optim.nope=1", "steps=0", "steps=-5",
        "log_every=0", "checkpoint_every=0", "keep_checkpoints=0", "max_nonfinite=0", "optim.b1=1.5",
        "optim.b2=-0.1", "optim.eps=0.0", "optim.ema_decay=2.0", "optim.warmup_steps=-1", "optim.grad_accum=0",
        "optim.clip_norm=-1.0", "optim.end_lr_ratio=1.5", "flow.caption_dropout=-0.1",
        "flow.caption_dropout=1.5", "flow.logit_std=0.0", "flow.shift=-1.0", "data.buckets=[]",
        "data.buckets=[(9, 0, 48, 8)]", "data.num_captions=0",
        "eval.guidance=0.5", "eval.every=-1", "eval.num_steps=0", "init_from='/no/such/ckpt'",
        "data.name='/no/such/dataset'", "seed=-1"]],
    ("train", ["--set", "noequals"], 2, "noequals"),
    # ---- train: the validation set (contentv_jax.validation), refused before the model is built
    *[("train", [flag, v], 2, f"argument {flag}") for flag, v in [("--val-fraction", "1.5"), ("--val-fraction", "x"),
                                                                  ("--eval-every", "-1")]],
    *[("train", ["--set", item], 2, item.partition("=")[0]) for item in [
        "data.val_fraction=1.0", "eval.val_sigmas=()", "eval.val_sigmas=(0.5, 1.5)", "eval.val_sigmas=0.5",
        "eval.val_max_records=-1", "eval.val_batch=-2"]],
    ("train", ["--val-data", "{missing}"], 2, "data.val_data"),
    ("train", ["--val-data", "{val_c8}", "--checkpoint-dir", "{out}/ck"], 2, "eval.every steps, which is 0"),
    ("train", ["--val-data", "{val_c8}", "--val-fraction", "0.1", "--eval-every", "1"], 2, "not both"),
    ("train", ["--val-fraction", "0.1", "--eval-every", "1"], 2, "synthetic set has no records to hold out"),
    ("train", ["--val-data", "{dir}", "--eval-every", "1", "--metrics-file", "{out}/m.jsonl"], 1, "a_dir: no manifest"),
    ("train", ["--val-data", "{val_c8}", "--eval-every", "1", "--metrics-file", "{out}/m.jsonl"], 1,
     "val_c8 does not fit model tiny: latent_channels 8 (model: 16)"),
    ("train", ["--init-from", "{txt}", "--checkpoint-dir", "{out}/ck", "--metrics-file", "{out}/m.jsonl"], 1,
     "notes.txt"),
    ("train", ["--data", "{dir}", "--checkpoint-dir", "{out}/ck"], 1, "a_dir"),
    ("train", ["--set", "data.bucket_weights=[0.0]", "--metrics-file", "{out}/m.jsonl"], 1, "bucket_weights"),
    ("train", ["--config", "huge"], 2, "unknown model"),
    ("train", ["--config", "tiny/rlhf"], 2, "unknown stage"),
    ("train", ["--mesh", "data=3"], 2, "--mesh"),
    ("train", ["--mesh", "pipeline=2"], 2, "unknown axes"),
    ("train", ["--init-from", "{missing}"], 2, "init_from"),
    ("train", ["--data", "{missing}"], 2, "data.name"),
    ("train", ["--resume", "5"], 2, "--resume 5 needs --checkpoint-dir"),
    ("train", ["--resume", "7", "--checkpoint-dir", "{out}/ck"], 2, "no checkpoint at that step"),
    ("train", ["--resume", "no", "--checkpoint-dir", "{ckpt_other}"], 2, "already holds step"),
    ("train", ["--checkpoint-dir", "{ckpt_other}", "--steps", "3", "--metrics-file", "{out}/m.jsonl"], 1,
     "written by a run of another --config"),
    # ---- rlhf
    *[("rlhf", [flag, v], 2, f"argument {flag}") for flag, values in {
        "--steps": ["-1", "0"], "--resume": ["abc"], "--checkpoint-dir": ["{txt}"],
        "--metrics-file": ["{dir}"]}.items() for v in values],
    *[("rlhf", ["--set", item], 2, item.partition("=")[0]) for item in [
        "rlhf.batch=0", "rlhf.grad_window=(3, 1)", "rlhf.grad_window=(0, 99)", "rlhf.rollout_steps=0",
        "rlhf.fm_every=-1", "rlhf.lam=1e999", "rlhf.guidance=0.5", "rlhf.eval_noise=0", "optim.lr=-1e-5"]],
    ("rlhf", ["--config", "huge"], 2, "'huge'"),
    ("rlhf", ["--reward", "{missing}"], 2, "rlhf.reward"),
    ("rlhf", ["--vae", "{missing}"], 2, "rlhf.vae"),
    ("rlhf", ["--prompts", "{missing}"], 2, "rlhf.prompts"),
    ("rlhf", ["--mesh", "data=3"], 2, "--mesh"),
    ("rlhf", ["--resume", "2"], 2, "--checkpoint-dir"),
    # ---- encode_dataset
    *[("encode", _enc(flag, v), 2, f"argument {flag}") for flag, values in {
        "--batch-size": ["0", "-1", "abc"], "--shard-size": ["0"], "--fps": ["0", "nan", "-1"],
        "--max-sequence-length": ["0"], "--part": ["1/1", "abc", "-1/2"], "--text-dtype": ["int8"]}.items()
      for v in values],
    *[("encode", _enc("--buckets", b), 2, "--buckets") for b in
      ["9x32x47", "10x32x48", "abc", "9x32x48,9x32x48", "0x32x48", "9x-32x48"]],
    ("encode", _enc("--buckets", "100001x1024x1024"), 1, "GiB"),
    ("encode", _enc(model="{missing}"), 1, "model folder not found"),
    ("encode", _enc(model="{bad_te3}"), 1, "text_encoder_3"),
    ("encode", _enc(model="{bad_vae}"), 1, "vae"),
    ("encode", _enc(model="{bad_tok}"), 1, "tokenizer_3"),
    ("encode", _enc("--captions", "{missing}"), 1, "--captions"),
    ("encode", _enc("--captions", "{bad_captions}"), 1, "line 2"),
    ("encode", _enc("--captions", "{empty}"), 1, "no entries"),
    ("encode", _enc("--output", "{txt}"), 2, "--output"),
    ("encode", _enc("--overwrite", "", "--part", "0/2"), 1, "--overwrite with --part"),
    # ---- convert
    *[("convert", ["--to", "jax", "{model}/transformer", "{out}/o", "--max-shard-gb", v], 2, "--max-shard-gb")
      for v in ["0", "-1", "nan", "inf", "abc"]],
    ("convert", ["--to", "jax", "{model}/transformer", "{out}/o", "--step", "-1"], 2, "--step"),
    ("convert", ["--to", "onnx", "{model}/transformer", "{out}/o"], 2, "--to"),
    ("convert", ["--to", "jax", "{model}/transformer", "{out}/o", "--from", "gguf"], 2, "--from"),
    ("convert", ["--to", "jax", "{model}/transformer", "{out}/o", "--dtype", "int3"], 2, "--dtype"),
    ("convert", ["--to", "torch", "{empty_pth}", "{out}/o"], 1, "empty.pth"),
    ("convert", ["--to", "torch", "{trunc_pth}", "{out}/o"], 1, "trunc.pth"),
    ("convert", ["--to", "torch", "{evil_pth}", "{out}/o"], 1, "refused to unpickle"),
    ("convert", ["--to", "torch", "{missing}", "{out}/o"], 1, "no such file"),
    ("convert", ["--to", "torch", "{txt}", "{out}/o"], 1, "unknown format"),
    ("convert", ["--to", "torch", "{bad_dit}/transformer", "{out}/o"], 1, "transformer"),
    ("convert", ["--to", "jax", "{model}/transformer", "{dir}"], 1, "already exists"),
    ("convert", ["--to", "jax", "{model}/transformer", "{txt}/sub"], 1, "cannot write"),
    ("convert", ["--to", "jax", "{model}/transformer", "{out}/o", "--ema"], 1, "--ema"),
    ("convert", ["--to", "jax", "{model}/transformer", "{out}/o", "--from", "wan-original"], 1, "single file"),
    # ---- benchmarks.parity
    ("parity", ["--checkpoint", "{missing}"], 2, "--checkpoint"),
    ("parity", ["--checkpoint", "{txt}"], 2, "--checkpoint"),
    ("parity", ["--checkpoint", "{model}/text_encoder"], 2, "no parity runner"),
    ("parity", ["--checkpoint", "{model}/transformer", "--inputs", "{missing}"], 2, "--inputs"),
    ("parity", ["--checkpoint", "{model}/transformer", "--inputs", "{empty}"], 2, "safetensors"),
    ("parity", ["--checkpoint", "{model}/transformer", "--output", "{dir}"], 2, "--output"),
    ("parity", ["--checkpoint", "{model}/transformer", "--output", "{txt}/o.safetensors"], 2, "--output"),
    ("parity", ["--checkpoint", "{model}/transformer", "--seed", "-1"], 2, "--seed"),
    ("parity", ["--checkpoint", "{model}/transformer", "--dtype", "fp8"], 2, "--dtype"),
]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _variant(model: Path, root: Path, name: str, component: str, spoil) -> Path:
    """A model folder whose `component` is a copy spoiled by `spoil(folder)`; the others are links."""
    out = root / name
    out.mkdir()
    for sub in model.iterdir():
        if sub.name == component:
            shutil.copytree(sub, out / sub.name)
            spoil(out / sub.name)
        else:
            (out / sub.name).symlink_to(sub)
    return out


def _spoil_weights(folder: Path) -> None:
    for f in folder.glob("*.safetensors"):
        _truncate(f)


def _spoil_tokenizer(folder: Path) -> None:
    for f in folder.iterdir():
        f.write_text("{not json")


@pytest.fixture(scope="module")
def ws(tiny_folder, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "empty").write_bytes(b"")
    (root / "notes.txt").write_text("hello")
    (root / "a_dir").mkdir()
    (root / "txt_dir").mkdir()
    (root / "txt_dir" / "x.txt").write_text("x")
    (root / "empty.pth").write_bytes(b"")
    torch.save({"encoder.conv1.weight": torch.zeros(8, 8)}, root / "ok.pth")
    (root / "trunc.pth").write_bytes((root / "ok.pth").read_bytes()[:200])

    class Evil:
        def __reduce__(self):
            return (Path.touch, (root / "PWNED",))

    torch.save({"x": Evil()}, root / "evil.pth")
    save_file({"noise": torch.zeros(1, 16, 3, 4, 6)}, str(root / "lat_key.safetensors"))
    save_file({"latents": torch.zeros(16, 3, 4, 6)}, str(root / "lat_4d.safetensors"))
    save_file({"latents": torch.zeros(1, 16, 3, 4, 7)}, str(root / "lat_shape.safetensors"))
    for name, block, down in [("lora_key", 9, (4, 32)), ("lora_shape", 0, (4, 30))]:
        q = f"transformer.transformer_blocks.{block}.attn.to_q"
        save_file({f"{q}.lora_A.weight": torch.zeros(down), f"{q}.lora_B.weight": torch.zeros(32, 4)},
                  str(root / f"{name}.safetensors"))
    (root / "captions.jsonl").write_text(json.dumps({"file": "a.mp4", "caption": "a cat"}) + "\n")
    (root / "bad_captions.jsonl").write_text('{"file": "a.mp4", "caption": "x"}\n{"file": "b.mp4"}\n')
    # a checkpoint of another model (other shapes than the tiny run's): a params tree of the wrong width
    from contentv_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(root / "ckpt_other", every=1)
    ckpt.save(2, {"params": {"x": np.zeros((3, 5), np.float32)}, "step": np.int32(2)}, {"kind": "synthetic"},
              force=True)
    ckpt.close()
    # a latent dataset of another VAE (8 channels) as --val-data
    import dataclasses

    from contentv_common.config import get_preset
    from contentv_common.dataset import write_dataset

    tiny = get_preset("tiny")
    vae8 = dataclasses.replace(tiny.vae, z_dim=8, latents_mean=tiny.vae.latents_mean[:8], latents_std=tiny.vae.latents_std[:8])
    write_dataset(root / "val_c8", [{"bucket": (9, 32, 48), "latents": np.zeros((3, 4, 6, 8), np.float32),
                                     "context": np.zeros((tiny.text.context_tokens, tiny.text.t5_hidden), np.float32),
                                     "pooled": np.zeros(tiny.text.pooled_dim, np.float32), "caption": "c", "source": "a.mp4"}],
                  vae8)
    paths = {
        "model": tiny_folder, "val_c8": root / "val_c8", "missing": root / "no_such_thing", "empty": root / "empty", "txt": root / "notes.txt",
        "dir": root / "a_dir", "txt_dir": root / "txt_dir", "captions": root / "captions.jsonl",
        "bad_captions": root / "bad_captions.jsonl", "ckpt_other": root / "ckpt_other",
        "empty_pth": root / "empty.pth", "trunc_pth": root / "trunc.pth", "evil_pth": root / "evil.pth",
        **{k: root / f"{k}.safetensors" for k in ("lat_key", "lat_4d", "lat_shape", "lora_key", "lora_shape")},
    }
    for name, component, spoil in [("bad_te3", "text_encoder_3", _spoil_weights), ("bad_te", "text_encoder", _spoil_weights),
                                   ("bad_vae", "vae", _spoil_weights), ("bad_dit", "transformer", _spoil_weights),
                                   ("bad_tok", "tokenizer_3", _spoil_tokenizer)]:
        paths[name] = _variant(tiny_folder, root, name, component, spoil)
    yield {k: str(v) for k, v in paths.items()}
    assert not (root / "PWNED").exists()


def _argv(case_argv, ws, out: Path) -> list[str]:
    return [a.format(**ws, out=out) for a in case_argv if a != ""]


def _check_answer(cli: str, rc: int, err: str, want_rc: int, want: str, out: Path) -> None:
    assert "Traceback" not in err, err
    assert rc == want_rc, err
    assert sum(line.startswith(f"{PROGS[cli]}: error: ") for line in err.splitlines()) == 1, err
    assert want in err, err
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))


@pytest.mark.parametrize("cli, argv, rc, want", CASES, ids=[f"{c[0]}:{' '.join(c[1][-2:])}" for c in CASES])
def test_bad_input_gets_one_named_line(cli, argv, rc, want, ws, tmp_path, capsys):
    out = tmp_path / "out"
    t0 = time.perf_counter()
    got = CLIS[cli].cli(_argv(argv, ws, out))
    err = capsys.readouterr().err
    _check_answer(cli, got, err, rc, want, out)
    assert time.perf_counter() - t0 < 30


def test_the_table_covers_every_cli_with_100_cases():
    assert len(CASES) >= 100 and set(CLIS) == {c[0] for c in CASES}


def test_debug_shows_the_traceback(ws, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert generate.cli(_argv(_gen("--steps", "0", "--debug"), ws, out)) == 2  # argparse's own line
    assert "Traceback" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="frame count 10"):
        generate.cli(_argv(_gen("--frames", "10", "--debug"), ws, out))
    monkeypatch.setenv("CONTENTV_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown format"):
        convert_cli.cli(_argv(["--to", "torch", "{txt}", "{out}/o"], ws, out))


@pytest.mark.parametrize("case", [0, 1, 2, 3, 4, 5])
def test_subprocess_end_to_end(case, ws, tmp_path):
    """One case per CLI as a user runs it: `python -m ...`, exit code, one line, no traceback, in time."""
    picks = [("generate", _gen("--frames", "10"), 1, "frame count 10"),
             ("train", ["--set", "optim.lr=1e999"], 2, "optim.lr"),
             ("rlhf", ["--steps", "-1"], 2, "--steps"),
             ("encode", _enc(model="{bad_te3}"), 1, "text_encoder_3"),
             ("convert", ["--to", "torch", "{empty_pth}", "{out}/o"], 1, "empty.pth"),
             ("parity", ["--checkpoint", "{model}/transformer", "--output", "{dir}"], 2, "--output")]
    cli, argv, rc, want = picks[case]
    out = tmp_path / "out"
    module = PROGS[cli].split()[-1]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module, *_argv(argv, ws, out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    _check_answer(cli, proc.returncode, proc.stderr, rc, want, out)
    assert time.perf_counter() - t0 < 60


def test_checkpoint_state_comparison_names_the_first_difference(tmp_path):
    import jax

    from contentv_common.cli import UserError
    from contentv_jax.checkpoint import Checkpointer, check_state_matches

    ckpt = Checkpointer(tmp_path / "ck", every=1)
    assert not (tmp_path / "ck").exists()  # made at the first save only
    ckpt.save(1, {"params": {"w": np.zeros((2, 3), np.float32)}, "opt": [np.zeros(3, np.float32)]}, {}, force=True)
    ckpt.close()
    item = tmp_path / "ck" / "1" / "state"
    spec = lambda *shape, dtype=np.float32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    check_state_matches(item, {"params": {"w": spec(2, 3)}, "opt": [spec(3)]})
    with pytest.raises(UserError, match=r"params/w is float32\[2, 3\] in the checkpoint, float32\[2, 4\] in this run"):
        check_state_matches(item, {"params": {"w": spec(2, 4)}, "opt": [spec(3)]})
    with pytest.raises(UserError, match=r"opt/0 is float32\[3\] in the checkpoint, bfloat16\[3\]"):
        check_state_matches(item, {"params": {"w": spec(2, 3)}, "opt": [spec(3, dtype=jax.numpy.bfloat16)]})
    with pytest.raises(UserError, match="state entry opt/1 is only in this run"):
        check_state_matches(item, {"params": {"w": spec(2, 3)}, "opt": [spec(3), spec(1)]})


def test_every_shipped_config_passes_validation():
    from contentv_jax import configs

    for model in ("tiny", "small", "contentv-8b"):
        for stage in configs.STAGES:
            configs.validate_config(configs.get_config(f"{model}/{stage}"))
        configs.validate_config(rlhf.get_config(model))
