"""The one attention function of the JAX models, with its backends chosen by name.

`attention(q, k, v, impl)` is full (non-causal, unmasked) scaled dot-product attention on
[B, S, heads, head_dim] tensors with scale 1/sqrt(head_dim); the logits and the softmax are float32 whatever the
input dtype, the output is in q's dtype. Backends (the `impl` name, `ATTENTION_IMPLS`):
  "flash"   - portable memory-efficient attention in pure JAX (blocks of queries and keys, online softmax, a
              custom VJP that recomputes the scores blockwise): O(S) memory, any length. The CPU default.
  "splash"  - the TPU Pallas flash-attention kernel (`jax.experimental.pallas.ops.tpu`); Pallas interpret mode
              off TPU (tests).
  "cudnn"   - cuDNN flash attention (NVIDIA GPU, bf16/fp16 inputs, head_dim <= 128 and a multiple of 8).
  "xla"     - the einsum + softmax path of `jax.nn.dot_product_attention` ([S, S] scores); the test reference.
  "ring", "ulysses" - context-parallel attention over the mesh's context axis (`contentv_jax.context_parallel`).
  "auto"    - cudnn on GPU (bf16 / fp16), splash on TPU, flash elsewhere (`auto_impl`); the configs' default.

The block math (`flash_forward` / `flash_backward`) is public: ring attention runs it on one K/V chunk at a time
and combines the chunks by their logsumexp.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

# Block sizes per backend (queries, keys). CPU: 256 x 256 keeps a block's [heads, 256, 256] fp32 scores (2 MiB at
# 8 heads) in cache. fwd+bwd at 1,613 / 4,096 tokens, 8 x 64 heads, 2 shared EPYC cores, time / torch SDPA's
# (benchmarks.speed --only attention, two runs, noisy): 256:256 0.95-1.2x / 0.91-1.4x, 512:512 1.1x / 1.2-1.4x,
# 4096:256 1.1x / 1.3x, 4096:4096 1.4x / 1.7x; the XLA path 2.7x / 3.5x. Accelerators want on-chip tiles.
DEFAULT_BLOCKS: dict[str, tuple[int, int]] = {"cpu": (256, 256), "gpu": (512, 512), "tpu": (512, 512)}


def default_blocks() -> tuple[int, int]:
    """(block_q, block_kv) for the default JAX backend."""
    return DEFAULT_BLOCKS.get(jax.default_backend(), DEFAULT_BLOCKS["gpu"])


def _split(n: int, block: int) -> tuple[int, int]:
    """Split a length n into (count, size) blocks of at most `block` (rounded up to a multiple of 8), padding
    as little as possible: 1613 keys in blocks of <= 512 -> 4 blocks of 408 (1632), not 4 of 512 (2048)."""
    if n <= block:
        return 1, n
    count = -(-n // block)
    size = -(-n // count)
    return count, -(-size // 8) * 8


def _pad_seq(x: jax.Array, length: int, value=0.0) -> jax.Array:
    """Pad axis 2 ([B, N, S, ...]) of x to `length`."""
    if x.shape[2] == length:
        return x
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, length - x.shape[2])
    return jnp.pad(x, pad, constant_values=value)


def _key_mask(j, block_kv: int, kv_len) -> jax.Array | None:
    """[block_kv] bool: which keys of key block j are valid (index < kv_len); None when all are."""
    if kv_len is None:
        return None
    return j * block_kv + lax.iota(jnp.int32, block_kv) < kv_len


# ------------------------------------------------------------------------------------------ block math
# Internal layout [B, N, S, D] (heads before sequence): the per-block dots then need no transposes.

def _fwd(q, k, v, kv_len, block_q: int, block_kv: int):
    """q [B, N, Sq, D], k, v [B, N, Skv, D] -> (o [B, N, Sq, D] f32, lse [B, N, Sq] f32), keys >= kv_len masked
    (kv_len: None, int or traced int32 scalar)."""
    b, n, sq, d = q.shape
    skv = k.shape[2]
    if skv == 0:  # no keys: every row empty
        return jnp.zeros(q.shape, jnp.float32), jnp.full((b, n, sq), -jnp.inf, jnp.float32)
    scale = 1.0 / math.sqrt(d)
    nq, bq = _split(sq, block_q)
    nk, bk = _split(skv, block_kv)
    if kv_len is None and nk * bk != skv:
        kv_len = skv  # padded keys must be masked
    q = q * jnp.asarray(scale, q.dtype)  # scale the [S, D] queries once, not every [S, S] block of logits
    qs = _pad_seq(q, nq * bq).reshape(b, n, nq, bq, d).transpose(2, 0, 1, 3, 4)  # [nq, B, N, bq, D]
    ks = _pad_seq(k, nk * bk).reshape(b, n, nk, bk, d).transpose(2, 0, 1, 3, 4)  # [nk, B, N, bk, D]
    vs = _pad_seq(v, nk * bk).reshape(b, n, nk, bk, d).transpose(2, 0, 1, 3, 4)

    def one_q_block(qi):  # qi [B, N, bq, D] -> (o, lse)
        def step(carry, x):
            m, l, acc = carry
            kj, vj, j = x
            s = jnp.einsum("bnqd,bnkd->bnqk", qi, kj, preferred_element_type=jnp.float32)
            mask = _key_mask(j, bk, kv_len)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # all keys so far masked: keep exp() finite
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum("bnqk,bnkd->bnqd", p.astype(vj.dtype), vj,
                                                     preferred_element_type=jnp.float32)
            return (m_new, l, acc), None

        init = (jnp.full((b, n, bq), -jnp.inf, jnp.float32), jnp.zeros((b, n, bq), jnp.float32),
                jnp.zeros((b, n, bq, d), jnp.float32))
        (m, l, acc), _ = lax.scan(step, init, (ks, vs, jnp.arange(nk, dtype=jnp.int32)))
        empty = l == 0.0  # every key masked: o = 0, lse = -inf
        o = acc / jnp.where(empty, 1.0, l)[..., None]
        lse = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))
        return o, lse

    o, lse = lax.map(one_q_block, qs)  # [nq, B, N, bq, D], [nq, B, N, bq]
    o = o.transpose(1, 2, 0, 3, 4).reshape(b, n, nq * bq, d)[:, :, :sq]
    lse = lse.transpose(1, 2, 0, 3).reshape(b, n, nq * bq)[:, :, :sq]
    return o, lse


def _bwd(q, k, v, o, lse, do, kv_len, block_q: int, block_kv: int):
    """Gradients (dq, dk, dv), float32, [B, N, S, D] layout, of attention over these keys given the rows' global
    o [B, N, Sq, D] and lse [B, N, Sq] (flash-attention backward: P recomputed per block from lse)."""
    b, n, sq, d = q.shape
    skv = k.shape[2]
    if skv == 0:
        return jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
    scale = 1.0 / math.sqrt(d)
    nq, bq = _split(sq, block_q)
    nk, bk = _split(skv, block_kv)
    if kv_len is None and nk * bk != skv:
        kv_len = skv
    delta = jnp.einsum("bnqd,bnqd->bnq", do.astype(jnp.float32), o.astype(jnp.float32))  # rowsum(dO * O)
    # lse = -inf (no valid key for the row): +inf makes P = exp(s - lse) = 0 instead of NaN.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse.astype(jnp.float32))
    sp, kp = nq * bq, nk * bk

    def blocks(x, count, size, value=0.0):  # [B, N, S, ...] -> [count, B, N, size, ...]
        x = _pad_seq(x, count * size, value)
        x = x.reshape(b, n, count, size, *x.shape[3:])
        return jnp.moveaxis(x, 2, 0)

    qs, dos = blocks(q * jnp.asarray(scale, q.dtype), nq, bq), blocks(do, nq, bq)  # scaled q: s and dK = dS^T Q scale
    lses, deltas = blocks(lse, nq, bq, jnp.inf), blocks(delta, nq, bq)  # padded rows: P = 0
    ks, vs = blocks(k, nk, bk), blocks(v, nk, bk)

    def one_kv_block(dq, x):  # outer loop over key blocks: dK_j, dV_j accumulate over query blocks
        kj, vj, j = x
        mask = _key_mask(j, bk, kv_len)

        def step(carry, y):
            dk, dv = carry
            qi, doi, lsei, deltai = y
            s = jnp.einsum("bnqd,bnkd->bnqk", qi, kj, preferred_element_type=jnp.float32)
            p = jnp.exp(s - lsei[..., None])
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
            dv = dv + jnp.einsum("bnqk,bnqd->bnkd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
            dp = jnp.einsum("bnqd,bnkd->bnqk", doi, vj, preferred_element_type=jnp.float32)
            ds = (p * (dp - deltai[..., None])).astype(qi.dtype)
            dk = dk + jnp.einsum("bnqk,bnqd->bnkd", ds, qi, preferred_element_type=jnp.float32)
            dqi = jnp.einsum("bnqk,bnkd->bnqd", ds, kj, preferred_element_type=jnp.float32) * scale
            return (dk, dv), dqi

        zeros = jnp.zeros((b, n, bk, d), jnp.float32)
        (dk, dv), dqs = lax.scan(step, (zeros, zeros), (qs, dos, lses, deltas))
        return dq + dqs, (dk, dv)

    dq, (dk, dv) = lax.scan(one_kv_block, jnp.zeros((nq, b, n, bq, d), jnp.float32),
                            (ks, vs, jnp.arange(nk, dtype=jnp.int32)))
    dq = jnp.moveaxis(dq, 0, 2).reshape(b, n, sp, d)[:, :, :sq]
    dk = jnp.moveaxis(dk, 0, 2).reshape(b, n, kp, d)[:, :, :skv]
    dv = jnp.moveaxis(dv, 0, 2).reshape(b, n, kp, d)[:, :, :skv]
    return dq, dk, dv


def _bnsd(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)  # [B, S, N, D] <-> [B, N, S, D]


def _blocks_or_default(block_q, block_kv) -> tuple[int, int]:
    dq, dkv = default_blocks()
    return block_q or dq, block_kv or dkv


def flash_forward(q, k, v, *, kv_len=None, block_q: int | None = None, block_kv: int | None = None):
    """q [B, Sq, N, D], k, v [B, Skv, N, D] -> (o [B, Sq, N, D] float32, lse [B, N, Sq] float32).

    o is softmax(q k^T / sqrt(D)) v normalised over these keys; lse the rows' logsumexp of the scaled logits.
    Keys at index >= kv_len are masked (kv_len: None = all, an int, or a traced int32 scalar). A row with no
    valid key gets o = 0, lse = -inf (no NaN), so chunks combine as sum_i exp(lse_i - lse) o_i.
    """
    bq, bkv = _blocks_or_default(block_q, block_kv)
    o, lse = _fwd(_bnsd(q), _bnsd(k), _bnsd(v), kv_len, bq, bkv)
    return _bnsd(o), lse


def flash_backward(q, k, v, o, lse, do, *, kv_len=None, block_q: int | None = None, block_kv: int | None = None):
    """The gradient contributions (dq [B, Sq, N, D], dk, dv [B, Skv, N, D], float32) of this K/V chunk, given the
    rows' GLOBAL output o [B, Sq, N, D] and logsumexp lse [B, N, Sq] over the full key sequence and the output
    cotangent do [B, Sq, N, D]. Summed over the chunks of a split key sequence they are the exact gradient."""
    bq, bkv = _blocks_or_default(block_q, block_kv)
    dq, dk, dv = _bwd(_bnsd(q), _bnsd(k), _bnsd(v), _bnsd(o), lse, _bnsd(do), kv_len, bq, bkv)
    return _bnsd(dq), _bnsd(dk), _bnsd(dv)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, block_q: int, block_kv: int):
    """[B, N, S, D] layout; output in q's dtype."""
    return _fwd(q, k, v, None, block_q, block_kv)[0].astype(q.dtype)


