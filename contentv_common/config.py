"""Model configs and presets, framework-free.

Field names are the diffusers config names, so `config.json` files of diffusers folders map onto
these dataclasses directly (`from_diffusers_config`) and back (`to_diffusers_config`).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)


def _to_dict(config, class_name: str) -> dict[str, Any]:
    """A frozen config -> its diffusers `config.json` dict (`_class_name` first, tuples as lists)."""
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
    return {"_class_name": class_name, **d}


def _from_dict(cls, d: dict[str, Any], ignore: tuple[str, ...] = ()):
    """Build a frozen config from a diffusers `config.json` dict: unknown keys (other than `_*` metadata
    and the names in `ignore`) are an error that names them, lists become tuples."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and not k.startswith("_") and k not in ignore)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown config keys {unknown}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
    return cls(**kw)


def video_tokens(latent_shape, patch_size: int) -> int:
    """Video tokens of one sample: T * (h / p) * (w / p) for latents (T, h, w, ...); each latent frame is
    patchified on its own (no temporal patch)."""
    t, h, w = latent_shape[:3]
    return t * (h // patch_size) * (w // patch_size)


# Diffusers keys of an SD3.5 transformer that ContentV drops on purpose: its learned 2D position table (ContentV adds
# a fixed 3D sin-cos table instead). Loaders and converters skip them; every other key must match.
SD3_POS_EMBED_KEY = "pos_embed.pos_embed"
IGNORED_TRANSFORMER_KEYS = (SD3_POS_EMBED_KEY,)


@dataclass(frozen=True)
class TransformerConfig:
    """The SD3.5-style MM-DiT of ContentV (diffusers `SD3Transformer2DModel` field names)."""

    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    num_layers: int = 38
    num_attention_heads: int = 38
    attention_head_dim: int = 64
    joint_attention_dim: int = 4096  # text context width (T5 width; CLIP states zero-padded to it)
    caption_projection_dim: int = 2432  # == inner_dim
    pooled_projection_dim: int = 2048  # CLIP-L projection + CLIP-bigG projection
    qk_norm: str = "rms_norm"
    dual_attention_layers: tuple[int, ...] = ()  # SD3.5 Medium only; must be empty here
    # Export-only metadata of the 2D ancestor: kept so config.json round-trips; unused by the video model.
    sample_size: int = 128
    pos_embed_max_size: int = 192

    def __post_init__(self):
        if self.qk_norm != "rms_norm":
            raise ValueError(f"TransformerConfig: qk_norm must be 'rms_norm' (SD3.5 Large), got {self.qk_norm!r}")
        if self.dual_attention_layers:
            raise ValueError("TransformerConfig: dual_attention_layers (SD3.5 Medium) are not supported")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"TransformerConfig: caption_projection_dim {self.caption_projection_dim} must equal "
                f"num_attention_heads * attention_head_dim = {self.inner_dim}"
            )

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def video_tokens(self, latent_shape) -> int:
        """Video tokens of one sample with latents (T, h, w, ...) (`video_tokens`)."""
        return video_tokens(latent_shape, self.patch_size)

    def to_diffusers_config(self) -> dict[str, Any]:
        return _to_dict(self, "SD3Transformer3DModel")

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> "TransformerConfig":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class VAEConfig:
    """The Wan2.1 causal 3D VAE (diffusers `AutoencoderKLWan` field names)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # (sic) diffusers spelling
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD

    def __post_init__(self):
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("VAEConfig: temperal_downsample needs len(dim_mult) - 1 entries")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"VAEConfig: latents_mean/std need z_dim={self.z_dim} entries")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    def latent_frames(self, frames: int) -> int:
        """Video frames (k * temporal_factor + 1) -> latent frames (k + 1); anything else is an error."""
        if frames < 1 or (frames - 1) % self.temporal_factor:
            raise ValueError(
                f"frame count {frames} is not {self.temporal_factor}k+1 (1, {1 + self.temporal_factor}, "
                f"{1 + 2 * self.temporal_factor}, ...)"
            )
        return (frames - 1) // self.temporal_factor + 1

    def latent_shape(self, frames: int, height: int, width: int, patch_size: int) -> tuple[int, int, int, int]:
        """(T, h, w, C) latents of a `frames` x `height` x `width` video: frames 4k+1, height and width positive
        multiples of spatial factor x `patch_size` (16 for ContentV; no rounding). Errors name the bad size."""
        t, m, s = self.latent_frames(frames), self.spatial_factor * patch_size, self.spatial_factor
        if height < m or width < m or height % m or width % m:
            raise ValueError(f"height {height} and width {width} must be positive multiples of {m} "
                             f"(VAE factor {s} x patch {patch_size}); no rounding is done")
        return (t, height // s, width // s, self.z_dim)

    def to_diffusers_config(self) -> dict[str, Any]:
        return _to_dict(self, "AutoencoderKLWan")

    @classmethod
    def from_diffusers_config(cls, d: dict[str, Any]) -> "VAEConfig":
        # Wan2.2 fields must hold their Wan2.1 values; anything else is a different VAE.
        wan21 = {"is_residual": False, "in_channels": 3, "out_channels": 3, "patch_size": None,
                 "scale_factor_temporal": 4, "scale_factor_spatial": 8, "decoder_base_dim": None}
        for k, v in wan21.items():
            if k in d and d[k] != v and not (k == "decoder_base_dim" and d[k] == d.get("base_dim")):
                raise ValueError(f"VAEConfig: {k}={d[k]!r} is not a Wan2.1 VAE (expected {v!r})")
        return _from_dict(cls, d, ignore=tuple(wan21))


@dataclass(frozen=True)
class TextConfig:
    """Widths and lengths of the three SD3.5 text encoders feeding the DiT."""

    clip_l_hidden: int = 768
    clip_g_hidden: int = 1280
    clip_l_projection: int = 768
    clip_g_projection: int = 1280
    t5_hidden: int = 4096
    clip_max_tokens: int = 77
    t5_max_tokens: int = 256

    @property
    def context_tokens(self) -> int:
        return self.clip_max_tokens + self.t5_max_tokens

    @property
    def pooled_dim(self) -> int:
        return self.clip_l_projection + self.clip_g_projection


@dataclass(frozen=True)
class ModelPreset:
    """A whole ContentV model: transformer + VAE + text widths, plus the sampling defaults."""

    name: str
    transformer: TransformerConfig
    vae: VAEConfig
    text: TextConfig
    height: int = 432
    width: int = 768
    frames: int = 125
    fps: int = 24
    num_steps: int = 50
    guidance_scale: float = 6.0
    shift: float = 3.0  # the SD3.5 scheduler's default; a scheduler/ config in a folder overrides it

    def __post_init__(self):
        t, x = self.text, self.transformer
        if t.t5_hidden != x.joint_attention_dim or t.clip_l_hidden + t.clip_g_hidden > t.t5_hidden:
            raise ValueError(f"{self.name}: text widths {t} do not fit joint_attention_dim {x.joint_attention_dim}")
        if t.pooled_dim != x.pooled_projection_dim:
            raise ValueError(f"{self.name}: pooled width {t.pooled_dim} != {x.pooled_projection_dim}")
        if self.vae.z_dim != x.in_channels:
            raise ValueError(f"{self.name}: VAE z_dim {self.vae.z_dim} != transformer in_channels {x.in_channels}")

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(T, h, w, C) normalised latents of a `frames` x `height` x `width` video (`VAEConfig.latent_shape`)."""
        return self.vae.latent_shape(frames, height, width, self.transformer.patch_size)


