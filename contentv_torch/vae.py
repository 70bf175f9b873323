"""The Wan2.1 causal 3D VAE in PyTorch, with the parameter names of diffusers `AutoencoderKLWan`.

A diffusers `vae/` folder (Wan2.1 config) loads strictly: `WanVAE.from_pretrained(folder)`.
Video tensors are (B, 3, F, H, W) in [-1, 1] with F = 4k + 1 and H, W multiples of 8; latents are
(B, z, T, H/8, W/8) with T = k + 1 (the raw posterior; (de)normalise with `contentv_common.latents`).

Chunked causal cache (the reference's streaming scheme, bounded memory in F):
- encode runs the encoder on frame chunks 1, 4, 4, ... (chunk = the temporal factor), each giving
  1 latent frame per chunk; decode runs the decoder on one latent frame at a time (1, then 4 frames out).
- Every module with temporal context has the signature `forward(x, cache) -> (x, cache)`. A module's
  cache is its own pytree: a tensor for a causal conv (the last 2 frames of its padded input), a tuple of
  its children's caches for a block, None for a stateless module. `cache=None` everywhere means
  "first chunk": causal convs zero-pad, the temporal Resamples skip their time conv (as the reference
  does). After the first chunk every conv cache holds exactly 2 frames (zero-padded), so chunk k >= 1
  sees caches of fixed shapes. Nothing is kept on the module (a cache on
  the module is hidden state that leaks from one call into the next).
- The upsample3d "Rep" marker of the reference (first chunk seen, time conv not yet run) is a cache
  of 2 zero frames: running the causal time conv on it is exactly the reference's zero padding.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from contentv_common.config import VAEConfig
from contentv_torch.modeling import PretrainedMixin

Cache = Union[torch.Tensor, tuple, None]  # a module's own cache pytree (see the module docstring)


class CausalConv3d(nn.Conv3d):
    """3D conv, zero padding on the left in time only (2 * padding_t frames), symmetric in space.

    forward(x: [B, Cin, T, H, W], cache: [B, Cin, 2*padding_t, H, W] | None)
      -> (y: [B, Cout, T', H', W'], new cache: last 2*padding_t frames of the padded input, or None
          when the conv has no time padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.time_pad = 2 * self.padding[0]
        self.space_pad = (self.padding[2], self.padding[2], self.padding[1], self.padding[1])
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.time_pad == 0:
            return super().forward(F.pad(x, self.space_pad)), None
        if cache is None:
            cache = x.new_zeros(*x.shape[:2], self.time_pad, *x.shape[3:])
        x = torch.cat([cache.to(x), x], dim=2)  # [B, C, time_pad + T, H, W]
        return super().forward(F.pad(x, self.space_pad)), x[:, :, -self.time_pad:].clone()  # clone: no view of x


class RMSNorm(nn.Module):
    """Channel-first RMS norm: F.normalize over C, times sqrt(C) and a learned gamma (no bias in Wan2.1).

    x: [B, C, T, H, W] (spatial_dims=3) or [N, C, H, W] (spatial_dims=2) -> same shape.
    Half-precision inputs are normalised in fp32.
    """

    def __init__(self, dim: int, spatial_dims: int = 3):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * spatial_dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = x.dtype in (torch.float16, torch.bfloat16)
        return F.normalize(x.float() if low else x, dim=1).to(x.dtype) * self.scale * self.gamma


class Upsample2x(nn.Module):
    """Nearest-exact x2 spatial upsampling in fp32. [N, C, H, W] -> [N, C, 2H, 2W]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Resample(nn.Module):
    """Spatial x2 up/down-sampling (per frame, 2D conv `resample.1`), with a temporal causal conv
    (`time_conv`) in the 3d modes.

    forward(x: [B, C, T, H, W], cache) -> (y, cache):
      upsample2d/3d: [B, out_dim, T', 2H, 2W], T' = T on the first chunk, 2T after (upsample3d);
      downsample2d/3d: [B, C, T', H/2, W/2], T' = T on the first chunk, T/2 after (downsample3d).
    Cache: upsample3d the time conv's 2-frame cache; downsample3d the last frame before the time conv;
    None in the 2d modes.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode {mode!r} not in {self.MODES}")
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x: torch.Tensor, cache: Cache = None) -> tuple[torch.Tensor, Cache]:
        b, c, t, h, w = x.shape
        new_cache = None
        if self.mode == "upsample3d":
            if cache is None:  # first chunk: no time conv; the next chunk starts from zero padding
                new_cache = x.new_zeros(b, c, 2, h, w)
            else:
                x, new_cache = self.time_conv(x, cache)  # [B, 2C, T, H, W]
                x = x.reshape(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        t = x.shape[2]
        x = self.resample(x.transpose(1, 2).reshape(b * t, c, h, w))  # [B*T, C', H', W']
        x = x.reshape(b, t, *x.shape[1:]).transpose(1, 2)  # [B, C', T, H', W']
        if self.mode == "downsample3d":
            new_cache = x[:, :, -1:].clone()
            if cache is not None:  # first chunk passes through; later ones see the previous last frame
                x, _ = self.time_conv(torch.cat([cache.to(x), x], dim=2))  # [B, C, T/2, H', W']
        return x, new_cache


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a 1x1 conv_shortcut when
    in_dim != out_dim. forward(x: [B, in_dim, T, H, W], cache: (conv1, conv2) | None)
    -> ([B, out_dim, T, H, W], (conv1, conv2) caches)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: Cache = None) -> tuple[torch.Tensor, Cache]:
        c1, c2 = cache if cache is not None else (None, None)
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)[0]
        x, c1 = self.conv1(F.silu(self.norm1(x)), c1)
        x, c2 = self.conv2(self.dropout(F.silu(self.norm2(x))), c2)
        return x + h, (c1, c2)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (no temporal context, no cache).
    x: [B, C, T, H, W] -> same shape."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # [B*T, C, H, W]
        qkv = self.to_qkv(y).reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # [B*T, 1, HW, 3C]
        q, k, v = qkv.chunk(3, dim=-1)  # each [B*T, 1, HW, C]
        y = F.scaled_dot_product_attention(q, k, v)  # [B*T, 1, HW, C]
        y = self.proj(y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class MidBlock(nn.Module):
    """resnets[0] -> attentions[0] -> resnets[1]. forward(x: [B, C, T, H, W], cache) -> (same shape, cache)."""

    def __init__(self, dim: int, dropout: float = 0.0):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: torch.Tensor, cache: Cache = None) -> tuple[torch.Tensor, Cache]:
        c0, c1 = cache if cache is not None else (None, None)
        x, c0 = self.resnets[0](x, c0)
        x, c1 = self.resnets[1](self.attentions[0](x), c1)
        return x, (c0, c1)


def _head(norm: RMSNorm, conv: CausalConv3d, x: torch.Tensor, cache: Cache):
    return conv(F.silu(norm(x)), cache)


class Encoder3d(nn.Module):
    """conv_in -> down_blocks (ResidualBlocks, a Resample after each level but the last) -> mid_block
    -> norm_out, SiLU, conv_out. forward(x: [B, 3, T, H, W], cache)
    -> ([B, 2z, T', H/8, W/8], cache); T' = 1 on the first chunk (T = 1), T / 4 after."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> tuple[torch.Tensor, Cache]:
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
    """num_res_blocks + 1 ResidualBlocks, then an optional Resample (`upsamplers.0`) halving the channels.
    forward(x: [B, in_dim, T, H, W], cache) -> ([B, out_dim or out_dim/2, T', 2H or H, ...], cache)."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample_mode: str | None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResidualBlock(in_dim if j == 0 else out_dim, out_dim, dropout) for j in range(num_res_blocks + 1)]
        )
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample_mode)] if upsample_mode else [])

    def forward(self, x: torch.Tensor, cache: Cache = None) -> tuple[torch.Tensor, Cache]:
        layers = [*self.resnets, *self.upsamplers]
        caches = cache if cache is not None else (None,) * len(layers)
        new = []
        for layer, c in zip(layers, caches):
            x, c = layer(x, c)
            new.append(c)
        return x, tuple(new)


