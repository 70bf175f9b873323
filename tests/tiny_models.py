"""The tiny ContentV folder of the tests: `contentv_torch.tiny.make_tiny_contentv_folder` with the diffusers
reference models as the VAE and transformer (one home for the folder builder: contentv_torch/tiny.py).

    make_tiny_contentv_folder(path, preset="tiny", seed=0) -> Path

writes the layout of `contentv_torch.tiny` with
    vae/                                   diffusers AutoencoderKLWan(...).save_pretrained
    transformer/                           the re-randomised diffusers reference of `tests/reference.py` with the
                                           same seed, so `reference_transformer(cfg, seed)` holds exactly its weights
"""
from __future__ import annotations

from pathlib import Path

import torch

from contentv_torch import tiny
from contentv_torch.tiny import clip_vocab as _clip_vocab  # noqa: F401  (tests import it from here)


def _write_vae(root: Path, preset, seed: int) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed + 4)
    kw = {k: v for k, v in preset.vae.to_diffusers_config().items() if not k.startswith("_")}
    AutoencoderKLWan(**kw).eval().save_pretrained(root / "vae")


def _write_transformer(root: Path, preset, seed: int) -> None:
    from reference import reference_state_dict, reference_transformer

    from contentv_torch.transformer import ContentVTransformer3DModel

    with torch.device("meta"):
        model = ContentVTransformer3DModel(preset.transformer)
    weights = reference_state_dict(reference_transformer(preset.transformer, seed))
    model.load_state_dict(weights, strict=True, assign=True)
    model.save_pretrained(root / "transformer")


def make_tiny_contentv_folder(path: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a whole ContentV-format folder at `path` (atomically; an existing folder is replaced) and return it."""
    return tiny.make_tiny_contentv_folder(path, preset, seed, write_vae=_write_vae, write_transformer=_write_transformer)


try:  # a session-wide tiny folder for the tests: `from tiny_models import tiny_folder` in a test module
    import pytest

    @pytest.fixture(scope="session")
    def tiny_folder(tmp_path_factory) -> Path:
        return make_tiny_contentv_folder(tmp_path_factory.mktemp("tiny") / "ContentV-tiny")

    @pytest.fixture(scope="module")
    def one_torch_thread():
        """torch on one intra-op thread for a module: tiny models on a shared 2-core machine run ~20x faster
        than with threads spinning against each other (`pytest -n 2` already uses both cores)."""
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(n)
except ImportError:  # pragma: no cover
    pass
