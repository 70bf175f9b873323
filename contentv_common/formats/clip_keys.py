"""transformers `CLIPModel` keys <-> the Flax tree of `contentv_jax.clip.CLIP`.

A `save_pretrained` folder holds `config.json` plus `model.safetensors` (or `model-0000k-of-0000n.safetensors`
shards with `model.safetensors.index.json`); `contentv_common.weights` reads both layouts.

    clip_rules(config) -> list[Rule]
    clip_shapes(config) -> {torch key: shape}
    clip_params_from_folder(folder) -> (config dict, params)   # strict: every key, every shape
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from contentv_common.config import CLIPConfig, read_json
from contentv_common.formats.keymap import Rule, read_flax_params
from contentv_common.weights import CONFIG_NAME, check_keys, tensor_shapes

_LAYER = [  # (torch suffix, flax suffix, kind) inside encoder.layers.{i}
    ("self_attn.q_proj.weight", "self_attn/q_proj/kernel", "linear"),
    ("self_attn.q_proj.bias", "self_attn/q_proj/bias", "copy"),
    ("self_attn.k_proj.weight", "self_attn/k_proj/kernel", "linear"),
    ("self_attn.k_proj.bias", "self_attn/k_proj/bias", "copy"),
    ("self_attn.v_proj.weight", "self_attn/v_proj/kernel", "linear"),
    ("self_attn.v_proj.bias", "self_attn/v_proj/bias", "copy"),
    ("self_attn.out_proj.weight", "self_attn/out_proj/kernel", "linear"),
    ("self_attn.out_proj.bias", "self_attn/out_proj/bias", "copy"),
    ("layer_norm1.weight", "layer_norm1/scale", "copy"),
    ("layer_norm1.bias", "layer_norm1/bias", "copy"),
    ("layer_norm2.weight", "layer_norm2/scale", "copy"),
    ("layer_norm2.bias", "layer_norm2/bias", "copy"),
    ("mlp.fc1.weight", "mlp/fc1/kernel", "linear"),
    ("mlp.fc1.bias", "mlp/fc1/bias", "copy"),
    ("mlp.fc2.weight", "mlp/fc2/kernel", "linear"),
    ("mlp.fc2.bias", "mlp/fc2/bias", "copy"),
]


def clip_rules(config) -> list[Rule]:
    """Rules for a `CLIPConfig` (contentv_common.config) or a transformers config.json dict."""
    if not isinstance(config, CLIPConfig):
        config = CLIPConfig.from_transformers(config)
    rules = [
        Rule("logit_scale", "logit_scale"),
        Rule("text_projection.weight", "text_projection/kernel", "linear"),
        Rule("visual_projection.weight", "visual_projection/kernel", "linear"),
        Rule("text_model.embeddings.token_embedding.weight", "text_model/embeddings/token_embedding/embedding"),
        Rule("text_model.embeddings.position_embedding.weight", "text_model/embeddings/position_embedding/embedding"),
        Rule("text_model.final_layer_norm.weight", "text_model/final_layer_norm/scale"),
        Rule("text_model.final_layer_norm.bias", "text_model/final_layer_norm/bias"),
        Rule("vision_model.embeddings.class_embedding", "vision_model/embeddings/class_embedding"),
        Rule("vision_model.embeddings.patch_embedding.weight", "vision_model/embeddings/patch_embedding/kernel", "conv2d"),
        Rule("vision_model.embeddings.position_embedding.weight", "vision_model/embeddings/position_embedding/embedding"),
        Rule("vision_model.pre_layrnorm.weight", "vision_model/pre_layernorm/scale"),  # (sic) transformers spelling
        Rule("vision_model.pre_layrnorm.bias", "vision_model/pre_layernorm/bias"),
        Rule("vision_model.post_layernorm.weight", "vision_model/post_layernorm/scale"),
        Rule("vision_model.post_layernorm.bias", "vision_model/post_layernorm/bias"),
    ]
    for tower, n in (("text_model", config.text.num_hidden_layers), ("vision_model", config.vision.num_hidden_layers)):
        rules += [
            Rule(f"{tower}.encoder.layers.{{i}}.{t}", f"{tower}/encoder/layers/{f}", kind, stack=(0, n)) for t, f, kind in _LAYER
        ]
    return rules


def clip_shapes(config) -> dict[str, tuple[int, ...]]:
    """Torch key -> shape of every tensor of a transformers CLIPModel of this CLIPConfig (from the config alone)."""
    t, v, proj = config.text, config.vision, config.projection_dim
    out: dict[str, tuple[int, ...]] = {
        "logit_scale": (), "text_projection.weight": (proj, t.hidden_size), "visual_projection.weight": (proj, v.hidden_size),
        "text_model.embeddings.token_embedding.weight": (t.vocab_size, t.hidden_size),
        "text_model.embeddings.position_embedding.weight": (t.max_position_embeddings, t.hidden_size),
        "vision_model.embeddings.class_embedding": (v.hidden_size,),
        "vision_model.embeddings.patch_embedding.weight": (v.hidden_size, v.num_channels, v.patch_size, v.patch_size),
        "vision_model.embeddings.position_embedding.weight": ((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size),
    }
    for norm, dim in (("text_model.final_layer_norm", t.hidden_size), ("vision_model.pre_layrnorm", v.hidden_size),
                      ("vision_model.post_layernorm", v.hidden_size)):
        out |= {f"{norm}.weight": (dim,), f"{norm}.bias": (dim,)}
    for tower, c in (("text_model", t), ("vision_model", v)):
        h, m = c.hidden_size, c.intermediate_size
        layer = {f"self_attn.{n}.{w}": ((h, h) if w == "weight" else (h,))
                 for n in ("q_proj", "k_proj", "v_proj", "out_proj") for w in ("weight", "bias")}
        layer |= {f"{n}.{w}": (h,) for n in ("layer_norm1", "layer_norm2") for w in ("weight", "bias")}
        layer |= {"mlp.fc1.weight": (m, h), "mlp.fc1.bias": (m,), "mlp.fc2.weight": (h, m), "mlp.fc2.bias": (h,)}
        out |= {f"{tower}.encoder.layers.{i}.{k}": shape for i in range(c.num_hidden_layers) for k, shape in layer.items()}
    return out


def clip_params_from_folder(folder: str | Path) -> tuple[dict[str, Any], dict]:
    """A transformers `CLIPModel` folder -> (its config.json dict, Flax params of numpy arrays).

    Strict: keys and shapes are checked against the config before any tensor is read; a mismatch raises
    `KeyMismatchError` naming every missing / unexpected key and wrong shape.
    """
    folder = Path(folder)
    d = read_json(folder / CONFIG_NAME)
    config = CLIPConfig.from_transformers(d)
    check_keys(tensor_shapes(folder), clip_shapes(config), f"{folder} (CLIPModel)")
    return d, read_flax_params(folder, clip_rules(config), f"{folder} (CLIPModel)")
