"""JAX flow-matching Euler + CFG sampler vs the torch `denoise`, on one converted tiny ContentV transformer.

The torch model is saved in diffusers layout; the Flax params come from that folder through the trainer's
`--init-from` loader (`load_init_params`), so this also checks initialising training from converted weights.
Tolerance: fp32 CPU, rel_err <= 1e-4 (Flax vs PyTorch) on the final latents after 4 guided steps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err

from contentv_common.config import get_preset
from contentv_common.schedule import flow_match_sigmas
from contentv_jax import configs, sharding as shd
from contentv_jax import train as T
from contentv_jax.optim import make_optimizer
from contentv_jax.sampler import euler_sample, make_sampler

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    from tiny_models import _write_transformer

    from contentv_torch.transformer import ContentVTransformer3DModel

    preset = get_preset("tiny")
    root = tmp_path_factory.mktemp("tiny")
    _write_transformer(root, preset, seed=3)
    folder = root / "transformer"
    torch_model = ContentVTransformer3DModel.from_pretrained(folder).eval()
    config = configs.get_config("tiny")
    model = T.build_model(config, preset)
    mesh = shd.create_mesh("fsdp=2,tensor=2", jax.devices()[:4])  # params loaded straight into shards
    state, shardings = T.create_train_state(model, make_optimizer(config.optim, 1), preset, mesh, 0,
                                            compiler_options={"xla_backend_optimization_level": 0})
    params = T.load_init_params(str(folder), state.params, shardings.params)
    assert any("fsdp" in str(x.sharding.spec) or "tensor" in str(x.sharding.spec) for x in jax.tree.leaves(params))
    return preset, torch_model, model, params


def _inputs(preset, b=2, t=3, h=4, w=6, seed=0):
    r = np.random.default_rng(seed)
    tc = preset.text
    f = lambda *s: r.standard_normal(s).astype(np.float32)  # noqa: E731
    return (f(b, t, h, w, 16), f(b, tc.context_tokens, tc.t5_hidden), f(b, tc.pooled_dim),
            f(b, tc.context_tokens, tc.t5_hidden) * 0.5, f(b, tc.pooled_dim) * 0.5)


def test_jax_sampler_matches_torch_denoise(converted):
    from contentv_torch.pipeline import denoise

    preset, torch_model, model, params = converted
    noise, ctx, pooled, neg_ctx, neg_pooled = _inputs(preset)
    sigmas = flow_match_sigmas(4, shift=3.0)
    with torch.no_grad():
        ref = denoise(torch_model, torch.from_numpy(noise).permute(0, 4, 1, 2, 3), torch.from_numpy(ctx),
                      torch.from_numpy(pooled), torch.from_numpy(neg_ctx), torch.from_numpy(neg_pooled), sigmas,
                      guidance=4.5, progress=False)
    ref = ref.permute(0, 2, 3, 4, 1).numpy()  # [B, C, T, h, w] -> [B, T, h, w, C]
    out = np.asarray(make_sampler(model, 4.5)(params, noise, ctx, pooled, neg_ctx, neg_pooled, jnp.asarray(sigmas)))
    err = rel_err(out, ref)
    print(f"JAX sampler vs torch denoise (tiny, 4 steps, CFG 4.5): rel_err {err:.2e}")
    assert err <= 1e-4
    assert rel_err(out, noise) > 0.1  # the sampler really moved the latents

    # no guidance: a different path (no [uncond; cond] batch) and a different result
    with torch.no_grad():
        ref1 = denoise(torch_model, torch.from_numpy(noise).permute(0, 4, 1, 2, 3), torch.from_numpy(ctx),
                       torch.from_numpy(pooled), None, None, sigmas, guidance=1.0, progress=False)
    out1 = np.asarray(make_sampler(model, 1.0)(params, noise, ctx, pooled, None, None, jnp.asarray(sigmas)))
    assert rel_err(out1, ref1.permute(0, 2, 3, 4, 1).numpy()) <= 1e-4
    assert rel_err(out1, out) > 1e-3


def test_euler_step_math_and_errors():
    # constant velocity field v = c: x_end = x0 + (s_end - s0) c = x0 - c, with or without CFG (v_u = v_c)
    c = 0.3
    apply_fn = lambda p, x, t, ctx, pool: jnp.full_like(x, c) + 0 * t.reshape(-1, 1, 1, 1, 1)  # noqa: E731
    x0 = jnp.ones((2, 1, 2, 2, 16))
    ctx, pool = jnp.zeros((2, 3, 4)), jnp.zeros((2, 5))
    sig = jnp.asarray(flow_match_sigmas(5, 2.0))
    np.testing.assert_allclose(euler_sample(apply_fn, None, x0, ctx, pool, ctx, pool, sig, 6.0), 1.0 - c, rtol=1e-6)
    # the timesteps fed to the model are 1000 * sigma
    seen = []
    euler_sample(lambda p, x, t, cc, pp: (seen.append(t), jnp.zeros_like(x))[1], None, x0, ctx, pool, None, None, sig, 1.0)
    assert seen[0].shape == (2,)
    with pytest.raises(ValueError, match="negative prompt"):
        euler_sample(apply_fn, None, x0, ctx, pool, None, None, sig, 2.0)


def test_one_default_sigma_grid_everywhere():
    """The released ContentV grid (linspace(1, 0, N+1)[:-1], shifted) is the default of the shared schedule, the torch
    pipeline and generate CLI, the JAX trainer's evaluation sampler and the RLHF rollout; "sd3" stays selectable."""
    import inspect

    from contentv_common.schedule import DEFAULT_SIGMA_GRID, shift_sigmas
    from contentv_jax import rlhf
    from contentv_torch import generate
    from contentv_torch.pipeline import ContentVPipeline

    assert DEFAULT_SIGMA_GRID == "contentv"
    np.testing.assert_allclose(flow_match_sigmas(6, 3.0)[:-1], shift_sigmas(np.linspace(1, 0, 7)[:-1], 3.0), rtol=1e-6)
    assert not np.allclose(flow_match_sigmas(6, 3.0), flow_match_sigmas(6, 3.0, grid="sd3"))
    assert inspect.signature(ContentVPipeline.__call__).parameters["sigma_grid"].default == DEFAULT_SIGMA_GRID
    assert generate.parse_args(["--model", "m", "--prompt", "p"]).sigma_grid == DEFAULT_SIGMA_GRID
    assert configs.get_config("tiny").eval.sigma_grid == DEFAULT_SIGMA_GRID
    assert rlhf.get_config("tiny").rlhf.sigma_grid == DEFAULT_SIGMA_GRID


