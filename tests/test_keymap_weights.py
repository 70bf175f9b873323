"""The declarative key-map mechanism and the streaming, atomic weight-folder IO."""
import json

import numpy as np
import pytest
import torch

from contentv_common.weights import KeyMismatchError, check_keys, iter_tensors, save_sharded, tensor_shapes, weight_index
from contentv_common.formats.keymap import Rule, flax_to_torch, torch_to_flax

RULES = [
    Rule("blocks.{i}.proj.weight", "blocks/proj/kernel", "linear", stack=(0, 3)),
    Rule("blocks.3.proj.weight", "last/proj/kernel", "linear"),
    Rule("down.{d}.conv.weight", "down_{d}/conv/kernel", "conv3d"),
    Rule("norm.weight", "norm/scale"),
]


def _torch_sd(rng):
    sd = {f"blocks.{i}.proj.weight": rng.standard_normal((4, 3)).astype(np.float32) for i in range(4)}
    sd.update({f"down.{d}.conv.weight": rng.standard_normal((5, 2, 3, 3, 3)).astype(np.float32) for d in range(2)})
    sd["norm.weight"] = rng.standard_normal(4).astype(np.float32)
    return sd


def test_roundtrip_is_exact_and_stacks_layers():
    sd = _torch_sd(np.random.default_rng(0))
    tree = torch_to_flax(sd.items(), RULES)
    assert tree["blocks"]["proj"]["kernel"].shape == (3, 3, 4)
    np.testing.assert_array_equal(tree["blocks"]["proj"]["kernel"][1], sd["blocks.1.proj.weight"].T)
    assert tree["down_1"]["conv"]["kernel"].shape == (3, 3, 3, 2, 5)
    back = dict(flax_to_torch(tree, RULES))
    assert sorted(back) == sorted(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_unexpected_and_missing_layers_are_named():
    sd = _torch_sd(np.random.default_rng(0))
    del sd["blocks.1.proj.weight"]
    sd["extra.bias"] = np.zeros(2, np.float32)
    with pytest.raises(KeyMismatchError, match=r"unexpected keys \['extra.bias'\].*blocks/proj/kernel rows \[1\]"):
        torch_to_flax(sd.items(), RULES)


def test_save_sharded_index_and_streaming_read(tmp_path):
    sd = {f"w{i}": torch.randn(64, 64, dtype=torch.bfloat16) for i in range(5)}
    out = save_sharded(tmp_path / "m", iter(sd.items()), config={"a": 1}, max_shard_bytes=3 * 64 * 64 * 2)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    got = dict(iter_tensors(out))
    assert all(torch.equal(got[k], sd[k]) and got[k].dtype == torch.bfloat16 for k in sd)
    assert tensor_shapes(out)["w3"] == (64, 64)
    assert len(weight_index(out)) == 5


def test_failed_save_leaves_nothing(tmp_path):
    def gen():
        yield "a", torch.zeros(2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_sharded(tmp_path / "m", gen())
    assert list(tmp_path.iterdir()) == []


def test_check_keys_lists_everything():
    with pytest.raises(KeyMismatchError) as e:
        check_keys({"a": (1,), "b": (2,), "x": (3,)}, {"a": (1,), "b": (3,), "c": (4,)}, "model")
    msg = str(e.value)
    assert "missing keys (1): ['c']" in msg and "unexpected keys (1): ['x']" in msg and "b: (2,) != expected (3,)" in msg


def test_numpy_bf16_folder_roundtrip_through_flax_reader(tmp_path):
    import ml_dtypes

    from contentv_common.formats.keymap import read_flax_params

    sd = {k: v.astype(ml_dtypes.bfloat16) for k, v in _torch_sd(np.random.default_rng(1)).items()}
    save_sharded(tmp_path / "m", flax_to_torch(torch_to_flax(sd.items(), RULES), RULES))
    tree = read_flax_params(tmp_path / "m", RULES)
    assert tree["blocks"]["proj"]["kernel"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(tree["blocks"]["proj"]["kernel"][2], sd["blocks.2.proj.weight"].T)