def _flash_fwd(q, k, v, block_q, block_kv):
    o, lse = _fwd(q, k, v, None, block_q, block_kv)
    o = o.astype(q.dtype)
    return o, (q, k, v, o, lse)  # O(S) residuals: no [S, S] scores kept


def _flash_bwd(block_q, block_kv, res, do):
    q, k, v, o, lse = res
    dq, dk, dv = _bwd(q, k, v, o, lse, do, None, block_q, block_kv)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, *, block_q: int | None = None, block_kv: int | None = None) -> jax.Array:
    """q [B, Sq, N, D], k, v [B, Skv, N, D] -> [B, Sq, N, D] in q's dtype: memory-efficient attention with the
    flash-attention backward (custom VJP; residuals q, k, v, o and the [B, N, Sq] logsumexp only)."""
    bq, bkv = _blocks_or_default(block_q, block_kv)
    return _bnsd(_flash(_bnsd(q), _bnsd(k), _bnsd(v), bq, bkv))


# ------------------------------------------------------------------------------------------------ splash
@functools.lru_cache(maxsize=32)
def _splash_kernel(heads: int, sq: int, skv: int, block_q: int, block_kv: int, interpret: bool):
    """The Pallas splash-attention kernel for [heads, sq, D] x [heads, skv, D] (padded lengths, block multiples),
    full mask; padding is masked by segment ids at call time."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    blocks = sk.BlockSizes(block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
                           block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
                           block_kv_dq=block_kv)
    mask = sm.MultiHeadMask([sm.FullMask((sq, skv)) for _ in range(heads)])
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret)


SPLASH_LANES = 128  # the TPU kernel's blocks are multiples of the 128-wide vector lanes


def splash_attention(q, k, v, *, block_q: int | None = None, block_kv: int | None = None,
                     interpret: bool | None = None) -> jax.Array:
    """q [B, Sq, N, D], k, v [B, Skv, N, D] -> [B, Sq, N, D] in q's dtype, by the TPU Pallas splash-attention
    kernel (its own flash backward). Lengths are padded to block multiples; padded keys get another segment id than
    every query, so the kernel masks them. interpret (default: off TPU) runs the kernel in Pallas interpret mode."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    b, sq, n, d = q.shape
    skv = k.shape[1]
    default_q, default_kv = DEFAULT_BLOCKS["tpu"]

    def fit(length: int, block: int) -> tuple[int, int]:  # (block, padded length): lane multiples, block <= length
        up = lambda x, m: -(-x // m) * m
        block = min(up(block, SPLASH_LANES), up(length, SPLASH_LANES))
        return block, up(length, block)

    bq, pq = fit(sq, block_q or default_q)
    bkv, pkv = fit(skv, block_kv or default_kv)
    kernel = _splash_kernel(n, pq, pkv, bq, bkv, interpret)
    seg = sk.SegmentIds(q=jnp.zeros((pq,), jnp.int32), kv=(jnp.arange(pkv) >= skv).astype(jnp.int32))
    # The kernel does not scale the logits: scale q (in bf16 exact only for head dims 4^k, e.g. 64).
    qh = _pad_seq(_bnsd(q) * jnp.asarray(1.0 / math.sqrt(d), q.dtype), pq)
    kh, vh = _pad_seq(_bnsd(k), pkv), _pad_seq(_bnsd(v), pkv)
    o = jax.vmap(lambda q1, k1, v1: kernel(q1, k1, v1, segment_ids=seg))(qh, kh, vh)  # [B, N, pq, D]
    return _bnsd(o[:, :, :sq]).astype(q.dtype)


# --------------------------------------------------------------------------------------------- backends
def _xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), implementation="xla")


