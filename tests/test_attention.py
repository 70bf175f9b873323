"""contentv_jax.attention: the flash (pure JAX) and splash (Pallas, interpret mode on CPU) backends against the
XLA reference, the public block math ring attention builds on, and the O(S) memory of the flash backward."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.common import rel_err
from contentv_jax import attention as A

FP32_TOL = 1e-5
BF16_TOL = 2e-2  # bf16 inputs / P / dS against the fp32 reference on the same (bf16-rounded) inputs


def qkv(sq, skv, b=2, n=2, d=32, seed=0, dtype=jnp.float32):
    """Random q [b, sq, n, d], k, v [b, skv, n, d] and an output cotangent [b, sq, n, d]."""
    rng = np.random.default_rng(seed)
    q, do = (jnp.asarray(rng.standard_normal((b, sq, n, d)), dtype) for _ in range(2))
    k, v = (jnp.asarray(rng.standard_normal((b, skv, n, d)), dtype) for _ in range(2))
    return q, k, v, do


def value_and_grads(fn, q, k, v, do):
    """(o, (dq, dk, dv)) of fn at q, k, v for the output cotangent do, all float32 numpy."""
    o, vjp = jax.vjp(fn, q, k, v)
    as_np = lambda x: np.asarray(x, np.float32)
    return as_np(o), tuple(as_np(g) for g in vjp(do.astype(o.dtype)))


def close(a, b, tol):
    """Relative Frobenius error <= tol, with an absolute floor (1e-6 RMS) for gradients that are exactly zero
    (a row with one key: dq = 0)."""
    a, b = np.float64(a), np.float64(b)
    return np.linalg.norm(a - b) <= tol * np.linalg.norm(b) + 1e-6 * np.sqrt(b.size)


def assert_matches_xla(fn, sq, skv, tol=FP32_TOL, dtype=jnp.float32, **kw):
    q, k, v, do = qkv(sq, skv, dtype=dtype, **kw)
    f32 = lambda x: x.astype(jnp.float32)
    o_ref, g_ref = value_and_grads(lambda q, k, v: A.attention(q, k, v, "xla"), f32(q), f32(k), f32(v), f32(do))
    o, g = value_and_grads(fn, q, k, v, do)
    assert o.shape == o_ref.shape and np.isfinite(o).all()
    assert close(o, o_ref, tol), ("out", rel_err(o, o_ref))
    for name, a, b in zip("qkv", g, g_ref):
        assert np.isfinite(a).all()
        assert close(a, b, tol), (f"d{name}", rel_err(a, b))


# --------------------------------------------------------------------------------------------- flash
@pytest.mark.parametrize("sq,skv,block_q,block_kv", [
    (1, 1, None, None),
    (1, 77, None, None),
    (77, 77, 32, 32),            # 77 = 3 blocks of 26 (rounded to 32): padded queries and keys
    (256, 256, 64, 128),         # block multiples: no padding
    (1613, 1613, None, None),    # 333 text + 1280 video tokens, default blocks
    (1613, 1613, 256, 512),      # non-multiple, several blocks each way
    (333, 1613, 128, 256),       # Sq != Skv
    (1613, 333, 512, 64),
])
def test_flash_matches_xla_fp32(sq, skv, block_q, block_kv):
    assert_matches_xla(lambda q, k, v: A.flash_attention(q, k, v, block_q=block_q, block_kv=block_kv), sq, skv)


def test_flash_bf16():
    # bf16 in and out (P and dS rounded to bf16 for the dots, fp32 accumulation): within 2e-2 of fp32.
    fn = lambda q, k, v: A.flash_attention(q, k, v, block_q=128, block_kv=256)
    assert_matches_xla(fn, 333, 1613, tol=BF16_TOL, dtype=jnp.bfloat16)
    q, k, v, _ = qkv(77, 77, dtype=jnp.bfloat16)
    assert fn(q, k, v).dtype == jnp.bfloat16


def test_flash_registry_and_auto():
    q, k, v, _ = qkv(77, 77)
    assert {"xla", "flash", "splash", "cudnn", "ring", "ulysses", "auto"} <= set(A.ATTENTION_IMPLS)
    if jax.default_backend() == "cpu":
        np.testing.assert_array_equal(A.attention(q, k, v, "auto"), A.attention(q, k, v, "flash"))
    with pytest.raises(ValueError, match="unknown"):
        A.attention(q, k, v, "bogus")


# ------------------------------------------------------------------------------------ public block math
def combine(outs):
    """Merge per-chunk (o [B, S, N, D], lse [B, N, S]) of the same rows into the full-sequence (o, lse)."""
    lse = jnp.logaddexp.reduce(jnp.stack([l for _, l in outs]), axis=0)
    w = [jnp.exp(l - lse).transpose(0, 2, 1)[..., None] for _, l in outs]  # [B, S, N, 1]
    return sum(wi * o for wi, (o, _) in zip(w, outs)), lse


def test_chunked_forward_backward_equals_full():
    q, k, v, do = qkv(333, 1613)
    cuts = [0, 500, 1100, 1613]  # three uneven key chunks
    chunks = [(k[:, a:b], v[:, a:b]) for a, b in zip(cuts, cuts[1:])]
    outs = [A.flash_forward(q, kc, vc, block_q=128, block_kv=256) for kc, vc in chunks]
    o, lse = combine(outs)
    o_full, lse_full = A.flash_forward(q, k, v, block_q=128, block_kv=256)
    o_ref, g_ref = value_and_grads(lambda q, k, v: A.attention(q, k, v, "xla"), q, k, v, do)
    assert o_full.dtype == lse_full.dtype == jnp.float32 and lse_full.shape == (2, 2, 333)
    assert rel_err(o, o_ref) <= FP32_TOL and rel_err(o_full, o_ref) <= FP32_TOL
    assert rel_err(lse, lse_full) <= FP32_TOL
    s = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(32)
    assert rel_err(lse_full, jax.nn.logsumexp(s, axis=-1)) <= FP32_TOL

    grads = [A.flash_backward(q, kc, vc, o, lse, do, block_q=128, block_kv=256) for kc, vc in chunks]
    dq = sum(g[0] for g in grads)
    dk = jnp.concatenate([g[1] for g in grads], axis=1)
    dv = jnp.concatenate([g[2] for g in grads], axis=1)
    for name, a, b in zip("qkv", (dq, dk, dv), g_ref):
        assert rel_err(a, b) <= FP32_TOL, name
    # a chunk's own dq alone is not the gradient: the sum over chunks is needed (the test can tell them apart)
    assert rel_err(grads[0][0], g_ref[0]) > 0.1


@pytest.mark.parametrize("n_valid", [0, 1, 100, 160])
def test_traced_kv_len_under_jit(n_valid):
    q, k, v, do = qkv(77, 160)

    @jax.jit
    def fwd_bwd(q, k, v, do, kv_len):
        o, lse = A.flash_forward(q, k, v, kv_len=kv_len, block_q=32, block_kv=64)
        return (o, lse), A.flash_backward(q, k, v, o, lse, do, kv_len=kv_len, block_q=32, block_kv=64)

    (o, lse), (dq, dk, dv) = fwd_bwd(q, k, v, do, jnp.int32(n_valid))
    for x in (o, lse, dq, dk, dv):
        assert not np.isnan(np.asarray(x)).any()
    assert not np.asarray(dk[:, n_valid:]).any() and not np.asarray(dv[:, n_valid:]).any()  # masked keys: no grad
    if n_valid == 0:  # no valid key: o = 0, lse = -inf, no gradient
        assert not np.asarray(o).any() and np.all(np.asarray(lse) == -np.inf) and not np.asarray(dq).any()
        return
    o_ref, (dq_ref, dk_ref, dv_ref) = value_and_grads(lambda q, k, v: A.attention(q, k, v, "xla"), q,
                                                      k[:, :n_valid], v[:, :n_valid], do)
    assert rel_err(o, o_ref) <= FP32_TOL
    if n_valid == 1:  # one key: softmax is constant, dq = dk = 0 up to rounding
        assert np.abs(np.asarray(dq)).max() < 1e-5 and np.abs(np.asarray(dk)).max() < 1e-4
    else:
        assert rel_err(dq, dq_ref) <= FP32_TOL and rel_err(dk[:, :n_valid], dk_ref) <= FP32_TOL
    assert rel_err(dv[:, :n_valid], dv_ref) <= FP32_TOL


def test_fully_masked_chunk_combines():
    q, k, v, _ = qkv(40, 96)
    live = A.flash_forward(q, k[:, :50], v[:, :50], block_kv=32)
    dead = A.flash_forward(q, k[:, 50:], v[:, 50:], kv_len=0, block_kv=32)
    o, _ = combine([live, dead])
    assert np.isfinite(np.asarray(o)).all()
    assert rel_err(o, A.attention(q, k[:, :50], v[:, :50], "xla")) <= FP32_TOL


# --------------------------------------------------------------------------------------------- memory
def _intermediate_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr computes, inner jaxprs (scan / while / custom_vjp / pjit bodies) included."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(getattr(o.aval, "shape", ())) for o in eqn.outvars]
        for p in eqn.params.values():
            for sub in (p if isinstance(p, (list, tuple)) else [p]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _intermediate_shapes(inner)
    return shapes


@pytest.mark.parametrize("impl,quadratic", [("flash", False), ("xla", True)])
def test_backward_has_no_seq_by_seq_array(impl, quadratic):
    s = 2048
    q, k, v, do = qkv(s, s, b=1)
    fn = ((lambda q, k, v: A.flash_attention(q, k, v, block_q=256, block_kv=256)) if impl == "flash"
          else (lambda q, k, v: A.attention(q, k, v, "xla")))
    grad = jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v), do), argnums=(0, 1, 2))
    shapes = _intermediate_shapes(jax.make_jaxpr(grad)(q, k, v).jaxpr)
    big = [sh for sh in shapes if sum(dim >= s for dim in sh) >= 2]
    assert bool(big) == quadratic, big[:3]


def test_flash_temp_memory_is_linear():
    s = 4096
    q, k, v, do = qkv(s, s, b=1, n=2, d=32)

    def temp_bytes(fn):
        step = jax.jit(jax.grad(lambda q, k, v: jnp.vdot(fn(q, k, v), do), argnums=(0, 1, 2)))
        return step.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

    scores = 2 * s * s * 4  # one fp32 [heads, S, S]
    xla = temp_bytes(lambda q, k, v: A.attention(q, k, v, "xla"))
    flash = temp_bytes(lambda q, k, v: A.flash_attention(q, k, v, block_q=256, block_kv=256))
    assert xla >= scores
    assert flash < scores / 8, (flash, xla)


# -------------------------------------------------------------------------------------- splash (Pallas)
@pytest.mark.parametrize("sq,skv,block_q,block_kv", [
    (77, 77, None, None),        # one padded block each way
    (256, 256, 128, 128),        # block multiples, 2 x 2 blocks
    (333, 1613, 128, 512),       # Sq != Skv, padded keys in the last block masked by segment ids
])
def test_splash_interpret_matches_xla(sq, skv, block_q, block_kv):
    assert_matches_xla(lambda q, k, v: A.splash_attention(q, k, v, block_q=block_q, block_kv=block_kv,
                                                          interpret=True), sq, skv, b=1)


def test_splash_interpret_bf16():
    fn = lambda q, k, v: A.splash_attention(q, k, v, interpret=True)
    assert_matches_xla(fn, 77, 200, tol=BF16_TOL, dtype=jnp.bfloat16, b=1)
    q, k, v, _ = qkv(77, 77, b=1, dtype=jnp.bfloat16)
    assert fn(q, k, v).dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------- benchmark
def test_speed_attention_section_smoke(tmp_path):
    from benchmarks import speed

    out = tmp_path / "speed.json"
    assert speed.main(["--sizes", "smoke", "--only", "attention", "--attention", "xla,flash:32:32",
                       "--attention-seq", "50", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["attention"]
    assert [r["impl"] for r in rows] == ["xla", "flash:32:32"]
    for r in rows:  # each JAX backend against torch SDPA on the same inputs
        assert r["seq"] == 50 and r["s"] > 0 and r["torch_s"] > 0
        assert r["over_torch"] == pytest.approx(r["s"] / r["torch_s"])
        assert r["rel_err_out"] < 1e-5 and r["rel_err_dq"] < 1e-5
    with pytest.raises(SystemExit):
        speed.main(["--sizes", "smoke", "--only", "attention", "--attention", "flash:32"])
