"""Flow-matching objective, optimizer pieces, configs, the synthetic source and the FLOP formula."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from contentv_common.config import TransformerConfig, get_preset
from contentv_common.schedule import shift_sigmas, token_dependent_shift
from contentv_jax import configs, flow, optim
from contentv_jax.data import SyntheticCaptionedSource, buckets_from_config, make_source
from contentv_jax.metrics import transformer_flops


def _flow_cfg(**kw):
    c = configs.get_config("tiny").flow
    c.unlock()
    c.update(kw)
    return c


def _batch(b=3, shape=(2, 4, 6, 16), seed=0):
    r = np.random.default_rng(seed)
    return {"latents": jnp.asarray(r.standard_normal((b, *shape)), jnp.float32) * 0.7 + 0.3,
            "context": jnp.asarray(r.standard_normal((b, 5, 8)), jnp.float32),
            "pooled": jnp.asarray(r.standard_normal((b, 4)), jnp.float32)}


def test_interpolation_and_target():
    x0, eps = jnp.full((2, 1, 2, 2, 3), 2.0), jnp.full((2, 1, 2, 2, 3), -1.0)
    xs, v = flow.interpolate(x0, eps, jnp.array([0.25, 1.0]))
    np.testing.assert_allclose(xs[0], 0.75 * 2.0 + 0.25 * -1.0)
    np.testing.assert_allclose(xs[1], -1.0)
    np.testing.assert_allclose(v, -3.0)


def test_oracle_velocity_has_zero_loss_and_zero_model_does_not():
    batch, cfg = _batch(), _flow_cfg(shift_mode="fixed", shift=3.0)
    x0 = batch["latents"]
    seen_t = []

    def oracle(params, xs, t, c, p):  # knows x0: v = (x_s - x0) / s = eps - x0
        seen_t.append(t)
        s = (t / 1000.0).reshape(-1, 1, 1, 1, 1)
        return (xs - x0) / s

    loss, aux = flow.flow_matching_loss(oracle, None, batch, jax.random.PRNGKey(1), cfg, patch_size=2)
    assert float(loss) < 1e-8
    assert aux["sigmas"].shape == (3,) and len(set(np.asarray(aux["sigmas"]).round(6))) == 3  # per-sample timesteps
    np.testing.assert_allclose(seen_t[0], 1000.0 * aux["sigmas"], rtol=1e-6)
    zero, _ = flow.flow_matching_loss(lambda *a: jnp.zeros_like(a[1]), None, batch, jax.random.PRNGKey(1), cfg, 2)
    # E|eps - x0|^2 = 1 + E x0^2 (x0 independent of eps)
    expect = 1.0 + float(jnp.mean(x0**2))
    assert abs(float(zero) - expect) / expect < 0.15


def test_timestep_sampling_and_shift():
    n = 20000
    cfg = _flow_cfg(timestep_sampling="logit_normal", logit_mean=0.5, logit_std=0.8, shift_mode="none")
    s = np.asarray(flow.sample_sigmas(jax.random.PRNGKey(0), n, cfg, 100))
    logit = np.log(s / (1 - s))
    assert abs(logit.mean() - 0.5) < 0.03 and abs(logit.std() - 0.8) < 0.03
    u = np.asarray(flow.sample_sigmas(jax.random.PRNGKey(0), n, _flow_cfg(timestep_sampling="uniform", shift_mode="none"), 1))
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    shifted = np.asarray(flow.sample_sigmas(jax.random.PRNGKey(0), n, _flow_cfg(timestep_sampling="uniform", shift_mode="fixed", shift=3.0), 1))
    np.testing.assert_allclose(shifted, shift_sigmas(u, 3.0), rtol=1e-5)
    tok = _flow_cfg(shift_mode="tokens")
    assert flow.training_shift(tok, 4096) > flow.training_shift(tok, 256) > 1.0
    assert flow.training_shift(tok, 1000) == pytest.approx(token_dependent_shift(1000))
    assert flow.video_tokens((2, 3, 8, 12, 16), 2) == 3 * 4 * 6
    with pytest.raises(ValueError, match="timestep_sampling"):
        flow.sample_sigmas(jax.random.PRNGKey(0), 2, _flow_cfg(timestep_sampling="beta"), 1)


def test_loss_weighting():
    s = jnp.array([0.1, 0.5, 0.9])
    np.testing.assert_allclose(flow.loss_weights(s, "none"), 1.0)
    np.testing.assert_allclose(flow.loss_weights(s, "cosmap"), 2 / (np.pi * (1 - 2 * s + 2 * s**2)), rtol=1e-6)
    np.testing.assert_allclose(flow.loss_weights(s, "sigma_sqrt"), 1 / s**2, rtol=1e-5)
    with pytest.raises(ValueError, match="loss_weighting"):
        flow.loss_weights(s, "snr")


def test_lr_schedule_decay_mask_and_ema():
    c = configs.get_config("tiny").optim
    sched = optim.lr_schedule(c, total_steps=120)
    assert float(sched(0)) == 0.0 and float(sched(c.warmup_steps)) == pytest.approx(c.lr)
    assert float(sched(120)) == pytest.approx(c.lr * c.end_lr_ratio, rel=1e-4)
    assert float(sched(60)) < c.lr
    params = {"proj": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "norm_q": {"scale": jnp.ones(4)},
              "blocks": {"ff": {"kernel": jnp.ones((2, 3, 4)), "bias": jnp.ones((2, 4))}, "norm1": {"linear": {"kernel": jnp.ones((2, 4, 4))}}}}
    mask = optim.decay_mask(params)
    assert mask["proj"] == {"kernel": True, "bias": False} and mask["norm_q"]["scale"] is False
    assert mask["blocks"]["ff"] == {"kernel": True, "bias": False}  # stacked bias [L, D] is still a bias
    assert mask["blocks"]["norm1"]["linear"]["kernel"] is False
    # weight decay really skips the masked leaves: with zero gradients only kernels shrink
    tx = optim.make_optimizer(c, 120)
    st = tx.init(params)
    for _ in range(c.warmup_steps + 1):
        up, st = tx.update(jax.tree.map(jnp.zeros_like, params), st, params)
    assert float(jnp.abs(up["proj"]["bias"]).max()) == 0.0 and float(up["proj"]["kernel"].max()) < 0.0
    ema = optim.ema_update({"a": jnp.zeros(2)}, {"a": jnp.ones(2)}, 0.9)
    np.testing.assert_allclose(ema["a"], 0.1)


def test_configs_all_stages_all_models():
    for model in ("tiny", "small", "contentv-8b"):
        preset = get_preset(model)
        for stage in configs.STAGES:
            c = configs.get_config(f"{model}/{stage}")
            assert c.stage == stage and c.model == model
            for b in buckets_from_config(c.data.buckets):
                b.latent_shape(preset)  # every bucket is a valid shape for its model
            with pytest.raises(AttributeError):
                c.not_a_field = 1  # locked
    joint = configs.get_config("contentv-8b/joint")
    assert any(b[0] == 1 for b in joint.data.buckets) and any(b[0] > 1 for b in joint.data.buckets)
    assert max(b[0] for b in configs.get_config("contentv-8b/duration").data.buckets) == 121  # 5 s at 24 fps
    assert configs.get_config("contentv-8b/sft").optim.lr < configs.get_config("contentv-8b/resolution").optim.lr
    c = configs.apply_overrides(configs.get_config("tiny"), ["optim.lr=3e-4", "data.name=synthetic", "steps=7"])
    assert c.optim.lr == 3e-4 and c.steps == 7
    with pytest.raises(ValueError, match="optim.nope"):
        configs.apply_overrides(c, ["optim.nope=1"])
    with pytest.raises(ValueError, match="unknown stage"):
        configs.get_config("tiny/rlhf")


def test_synthetic_source_is_deterministic_resumable_and_process_sliced():
    preset = get_preset("tiny")
    buckets = buckets_from_config([(9, 32, 48, 4), (1, 32, 48, 8)])
    a = SyntheticCaptionedSource(preset, buckets, None, 6, seed=3)
    first = [a.next() for _ in range(5)]
    assert first[0]["latents"].shape[1:] in [(3, 4, 6, 16), (1, 4, 6, 16)]
    assert first[0]["context"].shape[1:] == (93, 32) and first[0]["pooled"].shape[1:] == (32,)
    st = a.state()
    later = [a.next() for _ in range(3)]
    b = SyntheticCaptionedSource(preset, buckets, None, 6, seed=3)
    b.restore(st)
    for x, y in zip(later, [b.next() for _ in range(3)]):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    halves = [SyntheticCaptionedSource(preset, buckets, None, 6, seed=3, process_index=i, process_count=2).batch_at(1)
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate([h["latents"] for h in halves]), first[1]["latents"])
    assert 0.5 < float(np.std(first[0]["latents"])) < 2.0  # roughly normalised
    with pytest.raises(ValueError, match="seed"):
        b.restore({"kind": "synthetic", "seed": 4, "index": 0})
    with pytest.raises(ValueError, match="4k\\+1"):
        SyntheticCaptionedSource(preset, buckets_from_config([(8, 32, 48, 4)]))
    c = configs.get_config("tiny")
    c.data.name = "/no/such/dataset"
    with pytest.raises(ValueError, match="--data"):
        make_source(c, preset)


def test_flop_formula_matches_xla_count():
    """transformer_flops vs XLA's own count of the lowered forward (2 layers: the scan body counts once)."""
    from contentv_jax.transformer import ContentVTransformer

    cfg = TransformerConfig(num_layers=2, num_attention_heads=4, attention_head_dim=32, joint_attention_dim=64,
                            caption_projection_dim=128, pooled_projection_dim=64)
    m = ContentVTransformer(cfg)
    b, t, h, w, l = 2, 3, 8, 12, 40
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(b, t, h, w, 16), (b,), (b, l, 64), (b, 64)]]
    params = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), *[jnp.zeros(a.shape) for a in args]))
    xla = jax.jit(m.apply).lower(params, *args).cost_analysis()["flops"]
    ours = transformer_flops(cfg, (t, h, w), l, b)
    assert 0.9 < ours / xla < 1.02, (ours, xla)  # XLA also counts the (few) elementwise flops
    big = transformer_flops(get_preset("contentv-8b").transformer, (31, 54, 96), 333, 1)
    assert 2 * 8.06e9 * 31 * 27 * 48 < big < 3 * 2 * 8.06e9 * (31 * 27 * 48 + 333)  # ~2 * params * tokens + attention
    assert rel_err(transformer_flops(cfg, (t, h, w), l, 4), 2 * transformer_flops(cfg, (t, h, w), l, 2)) < 1e-12


