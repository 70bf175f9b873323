"""The one attention function of the JAX models, with its backends chosen by name.

`attention(q, k, v, impl)` is full (non-causal, unmasked) scaled dot-product attention on
[B, S, heads, head_dim] tensors with scale 1/sqrt(head_dim), computed in the input dtype; the logits and
the softmax are float32 whatever the input dtype (`jax.nn.dot_product_attention` does both).
Backends (the `impl` name):
  "xla"   - the portable einsum + softmax path (CPU, TPU, GPU); the reference.
  "cudnn" - cuDNN flash attention (NVIDIA GPU, bf16/fp16 inputs, head_dim <= 128 and a multiple of 8).
  "auto"  - let JAX choose (cuDNN where it applies, else XLA).
"""
from __future__ import annotations

import math

import jax

# name -> `implementation=` argument of jax.nn.dot_product_attention.
ATTENTION_IMPLS: dict[str, str | None] = {"xla": "xla", "cudnn": "cudnn", "auto": None}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str = "xla") -> jax.Array:
    """q: [B, Sq, N, D], k, v: [B, Skv, N, D] -> [B, Sq, N, D] in q's dtype.

    softmax(q k^T / sqrt(D)) v over all Skv keys, per head.
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
    return jax.nn.dot_product_attention(
        q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), implementation=ATTENTION_IMPLS[impl]
    )
