"""Logical axis names and the one table mapping them to mesh axes.

Modules annotate parameters (`nn.with_logical_partitioning(init, ("embed", "heads"))`) and
activations (`constrain(x, ("batch", "length", "act_embed"))`) with the names below only; the
rules table maps each name to mesh axes. A name without a rule is an error at start-up.
Mesh axes, ordered by communication cost: data (pure data parallel), fsdp (parameters and batch
sharded), tensor (heads / mlp split), context (token sequence split of the joint attention).
"""
from __future__ import annotations

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Parameter axes.
PARAM_AXES = (
    "layers",  # the scanned-layer axis of stacked parameters
    "embed",  # the model width (inner_dim) on the input side of a matmul
    "heads",  # attention projections' output (num_heads * head_dim)
    "mlp",  # feed-forward hidden width
    "joint",  # text context width (joint_attention_dim / pooled width)
    "conv_in",  # conv / patch input channels (small, never sharded)
    "conv_out",  # conv output channels
    "norm",  # norm scales and other small vectors
    "kernel",  # conv spatial / temporal kernel taps
)
# Activation axes.
ACTIVATION_AXES = ("batch", "length", "kv_length", "act_embed", "act_heads", "act_mlp", "act_channels")

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("joint", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
    ("kernel", None),
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("kv_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_channels", None),
)


def check_rules(rules=DEFAULT_RULES) -> None:
    """Fail if a logical name used by the models has no rule, or a rule names an unknown mesh axis."""
    named = {n for n, _ in rules}
    missing = sorted(set(PARAM_AXES + ACTIVATION_AXES) - named)
    if missing:
        raise ValueError(f"logical axes without a sharding rule: {missing}")
    for name, target in rules:
        targets = target if isinstance(target, tuple) else (target,)
        bad = [t for t in targets if t is not None and t not in MESH_AXES]
        if bad:
            raise ValueError(f"rule {name!r} -> {target!r} names unknown mesh axes {bad}; mesh axes are {MESH_AXES}")


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, names)
