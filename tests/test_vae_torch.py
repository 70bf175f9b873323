"""contentv_torch.vae.WanVAE against diffusers AutoencoderKLWan (random weights, saved with
save_pretrained and loaded strictly), fp32 on CPU. Tolerances: rel_err <= 1e-5 for encode (mean and
logvar), decode, tiled encode/decode vs diffusers' tiled versions, posterior samples."""
import math

import pytest
import torch
from conftest import rel_err
from diffusers import AutoencoderKLWan
from reference import reference_vae

from benchmarks.vae_tiling import psnr
from contentv_common.config import VAEConfig, get_preset
from contentv_common.weights import KeyMismatchError
from contentv_torch.vae import WanVAE

TOL = 1e-5


def _video(b, f, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, f, h, w, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = get_preset("tiny").vae  # base_dim 8, 1 res block, real /8 and /4 factors
    ref = reference_vae(cfg, seed=0)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    ref.save_pretrained(folder)
    ours = WanVAE.from_pretrained(folder)
    assert ours.config == cfg
    return ref, ours


@torch.no_grad()
@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode_matches_diffusers(pair, frames):
    ref, ours = pair
    x = _video(2, frames, 32, 48, seed=frames)
    post = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == logvar.shape == (2, 16, (frames - 1) // 4 + 1, 4, 6)
    assert rel_err(mean, post.mean) <= TOL
    assert rel_err(logvar, post.logvar) <= TOL
    assert logvar.abs().max() < 20  # not sitting on the clamp


@torch.no_grad()
@pytest.mark.parametrize("latent_frames", [1, 2, 3])
def test_decode_random_latents_matches_diffusers(pair, latent_frames):
    ref, ours = pair
    z = torch.randn(2, 16, latent_frames, 4, 6, generator=torch.Generator().manual_seed(latent_frames))
    want = ref.decode(z).sample
    got = ours.decode(z)
    assert got.shape == (2, 3, 4 * (latent_frames - 1) + 1, 32, 48)
    assert (want.abs() >= 1).float().mean() < 0.05  # the clamp leaves almost everything to compare
    assert rel_err(got, want) <= TOL


@torch.no_grad()
def test_decode_of_encoded_matches_diffusers_and_sample(pair):
    ref, ours = pair
    x = _video(2, 9, 32, 48, seed=3)
    mean, logvar = ours.encode(x)
    assert rel_err(ours.decode(mean), ref.decode(mean).sample) <= TOL
    post = ref.encode(x).latent_dist
    want = post.sample(generator=torch.Generator().manual_seed(7))
    got = WanVAE.sample(mean, logvar, generator=torch.Generator().manual_seed(7))
    assert rel_err(got, want) <= TOL and rel_err(got, mean) > 1e-3
    assert rel_err(ours(x), ref(x).sample) <= TOL


@torch.no_grad()
def test_chunking_streams_frames_and_cache_shapes_settle(pair):
    """Encoder sees 1, 4, 4 frames; decoder one latent frame per call; cache shapes never change."""
    _, ours = pair
    seen = {"encoder": [], "decoder": []}
    hooks = [getattr(ours, n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].shape[2]))
             for n in seen]
    try:
        ours.decode(ours.encode(_video(1, 9, 16, 24))[0])
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"encoder": [1, 4, 4], "decoder": [1, 1, 1]}

    def shapes(tree):
        return [None if t is None else tuple(t.shape) for t in torch.utils._pytree.tree_leaves(tree)]

    x = _video(1, 9, 16, 24)
    _, c0 = ours.encoder(x[:, :, :1])
    _, c1 = ours.encoder(x[:, :, 1:5], c0)
    _, c2 = ours.encoder(x[:, :, 5:9], c1)
    # Already the first chunk's caches hold 2 (zero-padded) frames: one cache shape for every chunk.
    assert shapes(c0) == shapes(c1) == shapes(c2) and all(s is None or s[2] in (1, 2) for s in shapes(c1))


@torch.no_grad()
def test_causal_prefixes_and_first_frame(pair):
    """Causality in time: a prefix of the video encodes to a prefix of the latents, and back.

    1e-5 is fp32 round-off of convolutions run on differently sized inputs (oneDNN picks its algorithm
    by shape and thread count); a leak from later frames would be O(1)."""
    _, ours = pair
    x = _video(2, 9, 16, 24, seed=11)
    mean, _ = ours.encode(x)
    assert rel_err(ours.encode(x[:, :, :5])[0], mean[:, :, :2]) <= 1e-5
    video = ours.decode(mean)
    assert rel_err(ours.decode(mean[:, :, :2]), video[:, :, :5]) <= 1e-5
    first = ours.decode_first_frame(mean)
    assert tuple(first.shape) == (2, 3, 1, 16, 24) and rel_err(first, video[:, :, :1]) <= 1e-5


