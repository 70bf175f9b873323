"""LoRA in the Flax MM-DiT (contentv_jax.lora): step 0 is the base model, only the adapter trains (and has optimizer
state), the same losses on a sharded mesh as on one device, exact resume, a bf16 base, and clear target errors.

Tiny preset in fp32 on CPU, a random (nonzero) base; tolerances: 1e-6 for step 0 (B = 0 makes it exact), fp32
reduction-order noise (1e-5) across meshes, 2e-2 for a bf16 base.
"""
import json
import shutil

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from contentv_common.cli import UsageError
from contentv_common.config import get_preset
from contentv_jax import configs
from contentv_jax import lora as L
from contentv_jax import sharding as shd
from contentv_jax import train as T
from contentv_jax.checkpoint import open_params
from contentv_jax.transformer import ContentVTransformer

FAST = {"xla_backend_optimization_level": 0}
PRESET = get_preset("tiny")


def _base_params(seed=1):
    model = ContentVTransformer(PRESET.transformer)
    init = jax.jit(lambda r: flax.linen.meta.unbox(model.init(r, *T._dummy_inputs(PRESET))["params"]))
    return jax.device_get(init(jax.random.PRNGKey(seed)))


@pytest.fixture(scope="module")
def base():
    return _base_params()


def _inputs(b=2, t=3, h=4, w=6):
    cfg, k = PRESET.transformer, jax.random.split(jax.random.PRNGKey(7), 4)
    return (jax.random.normal(k[0], (b, t, h, w, cfg.in_channels)), jnp.array([900.0, 250.0][:b]),
            jax.random.normal(k[2], (b, PRESET.text.context_tokens, cfg.joint_attention_dim)),
            jax.random.normal(k[3], (b, cfg.pooled_projection_dim)))


def _config(steps=6, rank=4, **lora):
    c = configs.get_config("tiny")
    c.steps, c.log_every, c.checkpoint_every = steps, 1, 3
    c.optim.warmup_steps, c.optim.lr = 0, 1e-2
    c.lora.rank = rank
    for k, v in lora.items():
        c.lora[k] = v
    return c


def _train(config, base, mesh_spec="data=1", **kw):
    n = int(np.prod([max(v, 1) for v in shd.parse_mesh_spec(mesh_spec).values()]))
    mesh = shd.create_mesh(mesh_spec, jax.devices()[:n])
    out = T.train(config, log=lambda s: None, compiler_options=FAST, mesh=mesh, base_params=base, **kw)
    return [h["loss"] for h in out["history"]], out


def test_step0_equals_base_and_adapter_equals_merged(base):
    spec = L.LoraSpec(4, 8.0)
    plain, lora = ContentVTransformer(PRESET.transformer), ContentVTransformer(PRESET.transformer, lora=spec)
    x = _inputs()
    adapter = jax.jit(lambda r: flax.linen.meta.unbox(lora.init(r, *x)["lora"]))(jax.random.PRNGKey(3))
    plain_apply, lora_apply = jax.jit(plain.apply), jax.jit(lora.apply)
    ref = plain_apply({"params": base}, *x)
    out = lora_apply({"params": base, "lora": adapter}, *x)
    assert float(jnp.abs(ref).mean()) > 0.1
    assert rel_err(out, ref) <= 1e-6
    # A is PEFT's kaiming-uniform U(+-1/sqrt(in)), nonzero; B starts at zero
    a = adapter["transformer_blocks"]["attn"]["to_q"]["lora_A"]
    assert a.shape == (PRESET.transformer.num_layers - 1, PRESET.transformer.inner_dim, 4)
    assert 0 < float(jnp.abs(a).max()) <= 1 / np.sqrt(PRESET.transformer.inner_dim)
    # nonzero B: the adapted model differs from the base and equals the merged W + (alpha/r) A B model
    adapter = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(jax.random.PRNGKey(v.size), v.shape), adapter)
    out = lora_apply({"params": base, "lora": adapter}, *x)
    merged = plain_apply({"params": L.merge_params(base, adapter, spec.scale)}, *x)
    assert rel_err(out, ref) > 1e-2
    assert rel_err(out, merged) <= 1e-5
    # every default target is adapted in both streams and in the last block (no to_add_out / ff_context there)
    names = {k for k in flax.traverse_util.flatten_dict(adapter, sep="/")}
    assert "last_block/attn/to_out/lora_B" in names and "last_block/attn/to_add_out/lora_A" not in names
    assert len(names) == 2 * (2 * len(L.DEFAULT_TARGETS) - 3)  # the last block: no to_add_out, ff_context


