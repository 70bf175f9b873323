"""The PyTorch ContentV MM-DiT against the diffusers-built reference, its loader, its errors.

Tolerances: fp32 vs the reference <= 1e-5; bf16 weights vs the fp32 reference <= 2e-2.
"""
import importlib.util
import inspect

import pytest
import torch
from conftest import rel_err
from reference import dit_inputs, reference_state_dict, reference_transformer

from contentv_common.config import TransformerConfig, get_preset
from contentv_common.weights import INDEX_NAME, KeyMismatchError, save_sharded
from contentv_torch.attention import default_backend_for, get_attention_backend
from contentv_torch.transformer import ContentVTransformer3DModel

CFG = get_preset("tiny").transformer  # 2 layers, 2 heads x 16, text 32 wide
# A third config: 3 layers (two full blocks + the context_pre_only one), 3 heads, 48 = 16 * 3 wide.
CFG3 = TransformerConfig(num_layers=3, num_attention_heads=3, attention_head_dim=16, joint_attention_dim=24,
                         caption_projection_dim=48, pooled_projection_dim=20, in_channels=8, out_channels=4)



@pytest.fixture(scope="module", params=[CFG, CFG3], ids=["tiny", "3layer"])
def saved(request, tmp_path_factory):
    """(config, reference, folder): the reference's state dict as a sharded diffusers folder with an index."""
    cfg = request.param
    ref = reference_transformer(cfg, seed=0)
    folder = tmp_path_factory.mktemp("dit") / "transformer"
    save_sharded(folder, reference_state_dict(ref), config=cfg.to_diffusers_config(), max_shard_bytes=64 * 1024)
    assert (folder / INDEX_NAME).is_file() and len(list(folder.glob("*.safetensors"))) > 1
    return cfg, ref, folder


@pytest.mark.parametrize("t,h,w", [(1, 8, 12), (3, 6, 10)])
def test_fp32_matches_reference(saved, t, h, w):
    cfg, ref, folder = saved
    model = ContentVTransformer3DModel.from_pretrained(folder, dtype=torch.float32)
    x = dit_inputs(cfg, t, h=h, w=w)
    expected = ref(**x)
    with torch.no_grad():
        out = model(**x)
    assert out.shape == (2, cfg.out_channels, t, h, w) and out.dtype == torch.float32
    assert expected.std() > 0.1 and (expected[0] - expected[1]).abs().max() > 0.1  # never zeros / degenerate
    err = rel_err(out, expected)
    print(f"fp32 {cfg.num_layers} layers T={t} {h}x{w}: rel_err {err:.3g}")
    assert err <= 1e-5


