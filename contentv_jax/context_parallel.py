"""Context-parallel attention: the joint token sequence split over the mesh's context axis.

`ring_attention(q, k, v)` and `ulysses_attention(q, k, v)` take GLOBAL [B, S, heads, head_dim] arrays and compute
what `contentv_jax.attention.attention` computes (full, unmasked softmax(q k^T / sqrt(D)) v, output in q's dtype),
as a `shard_map` over the ambient mesh (`jax.set_mesh`, as the trainer sets it). The specs come from the logical
rules in force (`nn.logical_axis_rules`, else `sharding.DEFAULT_RULES`): the sequence over the mesh axes of
"length" (the context axis), batch over those of "batch", heads over those of "act_heads" (tensor). A dim the mesh
axes do not divide is replicated over them (the sequence is padded instead). With no mesh, or a context axis of
size 1, both are local flash attention.

ring    - each device keeps its query chunk; the K/V chunks travel around the context ring (`lax.ppermute`), each
          step running the flash block math on one chunk and merging the chunks' (o, lse) by their logsumexp. The
          custom VJP sends K/V around again with the dK/dV accumulators, recomputing each chunk (flash backward
          given the global o, lse); after a full turn each accumulator is home. Any axis size; the sequence is
          padded to a multiple of it and the padded keys are masked (kv_len from `lax.axis_index`).
          Memory per device: O(S / P) activations, O(1) chunks in flight.
ulysses - `lax.all_to_all` turns sequence shards into head shards, every device runs flash attention over the
          whole sequence for heads / P heads, and a second all_to_all turns them back. Needs the heads (per tensor
          shard) to divide by the context size P: ContentV-8B's 38 heads allow context 2, 19 or 38.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from contentv_jax import sharding as shd
from contentv_jax.attention import flash_attention, flash_backward, flash_forward

CONTEXT_PARALLEL_IMPLS = ("ring", "ulysses")  # the attention backends (attention.ATTENTION_IMPLS) defined here

# Logical names of a [B, S, heads, head_dim] attention operand (the names JointAttention constrains q with).
QKV_NAMES = ("batch", "length", "act_heads", None)


def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, 'ax' or ('a', 'b')) as a tuple of mesh axis names."""
    return () if entry is None else entry if isinstance(entry, tuple) else (entry,)


def _entry(axes: tuple[str, ...]):
    return None if not axes else axes[0] if len(axes) == 1 else axes