def test_gradient_accumulation_is_the_mean_over_strided_micro_batches():
    """optim.grad_accum=2: loss / gradient = mean over micro-batches rows j, j+2, ... (key fold_in(step key, j))."""
    import flax.linen as nn

    from contentv_jax.train import TrainState, make_train_step

    class Toy(nn.Module):  # a velocity model with the DiT's call signature
        @nn.compact
        def __call__(self, x, t, c, p):
            return nn.Dense(x.shape[-1])(x) * (1 + t[:, None, None, None, None] / 1000) + jnp.mean(c) + jnp.mean(p)

    config = configs.get_config("tiny")
    config.optim.grad_accum = 2
    toy, tx = Toy(), optim.make_optimizer(config.optim, 10)
    batch = _batch(b=4)
    params = toy.init(jax.random.PRNGKey(0), batch["latents"], jnp.ones(4), batch["context"], batch["pooled"])["params"]
    state = TrainState(step=jnp.array(3, jnp.int32), params=params, opt_state=tx.init(params), ema_params=params,
                       rng=jax.random.PRNGKey(5), nonfinite=jnp.array(0, jnp.int32), skipped=jnp.array(0, jnp.int32))
    _, metrics = jax.jit(make_train_step(toy, tx, config, patch_size=2))(state, batch)

    apply_fn = lambda p, *a: toy.apply({"params": p}, *a)  # noqa: E731
    step_key = jax.random.fold_in(state.rng, 3)
    losses, grads = zip(*[
        jax.value_and_grad(lambda p, j=j: flow.flow_matching_loss(
            apply_fn, p, {k: v[j::2] for k, v in batch.items()}, jax.random.fold_in(step_key, j), config.flow, 2)[0])(params)
        for j in range(2)])
    np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-6)
    mean_grads = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
    np.testing.assert_allclose(metrics["grad_norm"], optim.tree_norm(mean_grads), rtol=1e-5)


