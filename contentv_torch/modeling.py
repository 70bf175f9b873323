"""Loading and saving PyTorch models from diffusers-layout folders, strictly and streaming.

A model class provides `config_class` (a contentv_common config with from/to_diffusers_config) and
`__init__(config)`. Weights are never initialised on load: the module is built on the meta device and
the checkpoint's tensors are assigned into it, so a 16 GB model needs 16 GB, not 32.
"""
from __future__ import annotations

from pathlib import Path

import torch

from contentv_common.config import read_json
from contentv_common.weights import CONFIG_NAME, check_keys, iter_tensors, save_sharded, tensor_shapes


class PretrainedMixin:
    """`from_pretrained(folder, dtype=..., device=...)` and `save_pretrained(folder)` for our torch models."""

    config_class = None  # set by subclasses
    # Checkpoint keys the model knowingly has no parameter for (e.g. the SD3.5 learned 2D
    # `pos_embed.pos_embed` table, which ContentV replaces by a fixed 3D one): skipped on load, by exact name.
    ignored_checkpoint_keys: frozenset[str] = frozenset()

    @classmethod
    def from_config_file(cls, folder: str | Path):
        return cls.config_class.from_diffusers_config(read_json(Path(folder) / CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        """Build from `folder/config.json` and load every tensor strictly (missing, unexpected and
        mis-shaped keys are all listed in one error). dtype None keeps the checkpoint's dtype."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a model folder (no hub access here: pass a local directory)")
        config = cls.from_config_file(folder)
        with torch.device("meta"):
            model = cls(config)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        found = {k: s for k, s in tensor_shapes(folder).items() if k not in cls.ignored_checkpoint_keys}
        check_keys(found, expected, str(folder))
        state = {}
        for k, t in iter_tensors(folder, framework="pt", keys=found):
            state[k] = t.to(device=device, dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model._init_non_persistent(device)
        return model.eval()

    def _init_non_persistent(self, device) -> None:
        """Recreate non-persistent buffers left on the meta device (override where a model has any)."""

    def save_pretrained(self, folder: str | Path, max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
        """Write config.json + safetensors (sharded with index above max_shard_bytes), atomically."""
        sd = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        return save_sharded(folder, sd, config=self.config.to_diffusers_config(), max_shard_bytes=max_shard_bytes, overwrite=overwrite)
