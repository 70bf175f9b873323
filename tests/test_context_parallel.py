"""Context-parallel attention (contentv_jax.context_parallel) on the 8 virtual CPU devices (conftest's XLA_FLAGS).

Ring and Ulysses attention equal the `xla` backend in fp32 (values and gradients, rel_err <= 1e-5) on sequence
lengths the context axis does not divide, with other mesh axes active; the tiny trainer's losses on a context mesh
equal the one-device run's, in one process and in a 2-process `jax.distributed` run.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import rel_err

from contentv_jax import configs
from contentv_jax import sharding as shd
from contentv_jax import train as T
from contentv_jax.attention import attention
from contentv_jax.context_parallel import ring_attention, ulysses_attention

ROOT = Path(__file__).resolve().parents[1]
FAST = {"xla_backend_optimization_level": 0}
IMPLS = {"ring": ring_attention, "ulysses": ulysses_attention}
# What each backend's partitioned program must contain (proof that the sequence really is split).
COLLECTIVE = {"ring": "collective-permute", "ulysses": "all-to-all"}

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")


def _qkvw(b, s, n, d, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, s, n, d)), jnp.float32) for _ in range(4)]


def _value_and_grads(fn, q, k, v, w):
    loss = lambda q, k, v: jnp.sum(fn(q, k, v) * w)  # noqa: E731  (a fixed random cotangent)
    return jax.jit(fn)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


@pytest.mark.parametrize("impl,mesh_spec,seq", [
    ("ring", "data=2,context=4", 13),  # chunks of 4: the last holds 1 real key
    ("ring", "data=2,context=4", 9),  # chunks of 3: the last chunk is all padding (every key masked)
    ("ring", "fsdp=2,tensor=2,context=2", 13),  # batch over fsdp, heads over tensor as well
    ("ulysses", "data=4,context=2", 13),
    ("ulysses", "fsdp=2,tensor=2,context=2", 13),  # 4 heads: 2 per tensor shard, 1 per context shard
])
def test_matches_xla_values_and_gradients(impl, mesh_spec, seq):
    q, k, v, w = _qkvw(2, seq, 4, 8)
    want, want_grads = _value_and_grads(lambda q, k, v: attention(q, k, v, "xla"), q, k, v, w)
    mesh = shd.create_mesh(mesh_spec)
    with jax.set_mesh(mesh), nn.logical_axis_rules(shd.DEFAULT_RULES):
        got, grads = _value_and_grads(IMPLS[impl], q, k, v, w)
        hlo = jax.jit(IMPLS[impl]).lower(q, k, v).compile().as_text()
    assert COLLECTIVE[impl] in hlo
    assert got.dtype == q.dtype and got.shape == q.shape
    assert rel_err(got, want) <= 1e-5
    for name, g, gw in zip("qkv", grads, want_grads):
        assert rel_err(g, gw) <= 1e-5, name


def test_bf16_inputs_give_bf16_outputs_close_to_xla():
    q, k, v, _ = _qkvw(2, 13, 4, 8, seed=1)
    want = attention(q, k, v, "xla")
    with jax.set_mesh(shd.create_mesh("data=2,context=4")), nn.logical_axis_rules(shd.DEFAULT_RULES):
        got = jax.jit(ring_attention)(*(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert got.dtype == jnp.bfloat16 and rel_err(got.astype(jnp.float32), want) <= 2e-2


@pytest.mark.parametrize("impl", sorted(IMPLS))
def test_without_a_context_axis_it_is_local_flash(impl):
    q, k, v, _ = _qkvw(1, 11, 2, 8)
    want = attention(q, k, v, "xla")
    assert rel_err(IMPLS[impl](q, k, v), want) <= 1e-5  # no mesh at all
    with jax.set_mesh(shd.create_mesh("data=2,fsdp=4")), nn.logical_axis_rules(shd.DEFAULT_RULES):
        hlo = jax.jit(IMPLS[impl]).lower(q, k, v).compile().as_text()
        got = jax.jit(IMPLS[impl])(q, k, v)
    assert COLLECTIVE[impl] not in hlo and rel_err(got, want) <= 1e-5


def test_ulysses_heads_must_divide_by_context():
    q, k, v, _ = _qkvw(2, 9, 3, 8)
    with jax.set_mesh(shd.create_mesh("data=4,context=2")), nn.logical_axis_rules(shd.DEFAULT_RULES):
        with pytest.raises(ValueError, match=r"3 heads .* context size 2.*38 heads allow context 2, 19 or 38"):
            jax.jit(ulysses_attention)(q, k, v)


def _config(attention_impl: str, steps: int = 3):
    c = configs.get_config("tiny")  # bucket (9, 32, 48, 8): 18 video + 93 text = 111 tokens (odd)
    c.steps, c.log_every, c.attention_impl = steps, 1, attention_impl
    c.optim.warmup_steps = 0  # full learning rate from step 1, so params move
    return c


def _losses(mesh_spec: str, attention_impl: str, devices=None) -> list[float]:
    mesh = shd.create_mesh(mesh_spec, devices)
    out = T.train(_config(attention_impl), log=lambda s: None, compiler_options=FAST, mesh=mesh)
    return [h["loss"] for h in out["history"]]


@pytest.fixture(scope="module")
def one_device_losses():
    losses = _losses("data=1", "xla", jax.devices()[:1])
    assert len(losses) == 3 and all(np.isfinite(losses)) and losses[0] != losses[-1]
    return losses


@pytest.mark.parametrize("impl,mesh_spec", [("ring", "data=2,context=4"), ("ulysses", "data=4,context=2")])
def test_training_losses_match_one_device(one_device_losses, impl, mesh_spec):
    losses = _losses(mesh_spec, impl)
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, one_device_losses)) <= 1e-5, (losses, one_device_losses)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("mesh_spec", ["data=2,context=4", "context=8"])
def test_two_process_ring_training_matches_one_device(one_device_losses, tmp_path, mesh_spec):
    """Two `jax.distributed` processes of 4 CPU devices each. data=2,context=4: data spans the processes (each
    feeds its half of the batch), context rings within each. context=8: the ring spans both processes, which hold
    the same (whole) batch, so both must read the same rows (`sharding.batch_slot`)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    port = _free_port()
    metrics = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "contentv_jax.train", "--steps", "3", "--log-every", "1", "--mesh", mesh_spec,
           "--attention", "ring", "--fast-compile", "--set", "optim.warmup_steps=0", "--metrics-file", str(metrics),
           "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2"]
    procs = [subprocess.Popen(cmd + ["--process-id", str(i)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n---\n".join(outs)
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 3
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, one_device_losses)) <= 1e-5, (losses, one_device_losses)


def test_offload_remat_policy_with_ring_gives_the_same_gradients():
    """remat `offload_attention` (q, k, v, attn_out to pinned_host; XLA:CPU has that memory space) under ring
    attention on a context mesh: same loss and gradients as no remat with xla attention on one device."""
    from contentv_common.config import get_preset
    from contentv_jax.transformer import ContentVTransformer

    cfg = get_preset("tiny").transformer
    rng = np.random.default_rng(3)
    args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((2, 2, 4, 6, 16), (2, 5, 32), (2, 32))]
    args.insert(1, jnp.asarray([100.0, 700.0]))
    params = ContentVTransformer(cfg).init(jax.random.key(0), *args)["params"]

    def value_and_grads(model):
        return jax.jit(jax.value_and_grad(lambda p: jnp.mean(model.apply({"params": p}, *args) ** 2)))(params)

    want, want_g = value_and_grads(ContentVTransformer(cfg))
    with jax.set_mesh(shd.create_mesh("data=2,context=4")), nn.logical_axis_rules(shd.DEFAULT_RULES):
        got, got_g = value_and_grads(ContentVTransformer(cfg, remat_policy="offload_attention", attention_impl="ring"))
    assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want))
    for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(want_g)):
        assert rel_err(a, b) <= 1e-5