def test_only_adapter_trains_and_loss_falls(base, tmp_path):
    config = _config(steps=12)
    config.eval.every = 12  # the evaluation sampler runs on the merged base + EMA adapter
    losses, out = _train(config, base, checkpoint_dir=str(tmp_path / "ckpt"))
    assert list((tmp_path / "ckpt" / "samples").glob("*"))
    state = out["state"]
    flat = flax.traverse_util.flatten_dict(jax.device_get(state.params), sep="/")
    assert flat and all(k.endswith(("/lora_A", "/lora_B")) for k in flat)
    # the optimizer state holds moments of the adapter only: every array leaf has an adapter leaf's shape
    adapter_shapes = {v.shape for v in flat.values()}
    opt = [x for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0]
    assert opt and all(x.shape in adapter_shapes for x in opt)
    assert sum(x.size for x in opt) == 2 * sum(v.size for v in flat.values())
    assert any(float(np.abs(v).max()) > 0 for k, v in flat.items() if k.endswith("lora_B"))  # B moved off zero
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses


@pytest.fixture(scope="module")
def ref_losses(base):
    return _train(_config(steps=3), base)[0]


# every mesh axis, scan + remat: tensor with full remat, data x fsdp x context with a name-based policy
@pytest.mark.parametrize("mesh_spec,remat", [("fsdp=2,tensor=2", "full"), ("data=2,fsdp=2,context=2", "save_attention")])
def test_sharded_mesh_matches_one_device(base, ref_losses, mesh_spec, remat):
    ref = ref_losses
    config = _config(steps=3)
    config.remat_policy = remat
    losses, out = _train(config, base, mesh_spec)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref)) <= 1e-5, (losses, ref)
    # the adapter is sharded like its kernel: to_q's lora_B [layers, r, out] splits its out axis over tensor
    b = out["state"].params["transformer_blocks"]["attn"]["to_q"]["lora_B"]
    assert "tensor" in str(b.sharding.spec[2]) or "tensor" not in mesh_spec


def test_resume_is_exact_and_checkpoint_holds_only_the_adapter(base, tmp_path):
    config = _config(steps=6)
    full, _ = _train(config, base, checkpoint_dir=str(tmp_path / "a"))
    record = json.loads((tmp_path / "a" / L.SPEC_FILE).read_text())
    assert record["rank"] == 4 and record["alpha"] == 4.0 and record["targets"] == list(L.DEFAULT_TARGETS)
    shapes, _, _ = open_params(tmp_path / "a")
    assert shapes and all(k.endswith(("lora_A", "lora_B")) for k in shapes)  # no base params in the checkpoint
    # "killed" after step 3: its checkpoint only
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns("6"))
    resumed, _ = _train(config, base, checkpoint_dir=str(tmp_path / "b"), resume="auto")
    assert resumed == full[3:]
    with pytest.raises(ValueError, match=r"rank 4.*asks for rank 8"):
        _train(_config(steps=6, rank=8), base, checkpoint_dir=str(tmp_path / "b"))


def test_bf16_base(base, ref_losses):
    ref = ref_losses
    losses, out = _train(_config(steps=3, base_dtype="bfloat16"), base)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, ref)) <= 2e-2
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(out["state"].params))  # fp32 adapter on a bf16 base


