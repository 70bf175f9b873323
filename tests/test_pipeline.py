"""The PyTorch pipeline and CLI against a sampling loop built from diffusers / transformers parts (fp32, CPU).

Reference: `StableDiffusion3Pipeline.encode_prompt` on the folder's tiny CLIP / T5 encoders,
`FlowMatchEulerDiscreteScheduler` from the folder's scheduler config with the released ContentV pipeline's
`set_timesteps(sigmas=np.linspace(1, 0, N + 1)[:-1])`, the diffusers-built DiT of
`tests/reference.py` loaded with the folder's weights, and diffusers `AutoencoderKLWan` for the decode.
"""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import rel_err
from tiny_models import one_torch_thread, tiny_folder  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a cat running on the street", "a big red bird flying over the sea at sunset"]
NEGATIVE = "blue sky"
FRAMES, HEIGHT, WIDTH, STEPS, GUIDANCE = 9, 48, 80, 4, 6.0  # 3 latent frames of 6 x 10; 3 x 3 x 5 tokens


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    from contentv_torch.pipeline import ContentVPipeline

    return ContentVPipeline.from_pretrained(tiny_folder, device="cpu", dtype=torch.float32)


def _sd3_text_pipeline(folder):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

    return StableDiffusion3Pipeline(
        transformer=None, vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2"),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder / "tokenizer_2"),
        text_encoder_3=T5EncoderModel.from_pretrained(folder / "text_encoder_3"),
        tokenizer_3=T5Tokenizer.from_pretrained(folder / "tokenizer_3"),
    )


def _reference_dit(folder, cfg):
    from reference import reference_transformer

    ref = reference_transformer(cfg, seed=123)  # different random weights, then the folder's
    weights = load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")
    missing, unexpected = ref.dit.load_state_dict(weights, strict=False)
    assert missing == ["pos_embed.pos_embed"] and not unexpected  # ContentV has no learned 2D table
    return ref


