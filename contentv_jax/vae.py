"""The Wan2.1 causal 3D VAE in Flax linen, channels-last.

Mirrors `contentv_torch/vae.py` class for class (diffusers `AutoencoderKLWan` math); the Flax tree differs
only where Flax is idiomatic: conv kernels are DHWIO / HWIO, RMS-norm gains are `scale` of shape [C]
(diffusers' gamma is [C, 1, 1, 1] / [C, 1, 1]), module lists are `name_{i}`. `contentv_common/formats/vae_keys.py` maps
the two trees onto each other.

Shapes: B batch, F video frames (4k + 1), H x W pixels, T = k + 1 latent frames, h x w = H/8 x W/8,
z latent channels (16). Video [B, F, H, W, 3] in [-1, 1]; latents [B, T, h, w, z] (the raw posterior:
(de)normalise with `contentv_common.latents` and channel_axis=-1).

Chunked causal cache (the reference's streaming scheme, bounded memory in F):
- encode runs the encoder on frame chunks 1, 4, 4, ... (one latent frame per chunk); decode runs the
  decoder on one latent frame at a time (1, then 4 video frames out). The first chunk runs on its own
  (it has a different size); every later chunk is one step of an `nn.scan` whose carry is the cache
  pytree, so a video of any length compiles once and holds one chunk's activations at a time.
- Every module with temporal context has the signature `__call__(x, cache) -> (x, cache)`. A module's
  cache is its own pytree: an array for a causal conv (the last 2 frames of its padded input), a tuple of
  its children's caches for a block, None for a stateless module. `cache=None` means "first chunk":
  causal convs zero-pad, the temporal Resamples skip their time conv, as the reference does. After the
  first chunk every cache has the fixed shape that the later chunks return, so it can be a scan carry.
  Nothing is kept on the module (a cache on
  the module is hidden state that leaks from one call into the next).
- The upsample3d "Rep" marker of the reference (first chunk seen, time conv not yet run) is a cache of
  2 zero frames: the causal time conv on it is exactly the reference's zero padding.

Parameters carry logical axis names (`contentv_jax.sharding`): conv kernels
(kernel, kernel, [kernel,] conv_in, conv_out), biases (conv_out,), norm gains (norm,).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from contentv_common.config import VAEConfig

Dtype = Any
Cache = Union[jax.Array, tuple, None]  # a module's own cache pytree (see the module docstring)


# torch's default conv init (kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))); uniform also compiles far
# faster on CPU than the truncated normal of lecun_normal.
_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _init(init, axes):
    return nn.with_logical_partitioning(init, axes)


class CausalConv3d(nn.Module):
    """3D conv, zero padding on the left in time only (2 * padding_t frames), symmetric in space.

    __call__(x: [B, T, H, W, Cin], cache: [B, 2*padding_t, H, W, Cin] | None)
      -> (y: [B, T', H', W', Cout], new cache: the last 2*padding_t frames of the padded input, or None
          when the conv has no time padding).
    """

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    stride: tuple[int, int, int] = (1, 1, 1)
    padding: tuple[int, int, int] = (0, 0, 0)  # torch padding (t, h, w); time becomes 2*t on the left
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, cache: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[jax.Array]]:
        kernel = self.param(
            "kernel",
            _init(_KERNEL_INIT, ("kernel", "kernel", "kernel", "conv_in", "conv_out")),
            (*self.kernel_size, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", _init(nn.initializers.zeros_init(), ("conv_out",)), (self.features,), self.param_dtype)
        time_pad = 2 * self.padding[0]
        new_cache = None
        if time_pad:
            if cache is None:
                cache = jnp.zeros((x.shape[0], time_pad, *x.shape[2:]), x.dtype)
            x = jnp.concatenate([cache.astype(x.dtype), x], axis=1)  # [B, time_pad + T, H, W, C]
            new_cache = x[:, -time_pad:]
        _, ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=self.stride,
            padding=((0, 0), (ph, ph), (pw, pw)),
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + bias.astype(self.dtype), new_cache


class Conv2d(nn.Module):
    """Per-frame 2D conv. x: [N, H, W, Cin] -> [N, H', W', Cout]; padding ((top, bottom), (left, right))."""

    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: tuple[tuple[int, int], tuple[int, int]] = ((1, 1), (1, 1))
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        kernel = self.param(
            "kernel",
            _init(_KERNEL_INIT, ("kernel", "kernel", "conv_in", "conv_out")),
            (k, k, x.shape[-1], self.features),
            self.param_dtype,
        )
        bias = self.param("bias", _init(nn.initializers.zeros_init(), ("conv_out",)), (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            kernel.astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(self.dtype)


class RMSNorm(nn.Module):
    """RMS norm over channels: x / max(||x||, 1e-12) * sqrt(C) * scale (torch F.normalize; no bias in Wan2.1).

    x: [..., C] -> [..., C] in `dtype`; normalised in fp32 (the reference does so for half inputs).
    """

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", _init(nn.initializers.ones_init(), ("norm",)), (c,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        # == x / max(||x||, eps) with a finite gradient at x = 0
        y = x32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), 1e-24))
        return (y * (math.sqrt(c) * scale.astype(jnp.float32))).astype(self.dtype)


class Resample(nn.Module):
    """Spatial x2 up/down-sampling (per frame, 2D conv `resample`), with a temporal causal conv
    (`time_conv`) in the 3d modes.

    __call__(x: [B, T, H, W, C], cache) -> (y, cache):
      upsample2d/3d: [B, T', 2H, 2W, out_dim], T' = T on the first chunk, 2T after (upsample3d);
      downsample2d/3d: [B, T', H/2, W/2, C], T' = T on the first chunk, T/2 after (downsample3d).
    Cache: upsample3d the time conv's 2-frame cache; downsample3d the last frame before the time conv;
    None in the 2d modes.
    """

    dim: int
    mode: str
    out_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def setup(self):
        if self.mode not in self.MODES:
            raise ValueError(f"Resample mode {self.mode!r} not in {self.MODES}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.mode.startswith("upsample"):
            self.resample = Conv2d(self.out_dim or self.dim // 2, 3, 1, ((1, 1), (1, 1)), **kw)
            if self.mode == "upsample3d":
                self.time_conv = CausalConv3d(2 * self.dim, (3, 1, 1), padding=(1, 0, 0), **kw)
        else:  # torch ZeroPad2d((0, 1, 0, 1)) then a stride-2 3x3 conv
            self.resample = Conv2d(self.dim, 3, 2, ((0, 1), (0, 1)), **kw)
            if self.mode == "downsample3d":
                self.time_conv = CausalConv3d(self.dim, (3, 1, 1), stride=(2, 1, 1), **kw)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        b, t, h, w, c = x.shape
        new_cache = None
        if self.mode == "upsample3d":
            if cache is None:  # first chunk: no time conv; the next chunk starts from zero padding
                new_cache = jnp.zeros((b, 2, h, w, c), x.dtype)
                if self.is_initializing():  # create time_conv's parameters from a single-frame init
                    self.time_conv(x)
            else:
                x, new_cache = self.time_conv(x, cache)  # [B, T, H, W, 2C]: channel halves = frames 2t, 2t+1
                x = x.reshape(b, t, h, w, 2, c).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c)
            t = x.shape[1]
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact x2 == repeat
        x = self.resample(x.reshape(b * t, *x.shape[2:]))  # [B*T, H', W', C']
        x = x.reshape(b, t, *x.shape[1:])  # [B, T, H', W', C']
        if self.mode == "downsample3d":
            new_cache = x[:, -1:]
            if cache is not None:  # first chunk passes through; later ones see the previous last frame
                x, _ = self.time_conv(jnp.concatenate([cache.astype(x.dtype), x], axis=1))  # [B, T/2, H', W', C]
            elif self.is_initializing():
                self.time_conv(jnp.zeros((b, 3, *x.shape[2:]), x.dtype))
        return x, new_cache


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> conv2, plus a 1x1 conv_shortcut when in_dim != out_dim
    (dropout is 0 in Wan2.1 and not applied). __call__(x: [B, T, H, W, in_dim], cache: (conv1, conv2) | None)
    -> ([B, T, H, W, out_dim], (conv1, conv2) caches)."""

    in_dim: int
    out_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm1 = RMSNorm(**kw)
        self.conv1 = CausalConv3d(self.out_dim, (3, 3, 3), padding=(1, 1, 1), **kw)
        self.norm2 = RMSNorm(**kw)
        self.conv2 = CausalConv3d(self.out_dim, (3, 3, 3), padding=(1, 1, 1), **kw)
        if self.in_dim != self.out_dim:
            self.conv_shortcut = CausalConv3d(self.out_dim, (1, 1, 1), **kw)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        c1, c2 = cache if cache is not None else (None, None)
        h = x if self.in_dim == self.out_dim else self.conv_shortcut(x)[0]
        x, c1 = self.conv1(nn.silu(self.norm1(x)), c1)
        x, c2 = self.conv2(nn.silu(self.norm2(x)), c2)
        return x + h, (c1, c2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal context, no cache).
    x: [B, T, H, W, C] -> same shape. Logits and softmax in fp32."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.norm = RMSNorm(**kw)
        self.to_qkv = Conv2d(3 * self.dim, 1, 1, ((0, 0), (0, 0)), **kw)
        self.proj = Conv2d(self.dim, 1, 1, ((0, 0), (0, 0)), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(b * t, h, w, c)).reshape(b * t, h * w, 3 * c)  # [B*T, HW, 3C]
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each [B*T, HW, C]
        logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
        y = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)  # [B*T, HW, C]
        y = self.proj(y.reshape(b * t, h, w, c))
        return x + y.reshape(b, t, h, w, c)


class MidBlock(nn.Module):
    """resnets_0 -> attentions_0 -> resnets_1. __call__(x: [B, T, H, W, C], cache) -> (same shape, cache)."""

    dim: int
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res, attn = (nn.remat(ResidualBlock), nn.remat(AttentionBlock)) if self.remat else (ResidualBlock, AttentionBlock)
        self.resnets = [res(self.dim, self.dim, **kw), res(self.dim, self.dim, **kw)]
        self.attentions = [attn(self.dim, **kw)]

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        c0, c1 = cache if cache is not None else (None, None)
        x, c0 = self.resnets[0](x, c0)
        x, c1 = self.resnets[1](self.attentions[0](x), c1)
        return x, (c0, c1)


def _head(norm: RMSNorm, conv: CausalConv3d, x: jax.Array, cache: Cache):
    """norm_out -> SiLU -> conv_out, the head shared by Encoder3d and Decoder3d."""
    return conv(nn.silu(norm(x)), cache)


class Encoder3d(nn.Module):
    """conv_in -> down_blocks (ResidualBlocks, a Resample after each level but the last) -> mid_block
    -> norm_out, SiLU, conv_out. __call__(x: [B, T, H, W, 3], cache)
    -> ([B, T', H/8, W/8, 2z], cache); T' = 1 on the first chunk (T = 1), T / 4 after."""

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(dims[0], (3, 3, 3), padding=(1, 1, 1), **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, **kw))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d", **kw))
        self.down_blocks = blocks
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNorm(**kw)
        self.conv_out = CausalConv3d(2 * cfg.z_dim, (3, 3, 3), padding=(1, 1, 1), **kw)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        c_in, c_down, c_mid, c_out = cache if cache is not None else (None, (None,) * len(self.down_blocks), None, None)
        x, c_in = self.conv_in(x, c_in)
        new_down = []
        for block, c in zip(self.down_blocks, c_down):
            x, c = block(x, c)
            new_down.append(c)
        x, c_mid = self.mid_block(x, c_mid)
        x, c_out = _head(self.norm_out, self.conv_out, x, c_out)
        return x, (c_in, tuple(new_down), c_mid, c_out)


class UpBlock(nn.Module):
    """num_res_blocks + 1 ResidualBlocks, then an optional Resample (`upsamplers_0`) halving the channels.
    __call__(x: [B, T, H, W, in_dim], cache) -> ([B, T', 2H or H, 2W or W, out_dim/2 or out_dim], cache)."""

    in_dim: int
    out_dim: int
    num_res_blocks: int
    upsample_mode: Optional[str] = None
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res = nn.remat(ResidualBlock) if self.remat else ResidualBlock
        self.resnets = [res(self.in_dim if j == 0 else self.out_dim, self.out_dim, **kw) for j in range(self.num_res_blocks + 1)]
        self.upsamplers = [Resample(self.out_dim, self.upsample_mode, **kw)] if self.upsample_mode else []

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        layers = [*self.resnets, *self.upsamplers]
        caches = cache if cache is not None else (None,) * len(layers)
        new = []
        for layer, c in zip(layers, caches):
            x, c = layer(x, c)
            new.append(c)
        return x, tuple(new)


class Decoder3d(nn.Module):
    """conv_in -> mid_block -> up_blocks -> norm_out, SiLU, conv_out. __call__(z: [B, T, h, w, z], cache)
    -> ([B, T', 8h, 8w, 3], cache); T' = 1 on the first chunk (T = 1), 4T after.
    remat: rematerialise each ResidualBlock / AttentionBlock in the backward pass (saves their inputs only)."""

    config: VAEConfig
    remat: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(dims[0], (3, 3, 3), padding=(1, 1, 1), **kw)
        self.mid_block = MidBlock(dims[0], remat=self.remat, **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous level's Resample halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, mode, remat=self.remat, **kw))
        self.up_blocks = blocks
        self.norm_out = RMSNorm(**kw)
        self.conv_out = CausalConv3d(3, (3, 3, 3), padding=(1, 1, 1), **kw)

    def __call__(self, x: jax.Array, cache: Cache = None) -> tuple[jax.Array, Cache]:
        c_in, c_mid, c_up, c_out = cache if cache is not None else (None, None, (None,) * len(self.up_blocks), None)
        x, c_in = self.conv_in(x, c_in)
        x, c_mid = self.mid_block(x, c_mid)
        new_up = []
        for block, c in zip(self.up_blocks, c_up):
            x, c = block(x, c)
            new_up.append(c)
        x, c_out = _head(self.norm_out, self.conv_out, x, c_out)
        return x, (c_in, c_mid, tuple(new_up), c_out)


def _scan_chunks(module: nn.Module, cache: Cache, xs: jax.Array) -> jax.Array:
    """Run `module(x_k, cache) -> (y_k, cache)` over axis 1 of xs with one nn.scan (the cache is the carry,
    parameters are broadcast). xs: [B, K, ...] -> ys [B, K, ...]."""

    def step(mdl, carry, x):
        y, carry = mdl(x, carry)
        return carry, y

    scan = nn.scan(step, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1)
    _, ys = scan(module, cache, xs)
    return ys


class WanVAE(nn.Module):
    """The Wan2.1 VAE: `encoder`, `quant_conv` (1x1), `post_quant_conv` (1x1), `decoder`.

    encode(video [B, F, H, W, 3] in [-1, 1]) -> (mean, logvar), each [B, (F-1)/4 + 1, H/8, W/8, z]
    decode(z [B, T, h, w, z]) -> video [B, 4(T-1) + 1, 8h, 8w, 3], clamped to [-1, 1]
    decode_first_frame(z [B, T, h, w, z]) -> video [B, 1, 8h, 8w, 3]: decodes latent frame 0 only
      (== decode(z)[:, :1] by causality; the cheap differentiable path RLHF uses).
    __call__(video) -> decode(encode(video) mean) (reconstruction; also what `init` runs: any 4k+1 frames,
      a single 8x8 frame is enough to create every parameter).
    remat_decoder: rematerialise the decoder's residual / attention blocks under jax.grad.
    Apply with `model.apply({"params": params}, x, method="encode" | "decode" | "decode_first_frame")`.
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_decoder: bool = False

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if cfg.attn_scales:
            raise ValueError(
                f"WanVAE: attn_scales={list(cfg.attn_scales)} is not supported: Wan2.1 uses none, and the "
                "diffusers reference cannot run them (its encoder passes the cache to WanAttentionBlock)"
            )
        self.encoder = Encoder3d(cfg, **kw)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, (1, 1, 1), **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, (1, 1, 1), **kw)
        self.decoder = Decoder3d(cfg, remat=self.remat_decoder, **kw)

    # ---- input checks (shapes are static under jit, so these raise at trace time) ---------------------------
    def _check_video(self, x: jax.Array) -> None:
        if x.ndim != 5 or x.shape[-1] != 3:
            raise ValueError(f"WanVAE.encode: video must be [B, F, H, W, 3] (channels last), got shape {tuple(x.shape)}")
        self.config.latent_frames(x.shape[1])  # raises for frame counts that are not 4k+1
        s = self.config.spatial_factor
        if x.shape[2] % s or x.shape[3] % s or 0 in x.shape:
            raise ValueError(f"WanVAE.encode: height and width must be positive multiples of {s}, got {tuple(x.shape[2:4])}")

    def _check_latents(self, z: jax.Array, what: str) -> None:
        if z.ndim != 5 or z.shape[-1] != self.config.z_dim or 0 in z.shape:
            raise ValueError(f"WanVAE.{what}: latents must be [B, T, h, w, {self.config.z_dim}] (channels last), got shape {tuple(z.shape)}")

    # ---- public API -----------------------------------------------------------------------------
    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """video [B, F, H, W, 3] in [-1, 1], F = 4k+1 -> (mean, logvar) each [B, k+1, H/8, W/8, z];
        logvar clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
        self._check_video(video)
        b, f, hh, ww, _ = video.shape
        n = self.config.temporal_factor
        y, cache = self.encoder(video[:, :1], None)  # [B, 1, h, w, 2z]
        if f > 1:
            chunks = video[:, 1:].reshape(b, (f - 1) // n, n, hh, ww, 3)  # [B, K, 4, H, W, 3]
            ys = _scan_chunks(self.encoder, cache, chunks)  # [B, K, 1, h, w, 2z]
            y = jnp.concatenate([y, ys.reshape(b, -1, *ys.shape[3:])], axis=1)
        moments, _ = self.quant_conv(y)  # [B, T, h, w, 2z]
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array, clamp: bool = True) -> jax.Array:
        """z [B, T, h, w, z] (raw VAE latents, not normalised) -> video [B, 4(T-1)+1, 8h, 8w, 3] in [-1, 1].
        clamp False returns the unclamped output (training: the clamp has no gradient outside [-1, 1])."""
        self._check_latents(z, "decode")
        x, _ = self.post_quant_conv(z)
        y, cache = self.decoder(x[:, :1], None)  # [B, 1, H, W, 3]
        if z.shape[1] > 1:
            ys = _scan_chunks(self.decoder, cache, x[:, 1:, None])  # [B, T-1, 4, H, W, 3]
            y = jnp.concatenate([y, ys.reshape(ys.shape[0], -1, *ys.shape[3:])], axis=1)
        return jnp.clip(y, -1.0, 1.0) if clamp else y

    def decode_first_frame(self, z: jax.Array) -> jax.Array:
        """z [B, T, h, w, z] -> the first video frame [B, 1, 8h, 8w, 3] in [-1, 1], from latent frame 0 only."""
        self._check_latents(z, "decode_first_frame")
        x, _ = self.post_quant_conv(z[:, :1])
        y, _ = self.decoder(x, None)
        return jnp.clip(y, -1.0, 1.0)

    def __call__(self, video: jax.Array) -> jax.Array:
        """video [B, F, H, W, 3] -> reconstruction decode(posterior mean) [B, F, H, W, 3]."""
        return self.decode(self.encode(video)[0])


def init_params(config: VAEConfig, rng: jax.Array | None = None, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> dict:
    """Random parameters (logically partitioned boxes) from a 1-frame init: {"params": ...}.

    rng None: an "rbg" key (XLA's CPU compile of threefry keys for ~200 parameters takes about a minute,
    an rbg key a few seconds)."""
    model = WanVAE(config, dtype=dtype, param_dtype=param_dtype)
    s = config.spatial_factor
    return model.init(rng if rng is not None else jax.random.key(0, impl="rbg"), jnp.zeros((1, 1, s, s, 3), dtype))


def param_shapes(config: VAEConfig) -> dict:
    """The parameter tree as jax.ShapeDtypeStruct leaves (boxes unwrapped), without allocating anything."""
    abstract = jax.eval_shape(lambda: init_params(config))
    return nn.meta.unbox(abstract)["params"]
