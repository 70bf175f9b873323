"""The ContentV MM-DiT in PyTorch: SD3.5-Large joint-attention blocks over video tokens.

Mirrors `contentv_jax/transformer.py` class for class. Parameter names are exactly the diffusers
`SD3Transformer2DModel` keys minus `pos_embed.pos_embed` (ContentV adds a fixed 3D sin-cos table
instead of the learned 2D one), so ContentV-8B / SD3.5 diffusers `transformer/` folders load strictly.

Shapes: B batch, T latent frames, H x W latent pixels, C channels, p patch, h = H/p, w = W/p,
N = T*h*w video tokens, L text tokens, D = inner_dim = heads * head_dim.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from contentv_common.config import IGNORED_TRANSFORMER_KEYS, TransformerConfig
from contentv_common.sincos import sincos_3d
from contentv_torch.attention import AttentionFn, default_backend_for, get_attention_backend
from contentv_torch.modeling import PretrainedMixin


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm without affine over the last axis: [..., D] -> [..., D]."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, S, D], shift / scale [B, D] -> x * (1 + scale) + shift."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_frequencies(timestep: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """timestep [B] -> [B, dim] float32: [cos | sin] of t * 10000^(-i / (dim/2)).

    diffusers `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`.
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    args = timestep.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class RMSNorm(nn.Module):
    """RMS norm with a gain over the last axis (qk-norm), in float32: [..., dim] -> [..., dim] in x's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class MLPEmbedder(nn.Module):
    """linear_1, SiLU, linear_2 (diffusers `TimestepEmbedding` / `PixArtAlphaTextProjection`): [B, in] -> [B, D]."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nn.Module):
    """timestep [B] in [0, 1000], pooled [B, P] -> temb [B, D] = MLP(freqs(timestep)) + MLP(pooled)."""

    def __init__(self, dim: int, pooled_dim: int):
        super().__init__()
        self.timestep_embedder = MLPEmbedder(256, dim)
        self.text_embedder = MLPEmbedder(pooled_dim, dim)

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        t = self.timestep_embedder(timestep_frequencies(timestep).to(pooled.dtype))
        return t + self.text_embedder(pooled)


