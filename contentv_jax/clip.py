"""CLIP in Flax (linen), the image-text model of reward models such as PickScore.

Mirrors transformers `CLIPModel` (names, math, pooling) so a `save_pretrained` folder loads through
`contentv_common/formats/clip_keys.py` with no renames beyond layout:
  vision: patch conv (no bias) -> [class token | patches] + position table -> pre-LN -> encoder -> LN of
          the class token (post-LN) -> visual projection;
  text:   token + position embeddings -> causal encoder -> final LN -> the state at the EOS token -> text
          projection;
  logits: exp(logit_scale) * cosine(image_emb, text_emb).
Encoder layers are pre-LN (LN -> attention -> residual, LN -> MLP -> residual) and stacked under `nn.scan`
(params carry a leading `layers` axis); `remat=True` recomputes each layer in the backward pass.
Images are channels-last [B, H, W, 3], already CLIP-normalised (see `contentv_jax/reward.py` for the
differentiable preprocessing); H = W = `vision.image_size`.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contentv_common.config import CLIP_ACTIVATIONS, CLIPConfig, CLIPTowerConfig  # noqa: F401  (re-exported)
from contentv_jax.sharding import constrain

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}
assert set(ACTIVATIONS) == set(CLIP_ACTIVATIONS), "the config's activation names and their functions must agree"


def _dense(features: int, names: tuple[str, str], use_bias: bool = True, name: str | None = None, dtype=jnp.float32):
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (names[1],)),
        name=name,
    )


def _layer_norm(eps: float, name: str, dtype=jnp.float32):
    return nn.LayerNorm(
        epsilon=eps,
        dtype=dtype,
        use_fast_variance=False,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
        name=name,
    )


class CLIPAttention(nn.Module):
    config: CLIPTowerConfig
    causal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, S, D] -> [B, S, D]; scaled dot-product attention over all heads (causal for text)."""
        c = self.config
        heads, head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        qkv = [_dense(c.hidden_size, ("embed", "heads"), name=n, dtype=self.dtype)(x) for n in ("q_proj", "k_proj", "v_proj")]
        q, k, v = (t.reshape(*x.shape[:2], heads, head_dim) for t in qkv)  # [B, S, N, Dh]
        out = jax.nn.dot_product_attention(q, k, v, is_causal=self.causal)  # scale 1/sqrt(Dh)
        out = out.reshape(*x.shape[:2], c.hidden_size)  # [B, S, N * Dh]
        return _dense(c.hidden_size, ("heads", "embed"), name="out_proj", dtype=self.dtype)(out)


class CLIPMLP(nn.Module):
    config: CLIPTowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, S, D] -> [B, S, D]."""
        c = self.config
        h = _dense(c.intermediate_size, ("embed", "mlp"), name="fc1", dtype=self.dtype)(x)
        h = ACTIVATIONS[c.hidden_act](h)
        return _dense(c.hidden_size, ("mlp", "embed"), name="fc2", dtype=self.dtype)(h)


class CLIPEncoderLayer(nn.Module):
    config: CLIPTowerConfig
    causal: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, _=None):
        """x: [B, S, D] -> ([B, S, D], None) (scan carry form)."""
        c = self.config
        x = constrain(x, ("batch", None, "act_embed"))
        h = _layer_norm(c.layer_norm_eps, "layer_norm1", self.dtype)(x)
        x = x + CLIPAttention(c, self.causal, self.dtype, name="self_attn")(h)
        h = _layer_norm(c.layer_norm_eps, "layer_norm2", self.dtype)(x)
        x = x + CLIPMLP(c, self.dtype, name="mlp")(h)
        return x, None


class CLIPEncoder(nn.Module):
    """`num_hidden_layers` CLIPEncoderLayers stacked with nn.scan (params: leading `layers` axis)."""

    config: CLIPTowerConfig
    causal: bool
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, S, D] -> [B, S, D]."""
        layer = nn.remat(CLIPEncoderLayer, prevent_cse=False) if self.remat else CLIPEncoderLayer
        stack = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=self.config.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        x, _ = stack(self.config, self.causal, self.dtype, name="layers")(x, None)
        return x