def test_bf16_matches_fp32_reference(saved):
    cfg, ref, folder = saved
    model = ContentVTransformer3DModel.from_pretrained(folder, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    x = dit_inputs(cfg, 3)
    with torch.no_grad():
        out = model(**x)
    assert out.dtype == torch.float32  # returned in the latents' dtype
    err = rel_err(out, ref(**x))
    print(f"bf16 {cfg.num_layers} layers T=3: rel_err {err:.3g}")
    assert 0 < err <= 2e-2


def test_loads_sd35_folder_written_by_diffusers(tmp_path):
    """An SD3.5-layout folder (diffusers `save_pretrained`, sharded, with the learned 2D `pos_embed.pos_embed`
    table, which ContentV does not use) loads strictly and gives the reference's output."""
    ref = reference_transformer(CFG, seed=1)
    ref.dit.save_pretrained(tmp_path / "sd35", max_shard_size="40KB")
    assert (tmp_path / "sd35" / INDEX_NAME).is_file()
    model = ContentVTransformer3DModel.from_pretrained(tmp_path / "sd35")
    x = dit_inputs(CFG, 2, seed=3)
    with torch.no_grad():
        assert rel_err(model(**x), ref(**x)) <= 1e-5


def test_callable_backend_and_three_step_forward(saved):
    """A plugged-in callable sees [B, heads, N+L, head_dim] once per block; embed/blocks/head == forward."""
    cfg, _, folder = saved
    model = ContentVTransformer3DModel.from_pretrained(folder)
    x = dit_inputs(cfg, 2)
    with torch.no_grad():
        expected = model(**x)
        seen = []

        def spy(q, k, v):
            seen.append(tuple(q.shape))
            return get_attention_backend("sdpa")(q, k, v)

        model.set_attention_backend(spy)
        tokens, ctx, temb = model.embed(**x)
        out = model.head(model.blocks_forward(tokens, ctx, temb), temb, (2, 4, 6))
    n = 2 * 4 * 6 + 7
    assert seen == [(2, cfg.num_attention_heads, n, cfg.attention_head_dim)] * cfg.num_layers
    assert rel_err(out, expected) == 0.0


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    model = ContentVTransformer3DModel(CFG).train()  # torch default init: nothing zero-initialised
    x = dit_inputs(CFG, 2)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(**x).square().mean().backward()
        grads.append(model.transformer_blocks[0].attn.to_q.weight.grad.clone())
    assert grads[0].abs().sum() > 0 and rel_err(grads[1], grads[0]) < 1e-6


def test_full_size_layout_on_meta():
    from diffusers import SD3Transformer2DModel

    cfg = get_preset("contentv-8b").transformer
    accepted = inspect.signature(SD3Transformer2DModel.__init__).parameters
    with torch.device("meta"):
        ours = ContentVTransformer3DModel(cfg).state_dict()
        theirs = SD3Transformer2DModel(**{k: v for k, v in cfg.to_diffusers_config().items() if k in accepted}).state_dict()
    assert len(ours) == 1226
    assert sum(v.numel() for v in ours.values()) == 8_056_627_520
    assert "pos_embed.pos_embed" in theirs
    expected = {k: tuple(v.shape) for k, v in theirs.items() if k != "pos_embed.pos_embed"}
    assert {k: tuple(v.shape) for k, v in ours.items()} == expected


def test_strict_load_names_every_problem(tmp_path):
    sd = reference_state_dict(reference_transformer(CFG))
    del sd["transformer_blocks.0.attn.norm_added_k.weight"]
    sd["transformer_blocks.1.attn.to_add_out.weight"] = torch.zeros(32, 32)  # the last block has none
    sd["proj_out.bias"] = torch.zeros(63)
    save_sharded(tmp_path / "bad", sd, config=CFG.to_diffusers_config(), max_shard_bytes=64 * 1024)
    with pytest.raises(KeyMismatchError) as e:
        ContentVTransformer3DModel.from_pretrained(tmp_path / "bad")
    msg = str(e.value)
    assert "missing keys (1): ['transformer_blocks.0.attn.norm_added_k.weight']" in msg
    assert "unexpected keys (1): ['transformer_blocks.1.attn.to_add_out.weight']" in msg
    assert "proj_out.bias: (63,) != expected (64,)" in msg


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x: x.update(hidden_states=x["hidden_states"][:, :, 0]), r"\[B, C, T, H, W\] \(5 dims\)"),
        (lambda x: x.update(hidden_states=x["hidden_states"][:, :15]), "15 channels.*in_channels=16"),
        (lambda x: x.update(hidden_states=x["hidden_states"][..., :7, :]), "height 7 and width 12.*patch_size 2"),
        (lambda x: x.update(hidden_states=x["hidden_states"][..., :11]), "height 8 and width 11.*patch_size 2"),
        (lambda x: x.update(timestep=x["timestep"][:1]), r"timestep must be \[B\]=\(2,\), got shape \(1,\)"),
        (lambda x: x.update(timestep=torch.tensor(3.0)), r"timestep must be \[B\]=\(2,\), got shape \(\)"),
        (lambda x: x.update(encoder_hidden_states=x["encoder_hidden_states"][:1]), r"encoder_hidden_states must be \[B=2"),
        (lambda x: x.update(encoder_hidden_states=x["encoder_hidden_states"][..., :31]), "joint_attention_dim=32.*31"),
        (lambda x: x.update(pooled_projections=x["pooled_projections"][:1]), r"pooled_projections must be \[B=2"),
    ],
)
def test_bad_inputs_are_named(change, match):
    with torch.device("meta"):
        model = ContentVTransformer3DModel(CFG)
    x = {k: v.to("meta") for k, v in dit_inputs(CFG, 1).items()}
    change(x)
    with pytest.raises(ValueError, match=match):
        model(**x)


def test_attention_registry():
    assert default_backend_for("cpu") == "sdpa" and default_backend_for("npu:0") == "npu"
    assert default_backend_for(torch.device("cpu")) == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'.*'npu', 'sdpa'"):
        get_attention_backend("flash3")
    q, k, v = torch.randn(3, 2, 3, 5, 8).unbind(0)
    ref = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v
    assert rel_err(get_attention_backend("sdpa")(q, k, v), ref) < 1e-6


@pytest.mark.skipif(importlib.util.find_spec("torch_npu") is not None, reason="torch_npu is installed here")
def test_npu_backend_without_torch_npu_is_a_clear_error():
    with pytest.raises(ImportError, match="pip install torch-npu"):
        get_attention_backend("npu")
    with torch.device("meta"):
        model = ContentVTransformer3DModel(CFG)
    with pytest.raises(ImportError, match="attention backend 'npu' needs Ascend torch_npu"):
        model.set_attention_backend("npu")
