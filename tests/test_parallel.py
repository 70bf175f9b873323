"""Ulysses sequence parallelism + CFG parallelism on CPU: 2 gloo processes against one process.

Video tokens 3 x 3 x 5 = 45 and text tokens 93 are both odd, so the split pads and masks; a 3-head
attention on 2 ranks exercises the head padding.
"""
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import rel_err
from contentv_common.schedule import flow_match_sigmas
from contentv_torch.parallel import token_layout
from tiny_models import one_torch_thread, tiny_folder  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORLD = 2
CLI_PROMPT = "a small dog running in the city"
CLI_SIZE = ["--frames", "5", "--height", "48", "--width", "80", "--steps", "2"]  # 2 x 3 x 5 video tokens


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(cfg):
    g = torch.Generator().manual_seed(1)
    b, heads_tokens = 2, 93
    return {
        "latents": torch.randn(b, cfg.in_channels, 3, 6, 10, generator=g),  # 48x80 pixels: 3 x 3 x 5 tokens
        "embeds": torch.randn(b, heads_tokens, cfg.joint_attention_dim, generator=g),
        "pooled": torch.randn(b, cfg.pooled_projection_dim, generator=g),
        "neg_embeds": torch.randn(b, heads_tokens, cfg.joint_attention_dim, generator=g),
        "neg_pooled": torch.randn(b, cfg.pooled_projection_dim, generator=g),
        "sigmas": torch.from_numpy(flow_match_sigmas(3, shift=3.0)),
        "qkv": torch.randn(3, 2, 3, 45, 8, generator=g),  # q, k, v [B=2, H=3, S=45, hd=8]
    }


def _denoise(dit, x):
    from contentv_torch.pipeline import denoise

    return denoise(dit, x["latents"], x["embeds"], x["pooled"], x["neg_embeds"], x["neg_pooled"], x["sigmas"],
                   guidance=6.0, progress=False)