def test_caption_dropout_replaces_whole_rows_by_the_empty_prompt():
    """flow.drop_captions: p=0 changes nothing, p=1 every row, p=0.5 some rows, each all-or-nothing."""
    batch = _batch(b=64)
    null_c = np.full(batch["context"].shape[1:], 7.0, np.float32)
    null_p = np.full(batch["pooled"].shape[1:], -3.0, np.float32)
    key = jax.random.PRNGKey(11)
    same = flow.drop_captions(batch, key, 0.0, null_c, null_p)
    assert same is batch
    allrows = flow.drop_captions(batch, key, 1.0, null_c, null_p)
    np.testing.assert_array_equal(allrows["context"], np.broadcast_to(null_c, batch["context"].shape))
    np.testing.assert_array_equal(allrows["pooled"], np.broadcast_to(null_p, batch["pooled"].shape))
    np.testing.assert_array_equal(allrows["latents"], batch["latents"])
    half = flow.drop_captions(batch, key, 0.5, null_c, null_p)
    dropped = np.array([np.array_equal(half["context"][i], null_c) for i in range(64)])
    kept = np.array([np.array_equal(half["context"][i], batch["context"][i]) for i in range(64)])
    assert (dropped ^ kept).all() and 16 < dropped.sum() < 48  # every row is one or the other
    for i in range(64):  # pooled goes with its row's context
        np.testing.assert_array_equal(half["pooled"][i], null_p if dropped[i] else batch["pooled"][i])


