"""Training shapes: a `Bucket` is one static (frames, height, width, global batch) the trainers compile for."""
from __future__ import annotations

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
