"""examples/e2e.py end to end with a handful of steps (`--quick`): every phase runs its real CLI and writes every
artefact with the right shapes. Accuracy is the full run's business (see the README), not this test's."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from examples import shapes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("direction", list(shapes.DIRECTIONS))
def test_analyse_reads_rendered_clips(direction):
    rng = np.random.default_rng(0)
    for colour in shapes.COLOURS:
        for shape in shapes.SHAPES:
            cap = shapes.Caption(colour, shape, direction)
            a = shapes.analyse(shapes.render(cap, 9, 32, 48, rng))
            assert shapes.score(cap, a) == {"colour": True, "direction": True, "both": True}, (cap, a)
    for cap in shapes.new_captions():  # the LoRA phase's concept, read when the analyser may answer it
        v = shapes.render(cap, 9, 32, 48, rng)
        assert shapes.score(cap, shapes.analyse(v, shapes.ALL_DIRECTIONS))["both"], cap
        assert shapes.analyse(v).direction in ("right", "down")  # the base phases' analyser has no such answer
    still = np.full((9, 32, 48, 3), shapes.BACKGROUND, np.uint8)
    assert shapes.analyse(still).colour is None and shapes.analyse(still).direction is None


def test_heldout_captions_are_never_trained():
    train, held = shapes.captions("train"), shapes.captions("heldout")
    assert {(c.colour, c.direction) for c in train}.isdisjoint({(c.colour, c.direction) for c in held})
    # every held-out colour and direction is trained, with other partners
    assert {c.colour for c in held} <= {c.colour for c in train} and {c.direction for c in held} <= {c.direction for c in train}
    assert len(held) == 2 * len(shapes.HELDOUT_PAIRS) and len(train) + len(held) == len(shapes.captions())
    with pytest.raises(ValueError, match="split"):
        shapes.captions("test")


def test_e2e_quick(tmp_path):
    from PIL import Image

    from contentv_torch.pipeline import read_model_info
    from contentv_torch.transformer import ContentVTransformer3DModel
    from contentv_torch.vae import WanVAE
    from contentv_common.video_io import read_mp4

    out = tmp_path / "e2e"
    proc = subprocess.run([sys.executable, "-m", "examples.e2e", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for phase in ("1/8 clips", "2/8 vae", "3/8 encode", "4/8 train", "5/8 convert", "6/8 generate", "7/8 check",
                  "8/8 lora: clips", "8/8 lora: encode", "8/8 lora: train", "8/8 lora: generate", "8/8 lora: check"):
        assert f"[{phase}]" in proc.stdout + proc.stderr, f"no summary line for phase {phase}"

    # 1. clips: the real encode_dataset input, training captions only
    lines = [json.loads(x) for x in (out / "clips" / "captions.jsonl").read_text().splitlines()]
    assert [x["caption"] for x in lines] == [c.text for c in shapes.captions("train")]
    frames, fps = read_mp4(out / "clips" / lines[0]["file"])
    assert frames.shape == (9, 32, 48, 3) and fps == 24
    # 2. the trained VAE: our JAX format and the diffusers vae/ converted from it, with measured latent stats
    assert json.loads((out / "vae_flax" / "config.json").read_text())["_contentv_format"] == "flax"
    vae = WanVAE.from_pretrained(out / "ContentV-shapes" / "vae")
    assert vae.config.latents_std != get_default_vae_std()
    # 3-5. dataset, checkpoint, converted folder
    manifest = json.loads((out / "dataset" / "manifest.json").read_text())
    assert json.dumps(manifest).count("9x32x48") >= 1
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == 2
    assert "caption dropout 0.1" in proc.stdout + proc.stderr  # the trainer learns the unconditional model CFG needs
    info = read_model_info(out / "ContentV-shapes-trained")
    assert info.preset.name == "tiny"
    ContentVTransformer3DModel.from_pretrained(out / "ContentV-shapes-trained" / "transformer")
    # 6. samples and contact sheets: rows = prompts (2 held-out + 1 seen), columns = frames
    for name in ("trained", "untrained"):
        videos = sorted((out / "samples" / name).glob("*.mp4"))
        assert [v.name.split("-")[1] for v in videos] == ["heldout", "heldout", "seen"], videos
        for v in videos:
            assert read_mp4(v)[0].shape == (9, 32, 48, 3)
    for sheet in ("contact_sheet.png", "contact_sheet_untrained.png"):
        with Image.open(out / sheet) as im:
            assert im.size == (9 * (48 + 2) + 2, 3 * (32 + 2) + 2) and im.mode == "RGB"
    # 7. the report
    report = json.loads((out / "report.json").read_text())
    assert report["analyser_accuracy_on_training_clips"] == 1.0 and report["settings"]["guidance"] == 2.0
    held, seen = {c.text for c in shapes.captions("heldout")}, {c.text for c in shapes.captions("train")}
    for name in ("trained", "untrained"):
        m = report["models"][name]
        assert m["videos"] == 2 and m["seen"]["videos"] == 1 and len(m["per_video"]) == 3
        for k in ("colour_accuracy", "direction_accuracy", "both_accuracy"):
            assert 0.0 <= m[k] <= 1.0 and 0.0 <= m["seen"][k] <= 1.0
        assert [r["prompt"] in held for r in m["per_video"]] == [True, True, False]
        assert m["per_video"][2]["prompt"] in seen
    assert set(report["timings_s"]) >= {"clips", "vae", "encode", "train", "convert", "generate"}

    # 8. LoRA on the trained folder: new-concept + validation clips, adapter file, videos with / without it, report
    from contentv_torch.lora import read_lora

    lora = out / "lora"
    new = [json.loads(x)["caption"] for x in (lora / "clips" / "captions.jsonl").read_text().splitlines()]
    assert new == [c.text for c in shapes.new_captions() + shapes.captions("train")]  # new concept, then replay
    assert all("diagonally" in c for c in new[:6]) and not any("diagonally" in c for c in new[6:])
    adapter = read_lora(lora / "lora.safetensors")
    assert {lay.rank for lay in adapter.layers.values()} == {2} and len(adapter.layers) == 21
    rep = json.loads((lora / "report.json").read_text())
    assert rep["analyser_accuracy_on_new_clips"] == 1.0
    assert [step for step, _ in rep["val_loss"]] == [0, 1, 2]  # --val-data every step, from the base at step 0
    for name in ("base", "lora"):
        videos = sorted((lora / "samples" / name).glob("*.mp4"))
        assert [v.name.split("-")[1] for v in videos] == ["new", "new", "heldout", "heldout", "seen"], videos
        m = rep["models"][name]
        assert (m["new"]["videos"], m["heldout"]["videos"], m["seen"]["videos"]) == (2, 2, 1)
        assert all(0.0 <= m[g][k] <= 1.0 for g in ("new", "heldout", "seen") for k in ("colour_accuracy", "both_accuracy"))
    assert (lora / "contact_sheet.png").is_file() and (lora / "contact_sheet_base.png").is_file()


@pytest.mark.parametrize("argv, want", [
    (["--phases", "lora"], "needs a trained ContentV folder"),
    (["--phases", "lora,base2"], "--phases lora,base2"),
    (["--phases", "base", "--base", "x"], "--base is the trained folder of an earlier run"),
])
def test_e2e_phase_flags(argv, want, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "examples.e2e", "--quick", "--out", str(tmp_path / "o"), *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and want in proc.stderr, proc.stderr
    assert not (tmp_path / "o" / "lora").exists()


def get_default_vae_std():
    from contentv_common.config import WAN21_LATENTS_STD

    return WAN21_LATENTS_STD


def test_e2e_rejects_unknown_setting(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "examples.e2e", "--quick", "--out", str(tmp_path), "--set", "steps=3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "steps=3" in proc.stderr and "dit_steps" in proc.stderr


def test_vae_windows_of_5_frames_leave_the_upsample_cache_taps_untrained():
    """The demo's last-latent-frame drift: its VAE was trained on 5-frame windows (2 latent frames). The decoder's
    temporal upsamples run no time conv on latent frame 0 and start frame 1 from a zero cache, so the tap that only
    ever sees the previous chunk (tap 0 of each causal time conv) gets exactly zero gradient; only a 3rd latent frame
    (9-frame windows, what e2e trains on now) trains it. Left at its random init, it corrupts every latent frame
    after the 2nd when 9 frames are decoded."""
    import jax
    import jax.numpy as jnp

    from contentv_common.config import get_preset
    from contentv_jax.vae import WanVAE, init_params
    from contentv_jax.vae_train import loss_fn
    from examples.e2e import Settings
    import flax.linen as nn

    assert Settings.full().vae_frames == 9
    cfg = get_preset("tiny").vae
    params = nn.meta.unbox(init_params(cfg, jax.random.key(0)))["params"]
    model = WanVAE(cfg)
    rng = np.random.default_rng(0)

    def cache_tap_grads(frames):
        video = jnp.asarray(rng.uniform(-1, 1, (1, frames, 16, 16, 3)), jnp.float32)
        g = jax.grad(lambda p: loss_fn(model, p, video, jax.random.key(1), 1e-6, sample=False)[0])(params)
        taps = [v[0] for path, v in jax.tree_util.tree_leaves_with_path(g["decoder"])
                if "time_conv" in jax.tree_util.keystr(path) and "kernel" in jax.tree_util.keystr(path)]
        assert taps, "no temporal upsample in the decoder"
        return max(float(jnp.abs(t).max()) for t in taps)

    assert cache_tap_grads(5) == 0.0
    assert cache_tap_grads(9) > 0.0