@torch.no_grad()
def test_nontrivial_config_matches_diffusers(tmp_path):
    """2 res blocks, 3 levels (spatial /4), temporal /2 in the first level, z 4, base 6."""
    cfg = VAEConfig(base_dim=6, z_dim=4, dim_mult=(1, 2, 2), num_res_blocks=2, temperal_downsample=(True, False),
                    latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(1.0, 2.0, 0.5, 1.5))
    ref = reference_vae(cfg, seed=1)
    ref.save_pretrained(tmp_path / "vae")
    ours = WanVAE.from_pretrained(tmp_path / "vae")
    x = _video(2, 5, 16, 24, seed=5)  # 5 = 1 + 4 frames: diffusers always chunks by 4
    post = ref.encode(x).latent_dist
    mean, logvar = ours.encode(x)
    assert mean.shape == (2, 4, 3, 4, 6)
    assert rel_err(mean, post.mean) <= TOL and rel_err(logvar, post.logvar) <= TOL
    assert rel_err(ours.decode(mean), ref.decode(mean).sample) <= TOL


def test_full_wan21_layout_on_meta_matches_diffusers():
    with torch.device("meta"):
        ref = AutoencoderKLWan()
        ours = WanVAE(VAEConfig())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want and len(got) == 194
    assert sum(math.prod(s) for s in got.values()) == sum(p.numel() for p in ref.parameters())


@torch.no_grad()
def test_tiled_matches_diffusers_tiling_and_approximates_untiled(pair):
    """64x112 frames in 32px tiles 24px apart (3 x 5 tiles): equal to diffusers' tiled encode/decode,
    and close to the untiled result. Random weights have no locality, so the untiled gap is large
    (measured: encode-mean PSNR 25.8 dB, rel_err 0.69; decode PSNR 14.9 dB; 64/48 tiles: 34.6 / 23.5 dB)."""
    ref, ours = pair
    x = torch.nn.functional.avg_pool3d(_video(1, 5, 64, 112, seed=9), (1, 5, 5), 1, (0, 2, 2))
    ref.enable_tiling(32, 32, 24, 24)
    try:
        post = ref.encode(x).latent_dist
        mean, logvar = ours.tiled_encode(x, tile_size=32, tile_stride=24)
        assert rel_err(mean, post.mean) <= TOL and rel_err(logvar, post.logvar) <= TOL
        video = ours.tiled_decode(mean, tile_size=32, tile_stride=24)
        assert rel_err(video, ref.decode(mean).sample) <= TOL
    finally:
        ref.disable_tiling()
    full_mean, _ = ours.encode(x)
    full_video = ours.decode(full_mean)
    assert video.shape == full_video.shape == (1, 3, 5, 64, 112)
    assert psnr(mean, full_mean, 2.0) > 22 and rel_err(mean, full_mean) < 0.8
    assert psnr(video, full_video, 2.0) > 13


@torch.no_grad()
def test_enable_tiling_switches_only_for_large_inputs(pair):
    _, ours = pair
    x = _video(1, 5, 48, 64, seed=4)
    try:
        ours.enable_tiling(tile_size=(32, 40), tile_stride=(24, 32))
        mean, _ = ours.encode(x)
        assert torch.equal(mean, ours.tiled_encode(x, (32, 40), (24, 32))[0])
        assert torch.equal(ours.decode(mean), ours.tiled_decode(mean, (32, 40), (24, 32)))
        small = x[:, :, :, :32, :40]  # fits one tile: untiled path, identical to a disabled switch
        m_small, _ = ours.encode(small)
        ours.disable_tiling()
        assert torch.equal(m_small, ours.encode(small)[0])
        assert rel_err(mean, ours.encode(x)[0]) > 1e-3  # the tiled result really differed
    finally:
        ours.disable_tiling()


@torch.no_grad()
def test_bad_inputs_raise_clear_errors(pair, tmp_path):
    _, ours = pair
    for shape, match in [
        ((1, 3, 8, 16, 16), "frame count 8 is not 4k\\+1"),
        ((1, 3, 5, 30, 16), "multiples of 8"),
        ((1, 3, 5, 16, 20), "multiples of 8"),
        ((1, 4, 5, 16, 16), "\\[B, 3, F, H, W\\]"),
        ((3, 5, 16, 16), "\\[B, 3, F, H, W\\]"),
    ]:
        with pytest.raises(ValueError, match=match):
            ours.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="\\[B, 16, T, h, w\\]"):
        ours.decode(torch.zeros(1, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="\\[B, 16, T, h, w\\]"):
        ours.decode(torch.zeros(16, 2, 2, 2))
    for tile, stride in [(30, 24), (32, 40), (32, 0), ((32,), 24)]:
        with pytest.raises(ValueError, match="tile_"):
            ours.tiled_decode(torch.zeros(1, 16, 1, 8, 8), tile, stride)
    with pytest.raises(ValueError, match="attn_scales"):
        WanVAE(VAEConfig(base_dim=8, num_res_blocks=1, attn_scales=(1.0,)))
    # A folder of another size fails strictly, naming the mismatched keys.
    reference_vae(VAEConfig(base_dim=4, num_res_blocks=1), seed=2).save_pretrained(tmp_path / "other")
    cfg_file = tmp_path / "other" / "config.json"
    cfg_file.write_text(cfg_file.read_text().replace('"base_dim": 4', '"base_dim": 8'))
    with pytest.raises(KeyMismatchError, match="encoder.conv_in.weight"):
        WanVAE.from_pretrained(tmp_path / "other")
