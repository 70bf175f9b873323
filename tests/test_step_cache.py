"""Step caching and guidance schedules: the shared rule (contentv_common.step_cache), the torch pipeline's
policies, the calibration command and the generate flags. Sizes as test_pipeline's (fp32, CPU)."""
import json

import numpy as np
import pytest
import torch

from conftest import rel_err
from contentv_common.step_cache import (CachePolicy, fit_calibration, guided_steps, init_state, make_policy,
                                        parse_interval, rescale, skip_rule)
from tiny_models import one_torch_thread, tiny_folder  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SIZE = dict(frames=9, height=48, width=80, steps=8, guidance=6.0, seed=3, output_type="latent", progress=False)


@pytest.fixture(scope="module")
def pipe(tiny_folder):
    from contentv_torch.pipeline import ContentVPipeline

    return ContentVPipeline.from_pretrained(tiny_folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def uncached(pipe):
    return pipe("a cat running", **SIZE)


# ---- the shared rule -------------------------------------------------------------------------------------------
def _run(policy, signals, n=None):
    n = n or len(signals)
    state, out = init_state(), []
    for i, s in enumerate(signals):
        c, state = skip_rule(policy, state, s, policy.forced(i, n))
        out.append(bool(c))
    return out


def test_teacache_accumulates_until_threshold():
    p = CachePolicy("teacache", 0.25)
    # step 0 and the last are forced; 0.1 + 0.1 < 0.25 skips twice, the third reaches 0.3 and computes
    assert _run(p, [9, 0.1, 0.1, 0.1, 0.1, 0.1]) == [True, False, False, True, False, True]
    q = CachePolicy("teacache", 0.25, coefficients=(2.0, 0.0))  # rescaled: 0.2 + 0.2 >= 0.25
    assert _run(q, [9, 0.1, 0.1, 0.1, 0.1, 0.1]) == [True, False, True, False, True, True]
    assert rescale((1.0, -2.0, 3.0), 2.0) == 3.0 and rescale((), 0.7) == 0.7


def test_magcache_error_of_ratio_product_and_max_skips():
    p = CachePolicy("magcache", 0.1, warmup=0.0, max_skips=2, mag_ratios={"cond": [1.0] * 8})
    assert _run(p, [1.0, 0.97, 0.97, 0.97, 0.97, 0.97, 0.97, 1.0]) == [True, False, False, True, False, False,
                                                                       True, True]
    # |1 - 0.85| >= 0.1 computes; K = 2 ends a run of skips even below the threshold
    assert _run(p, [1.0, 0.85, 1.0, 1.0, 1.0, 1.0]) == [True, True, False, False, True, True]
    with pytest.raises(ValueError, match="calibrate_cache"):
        CachePolicy("magcache", 0.1)


def test_fbcache_compares_each_step_alone_and_rule_runs_on_jax():
    p = CachePolicy("fbcache", 0.1)
    assert _run(p, [9, 0.05, 0.09, 0.2, 0.01, 0.5]) == [True, False, False, True, False, True]
    jnp = pytest.importorskip("jax.numpy")
    state, got = init_state(), []
    for i, s in enumerate([9, 0.05, 0.09, 0.2, 0.01, 0.5]):
        c, state = skip_rule(p, state, jnp.float32(s), jnp.asarray(p.forced(i, 6)), xp=jnp)
        got.append(bool(c))
    assert got == [True, False, False, True, False, True]


def test_policy_and_schedule_validation():
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="--cache-threshold"):
            CachePolicy("teacache", bad)
    with pytest.raises(ValueError, match="--cache"):
        CachePolicy("deepcache", 0.1)
    assert parse_interval("0.2,0.8") == (0.2, 0.8)
    for bad in ("0.8,0.2", "0.5", "-0.1,0.5", "0.1,1.5", "a,b"):
        with pytest.raises(ValueError, match="--guidance-interval"):
            parse_interval(bad)
    s = np.array([1.0, 0.75, 0.5, 0.25, 0.0])
    assert guided_steps(s, 6.0).tolist() == [True] * 4
    assert guided_steps(s, 1.0).tolist() == [False] * 4
    assert guided_steps(s, 6.0, interval=(0.3, 0.8)).tolist() == [False, True, True, False]
    assert guided_steps(s, 6.0, truncation=0.5).tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="--cfg-truncation"):
        guided_steps(s, 6.0, truncation=1.5)


def test_fit_calibration_recovers_polynomial_and_ratios():
    recs = [{"branch": b, "step": s, "num_steps": 5, "input_change": x, "output_change": 3 * x * x + 0.5 * x,
             "ratio": 1 + 0.1 * s} for b in ("cond", "uncond") for s in range(1, 5) for x in (0.1 * s, 0.05 * s)]
    cal = fit_calibration(recs, degree=2)
    np.testing.assert_allclose(cal["teacache"]["coefficients"], [3, 0.5, 0], atol=1e-8)
    assert cal["magcache"]["ratios"]["cond"] == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4])
    p = make_policy("magcache", 0.1, cal)
    assert p.ratio("cond", 2, 5) == pytest.approx(1.2) and p.ratio("cond", 1, 3) == pytest.approx(1.2)


