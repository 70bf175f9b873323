"""The original Stability AI single-file layout of the SD3.5 MM-DiT (`sd3.5_large.safetensors`) <-> diffusers keys.

The original file holds `model.diffusion_model.`-prefixed keys (some re-saves drop the prefix):
`x_embedder`, `t_embedder.mlp.{0,2}`, `y_embedder.mlp.{0,2}`, `context_embedder`, `pos_embed` (the learned
2D table), `joint_blocks.N.{x_block,context_block}.{attn.qkv, attn.ln_q, attn.ln_k, attn.proj,
adaLN_modulation.1, mlp.fc1, mlp.fc2}` and `final_layer.{linear, adaLN_modulation.1}`.

Every diffusers key is produced from exactly one original key by one of three named operations:
  copy   the tensor as it is;
  qkv    one third (q, k or v) of a fused `attn.qkv` weight or bias, split along dim 0;
  swap   an adaLN modulation whose two halves are stored (shift, scale) in the original and (scale, shift)
         in diffusers: `final_layer.adaLN_modulation.1` and the last block's context adaLN (context_pre_only).
The table is built for a given config (exact keys, no substring replacement); `diffusers_to_original` is its
inverse, used to write original-format files (tests check it against diffusers' own single-file converter).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from contentv_common.config import SD3_POS_EMBED_KEY, TransformerConfig

PREFIX = "model.diffusion_model."
# Other parts a single file may bundle (VAE, text encoders): not the transformer, skipped by name.
OTHER_PREFIXES = ("first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")
MARKER = "joint_blocks.0.x_block.attn.qkv.weight"  # identifies the format


@dataclass(frozen=True)
class Piece:
    """How one diffusers tensor comes out of the original file."""

    original: str  # original key (without PREFIX)
    op: str = "copy"  # copy | qkv | swap
    part: int = 0  # qkv: 0 q, 1 k, 2 v


def _linear(d: str, o: str, op: str = "copy", part: int = 0) -> dict[str, Piece]:
    return {f"{d}.weight": Piece(f"{o}.weight", op, part), f"{d}.bias": Piece(f"{o}.bias", op, part)}


def key_table(cfg: TransformerConfig, pos_embed: bool = False) -> dict[str, Piece]:
    """diffusers key -> Piece, for every tensor of an SD3.5-style MM-DiT with this config.
    pos_embed: include the learned 2D table `pos_embed.pos_embed` (SD3.5 has it, ContentV drops it)."""
    t: dict[str, Piece] = {}
    if pos_embed:
        t[SD3_POS_EMBED_KEY] = Piece("pos_embed")
    t |= _linear("pos_embed.proj", "x_embedder.proj")
    t |= _linear("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0")
    t |= _linear("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2")
    t |= _linear("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0")
    t |= _linear("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2")
    t |= _linear("context_embedder", "context_embedder")
    last = cfg.num_layers - 1
    for i in range(cfg.num_layers):
        d, x, c = f"transformer_blocks.{i}", f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block"
        for part, name in enumerate("qkv"):
            t |= _linear(f"{d}.attn.to_{name}", f"{x}.attn.qkv", "qkv", part)
            t |= _linear(f"{d}.attn.add_{name}_proj", f"{c}.attn.qkv", "qkv", part)
        t[f"{d}.attn.norm_q.weight"] = Piece(f"{x}.attn.ln_q.weight")
        t[f"{d}.attn.norm_k.weight"] = Piece(f"{x}.attn.ln_k.weight")
        t[f"{d}.attn.norm_added_q.weight"] = Piece(f"{c}.attn.ln_q.weight")
        t[f"{d}.attn.norm_added_k.weight"] = Piece(f"{c}.attn.ln_k.weight")
        t |= _linear(f"{d}.attn.to_out.0", f"{x}.attn.proj")
        t |= _linear(f"{d}.norm1.linear", f"{x}.adaLN_modulation.1")
        t |= _linear(f"{d}.ff.net.0.proj", f"{x}.mlp.fc1")
        t |= _linear(f"{d}.ff.net.2", f"{x}.mlp.fc2")
        if i == last:  # context_pre_only: (scale, shift) continuous adaLN, no context output / MLP
            t |= _linear(f"{d}.norm1_context.linear", f"{c}.adaLN_modulation.1", "swap")
        else:
            t |= _linear(f"{d}.attn.to_add_out", f"{c}.attn.proj")
            t |= _linear(f"{d}.norm1_context.linear", f"{c}.adaLN_modulation.1")
            t |= _linear(f"{d}.ff_context.net.0.proj", f"{c}.mlp.fc1")
            t |= _linear(f"{d}.ff_context.net.2", f"{c}.mlp.fc2")
    t |= _linear("norm_out.linear", "final_layer.adaLN_modulation.1", "swap")
    t |= _linear("proj_out", "final_layer.linear")
    return t


def swap_halves(w: np.ndarray) -> np.ndarray:
    """(shift, scale) <-> (scale, shift) along dim 0; its own inverse."""
    a, b = np.split(np.asarray(w), 2, axis=0)
    return np.concatenate([b, a], axis=0)


def apply(piece: Piece, w: np.ndarray) -> np.ndarray:
    """The diffusers tensor from the original tensor `w` named by `piece.original`."""
    if piece.op == "qkv":
        return np.split(np.asarray(w), 3, axis=0)[piece.part]
    if piece.op == "swap":
        return swap_halves(w)
    return w


def strip_keys(keys) -> tuple[dict[str, str], list[str]]:
    """Original-file keys -> ({key without PREFIX: full key}, skipped keys of other bundled models)."""
    keys = list(keys)
    prefixed = any(k.startswith(PREFIX) for k in keys)
    out, skipped = {}, []
    for k in keys:
        if prefixed and k.startswith(PREFIX):
            out[k[len(PREFIX):]] = k
        elif k.startswith(OTHER_PREFIXES) or prefixed:
            skipped.append(k)  # prefixed file: anything outside model.diffusion_model. is another model
        else:
            out[k] = k
    return out, skipped


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> TransformerConfig:
    """Read a TransformerConfig off the original file's tensor shapes (keys without PREFIX)."""
    def shape(k):
        if k not in shapes:
            raise KeyError(f"SD3 original file: required key {PREFIX}{k} is missing")
        return tuple(shapes[k])

    if any(".attn2." in k for k in shapes):
        raise ValueError("SD3 original file has attn2 (dual attention, SD3.5 Medium): only SD3.5 Large is supported")
    if "joint_blocks.0.x_block.attn.ln_q.weight" not in shapes:
        raise ValueError("SD3 original file has no qk-norm (ln_q): SD3 Medium 1.0, not SD3.5 Large")
    inner, cin, p, _ = shape("x_embedder.proj.weight")
    head_dim = shape("joint_blocks.0.x_block.attn.ln_q.weight")[0]
    layers = sorted({int(k.split(".")[1]) for k in shapes if k.startswith("joint_blocks.")})
    if layers != list(range(len(layers))):
        raise ValueError(f"SD3 original file: joint_blocks indices are not 0..N-1: {layers}")
    ctx_out, ctx_in = shape("context_embedder.weight")
    pos = shapes.get("pos_embed")
    kw = {}
    if pos is not None:
        kw["pos_embed_max_size"] = math.isqrt(pos[1])
    return TransformerConfig(
        patch_size=p, in_channels=cin, out_channels=shape("final_layer.linear.weight")[0] // (p * p),
        num_layers=len(layers), num_attention_heads=inner // head_dim, attention_head_dim=head_dim,
        joint_attention_dim=ctx_in, caption_projection_dim=ctx_out,
        pooled_projection_dim=shape("y_embedder.mlp.0.weight")[1], **kw,
    )