class Decoder3d(nn.Module):
    """conv_in -> mid_block -> up_blocks -> norm_out, SiLU, conv_out. forward(z: [B, z, T, h, w], cache)
    -> ([B, 3, T', 8h, 8w], cache); T' = 1 on the first chunk (T = 1), 4T after."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * m for m in (mult[-1], *mult[::-1])]
        temperal_upsample = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous level's Resample halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temperal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1)

    def forward(self, x: torch.Tensor, cache: Cache = None) -> tuple[torch.Tensor, Cache]:
        c_in, c_mid, c_up, c_out = cache if cache is not None else (None, None, (None,) * len(self.up_blocks), None)
        x, c_in = self.conv_in(x, c_in)
        x, c_mid = self.mid_block(x, c_mid)
        new_up = []
        for block, c in zip(self.up_blocks, c_up):
            x, c = block(x, c)
            new_up.append(c)
        x, c_out = _head(self.norm_out, self.conv_out, x, c_out)
        return x, (c_in, c_mid, tuple(new_up), c_out)


def _pair(v, name: str) -> tuple[int, int]:
    hw = (v, v) if isinstance(v, int) else tuple(v)
    if len(hw) != 2 or not all(isinstance(n, int) and n > 0 for n in hw):
        raise ValueError(f"{name} must be a positive int or an (height, width) pair, got {v!r}")
    return hw


def _blend(a: torch.Tensor, b: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """b with its first `extent` entries along `dim` faded linearly from a's last ones (weight of b: i / extent)."""
    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    w = torch.arange(extent, dtype=torch.float64) / extent  # the reference's python-float weights
    shape = [1] * b.ndim
    shape[dim] = extent
    wa, wb = (1 - w).to(b).reshape(shape), w.to(b).reshape(shape)
    head = a.narrow(dim, a.shape[dim] - extent, extent) * wa + b.narrow(dim, 0, extent) * wb
    return torch.cat([head, b.narrow(dim, extent, b.shape[dim] - extent)], dim=dim)