def _worker(rank: int, port: int, folder: str, inputs_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from contentv_torch.attention import get_attention_backend
    from contentv_torch.parallel import UlyssesAttention, init_parallel, make_state
    from contentv_torch.transformer import ContentVTransformer3DModel

    torch.set_num_threads(1)
    # what torchrun sets; init_parallel starts the gloo group from it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    sp = init_parallel("cpu", sp=WORLD)
    assert (sp.sp, sp.cfg, sp.sp_rank, sp.device.type) == (WORLD, 1, rank, "cpu")
    x = torch.load(inputs_path)
    dit = ContentVTransformer3DModel.from_pretrained(folder, dtype=torch.float32)
    dit.set_attention_backend("sdpa")
    out = {}
    # Ulysses attention alone: 3 heads on 2 ranks (zero-padded to 4), 45 tokens (padded to 46, masked).
    q, k, v = x["qkv"]
    nl, _, keep = token_layout(45, 0, WORLD, "cpu")
    padded = [torch.nn.functional.pad(t, (0, 0, 0, nl * WORLD - 45)) for t in (q, k, v)]  # [B, H, 46, hd]
    local = [t[:, :, rank * nl : (rank + 1) * nl] for t in padded]
    o = UlyssesAttention(get_attention_backend("sdpa"), sp.sp_group, WORLD, keep)(*local)
    parts = [torch.empty_like(o) for _ in range(WORLD)]
    dist.all_gather(parts, o.contiguous(), group=sp.sp_group)
    out["attention"] = torch.cat(parts, dim=2)[:, :, :45]
    out["sp"] = _denoise(sp.wrap(dit), x)
    out["cfg"] = _denoise(make_state(sp=1, cfg=WORLD).wrap(dit), x)
    assert dit.attention_backend == "sdpa"  # the wrapper restores the backend after each call
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    # The CLI under "torchrun": a different seed per rank, so only rank 0's broadcast noise gives the expected video.
    from contentv_torch.generate import main

    written = main(["--model", os.path.dirname(folder), "--prompt", CLI_PROMPT, "--sp", str(WORLD), "--seed", str(rank),
                    *CLI_SIZE, "--output", os.path.join(out_dir, "cli.mp4"),
                    "--latents-out", os.path.join(out_dir, "cli.safetensors"), "--quiet"])
    assert len(written) == (rank == 0)
    assert not dist.is_initialized()  # the CLI closed the process group


def test_token_layout_keeps_every_real_token_once():
    nl, ll, keep = token_layout(5, 3, 4, "cpu")
    assert (nl, ll) == (2, 1)
    # gathered: rank r holds [video 2r, 2r+1 | text r]: [v0 v1 t0 | v2 v3 t1 | v4 pad t2 | pad pad pad]
    assert keep.tolist() == [0, 1, 2, 3, 4, 5, 6, 8]
    assert token_layout(4, 2, 2, "cpu")[2] is None


def test_two_process_gloo_matches_single_process(tiny_folder, tmp_path):
    from contentv_torch.transformer import ContentVTransformer3DModel

    folder = str(tiny_folder / "transformer")
    dit = ContentVTransformer3DModel.from_pretrained(folder, dtype=torch.float32)
    dit.set_attention_backend("sdpa")
    x = _inputs(dit.config)
    torch.save(x, tmp_path / "inputs.pt")
    expected = _denoise(dit, x)
    q, k, v = x["qkv"]
    expected_attn = torch.nn.functional.scaled_dot_product_attention(q, k, v)

    mp.spawn(_worker, args=(_free_port(), folder, str(tmp_path / "inputs.pt"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert rel_err(got["attention"], expected_attn) < 1e-6, rank
        for mode in ("sp", "cfg"):
            err = rel_err(got[mode], expected)
            assert err < 1e-5, (rank, mode, err)
    assert float(np.abs(expected.numpy()).mean()) > 0.1  # a real, non-trivial result

    # the CLI run: rank 0's seed, sampled in one process
    from safetensors.torch import load_file

    from contentv_torch.pipeline import ContentVPipeline
    from contentv_common.video_io import read_mp4

    single = ContentVPipeline.from_pretrained(tiny_folder, device="cpu")(
        CLI_PROMPT, frames=5, height=48, width=80, steps=2, seed=0, output_type="latent", progress=False)
    err = rel_err(load_file(tmp_path / "cli.safetensors")["latents"], single.latents)
    assert err < 1e-5, err
    assert read_mp4(tmp_path / "cli.mp4")[0].shape == (5, 48, 80, 3)


def test_wrong_world_size_is_a_clear_error():
    from contentv_torch.parallel import init_parallel

    with pytest.raises(ValueError, match="torchrun --nproc-per-node 2"):
        init_parallel("cpu", sp=2)


# ---- step caches and guidance schedules under Ulysses / CFG parallelism ------------------------------------------
CACHE_CASES = {"teacache": 0.5, "magcache": 0.2, "fbcache": 0.7}
MAG = {"magcache": {"ratios": {"cond": [1.0] + [0.98] * 7, "uncond": [1.0] + [0.97] * 7}}}


def _cached_denoise(dit, x, name, wrap=None, group=None):
    """8 steps with `name`'s step cache (None: no cache) and CFG truncated after 3/4 of them -> (latents, evals)."""
    from contentv_common.step_cache import guided_steps, make_policy
    from contentv_torch.pipeline import denoise
    from contentv_torch.step_cache import StepCache

    sig = flow_match_sigmas(8, shift=3.0)
    cache = None if name is None else StepCache(make_policy(name, CACHE_CASES[name], MAG), 8, group=group)
    dit.step_cache = cache
    try:
        out = denoise(dit if wrap is None else wrap, x["latents"], x["embeds"], x["pooled"], x["neg_embeds"],
                      x["neg_pooled"], sig, 6.0, progress=False, guided=guided_steps(sig, 6.0, truncation=0.75),
                      cache=cache)
    finally:
        dit.step_cache = None
    return out, None if cache is None else cache.evaluations


def _cache_worker(rank: int, port: int, folder: str, inputs_path: str, out_dir: str) -> None:
    import torch.distributed as dist

    from contentv_torch.parallel import make_state
    from contentv_torch.transformer import ContentVTransformer3DModel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    x = torch.load(inputs_path)
    dit = ContentVTransformer3DModel.from_pretrained(folder, dtype=torch.float32)
    dit.set_attention_backend("sdpa")
    states = {"sp": make_state(sp=WORLD, cfg=1), "cfg": make_state(sp=1, cfg=WORLD)}
    out = {}
    for mode, st in states.items():
        for name in (None, *CACHE_CASES):
            out[mode, name] = _cached_denoise(dit, x, name, st.wrap(dit), st.sp_group)
    torch.save(out, os.path.join(out_dir, f"cache{rank}.pt"))
    dist.destroy_process_group()


def test_step_caches_under_ulysses_and_cfg_parallel_match_one_process(tiny_folder, tmp_path):
    """Every policy (and CFG truncation, whose cond-only steps one cfg group computes and broadcasts) gives one
    process's latents on 2 gloo ranks: the sp ranks sum their signals, so they skip the same steps."""
    from contentv_torch.transformer import ContentVTransformer3DModel

    folder = str(tiny_folder / "transformer")
    dit = ContentVTransformer3DModel.from_pretrained(folder, dtype=torch.float32)
    dit.set_attention_backend("sdpa")
    x = _inputs(dit.config)
    torch.save(x, tmp_path / "inputs.pt")
    expected = {name: _cached_denoise(dit, x, name) for name in (None, *CACHE_CASES)}
    for name in CACHE_CASES:  # each policy skips some branch passes here (8 steps, 6 guided: 14 in all)
        assert expected[name][1] < 14, (name, expected[name][1])
        assert rel_err(expected[name][0], expected[None][0]) > 1e-4, name

    mp.spawn(_cache_worker, args=(_free_port(), folder, str(tmp_path / "inputs.pt"), str(tmp_path)), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"cache{rank}.pt")
        for (mode, name), (latents, evals) in got.items():
            err = rel_err(latents, expected[name][0])
            assert err < 1e-5, (rank, mode, name, err)
            if name and mode == "sp":
                assert evals == expected[name][1], (rank, name, evals)
