"""The trainer's batch interface and the built-in synthetic captioned set.

A batch source subclasses `BatchSource` (contentv_common.buckets: its required and optional members, with
defaults, and the batch shapes); the on-disk dataset (`contentv_common.dataset.ShardedLatentSource`) is one.
Global batch = the rows of all processes, in process order (`jax.make_array_from_process_local_data`).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from contentv_common.buckets import BatchSource, Bucket, buckets_from_config  # noqa: F401  (the trainers' types)
from contentv_common.config import ModelPreset
from contentv_common.dataset import ON_CORRUPT, ShardedLatentSource

BATCH_NDIMS = {"latents": 5, "context": 3, "pooled": 2}  # array name -> rank; the batch axis is first
BATCH_KEYS = tuple(BATCH_NDIMS)


class SyntheticCaptionedSource(BatchSource):
    """A captioned 'video' set made on the fly, learnable and exactly resumable.

    Caption i has fixed random text embeddings (context [L, joint], pooled [P], from seed + i) and a fixed
    latent pattern: a per-channel offset plus a smooth wave over (t, y, x) whose frequencies and phases
    depend on the caption, plus a little per-sample noise; values are roughly unit-variance like normalised
    VAE latents. Batch k (its bucket, captions and noise) is a pure function of (seed, k): state() is {"index": k}.
    """

    def __init__(
        self,
        preset: ModelPreset,
        buckets: Sequence[Bucket],
        bucket_weights: Sequence[float] | None = None,
        num_captions: int = 16,
        seed: int = 0,
        process_index: int = 0,
        process_count: int = 1,
    ):
        self.preset, self.buckets, self.seed = preset, list(buckets), int(seed)
        if not self.buckets:
            raise ValueError("SyntheticCaptionedSource: no buckets")
        w = np.asarray(bucket_weights if bucket_weights is not None else [1.0] * len(self.buckets), np.float64)
        if w.shape != (len(self.buckets),) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"bucket_weights {list(w)} must be {len(self.buckets)} non-negative numbers, not all 0")
        self.weights = w / w.sum()
        for b in self.buckets:
            b.latent_shape(preset)
            if b.batch % process_count:
                raise ValueError(f"bucket {b}: batch {b.batch} does not divide over {process_count} processes")
        self.process_index, self.process_count = process_index, process_count
        t = preset.text
        rng = np.random.default_rng([self.seed, 1])
        self.context = rng.standard_normal((num_captions, t.context_tokens, t.t5_hidden), np.float32)
        self.pooled = rng.standard_normal((num_captions, t.pooled_dim), np.float32)
        c = preset.vae.z_dim
        self._offset = rng.uniform(-1.0, 1.0, (num_captions, c)).astype(np.float32)
        self._freq = rng.uniform(0.5, 2.0, (num_captions, 3, c)).astype(np.float32)
        self._phase = rng.uniform(0, 2 * np.pi, (num_captions, c)).astype(np.float32)
        self.captions = [f"synthetic caption {i}" for i in range(num_captions)]
        self._index = 0

    def pattern(self, caption: int, latent_shape) -> np.ndarray:
        """The noiseless latents of one caption: [T, h, w, C] float32."""
        t, h, w, _ = latent_shape
        grid = np.stack(np.meshgrid(np.linspace(0, 1, t), np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij"), -1)
        arg = np.einsum("thwk,kc->thwc", grid * np.pi, self._freq[caption]) + self._phase[caption]
        return (self._offset[caption] + np.sin(arg)).astype(np.float32)

    def batch_at(self, index: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch `index` (see the module docstring for shapes)."""
        rng = np.random.default_rng([self.seed, 2, index])
        bucket = self.buckets[int(rng.choice(len(self.buckets), p=self.weights))]
        shape = bucket.latent_shape(self.preset)
        ids = rng.integers(0, len(self.captions), bucket.batch)
        noise = rng.standard_normal((bucket.batch, *shape), np.float32)
        rows = slice(self.process_index * bucket.batch // self.process_count,
                     (self.process_index + 1) * bucket.batch // self.process_count)
        ids, noise = ids[rows], noise[rows]
        latents = np.stack([self.pattern(i, shape) for i in ids]) + 0.1 * noise  # [B_local, T, h, w, C]
        return {"latents": latents, "context": self.context[ids], "pooled": self.pooled[ids]}

    def null_text(self) -> tuple[np.ndarray, np.ndarray]:
        """The empty prompt's (context [L, J], pooled [P]) of this set: all zeros (caption dropout, CFG negative)."""
        return np.zeros_like(self.context[0]), np.zeros_like(self.pooled[0])

    def eval_prompts(self, n: int) -> dict:
        """The first n captions' embeddings; the negative prompt is the empty prompt's (`null_text`)."""
        n = min(n, len(self.captions))
        neg_context, neg_pooled = self.null_text()
        return {"names": self.captions[:n], "context": self.context[:n], "pooled": self.pooled[:n],
                "neg_context": np.repeat(neg_context[None], n, 0), "neg_pooled": np.repeat(neg_pooled[None], n, 0)}

    def next(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self._index)
        self._index += 1
        return batch

    def state(self) -> dict:
        return {"kind": "synthetic", "seed": self.seed, "index": self._index}

    def restore(self, state: dict) -> None:
        if state.get("kind") != "synthetic" or state.get("seed") != self.seed:
            raise ValueError(f"data state {state} is not a position of the synthetic set with seed {self.seed}")
        self._index = int(state["index"])


def make_source(config, preset: ModelPreset, process_index: int = 0, process_count: int = 1) -> BatchSource:
    """The batch source named by `config.data.name`: 'synthetic', or a dataset folder (contentv_common.dataset)."""
    buckets = buckets_from_config(config.data.buckets)
    on_corrupt = config.data.get("on_corrupt", "error")
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(f"data.on_corrupt={on_corrupt!r}: use 'error' (a corrupt shard or record stops the run, "
                         f"naming it) or 'skip' (logged with its file and record, counted in the metrics)")
    if config.data.name == "synthetic":
        return SyntheticCaptionedSource(
            preset, buckets, list(config.data.bucket_weights), config.data.num_captions, config.seed,
            process_index, process_count,
        )
    if os.path.isdir(config.data.name):  # a dataset folder of contentv_torch.encode_dataset
        return ShardedLatentSource(config.data.name, preset, buckets, seed=config.seed, process_index=process_index,
                                   process_count=process_count, image_ratio=config.data.get("image_ratio"),
                                   tokens_per_step=config.data.get("tokens_per_step"),
                                   on_corrupt=on_corrupt, val_fraction=config.data.get("val_fraction", 0.0))
    raise ValueError(f"--data {config.data.name!r}: unknown data source; use 'synthetic' or a dataset folder")