def _embedding(num: int, dim: int, name: str):
    return nn.Embed(num, dim, embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")), name=name)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTowerConfig

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, S] int (S <= max_position_embeddings) -> [B, S, D]."""
        c = self.config
        tok = _embedding(c.vocab_size, c.hidden_size, "token_embedding")(input_ids)
        pos = _embedding(c.max_position_embeddings, c.hidden_size, "position_embedding")(jnp.arange(input_ids.shape[1]))
        return tok + pos[None]


class CLIPTextTransformer(nn.Module):
    config: CLIPTowerConfig
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, S] int -> pooled [B, D]: the final-LN state at each sequence's EOS token.

        As transformers picks it: with the legacy `eos_token_id == 2` the position of the largest id
        (the EOS token has the largest id in the original vocabulary), otherwise the first position
        holding `eos_token_id` (padding may repeat it). Padding follows EOS, so under the causal mask
        it never reaches the pooled state: no padding mask is needed.
        """
        c = self.config
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"CLIP text: input_ids must be [B, S<={c.max_position_embeddings}], got {input_ids.shape}")
        x = CLIPTextEmbeddings(c, name="embeddings")(input_ids).astype(self.dtype)
        x = CLIPEncoder(c, causal=True, remat=self.remat, dtype=self.dtype, name="encoder")(x)
        x = _layer_norm(c.layer_norm_eps, "final_layer_norm", self.dtype)(x)
        if c.eos_token_id == 2:
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]  # [B, D]


class CLIPVisionTransformer(nn.Module):
    config: CLIPTowerConfig
    remat: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: [B, H, W, C] CLIP-normalised, H = W = image_size -> pooled [B, D] (post-LN class token)."""
        c = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, c.num_channels):
            raise ValueError(
                f"CLIP vision: pixels must be [B, {c.image_size}, {c.image_size}, {c.num_channels}], got {pixels.shape}"
            )
        emb = _VisionEmbeddings(c, self.dtype, name="embeddings")(pixels)  # [B, 1 + gh * gw, D]
        x = _layer_norm(c.layer_norm_eps, "pre_layernorm", self.dtype)(emb)
        x = CLIPEncoder(c, causal=False, remat=self.remat, dtype=self.dtype, name="encoder")(x)
        return _layer_norm(c.layer_norm_eps, "post_layernorm", self.dtype)(x[:, 0])


class _VisionEmbeddings(nn.Module):
    config: CLIPTowerConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels: [B, H, W, C] -> [B, 1 + (H/p)(W/p), D] (class token first, patches row-major)."""
        c = self.config
        p = c.patch_size
        patches = nn.Conv(
            c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False, dtype=self.dtype,
            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("kernel", "kernel", "conv_in", "embed")),
            name="patch_embedding",
        )(pixels.astype(self.dtype))  # [B, gh, gw, D]
        b = pixels.shape[0]
        patches = patches.reshape(b, -1, c.hidden_size)  # [B, gh * gw, D], (h, w) order as torch's flatten(2)
        cls = self.param("class_embedding", nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed",)), (c.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, c.hidden_size)), patches], axis=1)
        pos = _embedding(c.num_positions, c.hidden_size, "position_embedding")(jnp.arange(c.num_positions))
        return x + pos[None].astype(self.dtype)


class CLIP(nn.Module):
    """transformers `CLIPModel` in linen. Methods (use with `apply(..., method=...)`):
    get_image_features(pixels [B, S, S, 3]) -> [B, P]; get_text_features(input_ids [B, L]) -> [B, P];
    __call__(pixels, input_ids) -> dict of unit image_embeds [Bi, P], text_embeds [Bt, P],
    logits_per_image [Bi, Bt], logits_per_text [Bt, Bi]."""

    config: CLIPConfig
    remat: bool = False
    dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.text_model = CLIPTextTransformer(c.text, self.remat, self.dtype)
        self.vision_model = CLIPVisionTransformer(c.vision, self.remat, self.dtype)
        self.text_projection = _dense(c.projection_dim, ("embed", None), use_bias=False, dtype=self.dtype)
        self.visual_projection = _dense(c.projection_dim, ("embed", None), use_bias=False, dtype=self.dtype)
        self.logit_scale = self.param(
            "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(c.logit_scale_init_value), ()), ()
        )

    def get_image_features(self, pixels: jax.Array) -> jax.Array:
        """pixels: [B, S, S, 3] CLIP-normalised -> image embeddings [B, P] (not unit-normalised)."""
        return self.visual_projection(self.vision_model(pixels))

    def get_text_features(self, input_ids: jax.Array) -> jax.Array:
        """input_ids: [B, L] int -> text embeddings [B, P] (not unit-normalised)."""
        return self.text_projection(self.text_model(input_ids))

    def __call__(self, pixels: jax.Array, input_ids: jax.Array) -> dict[str, jax.Array]:
        img = unit(self.get_image_features(pixels))
        txt = unit(self.get_text_features(input_ids))
        logits_per_text = jnp.exp(self.logit_scale) * txt @ img.T  # [Bt, Bi]
        return {"image_embeds": img, "text_embeds": txt, "logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text}


def unit(x: jax.Array) -> jax.Array:
    """x / ||x|| over the last axis (float32 norm)."""
    n = jnp.linalg.norm(x.astype(jnp.float32), axis=-1, keepdims=True)
    return (x / n).astype(x.dtype)