def test_train_step_caption_dropout_uses_the_step_key():
    """make_train_step with flow.caption_dropout: p=0 is the old step exactly; p=1 equals a step on an all-empty-prompt
    batch; the draw depends only on (rng, step), so a resumed run redraws the same rows."""
    import flax.linen as nn

    from contentv_jax.train import TrainState, make_train_step

    class Toy(nn.Module):
        @nn.compact
        def __call__(self, x, t, c, p):
            return nn.Dense(x.shape[-1])(x) + jnp.mean(c, axis=(1, 2))[:, None, None, None, None] + jnp.mean(p)

    batch = _batch(b=4)
    null = (np.full(batch["context"].shape[1:], 0.5, np.float32), np.full(batch["pooled"].shape[1:], 0.25, np.float32))
    toy = Toy()
    params = toy.init(jax.random.PRNGKey(0), batch["latents"], jnp.ones(4), batch["context"], batch["pooled"])["params"]

    def loss_with(p_drop, b, null_text=None):
        config = configs.get_config("tiny")
        assert config.flow.caption_dropout == 0.0  # the tiny default: its runs are unchanged
        config.flow.caption_dropout = p_drop
        tx = optim.make_optimizer(config.optim, 10)
        state = TrainState(step=jnp.array(3, jnp.int32), params=params, opt_state=tx.init(params), ema_params=params,
                           rng=jax.random.PRNGKey(5), nonfinite=jnp.array(0, jnp.int32), skipped=jnp.array(0, jnp.int32))
        return float(jax.jit(make_train_step(toy, tx, config, 2, null_text))(state, b)[1]["loss"])

    empty = {**batch, "context": np.broadcast_to(null[0], batch["context"].shape), "pooled": np.broadcast_to(null[1], batch["pooled"].shape)}
    base = loss_with(0.0, batch)
    assert loss_with(0.0, batch, null) == base
    assert loss_with(1.0, batch, null) == loss_with(0.0, empty) != base
    assert loss_with(0.5, batch, null) == loss_with(0.5, batch, null)  # same (rng, step): same rows
    with pytest.raises(ValueError, match="null_text"):
        loss_with(0.1, batch)
    with pytest.raises(ValueError, match="caption_dropout"):
        loss_with(1.5, batch, null)
    assert configs.get_config("small").flow.caption_dropout == 0.1
