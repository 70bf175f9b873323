"""The same train steps on different meshes of the 8 virtual CPU devices give the same losses and params.

Meshes: one device, data 8, fsdp 8, data 2 x fsdp 2 x tensor 2, and fsdp 2 x tensor 2 x context 2.
Tiny model in fp32, 3 steps each; tolerance: fp32 reduction-order noise (rel_err <= 1e-5 on params).
(The per-bucket compile cache is tested in test_train_cli.py.)
"""
import jax
import numpy as np
import pytest
from conftest import rel_err

from contentv_jax import configs
from contentv_jax import sharding as shd
from contentv_jax import train as T

FAST = {"xla_backend_optimization_level": 0}  # halves CPU compile time; same math
MESHES = ["data=1", "data=8", "fsdp=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=2,context=2"]


def _config(spec="tiny", steps=3):
    c = configs.get_config(spec)
    c.steps, c.log_every = steps, 1
    c.optim.warmup_steps = 0  # full learning rate from step 1, so params move
    return c


def _run(mesh_spec, config):
    devices = jax.devices()[:1] if mesh_spec == "data=1" else None
    mesh = shd.create_mesh(mesh_spec, devices)
    out = T.train(config, mesh_spec=mesh_spec, log=lambda s: None, compiler_options=FAST, mesh=mesh)
    return [h["loss"] for h in out["history"]], jax.device_get(out["state"].params), out["state"], \
        [h["update_norm"] for h in out["history"]]


def test_mesh_parsing_and_shardings():
    assert shd.parse_mesh_spec("data=2,fsdp=-1") == {"data": 2, "fsdp": -1, "tensor": 1, "context": 1}
    mesh = shd.create_mesh("data=2,fsdp=-1,tensor=2")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "context": 1}
    with pytest.raises(ValueError, match="unknown axes"):
        shd.parse_mesh_spec("data=2,pipeline=4")
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.create_mesh("data=4,fsdp=4")
    with pytest.raises(ValueError, match="at most one -1"):
        shd.parse_mesh_spec("data=-1,fsdp=-1")
    # repeated logical names (conv kernel taps) are fine; a mesh axis is used once per array
    assert shd.logical_to_mesh_spec(("kernel", "kernel", "conv_in", "embed")) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert shd.logical_to_mesh_spec(("embed", "embed")) == jax.sharding.PartitionSpec("fsdp", None)
    with pytest.raises(ValueError, match="no sharding rule"):
        shd.logical_to_mesh_spec(("nonsense",))


def test_same_losses_and_params_on_every_mesh():
    config = _config()
    ref_losses, ref_params, _, ref_updates = _run(MESHES[0], config)
    assert len(ref_losses) == 3 and all(np.isfinite(ref_losses))
    diffs = {}
    for spec in MESHES[1:]:
        losses, params, state, _ = _run(spec, config)
        loss_err = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
        flat, ref_flat = jax.tree.leaves(params), jax.tree.leaves(ref_params)
        param_err = max(rel_err(a, b) for a, b in zip(flat, ref_flat))
        diffs[spec] = (loss_err, param_err)
        assert loss_err < 1e-5, (spec, losses, ref_losses)
        assert param_err < 1e-5, (spec, param_err)
        if "fsdp=8" == spec:  # parameters really are split: some leaf is sharded over fsdp
            specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
            assert any("fsdp" in str(s) for s in specs), specs
    print("mesh max diffs (loss rel, param rel_err):", diffs)
    # training really moved the params (a frozen-training bug would otherwise pass)
    assert all(h > 0 for h in ref_updates)


def _abstract_8b_params():
    """contentv-8b's boxed abstract params (logical names on every leaf): jax.eval_shape, nothing allocated."""
    from contentv_common.config import get_preset

    preset = get_preset("contentv-8b")
    model = T.build_model(configs.get_config("contentv-8b"), preset)
    return jax.eval_shape(lambda r: model.init(r, *T._dummy_inputs(preset))["params"], jax.random.PRNGKey(0))


def test_contentv_8b_default_mesh_never_replicates_large_parameters():
    """On 256 devices the contentv-8b default mesh (data=2 x fsdp=128; 2432 = 128 x 19) shards every parameter;
    fsdp=256 cannot divide the 2432-wide dims: fsdp moves to a dim it divides (the 9728 mlp, 14592 adaLN, 4096
    joint widths) and what stays replicated (the 2432 x 2432 attention kernels) is named in a RuntimeWarning."""
    import flax.linen as nn
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    boxed = _abstract_8b_params()
    params = nn.meta.unbox(boxed)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    assert n_params == 8_056_627_520
    config = configs.get_config("contentv-8b/sft")
    assert config.mesh == "data=-1,fsdp=128" and shd.parse_mesh_spec(config.mesh)["fsdp"] == 128

    def per_device_bytes(sh):  # fp32 params + 2 AdamW moments + EMA, like benchmarks.memory's `state`
        return 16 * sum(int(np.prod(s.shard_shape(x.shape))) for x, s in zip(jax.tree.leaves(params), jax.tree.leaves(sh)))

    default = shd.logical_shardings(boxed, AbstractMesh((2, 128, 1, 1), shd.MESH_AXES))
    assert shd.replicated_report(boxed, default) == []
    assert per_device_bytes(default) < 1.01 * 16 * n_params / 128  # every large leaf split 128 ways (0.94 GiB)

    wide = shd.logical_shardings(boxed, AbstractMesh((1, 256, 1, 1), shd.MESH_AXES))
    assert wide["transformer_blocks"]["ff"]["proj_in"]["kernel"].spec == P(None, None, "fsdp")  # 9728 = 256 x 38
    assert wide["context_embedder"]["kernel"].spec == P("fsdp", None)  # joint 4096 takes fsdp from embed 2432
    rep = shd.replicated_report(boxed, wide)
    assert rep and all(2432 in shape[-2:] and shape[-1] * shape[-2] == 2432 * 2432 for _, shape, _ in rep), rep
    assert "['transformer_blocks']['attn']['to_q']['kernel']" in {p for p, _, _ in rep}
    with pytest.warns(RuntimeWarning, match=r"(?s)REPLICATED.*fsdp <= 128.*\['attn'\]\['to_q'\]\['kernel'\]"):
        shd.warn_replicated(boxed, wide, "parameter")
    assert 25 * 2**30 < per_device_bytes(wide) < 30 * 2**30  # ~27 GiB, was 120 GiB before fsdp moved to other dims


def test_fit_spec_moves_fsdp_to_a_divisible_dim_only():
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    mesh = AbstractMesh((1, 4, 2, 1), shd.MESH_AXES)
    fit = shd._fit_spec
    assert fit(P("fsdp", "tensor"), (8, 6), mesh, ("embed", "heads")) == P("fsdp", "tensor")  # divisible: unchanged
    assert fit(P("fsdp", "tensor"), (6, 8), mesh, ("embed", "heads")) == P(None, "tensor")  # 8 taken by tensor
    assert fit(P("fsdp", None), (6, 12), mesh, ("embed", "joint")) == P(None, "fsdp")  # moved to the joint dim
    assert fit(P(None, "fsdp", None), (8, 6, 5), mesh, ("layers", "embed", "heads")) == P(None, None, None)  # never the scan axis
    assert fit(P(None, "tensor"), (12, 8), mesh, ("joint", "mlp")) == P("fsdp", "tensor")  # rules left fsdp unused
    assert fit(P(None, "tensor"), (3, 8), mesh, ("joint", "mlp")) == P(None, "tensor")  # nowhere to go: replicated
