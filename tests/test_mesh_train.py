"""The same train steps on different meshes of the 8 virtual CPU devices give the same losses and params.

Meshes: one device, data 8, fsdp 8, data 2 x fsdp 2 x tensor 2, and fsdp 2 x tensor 2 x context 2.
Tiny model in fp32, 3 steps each; tolerance: fp32 reduction-order noise (rel_err <= 1e-5 on params).
(The per-bucket compile cache is tested in test_train_cli.py.)
"""
import jax
import numpy as np
import pytest
from conftest import rel_err

from contentv_jax import configs, sharding as shd
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
