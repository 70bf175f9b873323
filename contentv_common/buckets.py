"""Training shapes and the batch interface: a `Bucket` is one static (frames, height, width, global batch) the
trainers compile for; a `BatchSource` yields batches of those shapes."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from contentv_common.config import ModelPreset


@dataclass(frozen=True)
class Bucket:
    """One static training shape: `frames` x `height` x `width` pixels (frames 4k+1; 1 = image), global `batch`."""

    frames: int
    height: int
    width: int
    batch: int

    def latent_shape(self, preset: ModelPreset) -> tuple[int, int, int, int]:
        """(T, h, w, C) of the normalised latents for this bucket; errors name the bucket and the bad size."""
        if self.batch < 1:
            raise ValueError(f"bucket {self}: batch must be >= 1")
        try:
            return preset.latent_shape(self.frames, self.height, self.width)
        except ValueError as e:
            raise ValueError(f"bucket {self} for {preset.name}: {e}") from None

    def video_tokens(self, preset: ModelPreset) -> int:
        """Video tokens of one sample of this bucket."""
        return preset.transformer.video_tokens(self.latent_shape(preset))


def buckets_from_config(items) -> list[Bucket]:
    return [Bucket(*map(int, b)) for b in items]


class BatchSource:
    """The trainers' batch interface (framework-free: the on-disk dataset implements it in contentv_common).

    Required (a subclass implements them):
      buckets             the static shapes it yields: `Bucket`s (pixel frames, height, width, global batch);
      next() -> batch     this process's rows of the next global batch, numpy float32: latents [B_local, T, h, w, C]
                          normalised and channels-last, context [B_local, L, J], pooled [B_local, P], with
                          (T, h, w, C) = `Bucket.latent_shape(preset)` of one of `buckets`;
      state() -> dict     JSON-serialisable exact data position (saved in every checkpoint);
      restore(state)      continue from that position: next() then yields exactly what it would have.
    Optional (these defaults mean "not available"):
      eval_prompts(n)     {"names", "context" [n, L, J], "pooled" [n, P], "neg_context", "neg_pooled"} numpy: the
                          fixed prompts of evaluation samples, or None;
      null_text()         (context [L, J], pooled [P]) of the empty prompt (caption dropout), or None;
      corruption_counts() {metric name: count} of skipped / replaced records (data.on_corrupt="skip");
      unreadable_shards() names of the shards skipped as unreadable.
    Global batch = the rows of all processes, in process order.
    """

    buckets: Sequence[Bucket]

    def next(self) -> dict:
        raise NotImplementedError

    def state(self) -> dict:
        raise NotImplementedError

    def restore(self, state: dict) -> None:
        raise NotImplementedError

    def eval_prompts(self, n: int) -> dict | None:
        return None

    def null_text(self) -> tuple | None:
        return None

    def corruption_counts(self) -> dict[str, int]:
        return {}

    def unreadable_shards(self) -> list[str]:
        return []
