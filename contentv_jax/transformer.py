"""The ContentV MM-DiT in Flax linen: SD3.5-Large joint-attention blocks over video tokens.

Mirrors `contentv_torch/transformer.py` class for class (diffusers `SD3Transformer2DModel` names); the
Flax tree differs only where Flax is idiomatic: kernels are [in, out] (conv kernels HWIO), norm gains
are `scale`, and the first num_layers - 1 blocks are one `nn.scan` over stacked parameters (leading
"layers" axis) under `transformer_blocks`, the last (context_pre_only) block standing apart as
`last_block`. `contentv_common/formats/transformer_keys.py` maps the two trees onto each other.

Shapes: B batch, T latent frames, H x W latent pixels, C channels, p patch, h = H/p, w = W/p,
N = T*h*w video tokens, L text tokens, D = inner_dim = heads * head_dim.
Every parameter carries logical axis names from `contentv_jax.sharding.PARAM_AXES`:
  Dense kernels [in, out]: (embed, heads) q/k/v, (heads, embed) out, (embed, mlp) / (mlp, embed) the
  MLPs and the adaLN modulation (D -> k*D), (joint, mlp) the conditioning inputs (context, pooled text,
  timestep frequencies), (embed, conv_out) proj_out; the patch conv (None, None, conv_in, embed) (Flax
  allows a logical name once per array, so the two tap axes of the p x p kernel stay unnamed: unsharded);
  biases take their kernel's output name; norm gains (norm,).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from contentv_common.config import TransformerConfig
from contentv_common.sincos import sincos_3d
from contentv_jax.attention import ATTENTION_IMPLS, attention
from contentv_jax.context_parallel import CONTEXT_PARALLEL_IMPLS
from contentv_jax.lora import LoRADense, LoraSpec
from contentv_jax.sharding import constrain

Dtype = Any


def _offload(*names: str) -> Callable:
    """Save the named activations in pinned host memory (copied out in the forward, back in the backward), the
    rest recomputed: maxdiffusion's HIDDEN_STATE_WITH_OFFLOAD. Takes effect on TPU and GPU; on XLA:CPU (jax 0.10.2)
    the device-to-host copy compiles to nothing, so there the named activations are simply saved in device memory
    (gradients are the same; the memory analysis shows no host temp)."""
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=list(names), offload_src="device",
        offload_dst="pinned_host")


# Remat policy name -> jax.checkpoint policy (None: save nothing, recompute the whole block).
# The blocks tag `query`, `key`, `value` (after qk-norm), `attn_out` (before the output projections)
# and `ff_hidden` (the MLP's 4D activation) with `checkpoint_name`, for the name-based policies.
REMAT_POLICIES: dict[str, Callable | None] = {
    "full": None,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names("query", "key", "value", "attn_out"),
    "save_attention_and_ff": jax.checkpoint_policies.save_only_these_names(
        "query", "key", "value", "attn_out", "ff_hidden"
    ),
    "offload_attn_out": _offload("attn_out"),
    "offload_attention": _offload("query", "key", "value", "attn_out"),
}
REMAT_CHOICES = ("none", *REMAT_POLICIES)


def _dense(features: int, axes: tuple[str, str], dtype: Dtype, param_dtype: Dtype, name: str, use_bias: bool = True,
           lora: LoraSpec | None = None):
    """nn.Dense with logically partitioned kernel [in, out] and bias [out]; with a `lora` spec, a `LoRADense`
    (the same params, plus the adapter when the spec targets this layer)."""
    kw = dict(
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )
    return nn.Dense(features, **kw) if lora is None else LoRADense(features, lora=lora, kernel_axes=axes, **kw)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine over the last axis, in float32; returns x's dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """x [B, S, D], shift / scale [B, D] -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_frequencies(timestep: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """timestep [B] -> [B, dim] float32: [cos | sin] of t * 10000^(-i / (dim/2)).

    diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = timestep.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def video_pos_table(dim: int, frames: int, height: int, width: int, dtype: Dtype = jnp.float32) -> jax.Array:
    """`contentv_common.sincos.sincos_3d(dim, frames, height, width)` as a [frames*height*width, dim] array.

    The table is a broadcast of a temporal [T, dim/4] and a spatial [h*w, 3*dim/4] part; both are taken from
    `sincos_3d` in numpy at trace time, and only the broadcast happens in the program, so a long video does not
    fold a [N, dim] constant (400 MB at 125 frames of 432x768) into the compiled program.
    """
    dt = dim // 4
    temporal = jnp.asarray(sincos_3d(dim, frames, 1, 1)[:, :dt], dtype)  # [T, dim/4]
    spatial = jnp.asarray(sincos_3d(dim, 1, height, width)[:, dt:], dtype)  # [h*w, 3*dim/4]
    n = height * width
    table = jnp.concatenate(
        [jnp.broadcast_to(temporal[:, None], (frames, n, dt)), jnp.broadcast_to(spatial[None], (frames, n, dim - dt))],
        axis=-1,
    )  # [T, h*w, dim]
    return table.reshape(frames * n, dim)


class RMSNorm(nn.Module):
    """RMS norm with a gain over the last axis (qk-norm), in float32: [..., dim] -> [..., dim] in `dtype`."""

    dim: int
    eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
                           (self.dim,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (x32 * scale.astype(jnp.float32)).astype(self.dtype)


class _WidthFields(nn.Module):
    """The fields of the small sub-modules (width D, compute / param dtypes, the LoRA spec) and their Dense."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    lora: LoraSpec | None = None

    def dense(self, features: int, axes: tuple[str, str], name: str):
        return _dense(features, axes, self.dtype, self.param_dtype, name, lora=self.lora)


class MLPEmbedder(_WidthFields):
    """Two Dense layers with SiLU between (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection`):
    [B, in] -> [B, D]."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.dense(self.dim, ("joint", "mlp"), "linear_1")(x)
        return self.dense(self.dim, ("mlp", "embed"), "linear_2")(nn.silu(x))


class CombinedTimestepTextProjEmbeddings(_WidthFields):
    """timestep [B] in [0, 1000], pooled [B, P] -> temb [B, D] = MLP(freqs(timestep)) + MLP(pooled)."""

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        t = timestep_frequencies(timestep).astype(self.dtype)
        t = MLPEmbedder(self.dim, self.dtype, self.param_dtype, self.lora, name="timestep_embedder")(t)
        p = MLPEmbedder(self.dim, self.dtype, self.param_dtype, self.lora, name="text_embedder")(pooled.astype(self.dtype))
        return t + p


class PatchEmbed(nn.Module):
    """The SD3 patch conv applied to every frame (no temporal patch) plus the fixed 3D sin-cos table.

    latents [B, T, H, W, C] -> tokens [B, T*h*w, D], ordered (t, h, w). The kernel is the conv's, HWIO
    [p, p, C, D]; a stride-p conv is a reshape + matmul, which is how it is computed.
    """

    patch_size: int
    in_channels: int
    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, latents: jax.Array) -> jax.Array:
        p, c, d = self.patch_size, self.in_channels, self.dim
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3),
                                         (None, None, "conv_in", "embed")),
            (p, p, c, d),
            self.param_dtype,
        )
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)), (d,),
                          self.param_dtype)
        b, t, hh, ww, _ = latents.shape
        h, w = hh // p, ww // p
        x = latents.astype(self.dtype).reshape(b, t, h, p, w, p, c)  # [B, T, h, p, w, q, C]
        x = jnp.einsum("bthpwqc,pqcd->bthwd", x, kernel.astype(self.dtype)) + bias.astype(self.dtype)
        x = x.reshape(b, t * h * w, d)  # [B, N, D], tokens (t, h, w)
        return x + video_pos_table(d, t, h, w, self.dtype)[None]


class AdaLayerNormZero(_WidthFields):
    """x [B, S, D], emb [B, D] -> (norm(x) * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp,
    gate_mlp), the last four [B, D]. Modulation = Dense(silu(emb)) split in six."""

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array):
        mod = self.dense(6 * self.dim, ("embed", "mlp"), "linear")(nn.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        return modulate(layer_norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(_WidthFields):
    """x [B, S, D], emb [B, D] -> norm(x) * (1 + scale) + shift, with (scale, shift) = Dense(silu(emb))
    (note: scale first, as in diffusers)."""

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        mod = self.dense(2 * self.dim, ("embed", "mlp"), "linear")(nn.silu(emb))
        scale, shift = jnp.split(mod, 2, axis=-1)
        return modulate(layer_norm(x), shift, scale)


class FeedForward(_WidthFields):
    """[B, S, D] -> [B, S, D]: Dense(4D), gelu-tanh, Dense(D) (diffusers `FeedForward(gelu-approximate)`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.dense(4 * self.dim, ("embed", "mlp"), "proj_in")(x)
        h = checkpoint_name(nn.gelu(h, approximate=True), "ff_hidden")
        h = constrain(h, ("batch", "length", "act_mlp"))
        return self.dense(self.dim, ("mlp", "embed"), "proj_out")(h)


class _JointFields(nn.Module):
    """The fields of a joint block, which it hands on to its attention unchanged."""

    config: TransformerConfig
    context_pre_only: bool = False  # the last block: no text-stream output
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: str = "xla"
    lora: LoraSpec | None = None  # adapters on the targeted Dense layers (contentv_jax.lora)


class JointAttention(_JointFields):
    """Joint attention over [video | text] tokens with RMS qk-norm (diffusers `JointAttnProcessor2_0`).

    Fields: `_JointFields`. x [B, N, D], c [B, L, D] -> (x_out [B, N, D], c_out [B, L, D] or None when
    context_pre_only).
    """

    @nn.compact
    def __call__(self, x: jax.Array, c: jax.Array):
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        d, nh, hd = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        b, n = x.shape[:2]

        def heads(y, proj, norm):  # [B, S, D] -> [B, S, heads, head_dim]
            y = proj(y).reshape(b, y.shape[1], nh, hd)
            return norm(y) if norm is not None else y

        def rms(name):
            return RMSNorm(hd, 1e-6, dt, pdt, name=name)

        proj = {k: _dense(d, ("embed", "heads"), dt, pdt, k, lora=self.lora)
                for k in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")}
        # [video | text] tokens: [B, N+L, heads, hd]
        q = jnp.concatenate([heads(x, proj["to_q"], rms("norm_q")), heads(c, proj["add_q_proj"], rms("norm_added_q"))],
                            axis=1)
        k = jnp.concatenate([heads(x, proj["to_k"], rms("norm_k")), heads(c, proj["add_k_proj"], rms("norm_added_k"))],
                            axis=1)
        v = jnp.concatenate([heads(x, proj["to_v"], None), heads(c, proj["add_v_proj"], None)], axis=1)
        # Context-parallel attention keeps K/V split over the sequence like q; the others need every key on each
        # device (kv_length: unsplit).
        kv = "length" if self.attention_impl in CONTEXT_PARALLEL_IMPLS else "kv_length"
        q = checkpoint_name(constrain(q, ("batch", "length", "act_heads", None)), "query")  # [B, N+L, heads, hd]
        k = checkpoint_name(constrain(k, ("batch", kv, "act_heads", None)), "key")
        v = checkpoint_name(constrain(v, ("batch", kv, "act_heads", None)), "value")
        o = attention(q, k, v, self.attention_impl).reshape(b, -1, d)  # [B, N+L, D]
        o = checkpoint_name(o, "attn_out")
        x_out = _dense(d, ("heads", "embed"), dt, pdt, "to_out", lora=self.lora)(o[:, :n])
        if self.context_pre_only:
            return x_out, None
        return x_out, _dense(d, ("heads", "embed"), dt, pdt, "to_add_out", lora=self.lora)(o[:, n:])


class JointTransformerBlock(_JointFields):
    """One MM-DiT block (diffusers `JointTransformerBlock`, adaLN-Zero, no dual attention).

    carry (x [B, N, D], c [B, L, D]), temb [B, D] -> ((x', c'), None); c' is None when context_pre_only.
    The (carry, broadcast input) -> (carry, None) signature is what `nn.scan` wants. Fields: `_JointFields`.
    """

    @nn.compact
    def __call__(self, carry, temb: jax.Array):
        x, c = carry
        d, dt, pdt, lora = self.config.inner_dim, self.dtype, self.param_dtype, self.lora
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = AdaLayerNormZero(d, dt, pdt, lora, name="norm1")(x, temb)
        if self.context_pre_only:
            nc = AdaLayerNormContinuous(d, dt, pdt, lora, name="norm1_context")(c, temb)
        else:
            norm1_context = AdaLayerNormZero(d, dt, pdt, lora, name="norm1_context")
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = norm1_context(c, temb)
        attn = JointAttention(self.config, self.context_pre_only, dt, pdt, self.attention_impl, lora, name="attn")
        attn_x, attn_c = attn(nx, nc)

        x = x + gate_msa[:, None] * attn_x
        x = x + gate_mlp[:, None] * FeedForward(d, dt, pdt, lora, name="ff")(modulate(layer_norm(x), shift_mlp, scale_mlp))
        x = constrain(x, ("batch", "length", "act_embed"))
        if self.context_pre_only:
            return (x, None), None
        c = c + c_gate_msa[:, None] * attn_c
        nc = modulate(layer_norm(c), c_shift_mlp, c_scale_mlp)
        c = c + c_gate_mlp[:, None] * FeedForward(d, dt, pdt, lora, name="ff_context")(nc)
        c = constrain(c, ("batch", None, "act_embed"))
        return (x, c), None


class ContentVTransformer(nn.Module):
    """The ContentV MM-DiT (diffusers `SD3Transformer2DModel` blocks, video patch embedding).

    __call__(latents [B, T, H, W, C] channels-last, timestep [B] float in [0, 1000],
             context [B, L, joint_attention_dim], pooled [B, pooled_projection_dim])
      -> [B, T, H, W, out_channels] (float32 under dtype float32, else `dtype`).

    dtype: compute dtype; param_dtype: parameter dtype; remat_policy: one of REMAT_CHOICES ("none" keeps
    every activation; "full" recomputes each block; the others save what their jax.checkpoint policy
    saves); attention_impl: a name in contentv_jax.attention.ATTENTION_IMPLS.
    """

    config: TransformerConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"
    attention_impl: str = "xla"
    lora: LoraSpec | None = None  # LoRA adapters (a "lora" collection) on the Dense layers it targets

    def _check_inputs(self, latents, timestep, context, pooled) -> None:
        cfg = self.config
        if latents.ndim != 5:
            raise ValueError(f"latents must be [B, T, H, W, C] (channels-last), got shape {latents.shape}")
        b, _, h, w, c = latents.shape
        if c != cfg.in_channels:
            raise ValueError(f"latents have {c} channels (last axis), the model expects in_channels={cfg.in_channels}; "
                             f"shape {latents.shape} must be [B, T, H, W, C]")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent height {h} and width {w} must be divisible by patch_size {cfg.patch_size}")
        if timestep.shape != (b,):
            raise ValueError(f"timestep must be [B]=({b},), got shape {timestep.shape}")
        if context.ndim != 3 or context.shape[0] != b or context.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"context must be [B={b}, L, joint_attention_dim={cfg.joint_attention_dim}], "
                             f"got shape {context.shape}")
        if pooled.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(f"pooled must be [B={b}, pooled_projection_dim={cfg.pooled_projection_dim}], "
                             f"got shape {pooled.shape}")

    def _block(self, context_pre_only: bool, name: str):
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} unknown; choose one of {sorted(ATTENTION_IMPLS)}")
        if self.remat_policy not in REMAT_CHOICES:
            raise ValueError(f"remat_policy {self.remat_policy!r} unknown; choose one of {list(REMAT_CHOICES)}")
        cls = JointTransformerBlock
        if self.remat_policy != "none":
            cls = nn.remat(cls, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=context_pre_only)
        if context_pre_only:
            return cls(self.config, True, self.dtype, self.param_dtype, self.attention_impl, self.lora, name=name)
        scanned = nn.scan(
            cls,
            variable_axes={"params": 0, "lora": 0},  # the adapter stacks per layer like the params
            split_rngs={"params": True},
            in_axes=(nn.broadcast,),
            length=self.config.num_layers - 1,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        return scanned(self.config, False, self.dtype, self.param_dtype, self.attention_impl, self.lora, name=name)

    def _block0_modulated(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """Block 0's adaLN-modulated video input (TeaCache's signal), from its params (stacked under the scan)."""
        stacked = self.config.num_layers > 1
        lin = nn.meta.unbox(self.variables["params"]["transformer_blocks" if stacked else "last_block"]["norm1"]["linear"])
        k, b = (lin["kernel"][0], lin["bias"][0]) if stacked else (lin["kernel"], lin["bias"])
        shift, scale = jnp.split(nn.silu(temb) @ k.astype(temb.dtype) + b.astype(temb.dtype), 6, axis=-1)[:2]
        return modulate(layer_norm(x), shift, scale)

    @nn.compact
    def __call__(self, latents: jax.Array, timestep: jax.Array, context: jax.Array, pooled: jax.Array,
                 residual: jax.Array | None = None, mode: str = "full"):
        """mode (a step cache's, static): "full" -> velocity; "probe" -> block 0's modulated input [B, N, D] (no
        blocks run); "compute" -> (velocity, residual = blocks' output - input tokens [B, N, D]); "reuse" -> the
        velocity with `residual` in place of the blocks."""
        self._check_inputs(latents, timestep, context, pooled)
        cfg, dt, pdt = self.config, self.dtype, self.param_dtype
        d, p, co = cfg.inner_dim, cfg.patch_size, cfg.out_channels
        b, t, hh, ww, _ = latents.shape
        h, w = hh // p, ww // p

        x = PatchEmbed(p, cfg.in_channels, d, dt, pdt, name="pos_embed")(latents)  # [B, N, D]
        x = constrain(x, ("batch", "length", "act_embed"))
        temb = CombinedTimestepTextProjEmbeddings(d, dt, pdt, self.lora, name="time_text_embed")(timestep, pooled)  # [B, D]
        temb = constrain(temb, ("batch", "act_embed"))
        c = _dense(d, ("joint", "embed"), dt, pdt, "context_embedder", lora=self.lora)(context.astype(dt))  # [B, L, D]
        c = constrain(c, ("batch", None, "act_embed"))

        if mode == "probe":
            return self._block0_modulated(x, temb)
        x_in = x
        if mode == "reuse":
            x = x + residual.astype(x.dtype)
        else:
            carry = (x, c)
            if cfg.num_layers > 1:
                carry, _ = self._block(False, "transformer_blocks")(carry, temb)
            (x, _), _ = self._block(True, "last_block")(carry, temb)
        residual = x - x_in

        x = AdaLayerNormContinuous(d, dt, pdt, self.lora, name="norm_out")(x, temb)
        x = _dense(p * p * co, ("embed", "conv_out"), dt, pdt, "proj_out", lora=self.lora)(x)  # [B, N, p*p*C_out], (p, q, c)
        x = x.reshape(b, t, h, w, p, p, co).transpose(0, 1, 2, 4, 3, 5, 6)  # [B, T, h, p, w, q, C_out]
        x = x.reshape(b, t, hh, ww, co)
        return (x, residual) if mode == "compute" else x


def count_params(params) -> int:
    """Number of scalars in a (possibly abstract / boxed) params tree."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(nn.unbox(params)))
