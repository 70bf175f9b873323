"""The Wan2.1 VAE key map: diffusers `AutoencoderKLWan` / `contentv_torch.vae.WanVAE` keys <-> the Flax
`contentv_jax.vae.WanVAE` tree.

The two trees have the same structure (module lists are `name.{i}` in torch, `name_{i}` in Flax); the
rules are templates over block indices, so one table covers every Wan2.1 config. Layout changes:
conv weights OI(D)HW -> (D)HWIO, RMS-norm gammas [C, 1, 1, 1] / [C, 1, 1] -> `scale` [C]
(kinds `gamma_c111` / `gamma_c11`), the 2D conv of a Resample (`resample.1`, index 1 of torch's
nn.Sequential) -> `resample`.
"""
from __future__ import annotations

from pathlib import Path

from contentv_common.config import VAEConfig, read_json
from contentv_common.formats.keymap import Rule, read_flax_params
from contentv_common.formats.wan_original import layout
from contentv_common.weights import CONFIG_NAME, check_keys, tensor_shapes


def _conv(t: str, f: str, kind: str) -> list[Rule]:
    return [Rule(f"{t}.weight", f"{f}/kernel", kind), Rule(f"{t}.bias", f"{f}/bias")]


def _resnet(t: str, f: str) -> list[Rule]:
    rules = [Rule(f"{t}.norm1.gamma", f"{f}/norm1/scale", "gamma_c111"), Rule(f"{t}.norm2.gamma", f"{f}/norm2/scale", "gamma_c111")]
    for conv in ("conv1", "conv2", "conv_shortcut"):
        rules += _conv(f"{t}.{conv}", f"{f}/{conv}", "conv3d")
    return rules


def _attention(t: str, f: str) -> list[Rule]:
    return [Rule(f"{t}.norm.gamma", f"{f}/norm/scale", "gamma_c11"), *_conv(f"{t}.to_qkv", f"{f}/to_qkv", "conv2d"),
            *_conv(f"{t}.proj", f"{f}/proj", "conv2d")]


def _resample(t: str, f: str) -> list[Rule]:
    return [*_conv(f"{t}.resample.1", f"{f}/resample", "conv2d"), *_conv(f"{t}.time_conv", f"{f}/time_conv", "conv3d")]


def vae_rules(cfg: VAEConfig) -> list[Rule]:
    """The declarative map for a Wan2.1 VAE config (attn_scales must be empty, as in Wan2.1)."""
    if cfg.attn_scales:
        raise ValueError(f"vae_rules: attn_scales={list(cfg.attn_scales)} is not supported (Wan2.1 uses none)")
    rules = [*_conv("quant_conv", "quant_conv", "conv3d"), *_conv("post_quant_conv", "post_quant_conv", "conv3d")]
    for side in ("encoder", "decoder"):
        rules += _conv(f"{side}.conv_in", f"{side}/conv_in", "conv3d")
        rules += _conv(f"{side}.conv_out", f"{side}/conv_out", "conv3d")
        rules.append(Rule(f"{side}.norm_out.gamma", f"{side}/norm_out/scale", "gamma_c111"))
        rules += _resnet(f"{side}.mid_block.resnets.{{r}}", f"{side}/mid_block/resnets_{{r}}")
        rules += _attention(f"{side}.mid_block.attentions.{{a}}", f"{side}/mid_block/attentions_{{a}}")
    # encoder.down_blocks is one flat list of ResidualBlocks and Resamples (their key names do not overlap)
    rules += _resnet("encoder.down_blocks.{d}", "encoder/down_blocks_{d}")
    rules += _resample("encoder.down_blocks.{d}", "encoder/down_blocks_{d}")
    rules += _resnet("decoder.up_blocks.{u}.resnets.{r}", "decoder/up_blocks_{u}/resnets_{r}")
    rules += _resample("decoder.up_blocks.{u}.upsamplers.{s}", "decoder/up_blocks_{u}/upsamplers_{s}")
    return rules


def vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape of every tensor of the Wan2.1 VAE of `cfg` (from the config alone)."""
    return {k: shape for k, (_, shape) in layout(cfg).items()}


def vae_params_from_folder(folder: str | Path) -> tuple[VAEConfig, dict]:
    """A diffusers-layout VAE folder (config.json + safetensors, single or sharded) -> (config, nested Flax
    params of numpy arrays in the checkpoint's dtype). Keys and shapes are checked against the config before
    any tensor is read (one KeyMismatchError naming every missing, unexpected and mis-shaped key); then it
    streams tensor by tensor."""
    folder = Path(folder)
    cfg = VAEConfig.from_diffusers_config(read_json(folder / CONFIG_NAME))
    check_keys(tensor_shapes(folder), vae_shapes(cfg), str(folder))
    return cfg, read_flax_params(folder, vae_rules(cfg), what=str(folder))