# ---- CLIP (the reward model's image-text tower pair) ------------------------------------------------
CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")  # transformers' hidden_act names


@dataclass(frozen=True)
class CLIPTowerConfig:
    """One encoder tower (transformers `CLIPTextConfig` / `CLIPVisionConfig` field names and defaults)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # text only
    vocab_size: int = 49408
    max_position_embeddings: int = 77
    eos_token_id: int = 49407
    # vision only
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise ValueError(f"CLIP hidden_act {self.hidden_act!r} unsupported; choose one of {sorted(CLIP_ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP image_size {self.image_size} not divisible by patch_size {self.patch_size}")

    @property
    def num_positions(self) -> int:
        """Vision: class token + patches."""
        return (self.image_size // self.patch_size) ** 2 + 1


_TEXT_DEFAULTS = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


@dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTowerConfig
    vision: CLIPTowerConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592

    @classmethod
    def from_transformers(cls, d: Mapping[str, Any]) -> CLIPConfig:
        """From a transformers `CLIPModel` `config.json` dict; fields it omits take transformers' defaults,
        fields other than ours (dropout, init ranges, old-version metadata) are ignored."""
        if d.get("model_type", "clip") != "clip":
            raise ValueError(f"CLIP config: model_type {d.get('model_type')!r} is not 'clip'")
        names = {f.name for f in dataclasses.fields(CLIPTowerConfig)}

        def tower(sub: str, defaults: dict) -> CLIPTowerConfig:
            section = d.get(sub) or d.get(f"{sub}_dict")  # transformers < 4.27 wrote `text_config_dict` too
            if not isinstance(section, Mapping):
                raise ValueError(  # noqa: TRY004 - a bad file, not a bad argument type
                    f"CLIP config: missing the {sub!r} section of a CLIPModel config.json")
            return CLIPTowerConfig(**{**defaults, **{k: v for k, v in section.items() if k in names}})

        return cls(
            text=tower("text_config", _TEXT_DEFAULTS),
            vision=tower("vision_config", _VISION_DEFAULTS),
            projection_dim=int(d.get("projection_dim", 512)),
            logit_scale_init_value=float(d.get("logit_scale_init_value", 2.6592)),
        )


PRESETS: dict[str, ModelPreset] = {
    "contentv-8b": ModelPreset("contentv-8b", TransformerConfig(), VAEConfig(), TextConfig()),
    # Real text-encoder widths, an 8-layer 512-wide DiT: benchmarks and CPU-sized training runs.
    "small": ModelPreset(
        "small",
        TransformerConfig(num_layers=8, num_attention_heads=8, attention_head_dim=64, caption_projection_dim=512),
        VAEConfig(),
        TextConfig(),
        height=128, width=128, frames=17, num_steps=20,
    ),
    # Tests and the CPU default: everything a few channels wide, the real factors (/8, /4, patch 2).
    "tiny": ModelPreset(
        "tiny",
        TransformerConfig(
            num_layers=2, num_attention_heads=2, attention_head_dim=16, joint_attention_dim=32,
            caption_projection_dim=32, pooled_projection_dim=32, sample_size=32, pos_embed_max_size=32,
        ),
        VAEConfig(base_dim=8, num_res_blocks=1),
        TextConfig(clip_l_hidden=8, clip_g_hidden=16, clip_l_projection=16, clip_g_projection=16,
                   t5_hidden=32, clip_max_tokens=77, t5_max_tokens=16),
        height=32, width=48, frames=9, num_steps=4,
    ),
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