def test_targets_patterns_and_errors(base, tmp_path):
    assert L.normalize_target("attn.to_out.0") == "attn/to_out"
    assert L.normalize_target("ff_context.net.0.proj") == "ff_context/proj_in"
    assert L.normalize_target("ff.net.2") == "ff/proj_out"
    spec = L.LoraSpec(2, 2.0, ("attn/to_q", "ff*/proj_in"))
    adapted = L.check_targets(spec, base)
    assert sorted(L.module_name(p) for p in adapted) == ["attn/to_q", "attn/to_q", "ff/proj_in", "ff/proj_in",
                                                          "ff_context/proj_in"]
    with pytest.raises(ValueError, match=r"\['attn/to_qq'\] match no Dense layer"):
        L.check_targets(L.LoraSpec(2, 2.0, ("attn/to_q", "attn/to_qq")), base)
    with pytest.raises(ValueError, match="attn/nope"):
        _train(_config(steps=1, targets=["attn.to_q", "attn/nope"]), base)
    with pytest.raises(ValueError, match=r"\['attn/nope'\] match no Dense layer"):  # nothing adapted at all
        _train(_config(steps=1, targets=["attn/nope"]), base, checkpoint_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()  # a failed run leaves no checkpoint dir (lora.json comes with a checkpoint)
    c = _config()
    with pytest.raises(UsageError, match="--init-from"):
        configs.validate_config(c)
    c.init_from, c.lora.targets = ".", []
    with pytest.raises(UsageError, match="lora.targets"):
        configs.validate_config(c)


def test_memory_benchmark_counts_base_adapter_and_optimizer_state():
    from benchmarks.memory import measure
    from contentv_jax.transformer import count_params

    row = measure("tiny", (9, 32, 48), "fsdp=2", "full", attention="flash", lora_rank=4, lora_base_dtype="bfloat16")
    base_params = _base_params()
    n_base = count_params(base_params)
    kernels = [x for p, x in flax.traverse_util.flatten_dict(base_params, sep="/").items()
               if p.endswith("/kernel") and L.LoraSpec(4, 4.0).matches(p.rsplit("/", 1)[0])]
    n_adapter = sum(4 * (x.shape[-2] + x.shape[-1]) * (x.shape[0] if x.ndim == 3 else 1) for x in kernels)  # A + B
    gib = 2.0**30
    assert row["lora_rank"] == 4 and row["base_dtype"] == "bfloat16"
    assert row["params_gib"] * gib == pytest.approx(n_base * 2 / 2, rel=0.05)  # bf16, halved by fsdp=2
    assert row["adapter_gib"] * gib == pytest.approx(n_adapter * 4 / 2, rel=0.05)  # fp32 adapter, sharded
    assert row["adamw_gib"] == pytest.approx(2 * row["adapter_gib"], rel=1e-3)  # 2 moments (+ the step count)
    assert row["ema_gib"] == pytest.approx(row["adapter_gib"])
    parts = row["params_gib"] + row["adapter_gib"] + row["adamw_gib"] + row["ema_gib"]
    assert row["state_gib"] == pytest.approx(parts, rel=1e-3)  # + the step, rng and counters


def test_validation_loss_of_the_lora_model(base, tmp_path):
    """--val-fraction with a LoRA run: the validation loss is the base + adapter model's, and it falls."""
    from test_validation import _samples

    from contentv_common.dataset import write_dataset

    data = write_dataset(tmp_path / "ds", _samples(n=32), PRESET.vae, shard_rows=16)
    config = _config(steps=6)
    config.data.name, config.data.val_fraction = str(data), 0.25
    config.eval.every, config.eval.num_prompts = 3, 0
    _, out = _train(config, base)
    vals = [h["val_loss"] for h in out["val_history"]]
    assert [h["step"] for h in out["val_history"]] == [0, 3, 6] and all(np.isfinite(vals))
    assert vals[-1] < vals[0], vals