def _plan(shape):
    """(mesh, spec, seq_axes, P) for a global [B, S, N, D] operand under the ambient mesh and logical rules.

    spec: the shard_map PartitionSpec (batch / heads replicated over mesh axes that do not divide them; the
    sequence over `seq_axes`, its length padded to a multiple of P = their total size). (None, None, (), 1)
    when there is no mesh or the sequence is not split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None, None, (), 1
    rules = nn.get_logical_axis_rules() or shd.DEFAULT_RULES
    spec = shd.logical_to_mesh_spec(QKV_NAMES, rules)
    out = []
    for dim, entry in zip(shape, spec):
        axes = tuple(a for a in _axes(entry) if a in mesh.axis_names and mesh.shape[a] > 1)
        out.append(axes)
    seq_axes = out[1]
    size = 1
    for a in seq_axes:
        size *= mesh.shape[a]
    for i in (0, 2):  # batch, heads: replicated where their mesh axes do not divide them
        n = 1
        for a in out[i]:
            n *= mesh.shape[a]
        if shape[i] % n:
            out[i] = ()
    return mesh, P(*(_entry(a) for a in out)), seq_axes, size


def _context_parallel(shard_fn, q: jax.Array, k: jax.Array, v: jax.Array, name: str) -> jax.Array:
    """Run shard_fn(q, k, v, *, seq_len, axes, size) ([b, S'/P, n, D] shards -> [b, S'/P, n, D]) on the global
    [B, S, N, D] q, k, v: pad S to S' (a multiple of P), shard_map over the plan's spec, slice the padding off."""
    if q.shape != k.shape or k.shape != v.shape:
        raise ValueError(f"{name} attention needs q, k, v of one shape [B, S, heads, head_dim] (self-attention over "
                         f"the joint sequence), got {q.shape}, {k.shape}, {v.shape}")
    mesh, spec, axes, size = _plan(q.shape)
    if size == 1:
        return flash_attention(q, k, v)
    s = q.shape[1]
    pad = -s % size
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    local = functools.partial(shard_fn, seq_len=s, axes=axes, size=size)
    # check_vma off: the flash block math builds its scan carries from constants, which the varying-manual-axes
    # type check rejects inside a shard_map; the specs above are exact, so nothing is lost but the check.
    o = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)(q, k, v)
    return o[:, :s] if pad else o


# ------------------------------------------------------------------------------------------------------ ring
def _chunk_len(j, chunk: int, seq_len: int):
    """Valid keys in sequence chunk j (traced int32) of a sequence of seq_len padded into chunks of `chunk`."""
    return jnp.clip(seq_len - j * chunk, 0, chunk).astype(jnp.int32)


def _merge(o, lse, o_j, lse_j):
    """Combine two partial attentions over disjoint key sets: o [b, s, n, D] f32 normalised over its keys,
    lse [b, n, s] f32 (-inf: no keys yet) -> the pair over the union."""
    new = jnp.logaddexp(lse, lse_j)
    safe = jnp.where(new == -jnp.inf, 0.0, new)  # both empty: weights exp(-inf) = 0, not NaN

    def weight(l):  # [b, n, s] -> [b, s, n, 1]
        return jnp.exp(l - safe).transpose(0, 2, 1)[..., None]

    return o * weight(lse) + o_j * weight(lse_j), new


def _ring_fwd(q, k, v, seq_len, axes, size):
    """Per shard: q, k, v [b, c, n, D] (c = padded S / P) -> (o [b, c, n, D] f32, lse [b, n, c] f32)."""
    c = q.shape[1]
    me = lax.axis_index(axes)
    perm = [(i, (i + 1) % size) for i in range(size)]  # chunk j moves to device j + 1

    def attend(o, lse, k, v, t):  # at step t this device holds K/V chunk (me - t) mod P
        o_j, lse_j = flash_forward(q, k, v, kv_len=_chunk_len((me - t) % size, c, seq_len))
        return _merge(o, lse, o_j, lse_j)

    def step(carry, t):
        o, lse, k, v = carry
        k_next, v_next = lax.ppermute(k, axes, perm), lax.ppermute(v, axes, perm)  # overlaps the compute
        o, lse = attend(o, lse, k, v, t)
        return (o, lse, k_next, v_next), None

    b, _, n, d = q.shape
    init = (jnp.zeros((b, c, n, d), jnp.float32), jnp.full((b, n, c), -jnp.inf, jnp.float32), k, v)
    (o, lse, k, v), _ = lax.scan(step, init, jnp.arange(size - 1))
    return attend(o, lse, k, v, size - 1)  # the last chunk: nothing left to send


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _ring(q, k, v, seq_len, axes, size):
    return _ring_fwd(q, k, v, seq_len, axes, size)[0].astype(q.dtype)


def _ring_vjp_fwd(q, k, v, seq_len, axes, size):
    o, lse = _ring_fwd(q, k, v, seq_len, axes, size)
    o = o.astype(q.dtype)
    return o, (q, k, v, o, lse)  # O(S / P) residuals per device


def _ring_vjp_bwd(seq_len, axes, size, res, do):
    """K/V and their dK/dV accumulators travel the ring once more; each step adds this device's queries'
    contribution to the chunk it holds. After P sends the accumulators are back on the chunk's owner."""
    q, k, v, o, lse = res
    c = q.shape[1]
    me = lax.axis_index(axes)
    perm = [(i, (i + 1) % size) for i in range(size)]

    def grads(dq, dk, dv, k, v, t):
        dq_j, dk_j, dv_j = flash_backward(q, k, v, o, lse, do, kv_len=_chunk_len((me - t) % size, c, seq_len))
        return dq + dq_j, dk + dk_j, dv + dv_j

    def step(carry, t):
        dq, dk, dv, k, v = carry
        k_next, v_next = lax.ppermute(k, axes, perm), lax.ppermute(v, axes, perm)
        dq, dk, dv = grads(dq, dk, dv, k, v, t)
        return (dq, lax.ppermute(dk, axes, perm), lax.ppermute(dv, axes, perm), k_next, v_next), None

    zeros = jnp.zeros(q.shape, jnp.float32)
    (dq, dk, dv, k, v), _ = lax.scan(step, (zeros, zeros, zeros, k, v), jnp.arange(size - 1))
    dq, dk, dv = grads(dq, dk, dv, k, v, size - 1)
    dk, dv = lax.ppermute(dk, axes, perm), lax.ppermute(dv, axes, perm)  # the last hop home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring.defvjp(_ring_vjp_fwd, _ring_vjp_bwd)


def _ring_shard(q, k, v, *, seq_len: int, axes: tuple[str, ...], size: int):
    return _ring(q, k, v, seq_len, axes, size)


def ring_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q, k, v [B, S, heads, head_dim] (global) -> [B, S, heads, head_dim] in q's dtype: ring attention over the
    mesh's context axis (module doc); local flash attention without a mesh or with context 1."""
    return _context_parallel(_ring_shard, q, k, v, "ring")


# --------------------------------------------------------------------------------------------------- ulysses
def _ulysses_shard(q, k, v, *, seq_len: int, axes: tuple[str, ...], size: int):
    """Per shard [b, c, n, D] -> [b, c, n, D]: all_to_all to [b, P c, n / P, D], flash over the unpadded
    sequence, all_to_all back."""
    n = q.shape[2]
    if n % size:
        raise ValueError(
            f"ulysses attention splits the heads over the context axis, but the {n} heads on each device (after any "
            f"tensor split) do not divide by the context size {size}: the heads must divide by context x tensor. "
            f"ContentV-8B's 38 heads allow context 2, 19 or 38 (tensor 1); ring attention takes any context size.")

    def to_heads(x):  # [b, c, n, D] -> [b, P c, n / P, D]
        return lax.all_to_all(x, axes, split_axis=2, concat_axis=1, tiled=True)

    q, k, v = (to_heads(x)[:, :seq_len] for x in (q, k, v))  # padded keys dropped: nothing to mask
    o = jnp.pad(flash_attention(q, k, v), ((0, 0), (0, -seq_len % size), (0, 0), (0, 0)))
    return lax.all_to_all(o, axes, split_axis=1, concat_axis=2, tiled=True)  # back to [b, c, n, D]


def ulysses_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """q, k, v [B, S, heads, head_dim] (global) -> [B, S, heads, head_dim] in q's dtype: Ulysses attention over the
    mesh's context axis (module doc); local flash attention without a mesh or with context 1. Raises ValueError
    when the heads on each tensor shard do not divide by the context size."""
    return _context_parallel(_ulysses_shard, q, k, v, "ulysses")
