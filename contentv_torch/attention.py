"""Attention backends of the PyTorch models, chosen by name from one registry.

Every backend has one signature: `fn(q, k, v) -> out`, all [B, heads, S, head_dim], full (non-causal,
unmasked) softmax attention with scale 1/sqrt(head_dim), output in q's dtype. A model asks
`get_attention_backend(name_or_callable)`; a callable with that signature (e.g. a Ulysses
sequence-parallel wrapper around another backend) is used as is, so nothing needs patching.

Backends:
  "sdpa" - `torch.nn.functional.scaled_dot_product_attention`; on CUDA it dispatches to flash /
           memory-efficient kernels where they apply, on CPU to the math path.
  "npu"  - Ascend `torch_npu.npu_fusion_attention` ("BNSD" layout), imported only when asked for.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@functools.cache
def _sdpa() -> AttentionFn:
    def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, N, Sq, D], k, v: [B, N, Skv, D] -> [B, N, Sq, D]."""
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)

    return sdpa


@functools.cache
def _npu() -> AttentionFn:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu)
    except ImportError as e:
        raise ImportError(
            f"attention backend 'npu' needs Ascend torch_npu, which is not importable ({e}); "
            "install it with `pip install torch-npu` (the build matching your torch and CANN versions), "
            "or choose the 'sdpa' backend"
        ) from None
    torch.npu.config.allow_internal_format = False

    def npu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [B, N, Sq, D], k, v: [B, N, Skv, D] -> [B, N, Sq, D].

        The window arguments cover any sequence length (2**31 - 1; 65536 would silently truncate
        attention over longer sequences). No mask: every token sees every token.
        """
        return torch_npu.npu_fusion_attention(
            q, k, v, q.shape[1], "BNSD",
            scale=1.0 / math.sqrt(q.shape[-1]), keep_prob=1.0,
            pre_tockens=2147483647, next_tockens=2147483647,
        )[0]

    return npu


# name -> factory returning the attention function (factories keep optional imports lazy).
ATTENTION_BACKENDS: dict[str, Callable[[], AttentionFn]] = {"sdpa": _sdpa, "npu": _npu}


def get_attention_backend(name_or_callable: str | AttentionFn) -> AttentionFn:
    """A registered backend by name, or the given callable `fn(q, k, v) -> out` itself."""
    if callable(name_or_callable):
        return name_or_callable
    if name_or_callable not in ATTENTION_BACKENDS:
        raise ValueError(
            f"unknown attention backend {name_or_callable!r}; choose one of {sorted(ATTENTION_BACKENDS)} "
            "or pass a callable fn(q, k, v) -> out on [B, heads, S, head_dim] tensors"
        )
    return ATTENTION_BACKENDS[name_or_callable]()


def default_backend_for(device: str | torch.device) -> str:
    """"npu" on an Ascend device, else "sdpa". Strings are read without torch.device (which only knows
    "npu" once torch_npu is imported)."""
    kind = device.split(":")[0] if isinstance(device, str) else device.type
    return "npu" if kind == "npu" else "sdpa"
