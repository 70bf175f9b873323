"""The framework-free tables and schedules against the diffusers originals."""
import numpy as np
import pytest
import torch
from conftest import rel_err
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.models.embeddings import get_3d_sincos_pos_embed

from contentv_common.config import PRESETS, TransformerConfig, VAEConfig, get_preset
from contentv_common.schedule import flow_match_sigmas
from contentv_common.sincos import sincos_3d


@pytest.mark.parametrize("dim,t,h,w", [(32, 3, 2, 5), (64, 1, 4, 3), (2432, 2, 3, 4)])
def test_sincos_3d_matches_diffusers(dim, t, h, w):
    ref = get_3d_sincos_pos_embed(dim, (w, h), t, spatial_interpolation_scale=0.5, temporal_interpolation_scale=1.0)
    ours = sincos_3d(dim, t, h, w)
    assert ours.shape == (t * h * w, dim)
    assert rel_err(ours, ref.reshape(-1, dim).numpy()) < 1e-6


def test_sincos_3d_rejects_bad_width():
    with pytest.raises(ValueError, match="divisible by 16"):
        sincos_3d(40, 1, 2, 2)


@pytest.mark.parametrize("steps,shift", [(50, 3.0), (4, 1.0), (7, 7.0)])
def test_sigmas_match_diffusers_scheduler(steps, shift):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = flow_match_sigmas(steps, shift, grid="sd3")
    np.testing.assert_allclose(ours, sched.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(1000 * ours[:-1], sched.timesteps.numpy(), rtol=1e-6)


def test_config_roundtrip_and_errors():
    for p in PRESETS.values():
        assert TransformerConfig.from_diffusers_config(p.transformer.to_diffusers_config()) == p.transformer
        assert VAEConfig.from_diffusers_config(p.vae.to_diffusers_config()) == p.vae
    with pytest.raises(ValueError, match="unknown config keys \\['bogus'\\]"):
        TransformerConfig.from_diffusers_config({"bogus": 1})
    with pytest.raises(ValueError, match="is_residual"):
        VAEConfig.from_diffusers_config({"is_residual": True})
    with pytest.raises(ValueError, match="frame count 8 is not 4k\\+1"):
        get_preset("contentv-8b").vae.latent_frames(8)
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("huge")