@pytest.mark.parametrize("name,threshold", [("teacache", 0.5), ("magcache", 0.2)])
def test_jax_step_cache_matches_torch_pipeline(converted, name, threshold):
    """The JAX sampler's step cache takes the torch pipeline's decisions (one skip rule, contentv_common) and
    gives its latents; each branch skips some of the 8 steps."""
    from contentv_common.step_cache import make_policy
    from contentv_torch.pipeline import denoise
    from contentv_torch.step_cache import StepCache

    preset, torch_model, model, params = converted
    noise, ctx, pooled, neg_ctx, neg_pooled = _inputs(preset)
    sigmas = flow_match_sigmas(8, shift=3.0)
    policy = make_policy(name, threshold, {"magcache": {"ratios": {"cond": [1.0] + [0.98] * 7,
                                                                   "uncond": [1.0] + [0.97] * 7}}})
    cache = StepCache(policy, 8)
    torch_model.step_cache = cache
    try:
        with torch.no_grad():
            ref = denoise(torch_model, torch.from_numpy(noise).permute(0, 4, 1, 2, 3), torch.from_numpy(ctx),
                          torch.from_numpy(pooled), torch.from_numpy(neg_ctx), torch.from_numpy(neg_pooled), sigmas,
                          guidance=4.5, progress=False, cache=cache)
    finally:
        torch_model.step_cache = None
    out, evals = make_sampler(model, 4.5, policy)(params, noise, ctx, pooled, neg_ctx, neg_pooled, jnp.asarray(sigmas))
    assert int(evals) == cache.evaluations < 16
    assert rel_err(np.asarray(out), ref.permute(0, 2, 3, 4, 1).numpy()) <= 1e-4
    plain = make_sampler(model, 4.5)(params, noise, ctx, pooled, neg_ctx, neg_pooled, jnp.asarray(sigmas))
    assert rel_err(np.asarray(out), np.asarray(plain)) > 1e-4  # the skips changed the result