def diffusers_to_original(state: Mapping[str, np.ndarray], cfg: TransformerConfig, prefix: str = PREFIX,
                          concat: Callable | None = None) -> dict[str, np.ndarray]:
    """Inverse of the table: a diffusers state dict -> the original single-file state dict (with `prefix`).
    Fuses q, k, v back into `qkv` and swaps the adaLN halves back. Works on numpy arrays or torch tensors
    (`concat` defaults to numpy's / torch's cat along dim 0)."""
    if concat is None:
        first = next(iter(state.values()))
        if hasattr(first, "element_size"):  # a torch tensor: torch is imported already, this floor never imports it
            cat = sys.modules["torch"].cat
            concat = lambda xs: cat(list(xs), 0)  # noqa: E731
        else:
            concat = lambda xs: np.concatenate(list(xs), 0)  # noqa: E731
    table = key_table(cfg, pos_embed=SD3_POS_EMBED_KEY in state)
    missing = sorted(set(table) - set(state))
    unexpected = sorted(set(state) - set(table))
    if missing or unexpected:
        raise KeyError(f"diffusers_to_original: missing {missing}, unexpected {unexpected}")
    out: dict[str, object] = {}
    fused: dict[str, dict[int, object]] = {}
    for key, piece in table.items():
        w = state[key]
        if piece.op == "qkv":
            fused.setdefault(piece.original, {})[piece.part] = w
        elif piece.op == "swap":
            a, b = w[: w.shape[0] // 2], w[w.shape[0] // 2:]
            out[prefix + piece.original] = concat([b, a])
        else:
            out[prefix + piece.original] = w
    for orig, parts in fused.items():
        out[prefix + orig] = concat(parts[i] for i in range(3))
    return out