def _stitch(tiles: list[list[torch.Tensor]], blend: tuple[int, int], stride: tuple[int, int], size: tuple[int, int]):
    """Blend each tile into its upper and left neighbours (already blended), keep its first stride
    rows/cols, concatenate, crop to size. tiles[i][j]: [B, C, T, h_ij, w_ij] -> [B, C, T, *size]."""
    done: list[list[torch.Tensor]] = []
    for i, row in enumerate(tiles):
        done.append([])
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(done[i - 1][j], tile, blend[0], dim=3)
            if j > 0:
                tile = _blend(done[i][j - 1], tile, blend[1], dim=4)
            done[i].append(tile)
    rows = [torch.cat([t[:, :, :, : stride[0], : stride[1]] for t in row], dim=4) for row in done]
    return torch.cat(rows, dim=3)[:, :, :, : size[0], : size[1]]


class WanVAE(nn.Module, PretrainedMixin):
    """The Wan2.1 VAE: `encoder`, `quant_conv` (1x1), `post_quant_conv` (1x1), `decoder` (diffusers keys).

    encode(video [B, 3, F, H, W] in [-1, 1]) -> (mean, logvar), each [B, z, (F-1)/4 + 1, H/8, W/8]
    decode(z [B, z, T, h, w]) -> video [B, 3, 4(T-1) + 1, 8h, 8w], clamped to [-1, 1]
    Both use spatial tiles when `enable_tiling` was called and the input is larger than a tile.
    """

    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        if config.attn_scales:
            raise ValueError(
                f"WanVAE: attn_scales={list(config.attn_scales)} is not supported: Wan2.1 uses none, and the "
                "diffusers reference cannot run them (its encoder passes the cache to WanAttentionBlock)"
            )
        self.config = config
        self.encoder = Encoder3d(config)
        self.quant_conv = CausalConv3d(2 * config.z_dim, 2 * config.z_dim, 1)
        self.post_quant_conv = CausalConv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self.tiling: tuple[tuple[int, int], tuple[int, int]] | None = None  # (tile, stride) in pixels

    # ---- input checks -------------------------------------------------------------------------
    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != 3:
            raise ValueError(f"WanVAE.encode: video must be [B, 3, F, H, W], got shape {tuple(x.shape)}")
        self.config.latent_frames(x.shape[2])  # raises for frame counts that are not 4k+1
        s = self.config.spatial_factor
        if x.shape[3] % s or x.shape[4] % s:
            raise ValueError(f"WanVAE.encode: height and width must be multiples of {s}, got {tuple(x.shape[3:])}")

    def _check_latents(self, z: torch.Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim or 0 in z.shape:
            raise ValueError(f"WanVAE.decode: latents must be [B, {self.config.z_dim}, T, h, w], got shape {tuple(z.shape)}")

    # ---- untiled, chunked in time ---------------------------------------------------------------
    def _encode_moments(self, x: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """[B, 3, F, H, W] -> quant_conv moments [B, 2z, T, H/8, W/8]: chunks of 1, 4, 4, ... frames."""
        n = self.config.temporal_factor
        bounds = [(0, 1)] + [(a, a + n) for a in range(1, x.shape[2], n)]  # frame 0 alone, then n at a time
        cache, out = None, []
        for a, b in tqdm(bounds, desc="VAE encode", disable=not progress, leave=False):
            y, cache = self.encoder(x[:, :, a:b], cache)  # [B, 2z, 1, H/8, W/8]
            out.append(y)
        return self.quant_conv(torch.cat(out, dim=2))[0]

    def _decode_frames(self, z: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """[B, z, T, h, w] -> unclamped video [B, 3, 4(T-1) + 1, 8h, 8w], one latent frame at a time."""
        z = self.post_quant_conv(z)[0]
        b, _, t, h, w = z.shape
        s, n = self.config.spatial_factor, self.config.temporal_factor
        out = z.new_empty(b, 3, n * (t - 1) + 1, h * s, w * s)
        cache, pos = None, 0
        for i in tqdm(range(t), desc="VAE decode", disable=not progress, leave=False):
            y, cache = self.decoder(z[:, :, i : i + 1], cache)  # [B, 3, 1 or 4, 8h, 8w]
            out[:, :, pos : pos + y.shape[2]] = y
            pos += y.shape[2]
        return out

    # ---- public API -------------------------------------------------------------------------
    def encode(self, video: torch.Tensor, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """video [B, 3, F, H, W] in [-1, 1], F = 4k+1 -> (mean, logvar) each [B, z, k+1, H/8, W/8];
        logvar clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does."""
        self._check_video(video)
        if self.tiling is not None and (video.shape[3] > self.tiling[0][0] or video.shape[4] > self.tiling[0][1]):
            return self.tiled_encode(video, *self.tiling, progress=progress)
        return _posterior(self._encode_moments(video, progress))

    def decode(self, z: torch.Tensor, progress: bool = False) -> torch.Tensor:
        """z [B, z, T, h, w] (raw VAE latents, not normalised) -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1]."""
        self._check_latents(z)
        s = self.config.spatial_factor
        if self.tiling is not None and (z.shape[3] > self.tiling[0][0] // s or z.shape[4] > self.tiling[0][1] // s):
            return self.tiled_decode(z, *self.tiling, progress=progress)
        return self._decode_frames(z, progress).clamp(-1.0, 1.0)

    def decode_first_frame(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, z, T, h, w] -> the first video frame [B, 3, 1, 8h, 8w] in [-1, 1], from latent frame 0 only
        (causal: equal to decode(z)[:, :, :1]; the RLHF reward path decodes just this)."""
        self._check_latents(z)
        return self.decode(z[:, :, :1])

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample mean + exp(logvar / 2) * eps, eps drawn on the generator's device (diffusers order)."""
        device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=device, dtype=mean.dtype).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * eps

    def forward(self, video: torch.Tensor, sample_posterior: bool = False, generator: torch.Generator | None = None):
        """Reconstruction: video [B, 3, F, H, W] -> decode(mean or a posterior sample) [B, 3, F, H, W]."""
        mean, logvar = self.encode(video)
        return self.decode(self.sample(mean, logvar, generator) if sample_posterior else mean)

    # ---- spatial tiling -----------------------------------------------------------------------
    def enable_tiling(self, tile_size=256, tile_stride=192) -> None:
        """Encode/decode inputs larger than `tile_size` pixels (int or (h, w)) in tiles `tile_stride` apart,
        blended linearly over the overlap. Defaults (256, 192, diffusers'): 432x768 -> 3x4 tiles,
        480x832 -> 3x5, 720x1280 -> 4x7, each 256x256 at most."""
        self.tiling = self._tile_args(tile_size, tile_stride)

    def disable_tiling(self) -> None:
        self.tiling = None

    def _tile_args(self, tile_size, tile_stride) -> tuple[tuple[int, int], tuple[int, int]]:
        tile, stride = _pair(tile_size, "tile_size"), _pair(tile_stride, "tile_stride")
        s = self.config.spatial_factor
        if any(v % s for v in (*tile, *stride)) or any(st > t for st, t in zip(stride, tile)):
            raise ValueError(f"tile_size {tile} and tile_stride {stride} must be multiples of {s} with stride <= size")
        return tile, stride

    def tiled_encode(self, video: torch.Tensor, tile_size=256, tile_stride=192, progress: bool = False):
        """encode() over overlapping spatial tiles (pixels); the moments are blended over the overlap.
        video [B, 3, F, H, W] -> (mean, logvar) each [B, z, T, H/8, W/8]."""
        self._check_video(video)
        (th, tw), (sh, sw) = self._tile_args(tile_size, tile_stride)
        s = self.config.spatial_factor
        H, W = video.shape[3:]
        tiles = [
            [self._encode_moments(video[:, :, :, i : i + th, j : j + tw], progress) for j in range(0, W, sw)]
            for i in range(0, H, sh)
        ]
        moments = _stitch(tiles, ((th - sh) // s, (tw - sw) // s), (sh // s, sw // s), (H // s, W // s))
        return _posterior(moments)

    def tiled_decode(self, z: torch.Tensor, tile_size=256, tile_stride=192, progress: bool = False) -> torch.Tensor:
        """decode() over overlapping spatial latent tiles (sizes in pixels); the videos are blended
        over the overlap. z [B, z, T, h, w] -> video [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1]."""
        self._check_latents(z)
        (th, tw), (sh, sw) = self._tile_args(tile_size, tile_stride)
        s = self.config.spatial_factor
        h, w = z.shape[3:]
        tiles = [
            [self._decode_frames(z[:, :, :, i : i + th // s, j : j + tw // s], progress) for j in range(0, w, sw // s)]
            for i in range(0, h, sh // s)
        ]
        return _stitch(tiles, (th - sh, tw - sw), (sh, sw), (h * s, w * s)).clamp(-1.0, 1.0)


def _posterior(moments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, 2z, ...] -> (mean, logvar clamped to [-30, 20]), each [B, z, ...]."""
    mean, logvar = moments.chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)
