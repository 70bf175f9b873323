"""transformers `CLIPModel` keys <-> the Flax tree of `contentv_jax.clip.CLIP`.

A `save_pretrained` folder holds `config.json` plus `model.safetensors` (or `model-0000k-of-0000n.safetensors`
shards with `model.safetensors.index.json`); `contentv_common.weights` reads both layouts.

    clip_rules(config) -> list[Rule]
    clip_params_from_folder(folder) -> (config dict, params)   # strict: every key, every shape
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from contentv_common.config import read_json
from contentv_common.weights import CONFIG_NAME, check_keys, tensor_shapes
from convert.keymap import Rule, flatten, read_flax_params

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
    from contentv_common.config import CLIPConfig

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


def _expected_torch_shapes(config) -> dict[str, tuple[int, ...]]:
    """Torch key -> shape of a CLIPModel with this config, from the Flax model's abstract init (no weights)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from contentv_jax.clip import CLIP
    from convert.keymap import TO_TORCH

    v = config.vision
    abstract = jax.eval_shape(
        CLIP(config).init, jax.random.key(0),
        jnp.zeros((1, v.image_size, v.image_size, v.num_channels)), jnp.zeros((1, 2), jnp.int32),
    )["params"]
    out = {}
    rules = clip_rules(config)
    for path, x in flatten(nn.meta.unbox(abstract)).items():
        for r in rules:
            keys = r.to_torch_keys(path, x.shape[0] if r.stack and x.shape else None)
            if keys is not None:
                shape = TO_TORCH[r.kind](_Shape(x.shape[1:] if r.stack else x.shape)).shape
                out.update({k: shape for k in keys})
    return out


class _Shape:
    """A stand-in with `.T` / `.transpose` so the layout functions of keymap compute shapes without data."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    @property
    def T(self):
        return _Shape(self.shape[::-1])

    def transpose(self, *axes):
        return _Shape(tuple(self.shape[a] for a in axes))


def clip_params_from_folder(folder: str | Path) -> tuple[dict[str, Any], dict]:
    """A transformers `CLIPModel` folder -> (its config.json dict, Flax params of numpy arrays).

    Strict: keys and shapes are checked against the config before any tensor is read; a mismatch raises
    `KeyMismatchError` naming every missing / unexpected key and wrong shape.
    """
    from contentv_common.config import CLIPConfig

    folder = Path(folder)
    d = read_json(folder / CONFIG_NAME)
    config = CLIPConfig.from_transformers(d)
    check_keys(tensor_shapes(folder), _expected_torch_shapes(config), f"{folder} (CLIPModel)")
    return d, read_flax_params(folder, clip_rules(config), f"{folder} (CLIPModel)")
