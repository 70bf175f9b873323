"""Differentiable image rewards for RLHF.

A reward model is anything with the `RewardModel` protocol:
    tokenize(prompts: Sequence[str]) -> np.ndarray [B, L] int32        (host side, cached per prompt)
    __call__(params, images [B, H, W, 3] in [-1, 1], tokens [B, L]) -> reward [B] float32   (pure, jittable,
                                                                         differentiable in `images`)
`CLIPReward` is the PickScore-style one: reward = exp(logit_scale) * cosine(image_emb, text_emb), with CLIP's
image preprocessing (resize the shortest side, center crop, normalise) done in JAX so gradients reach the
pixels. PickScore (yuvalkirstain/PickScore_v1) is a `CLIPModel` folder; its processor comes from the
laion CLIP-ViT-H-14 folder, hence the separate `processor_folder`.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from contentv_common.config import read_json
from contentv_common.config import CLIPConfig
from contentv_common.formats.clip_keys import clip_params_from_folder
from contentv_jax.clip import CLIP, unit

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes in preprocessor_config.json


class RewardModel(Protocol):
    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts -> token ids [B, L] int32 (host)."""

    def __call__(self, params: Any, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1], tokens [B, L] -> reward [B] float32 (higher is better)."""


def clip_preprocess(
    images: jax.Array,
    resize: int,
    crop: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    method: str = "bicubic",
) -> jax.Array:
    """CLIP's image preprocessing, differentiable: images [B, H, W, 3] in [-1, 1] -> [B, crop, crop, 3].

    As transformers' `CLIPImageProcessor`: the shortest side is resized to `resize` (the long side to
    int(resize * long / short)), an antialiased `method` resize (jax.image.resize), a center crop of
    `crop` x `crop` (top = (h - crop) // 2), then (x - mean) / std on [0, 1] pixels. Unlike the processor
    it does not round to uint8 in between, so values differ from it by the 8-bit quantisation only.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"clip_preprocess: images must be [B, H, W, 3], got {images.shape}")
    b, h, w, _ = images.shape
    short, long = (h, w) if h <= w else (w, h)
    new_long = int(resize * long / short)
    nh, nw = (resize, new_long) if h <= w else (new_long, resize)
    if min(nh, nw) < crop:
        raise ValueError(f"clip_preprocess: resized {nh}x{nw} is smaller than the {crop}x{crop} crop")
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    x = jax.image.resize(x, (b, nh, nw, 3), method=method, antialias=True)
    top, left = (nh - crop) // 2, (nw - crop) // 2
    x = x[:, top : top + crop, left : left + crop]
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class CLIPReward:
    """PickScore-style reward: exp(logit_scale) * cos(image_emb, text_emb) -> [B].

    `params` is the CLIP params tree (what `clip_params_from_folder` returns, or `CLIP.init(...)["params"]`).
    """

    def __init__(
        self,
        config: CLIPConfig,
        tokenizer=None,
        resize: int | None = None,
        crop: int | None = None,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        method: str = "bicubic",
        remat: bool = False,
        dtype=jnp.float32,
    ):
        self.config = config
        self.model = CLIP(config, remat=remat, dtype=dtype)
        self.tokenizer = tokenizer
        self.resize = resize or config.vision.image_size
        self.crop = crop or config.vision.image_size
        if self.crop != config.vision.image_size:
            raise ValueError(f"CLIPReward: crop {self.crop} != the vision tower's image_size {config.vision.image_size}")
        self.mean, self.std, self.method = tuple(mean), tuple(std), method
        self._token_cache: dict[str, np.ndarray] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, processor_folder: str | Path | None = None, **kw) -> tuple[CLIPReward, dict]:
        """A transformers CLIPModel folder (+ a folder with `preprocessor_config.json` and the CLIPTokenizer
        files; default: the same folder) -> (reward, params of numpy arrays). Local files only."""
        from transformers import CLIPTokenizer

        folder = Path(folder)
        proc = Path(processor_folder) if processor_folder else folder
        d, params = clip_params_from_folder(folder)
        config = CLIPConfig.from_transformers(d)
        pre = {}
        if (proc / "preprocessor_config.json").is_file():
            pre = read_json(proc / "preprocessor_config.json")
        size, crop = pre.get("size", config.vision.image_size), pre.get("crop_size", config.vision.image_size)
        size = size.get("shortest_edge", size.get("height")) if isinstance(size, dict) else size
        crop = crop.get("height") if isinstance(crop, dict) else crop
        resample = pre.get("resample", 3)
        if resample not in _PIL_RESAMPLE:
            raise ValueError(f"{proc}/preprocessor_config.json: resample {resample} unsupported (2 bilinear, 3 bicubic)")
        try:
            tok = CLIPTokenizer.from_pretrained(proc, local_files_only=True)
        except (OSError, ValueError, TypeError) as e:
            raise FileNotFoundError(f"{proc}: no CLIPTokenizer files (vocab.json, merges.txt): {e}") from None
        kw.setdefault("method", _PIL_RESAMPLE[resample])
        reward = cls(config, tok, resize=size, crop=crop, mean=pre.get("image_mean", OPENAI_CLIP_MEAN),
                     std=pre.get("image_std", OPENAI_CLIP_STD), **kw)
        return reward, params

    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """prompts -> [B, max_position_embeddings] int32, padded / truncated as CLIPProcessor does; cached per prompt."""
        if self.tokenizer is None:
            raise ValueError("CLIPReward has no tokenizer (build it with from_folder or pass tokenizer=)")
        todo = [p for p in dict.fromkeys(prompts) if p not in self._token_cache]
        if todo:
            ids = self.tokenizer(todo, padding="max_length", truncation=True,
                                 max_length=self.config.text.max_position_embeddings, return_tensors="np")["input_ids"]
            self._token_cache.update(zip(todo, np.asarray(ids, np.int32)))
        return np.stack([self._token_cache[p] for p in prompts])

    def preprocess(self, images: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1] -> CLIP pixels [B, S, S, 3]."""
        return clip_preprocess(images, self.resize, self.crop, self.mean, self.std, self.method)

    def __call__(self, params, images: jax.Array, tokens: jax.Array) -> jax.Array:
        """images [B, H, W, 3] in [-1, 1], tokens [B, L] int -> reward [B] float32."""
        if images.shape[0] != tokens.shape[0]:
            raise ValueError(f"CLIPReward: {images.shape[0]} images but {tokens.shape[0]} token rows")
        v = {"params": params}
        img = unit(self.model.apply(v, self.preprocess(images), method=CLIP.get_image_features))
        txt = unit(self.model.apply(v, tokens, method=CLIP.get_text_features))
        scale = jnp.exp(jnp.asarray(params["logit_scale"], jnp.float32))
        return scale * jnp.sum(img.astype(jnp.float32) * txt.astype(jnp.float32), axis=-1)
