"""Folders we write load in the released ContentV code's environment: model_index.json names classes diffusers /
transformers can import, and tiny tokenizer folders carry the files transformers 4.x reads (vocab.json + merges.txt,
spiece.model) next to 5.x's tokenizer.json, encoding the same ids."""
from __future__ import annotations

import importlib
import json

import pytest

PROMPTS = ["a red car on the street", "The city at night, 2 birds!", "dog"]


@pytest.fixture(scope="module")
def tokenizer_root(tmp_path_factory):
    from contentv_torch.tiny import _write_tokenizers

    root = tmp_path_factory.mktemp("tok")
    _write_tokenizers(root, 77, ("street",))
    return root


def test_model_index_names_importable_classes(tmp_path):
    from contentv_common.config import get_preset
    from contentv_torch.tiny import write_scheduler_and_index

    write_scheduler_and_index(tmp_path, get_preset("tiny"))
    index = json.loads((tmp_path / "model_index.json").read_text())
    for name, (library, cls) in ((k, v) for k, v in index.items() if not k.startswith("_")):
        assert hasattr(importlib.import_module(library), cls), f"{name}: {library}.{cls} does not import"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]  # what the release's index names


@pytest.mark.parametrize("name", ["tokenizer", "tokenizer_2"])
def test_clip_tokenizer_legacy_files_match_tokenizer_json(tokenizer_root, name):
    folder = tokenizer_root / name
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    assert json.loads((folder / "vocab.json").read_text()) == model["vocab"]
    lines = (folder / "merges.txt").read_text().splitlines()
    assert lines[0].startswith("#version") and [tuple(x.split(" ")) for x in lines[1:]] == [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "CLIPTokenizer" and "backend" not in cfg


def test_t5_spiece_model_encodes_like_tokenizer_json(tokenizer_root):
    import sentencepiece
    from tokenizers import Tokenizer

    folder = tokenizer_root / "tokenizer_3"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "spiece.model"))
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for prompt in PROMPTS:
        want = [i for i in fast.encode(prompt).ids if i != 1]  # without the appended </s>
        assert sp.encode(prompt) == want, prompt
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "T5Tokenizer" and not isinstance(cfg.get("extra_special_tokens", {}), list)


def test_parity_cli_takes_an_sd35_large_transformer_folder(tmp_path, capsys):
    """An SD3.5 Large folder (`SD3Transformer2DModel`, with its learned 2D position table) runs through the parity
    CLI as `python -m convert` and `--init-from` take it: the table is skipped, every other key is used."""
    from benchmarks import parity
    from contentv_common.config import get_preset
    from tests.reference import reference_transformer

    ref = reference_transformer(get_preset("tiny").transformer, seed=2)
    ref.dit.save_pretrained(tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert config["_class_name"] == "SD3Transformer2DModel"
    assert parity.main(["--checkpoint", str(tmp_path / "transformer"), "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "SD3Transformer2DModel" in out and "PASS" in out