@torch.no_grad()
def _reference_sample(folder, cfg, noise, max_len):
    """The SD3 sampling loop from diffusers parts, on the video DiT -> (embeds, final latents, uint8 frames)."""
    from diffusers import AutoencoderKLWan

    sd3 = _sd3_text_pipeline(folder)
    emb, neg, pooled, neg_pooled = sd3.encode_prompt(PROMPTS, None, None, device=torch.device("cpu"),
                                                     do_classifier_free_guidance=True, negative_prompt=NEGATIVE,
                                                     max_sequence_length=max_len)
    dit = _reference_dit(folder, cfg)
    sched = sd3.scheduler
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, STEPS + 1)[:-1])  # as ContentV's pipeline does
    x = noise.clone()
    for t in sched.timesteps:
        v = dit(torch.cat([x, x]), torch.cat([neg, emb]), torch.cat([neg_pooled, pooled]), t.expand(2 * x.shape[0]))
        v_u, v_c = v.chunk(2)
        x = sched.step(v_u + GUIDANCE * (v_c - v_u), t, x).prev_sample
    vae = AutoencoderKLWan.from_pretrained(folder / "vae").eval()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    video = vae.decode(x * std + mean).sample.clamp(-1, 1)  # [B, 3, F, H, W]
    frames = ((video + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    return (emb, pooled, neg, neg_pooled), x, frames


def test_latents_and_frames_match_diffusers_reference(pipe, tiny_folder):
    from contentv_common.config import get_preset

    p = get_preset("tiny")
    noise = torch.randn(len(PROMPTS), 16, 3, HEIGHT // 8, WIDTH // 8, generator=torch.Generator().manual_seed(7))
    ref_emb, ref_latents, ref_frames = _reference_sample(tiny_folder, pipe.transformer.config, noise,
                                                         p.text.t5_max_tokens)

    ours = pipe.text_encoders.encode(PROMPTS, NEGATIVE, max_sequence_length=p.text.t5_max_tokens)
    got = (ours.prompt_embeds, ours.pooled, ours.negative_embeds, ours.negative_pooled)
    for a, b in zip(got, ref_emb, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < 1e-6
    assert ours.prompt_embeds.shape == (2, p.text.context_tokens, p.text.t5_hidden)

    out = pipe(PROMPTS, NEGATIVE, frames=FRAMES, height=HEIGHT, width=WIDTH, steps=STEPS, guidance=GUIDANCE,
               latents=noise, progress=False)
    err = rel_err(out.latents, ref_latents)
    assert err < 1e-4, err
    assert rel_err(out.latents, noise) > 0.1  # the DiT moved the latents
    assert out.frames.shape == ref_frames.shape == (2, FRAMES, HEIGHT, WIDTH, 3) and out.frames.dtype == np.uint8
    diff = np.abs(out.frames.astype(int) - ref_frames.astype(int))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())  # at most a rounding flip
    assert ref_frames.std() > 5  # a real picture, not a constant


def test_num_videos_and_defaults_and_seed(pipe):
    a = pipe("a dog", num_videos_per_prompt=2, seed=3, steps=2, output_type="latent", progress=False)
    b = pipe("a dog", num_videos_per_prompt=2, seed=3, steps=2, output_type="latent", progress=False)
    assert a.frames is None and a.latents.shape == (2, 16, 3, 4, 6)  # the tiny preset's 9 frames at 32 x 48
    torch.testing.assert_close(a.latents, b.latents, rtol=0, atol=0)
    assert rel_err(a.latents[0], a.latents[1]) > 0.1  # different noise per video
    emb = pipe.text_encoders.encode(["a dog", "a cat"], "", num_videos_per_prompt=2, max_sequence_length=16)
    torch.testing.assert_close(emb.prompt_embeds[0], emb.prompt_embeds[1])
    assert rel_err(emb.prompt_embeds[1], emb.prompt_embeds[2]) > 1e-3


@pytest.mark.parametrize("kw, match", [
    (dict(frames=10), "4k\\+1"),
    (dict(height=40), "multiples of 16"),
    (dict(width=50), "multiples of 16"),
    (dict(latents=torch.zeros(1, 16, 3, 4, 5)), "expected \\(1, 16, 3, 4, 6\\)"),
    (dict(output_type="pil"), "output_type"),
])
def test_bad_requests_fail_before_sampling(pipe, monkeypatch, kw, match):
    monkeypatch.setattr(pipe.text_encoders, "encode", lambda *a, **k: pytest.fail("encoded before checking"))
    with pytest.raises(ValueError, match=match):
        pipe("a cat", **kw)


@pytest.mark.parametrize("steps, shift", [(50, 3.0), (7, 5.0)])
def test_contentv_sigma_grid_matches_diffusers(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from contentv_common.schedule import flow_match_sigmas

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])  # the released ContentV pipeline's call
    ours = flow_match_sigmas(steps, shift, grid="contentv")
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(1000 * ours[:-1], sched.timesteps.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="unknown sigma grid"):
        flow_match_sigmas(steps, shift, grid="karras")


def test_scheduler_options_are_checked(tmp_path):
    from contentv_torch.pipeline import read_scheduler_config

    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 5.0}))
    assert read_scheduler_config(path) == (5.0, 1000)
    path.write_text(json.dumps({"_class_name": "FlowMatchEulerDiscreteScheduler", "use_dynamic_shifting": True}))
    with pytest.raises(ValueError, match="use_dynamic_shifting"):
        read_scheduler_config(path)
    path.write_text(json.dumps({"_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(ValueError, match="EulerDiscreteScheduler"):
        read_scheduler_config(path)


# ---------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------
def _cli(folder, tmp_path, *extra):
    from contentv_torch.generate import main

    return main(["--model", str(folder), "--prompt", "a red car on the street at night", "--steps", "2",
                 "--frames", "9", "--height", "32", "--width", "64", "--seed", "1", "--quiet", *map(str, extra)])


def test_cli_writes_mp4_and_latents_round_trip(tiny_folder, tmp_path, pipe):
    from contentv_common.video_io import read_mp4

    noise = torch.randn(1, 16, 3, 4, 8, generator=torch.Generator().manual_seed(5))
    save_file({"latents": noise}, str(tmp_path / "noise.safetensors"))
    out = tmp_path / "videos" / "car.mp4"
    written = _cli(tiny_folder, tmp_path, "--output", out, "--fps", 12, "--latents-in", tmp_path / "noise.safetensors",
                   "--latents-out", tmp_path / "final.safetensors", "--offload", "--tiled-vae")
    assert written == [out]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # normal permissions, not the temp file's 0600
    frames, fps = read_mp4(out)
    assert frames.shape == (9, 32, 64, 3) and fps == 12
    final = load_file(tmp_path / "final.safetensors")["latents"]
    api = pipe("a red car on the street at night", frames=9, height=32, width=64, steps=2, latents=noise,
               progress=False)
    torch.testing.assert_close(final, api.latents, rtol=1e-6, atol=1e-6)
    # the mp4 holds the pipeline's frames: H.264 subsamples chroma (4:2:0), so compare luma, which it keeps
    # closely (measured 2 levels), with the video's own spread around its mean (~20 levels)
    luma = lambda x: x.astype(float) @ np.array([0.299, 0.587, 0.114])  # noqa: E731
    want = luma(api.frames[0])
    err, spread = np.abs(luma(frames) - want).mean(), np.abs(want - want.mean()).mean()
    assert err < 0.25 * spread, (err, spread)


@pytest.mark.parametrize("case, error, match", [
    ("frames", ValueError, "4k\\+1"),
    ("size", ValueError, "multiples of 16"),
    ("output", PermissionError, "not writable"),
    ("model", FileNotFoundError, "model folder not found"),
    ("latents", ValueError, "does not match"),
    ("latents-key", ValueError, "no tensor named 'latents'"),
    ("npu", ImportError, "torch_npu"),
])
def test_cli_errors_before_loading(tiny_folder, tmp_path, monkeypatch, case, error, match):
    from contentv_torch.pipeline import ContentVPipeline

    monkeypatch.setattr(ContentVPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded before checking"))
    (tmp_path / "a_file").write_text("")
    save_file({"latents": torch.zeros(1, 16, 3, 4, 6)}, str(tmp_path / "wrong.safetensors"))
    save_file({"noise": torch.zeros(1, 16, 3, 4, 8)}, str(tmp_path / "key.safetensors"))
    folder, extra = tiny_folder, ["--output", tmp_path / "v.mp4"]
    extra += {"frames": ["--frames", 8], "size": ["--height", 24],
              "output": ["--output", tmp_path / "a_file" / "v.mp4"],
              "model": [], "latents": ["--latents-in", tmp_path / "wrong.safetensors"],
              "latents-key": ["--latents-in", tmp_path / "key.safetensors"], "npu": ["--device", "npu"]}[case]
    if case == "npu" and importlib.util.find_spec("torch_npu") is not None:
        pytest.skip("torch_npu is installed here")
    if case == "model":
        folder = tmp_path / "no_such_model"
    with pytest.raises(error, match=match):
        _cli(folder, tmp_path, *extra)
    assert not (tmp_path / "v.mp4").exists()


def test_bf16_dit_close_to_fp32(pipe, tiny_folder):
    """The accelerator default (bf16 DiT and text encoders, fp32 latents and VAE) on CPU; CFG 6 amplifies
    the bf16 rounding, measured 2.9e-2."""
    from contentv_torch.pipeline import ContentVPipeline

    bf16 = ContentVPipeline.from_pretrained(tiny_folder, device="cpu", dtype=torch.bfloat16)
    assert bf16.transformer.proj_out.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in bf16.vae.parameters())
    kw = dict(seed=0, steps=4, output_type="latent", progress=False)
    a, b = pipe(PROMPTS, **kw).latents, bf16(PROMPTS, **kw).latents
    assert b.dtype == torch.float32
    assert 1e-4 < rel_err(b, a) < 5e-2, rel_err(b, a)  # really ran in bf16, and close
