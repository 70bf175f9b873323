"""The ContentV MM-DiT key map: diffusers / torch keys <-> the Flax `ContentVTransformer` tree.

Torch layers 0 .. L-2 are rows of the scanned `transformer_blocks` arrays; layer L-1 (context_pre_only:
AdaLayerNormContinuous `norm1_context`, no `to_add_out`, `ff_context`, `norm2_context`) is `last_block`.
Exact templates only; every key matches exactly one rule (see keymap.py).
"""
from __future__ import annotations

from pathlib import Path

from contentv_common.config import IGNORED_TRANSFORMER_KEYS, TransformerConfig, read_json
from contentv_common.weights import CONFIG_NAME, check_keys, tensor_shapes
from contentv_common.formats.keymap import Rule, read_flax_params

_LINEAR = ("weight", "kernel", "linear")
_BIAS = ("bias", "bias", "copy")
_GAIN = ("weight", "scale", "copy")


def _dense(torch_prefix: str, flax_prefix: str, **kw) -> list[Rule]:
    return [Rule(f"{torch_prefix}.{t}", f"{flax_prefix}/{f}", k, **kw) for t, f, k in (_LINEAR, _BIAS)]


def _block_rules(t: str, f: str, context_pre_only: bool, **kw) -> list[Rule]:
    """Rules for one joint block: torch prefix `t` (e.g. "transformer_blocks.{i}") -> Flax prefix `f`."""
    rules = _dense(f"{t}.norm1.linear", f"{f}/norm1/linear", **kw)
    rules += _dense(f"{t}.norm1_context.linear", f"{f}/norm1_context/linear", **kw)
    projs = ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"]
    for name in projs:
        rules += _dense(f"{t}.attn.{name}", f"{f}/attn/{name}", **kw)
    rules += _dense(f"{t}.attn.to_out.0", f"{f}/attn/to_out", **kw)
    for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
        rules.append(Rule(f"{t}.attn.{name}.weight", f"{f}/attn/{name}/scale", "copy", **kw))
    ffs = ["ff"] if context_pre_only else ["ff", "ff_context"]
    for ff in ffs:
        rules += _dense(f"{t}.{ff}.net.0.proj", f"{f}/{ff}/proj_in", **kw)
        rules += _dense(f"{t}.{ff}.net.2", f"{f}/{ff}/proj_out", **kw)
    if not context_pre_only:
        rules += _dense(f"{t}.attn.to_add_out", f"{f}/attn/to_add_out", **kw)
    return rules


def transformer_rules(cfg: TransformerConfig) -> list[Rule]:
    """The declarative map for a model with `cfg.num_layers` blocks (diffusers keys minus pos_embed.pos_embed)."""
    n = cfg.num_layers
    rules = [
        Rule("pos_embed.proj.weight", "pos_embed/kernel", "conv2d"),
        Rule("pos_embed.proj.bias", "pos_embed/bias", "copy"),
        *_dense("context_embedder", "context_embedder"),
        *_dense("norm_out.linear", "norm_out/linear"),
        *_dense("proj_out", "proj_out"),
    ]
    for emb in ("timestep_embedder", "text_embedder"):
        for lin in ("linear_1", "linear_2"):
            rules += _dense(f"time_text_embed.{emb}.{lin}", f"time_text_embed/{emb}/{lin}")
    if n > 1:
        rules += _block_rules("transformer_blocks.{i}", "transformer_blocks", False, stack=(0, n - 1))
    rules += _block_rules(f"transformer_blocks.{n - 1}", "last_block", True)
    return rules


def transformer_shapes(cfg: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape of every tensor of the model of `cfg` (from the config alone; no pos_embed.pos_embed)."""
    d, p, head, n = cfg.inner_dim, cfg.patch_size, cfg.attention_head_dim, cfg.num_layers

    def dense(name: str, out: int, inp: int) -> dict[str, tuple[int, ...]]:
        return {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}

    out = {"pos_embed.proj.weight": (d, cfg.in_channels, p, p), "pos_embed.proj.bias": (d,),
           **dense("context_embedder", d, cfg.joint_attention_dim), **dense("norm_out.linear", 2 * d, d),
           **dense("proj_out", p * p * cfg.out_channels, d),
           **dense("time_text_embed.timestep_embedder.linear_1", d, 256),  # 256 sinusoidal timestep channels
           **dense("time_text_embed.timestep_embedder.linear_2", d, d),
           **dense("time_text_embed.text_embedder.linear_1", d, cfg.pooled_projection_dim),
           **dense("time_text_embed.text_embedder.linear_2", d, d)}
    for i in range(n):
        b, last = f"transformer_blocks.{i}", i == n - 1  # the last block is context_pre_only
        out |= dense(f"{b}.norm1.linear", 6 * d, d) | dense(f"{b}.norm1_context.linear", (2 if last else 6) * d, d)
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0",
                     *(() if last else ("to_add_out",))):
            out |= dense(f"{b}.attn.{name}", d, d)
        out |= {f"{b}.attn.{name}.weight": (head,) for name in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")}
        for ff in ("ff",) if last else ("ff", "ff_context"):
            out |= dense(f"{b}.{ff}.net.0.proj", 4 * d, d) | dense(f"{b}.{ff}.net.2", d, 4 * d)
    return out


def transformer_params_from_folder(folder: str | Path) -> tuple[TransformerConfig, dict]:
    """A diffusers-layout transformer folder (config.json + safetensors, single or sharded) ->
    (config, nested Flax params of numpy arrays in the checkpoint's dtype). Keys and shapes are checked against
    the config before any tensor is read (one KeyMismatchError naming every missing, unexpected and mis-shaped
    key); then it streams tensor by tensor. An SD3.5 folder (`SD3Transformer2DModel`) reads too: its
    IGNORED_TRANSFORMER_KEYS are skipped."""
    folder = Path(folder)
    cfg = TransformerConfig.from_diffusers_config(read_json(folder / CONFIG_NAME))
    found = {k: s for k, s in tensor_shapes(folder).items() if k not in IGNORED_TRANSFORMER_KEYS}
    check_keys(found, transformer_shapes(cfg), str(folder))
    return cfg, read_flax_params(folder, transformer_rules(cfg), what=str(folder), ignore=IGNORED_TRANSFORMER_KEYS)