# ---- the torch pipeline ----------------------------------------------------------------------------------------
def test_cache_none_is_todays_loop_bitwise(pipe):
    """denoise without a cache or schedule is the loop it was before caching existed, bit for bit."""
    from contentv_torch.pipeline import denoise

    g = torch.Generator().manual_seed(0)
    cfg = pipe.transformer.config
    x0 = torch.randn(2, cfg.in_channels, 3, 6, 10, generator=g)
    e, ne = torch.randn(2, 2, 7, cfg.joint_attention_dim, generator=g)
    p, np_ = torch.randn(2, 2, cfg.pooled_projection_dim, generator=g)
    sig = np.linspace(1, 0, 6).astype(np.float32)
    got = denoise(pipe.transformer, x0, e, p, ne, np_, sig, 5.0, progress=False)
    x, ctx, pool, s = x0.clone(), torch.cat([ne, e]), torch.cat([np_, p]), torch.as_tensor(sig)
    for i in range(5):  # the loop as it was
        v = pipe.transformer(torch.cat([x, x]), ctx, pool, (s[i] * 1000).expand(4)).float()
        v_u, v_c = v.chunk(2)
        x = x + (s[i + 1] - s[i]).item() * (v_u + 5.0 * (v_c - v_u))
    assert torch.equal(got, x)


@pytest.mark.parametrize("name,threshold", [("teacache", 0.5), ("magcache", 0.2), ("fbcache", 0.7)])
def test_threshold_zero_is_exact_and_large_threshold_skips(pipe, uncached, name, threshold, monkeypatch):
    import contentv_torch.pipeline as pl

    cal = {"magcache": {"ratios": {"cond": [1.0] + [0.98] * 7, "uncond": [1.0] + [0.99] * 7}}}
    monkeypatch.setattr(pl, "read_calibration", lambda folder: cal)
    exact = pipe("a cat running", cache=name, cache_threshold=0.0, **SIZE)
    assert torch.equal(exact.latents, uncached.latents) and exact.dit_evaluations == uncached.dit_evaluations == 16
    fast = pipe("a cat running", cache=name, cache_threshold=threshold, **SIZE)  # skips some (random tiny DiT)
    assert fast.dit_evaluations < 16
    assert 0 < rel_err(fast.latents, uncached.latents) < 0.3, rel_err(fast.latents, uncached.latents)
    most = pipe("a cat running", cache=name, cache_threshold=1e9, **SIZE)
    forced = {"teacache": 2, "fbcache": 2, "magcache": 4}[name]  # step 0 + last; magcache: 2 warm-up + last, K=2
    assert most.dit_evaluations == 2 * forced if name != "magcache" else most.dit_evaluations < 16


def test_branches_tracked_apart(pipe):
    """cond and uncond decide separately: at some step one branch computes (a sub-batch) while the other skips."""
    from contentv_torch.step_cache import StepCache

    per_step = []
    for threshold in (0.3, 0.5, 0.8):
        cache = StepCache(make_policy("teacache", threshold), 8)
        orig = cache.blocks

        def spy(*a, cache=cache, orig=orig):
            before = cache.evaluations
            out = orig(*a)
            per_step.append(cache.evaluations - before)
            return out

        cache.blocks = spy
        out = pipe("a cat running", cache=cache, **SIZE)
        assert set(cache.state) == {"uncond", "cond"}
        assert cache.evaluations + cache.skipped == 16 and out.dit_evaluations == cache.evaluations
    assert 1 in per_step and 0 in per_step, per_step


def test_guidance_schedules(pipe, uncached):
    none = pipe("a cat running", guidance_interval=(0.0, 0.0), **SIZE)  # sigma 0 is never a step: no CFG at all
    plain = pipe("a cat running", **{**SIZE, "guidance": 1.0})
    assert torch.equal(none.latents, plain.latents) and none.dit_evaluations == 8
    full = pipe("a cat running", guidance_interval=(0.0, 1.0), cfg_truncation=1.0, **SIZE)
    assert torch.equal(full.latents, uncached.latents)
    half = pipe("a cat running", cfg_truncation=0.5, **SIZE)
    assert half.dit_evaluations == 12 and 0 < rel_err(half.latents, uncached.latents)
    both = pipe("a cat running", cfg_truncation=0.5, cache="fbcache", cache_threshold=0.0, **SIZE)
    assert torch.equal(both.latents, half.latents)


def test_calibrate_command_and_generate_flags(tiny_folder, tmp_path, capsys):
    from contentv_common.cli import UsageError
    from contentv_torch import calibrate_cache, generate

    out = calibrate_cache.main(["--model", str(tiny_folder), "--prompt", "a cat", "--steps", "4", "--frames", "5",
                                "--height", "32", "--width", "48", "--device", "cpu",
                                "--output", str(tmp_path / "cal.json")])
    cal = json.loads(out.read_text())
    assert len(cal["teacache"]["coefficients"]) >= 2 and set(cal["magcache"]["ratios"]) == {"cond", "uncond"}
    assert len(cal["magcache"]["ratios"]["cond"]) == 4 and cal["source"]["records"] == 6  # 3 steps x 2 branches
    base = ["--model", str(tiny_folder), "--prompt", "x"]
    for flags, name in ((["--cache", "teacache", "--cache-threshold", "-1"], "--cache-threshold"),
                        (["--cache-threshold", "0.1"], "--cache-threshold"),
                        (["--guidance-interval", "0.9,0.1"], "--guidance-interval"),
                        (["--cfg-truncation", "2"], "--cfg-truncation"),
                        (["--cache", "magcache"], "calibrate_cache")):  # the tiny folder has no calibration
        with pytest.raises(UsageError, match=name):
            generate.parse_args(base + flags)
    args = generate.parse_args(base + ["--cache", "fbcache", "--guidance-interval", "0.1,0.9", "--cfg-truncation",
                                       "0.5"])
    assert (args.cache, args.guidance_interval, args.cfg_truncation) == ("fbcache", (0.1, 0.9), 0.5)
