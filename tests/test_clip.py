"""Flax CLIP (contentv_jax/clip.py) vs transformers CLIPModel; key map; differentiable CLIP reward."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import rel_err

IMAGE, PATCH = 28, 7


def make_tiny_clip_folder(path: str | Path, seed: int = 0, hidden_act: str = "quick_gelu", legacy_eos: bool = False,
                          max_shard_size: str | None = None, max_positions: int = 12) -> Path:
    """A transformers CLIPModel folder (random weights, save_pretrained) + CLIPTokenizer + preprocessor config.

    Tiny sizes: text 16 wide / 2 layers / `max_positions` positions, vision 24 wide / 3 layers / 28 px, patch 7, projection 8.
    """
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from tests.tiny_models import _clip_vocab

    path = Path(path)
    vocab, merges = _clip_vocab()
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_positions)
    tok.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    cfg = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 16, "intermediate_size": 40, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": max_positions, "hidden_act": hidden_act,
                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id,
                     "eos_token_id": 2 if legacy_eos else tok.eos_token_id},
        vision_config={"hidden_size": 24, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3,
                       "image_size": IMAGE, "patch_size": PATCH, "hidden_act": hidden_act, "initializer_factor": 4.0},
        projection_dim=8, logit_scale_init_value=1.7,
    )
    torch.manual_seed(seed)
    model = CLIPModel(cfg).eval()
    with torch.no_grad():  # wake up the tiny model: non-trivial norms and embeddings
        for n, p in model.named_parameters():
            if "layer_norm" in n or "layrnorm" in n:
                p.add_(0.3 * torch.randn_like(p))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kw)
    return path


def _token_ids(vocab_size: int, eos: int, pad: int, bos: int, lengths, seq: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.full((len(lengths), seq), pad, np.int64)
    for b, n in enumerate(lengths):
        ids[b, 0] = bos
        ids[b, 1 : n - 1] = rng.integers(0, vocab_size - 3, n - 2)
        ids[b, n - 1] = eos
    return ids


@pytest.mark.parametrize("hidden_act,legacy_eos", [("quick_gelu", False), ("gelu", True)])
def test_clip_matches_transformers(tmp_path, hidden_act, legacy_eos):
    import jax.numpy as jnp
    from transformers import CLIPModel, CLIPTokenizer

    from contentv_jax.clip import CLIP, CLIPConfig
    from contentv_common.formats.clip_keys import clip_params_from_folder

    folder = make_tiny_clip_folder(tmp_path / "clip", seed=1, hidden_act=hidden_act, legacy_eos=legacy_eos)
    ref = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    tok = CLIPTokenizer.from_pretrained(folder)
    d, params = clip_params_from_folder(folder)
    model = CLIP(CLIPConfig.from_transformers(d))

    # Text: 3 sequences of different lengths, EOS then padding (the pad id is EOS itself here, as in real CLIP).
    eos = tok.eos_token_id
    ids = _token_ids(len(tok), eos, tok.pad_token_id, tok.bos_token_id, [5, 12, 8], 12, seed=2)
    if legacy_eos:  # legacy pooling takes the largest id: only the EOS position may hold it
        assert eos == ids.max()
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = ref(input_ids=torch.as_tensor(ids), pixel_values=pixels)
    got = model.apply({"params": params}, jnp.asarray(pixels.permute(0, 2, 3, 1).numpy()), jnp.asarray(ids, jnp.int32))
    errs = {k: rel_err(got[k], getattr(out, k).numpy()) for k in ("image_embeds", "text_embeds", "logits_per_image")}
    print(hidden_act, "legacy_eos" if legacy_eos else "eos_token_id", errs)
    assert all(e < 1e-4 for e in errs.values()), errs
    # the pooled token must be the EOS one: logits differ per sequence and are not all equal
    assert np.std(np.asarray(got["logits_per_image"])) > 1e-3


def test_clip_sharded_folder_and_strict_keys(tmp_path):
    from safetensors.numpy import load_file, save_file

    from contentv_common.weights import KeyMismatchError
    from contentv_common.formats.clip_keys import clip_params_from_folder, clip_rules
    from contentv_common.formats.keymap import flatten, flax_to_torch

    one = make_tiny_clip_folder(tmp_path / "one", seed=4)
    sharded = make_tiny_clip_folder(tmp_path / "sharded", seed=4, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    d, a = clip_params_from_folder(one)
    _, b = clip_params_from_folder(sharded)
    fa, fb = flatten(a), flatten(b)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    # Flax -> torch round trip gives back every tensor of the file.
    orig = load_file(one / "model.safetensors")
    back = dict(flax_to_torch(a, clip_rules(d)))
    assert back.keys() == orig.keys() and all(np.array_equal(back[k], orig[k]) for k in orig)
    # A missing and a reshaped tensor are both named.
    orig.pop("vision_model.post_layernorm.bias")
    orig["text_projection.weight"] = orig["text_projection.weight"][:, :3]
    save_file(orig, str(one / "model.safetensors"))
    with pytest.raises(KeyMismatchError, match=r"post_layernorm\.bias(.|\n)*text_projection\.weight"):
        clip_params_from_folder(one)


def test_clip_preprocess_matches_processor():
    """Differentiable resize/crop/normalise vs CLIPImageProcessor (PIL, uint8 in between) on a smooth non-square image."""
    import jax.numpy as jnp
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from contentv_jax.reward import clip_preprocess

    h, w = 40, 64
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    img = np.stack([np.sin(3 * xx + yy), np.cos(2 * yy - xx), xx * yy], -1) * 0.8  # [-1, 1]
    img8 = np.round((img + 1) * 127.5).astype(np.uint8)
    proc = CLIPImageProcessorPil(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE})
    ref = proc(images=[img8, img8[::-1]], return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
    x = jnp.asarray(np.stack([img8, img8[::-1]]).astype(np.float32) / 127.5 - 1)
    got = clip_preprocess(x, IMAGE, IMAGE)
    err = rel_err(got, ref)
    print("clip_preprocess vs CLIPImageProcessorPil rel err", err)
    assert got.shape == (2, IMAGE, IMAGE, 3) and err < 2e-2


def test_clip_reward(tmp_path):
    """reward = exp(logit_scale) * cos: equals transformers' logits_per_image diagonal on the same pixels;
    tokenization is the processor's and is cached; the gradient reaches the pixels."""
    import jax
    import jax.numpy as jnp
    from transformers import CLIPModel

    from contentv_jax.reward import CLIPReward

    folder = make_tiny_clip_folder(tmp_path / "clip", seed=5)
    reward, params = CLIPReward.from_folder(folder)
    assert (reward.resize, reward.crop, reward.method) == (IMAGE, IMAGE, "bicubic")
    prompts = ["a red car on the street", "a bird flying over the sea at sunset", "a red car on the street"]
    tokens = reward.tokenize(prompts)
    ref_ids = reward.tokenizer(prompts, padding="max_length", max_length=12, truncation=True)["input_ids"]
    assert tokens.shape == (3, 12) and tokens.dtype == np.int32 and np.array_equal(tokens, ref_ids)
    assert len(reward._token_cache) == 2
    images = jnp.asarray(np.random.default_rng(6).uniform(-1, 1, (3, 32, 48, 3)).astype(np.float32))
    r = jax.jit(reward)(params, images, tokens)
    ref = CLIPModel.from_pretrained(folder, local_files_only=True).eval()
    pix = torch.as_tensor(np.array(reward.preprocess(images))).permute(0, 3, 1, 2)
    with torch.no_grad():
        logits = ref(input_ids=torch.as_tensor(tokens.astype(np.int64)), pixel_values=pix).logits_per_image.numpy()
    print("reward", np.asarray(r), "rel err vs transformers diag", rel_err(r, np.diag(logits)))
    assert r.shape == (3,) and rel_err(r, np.diag(logits)) < 1e-4
    g = jax.grad(lambda x: reward(params, x, tokens).sum())(images)
    assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).max()) > 0