class PatchEmbed(nn.Module):
    """The SD3 patch conv applied to every frame (no temporal patch) plus the fixed 3D sin-cos table.

    latents [B, C, T, H, W] -> tokens [B, T*h*w, D], ordered (t, h, w). The table is computed per grid
    shape by `contentv_common.sincos.sincos_3d` and cached (a few shapes) on the tokens' device and dtype.
    """

    _CACHE_SIZE = 2  # tables kept (a 125-frame 432x768 table is 200 MB in bf16)

    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.dim = dim
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self._tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def table(self, t: int, h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The [T*h*w, D] sin-cos table for a T x h x w patch grid."""
        key = (t, h, w, device, dtype)
        if key not in self._tables:
            self._tables[key] = torch.from_numpy(sincos_3d(self.dim, t, h, w)).to(device=device, dtype=dtype)
            while len(self._tables) > self._CACHE_SIZE:
                self._tables.popitem(last=False)
        self._tables.move_to_end(key)
        return self._tables[key]

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, t, hh, ww = latents.shape
        frames = latents.transpose(1, 2).reshape(b * t, c, hh, ww)  # [B*T, C, H, W]
        x = self.proj(frames)  # [B*T, D, h, w]
        h, w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2).reshape(b, t * h * w, self.dim)  # [B, N, D], tokens (t, h, w)
        return x + self.table(t, h, w, x.device, x.dtype)[None]


class AdaLayerNormZero(nn.Module):
    """x [B, S, D], emb [B, D] -> (norm(x) * (1 + scale_msa) + shift_msa, gate_msa, shift_mlp, scale_mlp,
    gate_mlp), the last four [B, D]. Modulation = Linear(silu(emb)) split in six."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(F.silu(emb)).chunk(6, dim=-1)
        return modulate(layer_norm(x), shift_msa, scale_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class AdaLayerNormContinuous(nn.Module):
    """x [B, S, D], emb [B, D] -> norm(x) * (1 + scale) + shift, with (scale, shift) = Linear(silu(emb))
    (note: scale first, as in diffusers)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(F.silu(emb)).chunk(2, dim=-1)
        return modulate(layer_norm(x), shift, scale)


class _GeluTanhProj(nn.Module):
    """Linear then gelu-tanh (diffusers `GELU(approximate="tanh")`, whose Linear is `proj`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """[B, S, D] -> [B, S, D]: Linear(4D), gelu-tanh, Linear(D). Keys `net.0.proj`, `net.2` as in diffusers
    (`net.1` is diffusers' parameter-free dropout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([_GeluTanhProj(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class JointAttention(nn.Module):
    """Joint attention over [video | text] tokens with RMS qk-norm (diffusers `JointAttnProcessor2_0`).

    x [B, N, D], c [B, L, D], attn_fn (q, k, v [B, heads, N+L, head_dim] -> same)
      -> (x_out [B, N, D], c_out [B, L, D] or None when context_pre_only).
    """

    def __init__(self, config: TransformerConfig, context_pre_only: bool = False):
        super().__init__()
        d, hd = config.inner_dim, config.attention_head_dim
        self.heads, self.head_dim, self.context_pre_only = config.num_attention_heads, hd, context_pre_only
        self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.norm_q, self.norm_k = RMSNorm(hd), RMSNorm(hd)
        self.norm_added_q, self.norm_added_k = RMSNorm(hd), RMSNorm(hd)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])  # `to_out.0`, as in diffusers
        self.to_add_out = None if context_pre_only else nn.Linear(d, d)

    def _heads(self, y: torch.Tensor, proj: nn.Module, norm: nn.Module | None) -> torch.Tensor:
        """[B, S, D] -> [B, heads, S, head_dim] (qk-normed when norm is given)."""
        y = proj(y).unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)
        return y if norm is None else norm(y)

    def forward(self, x: torch.Tensor, c: torch.Tensor, attn_fn: AttentionFn):
        n = x.shape[1]
        q = torch.cat([self._heads(x, self.to_q, self.norm_q), self._heads(c, self.add_q_proj, self.norm_added_q)], 2)
        k = torch.cat([self._heads(x, self.to_k, self.norm_k), self._heads(c, self.add_k_proj, self.norm_added_k)], 2)
        v = torch.cat([self._heads(x, self.to_v, None), self._heads(c, self.add_v_proj, None)], 2)
        o = attn_fn(q, k, v)  # [B, heads, N+L, head_dim]
        o = o.transpose(1, 2).flatten(2).to(x.dtype)  # [B, N+L, D]
        x_out = self.to_out[0](o[:, :n])
        return x_out, (None if self.to_add_out is None else self.to_add_out(o[:, n:]))


class JointTransformerBlock(nn.Module):
    """One MM-DiT block (diffusers `JointTransformerBlock`, adaLN-Zero, no dual attention).

    x [B, N, D], c [B, L, D], temb [B, D], attn_fn -> (x' [B, N, D], c' [B, L, D] or None when context_pre_only).
    """

    def __init__(self, config: TransformerConfig, context_pre_only: bool = False):
        super().__init__()
        d = config.inner_dim
        self.context_pre_only = context_pre_only
        self.norm1 = AdaLayerNormZero(d)
        self.norm1_context = AdaLayerNormContinuous(d) if context_pre_only else AdaLayerNormZero(d)
        self.attn = JointAttention(config, context_pre_only)
        self.ff = FeedForward(d)
        self.ff_context = None if context_pre_only else FeedForward(d)

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor, attn_fn: AttentionFn):
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            nc = self.norm1_context(c, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(c, temb)
        attn_x, attn_c = self.attn(nx, nc, attn_fn)

        x = x + gate_msa[:, None] * attn_x
        x = x + gate_mlp[:, None] * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))
        if self.context_pre_only:
            return x, None
        c = c + c_gate_msa[:, None] * attn_c
        c = c + c_gate_mlp[:, None] * self.ff_context(modulate(layer_norm(c), c_shift_mlp, c_scale_mlp))
        return x, c


class ContentVTransformer3DModel(nn.Module, PretrainedMixin):
    """The ContentV MM-DiT (diffusers `SD3Transformer2DModel` blocks, video patch embedding).

    forward(hidden_states [B, C, T, H, W], encoder_hidden_states [B, L, joint_attention_dim],
            pooled_projections [B, pooled_projection_dim], timestep [B] float in [0, 1000])
      -> [B, out_channels, T, H, W] in hidden_states' dtype (computed in the parameters' dtype).

    The forward is three steps so that sequence parallelism can wrap the middle one:
    `embed` -> `blocks_forward` -> `head`. Attention runs through `set_attention_backend(name or
    callable)`; unset, the backend is chosen by the device of the tokens (`default_backend_for`).
    `gradient_checkpointing = True` recomputes each block in the backward pass while training.
    """

    config_class = TransformerConfig
    ignored_checkpoint_keys = frozenset(IGNORED_TRANSFORMER_KEYS)  # SD3.5's learned 2D table; unused by video

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        d = config.inner_dim
        self.pos_embed = PatchEmbed(config.patch_size, config.in_channels, d)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(d, config.pooled_projection_dim)
        self.context_embedder = nn.Linear(config.joint_attention_dim, d)
        self.transformer_blocks = nn.ModuleList(
            [JointTransformerBlock(config, context_pre_only=i == config.num_layers - 1) for i in range(config.num_layers)]
        )
        self.norm_out = AdaLayerNormContinuous(d)
        self.proj_out = nn.Linear(d, config.patch_size**2 * config.out_channels)
        self.attention_backend: str | AttentionFn | None = None
        self.gradient_checkpointing = False
        self.step_cache = None  # a contentv_torch.step_cache.StepCache while a pipeline samples with one

    def set_attention_backend(self, name_or_callable: str | AttentionFn | None) -> None:
        """A backend name ("sdpa", "npu"), a callable fn(q, k, v) -> out on [B, heads, S, head_dim], or None
        (choose by device). Names are checked (and optional imports done) now."""
        if name_or_callable is not None:
            get_attention_backend(name_or_callable)
        self.attention_backend = name_or_callable

    def check_inputs(self, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> None:
        """Raise ValueError naming the argument, its shape and what the model expects."""
        cfg = self.config
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, T, H, W] (5 dims), got shape {tuple(hidden_states.shape)}")
        b, c, _, h, w = hidden_states.shape
        if c != cfg.in_channels:
            raise ValueError(f"hidden_states have {c} channels (dim 1), the model expects in_channels={cfg.in_channels}; "
                             f"shape {tuple(hidden_states.shape)} must be [B, C, T, H, W]")
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"hidden_states height {h} and width {w} must be divisible by patch_size {cfg.patch_size}")
        if tuple(timestep.shape) != (b,):
            raise ValueError(f"timestep must be [B]=({b},), got shape {tuple(timestep.shape)}")
        e = encoder_hidden_states
        if e.ndim != 3 or e.shape[0] != b or e.shape[2] != cfg.joint_attention_dim:
            raise ValueError(f"encoder_hidden_states must be [B={b}, L, joint_attention_dim={cfg.joint_attention_dim}], "
                             f"got shape {tuple(e.shape)}")
        if tuple(pooled_projections.shape) != (b, cfg.pooled_projection_dim):
            raise ValueError(f"pooled_projections must be [B={b}, pooled_projection_dim={cfg.pooled_projection_dim}], "
                             f"got shape {tuple(pooled_projections.shape)}")

    def embed(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """-> (x [B, N, D] video tokens (t, h, w) with the 3D table added, ctx [B, L, D], temb [B, D]),
        on the parameters' device and dtype. Inputs as in `forward` (validated here, then moved there)."""
        self.check_inputs(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        dev, dt = self.proj_out.weight.device, self.proj_out.weight.dtype
        x = self.pos_embed(hidden_states.to(dev, dt))
        temb = self.time_text_embed(timestep.to(dev), pooled_projections.to(dev, dt))
        ctx = self.context_embedder(encoder_hidden_states.to(dev, dt))
        return x, ctx, temb

    def blocks_forward(self, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x [B, N, D], ctx [B, L, D], temb [B, D] -> x [B, N, D] after all joint blocks."""
        attn_fn = get_attention_backend(self.attention_backend or default_backend_for(x.device))
        if self.step_cache is not None:  # it may reuse a cached residual instead of running the blocks
            return self.step_cache.blocks(self, x, ctx, temb, attn_fn)
        remat = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer_blocks:
            if remat:
                x, ctx = checkpoint(block, x, ctx, temb, attn_fn, use_reentrant=False)
            else:
                x, ctx = block(x, ctx, temb, attn_fn)
        return x

    def head(self, x: torch.Tensor, temb: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """x [B, N, D], temb [B, D], grid (T, h, w) with N = T*h*w -> [B, C_out, T, h*p, w*p]."""
        p, co = self.config.patch_size, self.config.out_channels
        t, h, w = grid
        x = self.proj_out(self.norm_out(x, temb))  # [B, N, p*p*C_out], channels (p, q, c)
        x = x.reshape(x.shape[0], t, h, w, p, p, co)
        x = torch.einsum("bthwpqc->bcthpwq", x)  # b (t h w) (p q c) -> b c t (h p) (w q)
        return x.reshape(x.shape[0], co, t, h * p, w * p)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep) -> torch.Tensor:
        """See the class docstring for shapes."""
        p = self.config.patch_size
        x, ctx, temb = self.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        x = self.blocks_forward(x, ctx, temb)
        t, hh, ww = hidden_states.shape[2:]
        return self.head(x, temb, (t, hh // p, ww // p)).to(hidden_states.dtype)