def _cudnn(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), implementation="cudnn")


def _ring(q, k, v):
    from contentv_jax.context_parallel import ring_attention  # lazy: context_parallel imports this module

    return ring_attention(q, k, v)


def _ulysses(q, k, v):
    from contentv_jax.context_parallel import ulysses_attention

    return ulysses_attention(q, k, v)


def auto_impl(dtype, head_dim: int) -> str:
    """The backend "auto" picks: cudnn on GPU for the inputs it takes (bf16 / fp16, head_dim <= 128 and a
    multiple of 8), splash on TPU, flash elsewhere (CPU, fp32 on GPU)."""
    backend = jax.default_backend()
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128 and head_dim % 8 == 0:
        return "cudnn"
    return "splash" if backend == "tpu" else "flash"


def _auto(q, k, v):
    return ATTENTION_IMPLS[auto_impl(q.dtype, q.shape[-1])](q, k, v)


ATTENTION_IMPLS: dict[str, Callable[[jax.Array, jax.Array, jax.Array], jax.Array]] = {
    "xla": _xla,
    "flash": lambda q, k, v: flash_attention(q, k, v),
    "splash": lambda q, k, v: splash_attention(q, k, v),
    "cudnn": _cudnn,
    "ring": _ring,
    "ulysses": _ulysses,
    "auto": _auto,
}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla") -> jax.Array:
    """q: [B, Sq, N, D], k, v: [B, Skv, N, D] -> [B, Sq, N, D] in q's dtype.

    softmax(q k^T / sqrt(D)) v over all Skv keys, per head, by the backend named `impl`.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r} unknown; choose one of {sorted(ATTENTION_IMPLS)}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention expects [B, S, heads, head_dim] tensors, got q {q.shape}, k {k.shape}, "
                         f"v {v.shape}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention shapes do not agree: q {q.shape}, k {k.shape}, v {v.shape}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention dtypes differ: q {q.dtype}, k {k.dtype}, v {v.dtype}")
    return ATTENTION_IMPLS[impl](q, k, v)
