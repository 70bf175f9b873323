"""The ContentV MM-DiT reference, built from diffusers parts (tests only).

`reference_transformer(cfg)` is a diffusers `SD3Transformer2DModel` with every parameter re-randomised
(diffusers zero-initialises adaLN and proj_out), called as ContentV calls it: per-frame SD3 patch conv,
tokens ordered (t, h, w), the 3D sin-cos table from diffusers, the unchanged joint blocks, and the unpatchify
`b (t h w) (p q c) -> b c t (h p) (w q)`.
"""
from __future__ import annotations

import inspect

import torch
from diffusers import SD3Transformer2DModel
from diffusers.models.embeddings import get_3d_sincos_pos_embed

from contentv_common.config import TransformerConfig, VAEConfig


class ReferenceContentV(torch.nn.Module):
    def __init__(self, cfg: TransformerConfig, seed: int = 0):
        super().__init__()
        accepted = inspect.signature(SD3Transformer2DModel.__init__).parameters
        kw = {k: v for k, v in cfg.to_diffusers_config().items() if k in accepted}
        self.dit = SD3Transformer2DModel(**kw).float().eval()
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.dit.named_parameters():
                noise = torch.randn(p.shape, generator=g)
                if p.ndim >= 2:  # Linear / conv weights: unit-variance outputs
                    p.copy_(noise / p[0].numel() ** 0.5)
                elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight"):
                    p.copy_(1.0 + 0.1 * noise)  # RMSNorm gains around 1
                else:
                    p.copy_(0.1 * noise)  # biases

    @torch.no_grad()
    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        """hidden_states [B, C, T, H, W], encoder_hidden_states [B, L, joint_dim], pooled [B, P], timestep [B]
        -> [B, C_out, T, H, W]."""
        d, p = self.dit, self.dit.config.patch_size
        b, c, t, h, w = hidden_states.shape
        frames = hidden_states.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        x = d.pos_embed.proj(frames).flatten(2).transpose(1, 2)  # [B*T, h*w, D]
        x = x.reshape(b, t * (h // p) * (w // p), -1)  # tokens (t, h, w)
        pe = get_3d_sincos_pos_embed(x.shape[-1], (w // p, h // p), t, spatial_interpolation_scale=0.5,
                                     temporal_interpolation_scale=1.0)
        x = x + pe.reshape(1, -1, x.shape[-1]).to(x)
        temb = d.time_text_embed(timestep, pooled_projections)
        ctx = d.context_embedder(encoder_hidden_states)
        for block in d.transformer_blocks:
            ctx, x = block(hidden_states=x, encoder_hidden_states=ctx, temb=temb)
        x = d.proj_out(d.norm_out(x, temb))  # [B, T*h*w, p*p*C_out]
        co = d.out_channels
        x = x.reshape(b, t, h // p, w // p, p, p, co)
        return torch.einsum("bthwpqc->bcthpwq", x).reshape(b, co, t, h, w)


def reference_transformer(cfg: TransformerConfig, seed: int = 0) -> ReferenceContentV:
    return ReferenceContentV(cfg, seed)


def reference_state_dict(ref: ReferenceContentV) -> dict[str, torch.Tensor]:
    """The diffusers state dict in the ContentV layout (no learned `pos_embed.pos_embed` table)."""
    return {k: v.detach().clone() for k, v in ref.dit.state_dict().items() if k != "pos_embed.pos_embed"}


def reference_vae(cfg: VAEConfig, seed: int = 0, bias_std: float = 0.05):
    """diffusers `AutoencoderKLWan` of `cfg` with every parameter random: RMS-norm gammas around 1 (not ones),
    biases non-zero, conv weights as built (seeded)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    ref = AutoencoderKLWan.from_config(cfg.to_diffusers_config()).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(bias_std * torch.randn_like(p))
    return ref


def dit_inputs(cfg: TransformerConfig, t: int, b: int = 2, h: int = 8, w: int = 12, seq: int = 7,
               seed: int = 0) -> dict:
    """Random inputs of a torch MM-DiT (diffusers argument names): latents [B, C, T, H, W], text [B, seq, J],
    pooled [B, P], timesteps (b <= 3)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(b, cfg.in_channels, t, h, w, generator=g),
        encoder_hidden_states=torch.randn(b, seq, cfg.joint_attention_dim, generator=g),
        pooled_projections=torch.randn(b, cfg.pooled_projection_dim, generator=g),
        timestep=torch.tensor([37.5, 912.0, 500.0][:b]),
    )
