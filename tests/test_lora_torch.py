"""contentv_torch.lora against diffusers + PEFT: LoRA files saved the diffusers way, applied to our MM-DiT.

The reference is the tiny diffusers `SD3Transformer2DModel` of tests/reference.py with a PEFT LoRA added
(`add_adapter(LoraConfig)`) or loaded (`load_lora_adapter`), lora_B random (not PEFT's zeros), saved with
`StableDiffusion3Pipeline.save_lora_weights`. Tolerance: fp32 rel_err <= 1e-5, as the base model's parity.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import rel_err
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from reference import dit_inputs, reference_state_dict, reference_transformer
from safetensors.torch import save_file
from tiny_models import one_torch_thread, tiny_folder  # noqa: F401  (fixtures)

from contentv_common.config import get_preset
from contentv_common.weights import save_sharded
from contentv_torch.lora import apply_lora, check_lora, merge_lora, read_lora
from contentv_torch.transformer import ContentVTransformer3DModel

pytestmark = [pytest.mark.usefixtures("one_torch_thread"),
              pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute")]  # two adapters, on purpose
CFG = get_preset("tiny").transformer  # 2 layers (the last context_pre_only), width 32
# Both streams' attention projections and feed-forwards, as diffusers' SD3 LoRA recipes target them.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]



def randomise_lora(dit, adapter: str, seed: int) -> None:
    """PEFT initialises lora_B to zeros (the adapter starts as the identity); make both factors random."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if f".{adapter}." in name and ("lora_A" in name or "lora_B" in name):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)


def save_diffusers_lora(dit, adapter: str, folder) -> str:
    """The adapter as diffusers writes it for a pipeline: transformer.-prefixed keys + lora_adapter_metadata."""
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline.save_lora_weights(
        folder, transformer_lora_layers=get_peft_model_state_dict(dit, adapter_name=adapter),
        transformer_lora_adapter_metadata=dit.peft_config[adapter].to_dict())
    return str(folder / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(reference with adapters "a" (r 4, alpha 8, every target) and "b" (r 2 / 3 by rank_pattern, alpha 1 / 5 by
    alpha_pattern, the video stream's attention only), the base folder, the two LoRA files, their inputs)."""
    root = tmp_path_factory.mktemp("lora")
    ref = reference_transformer(CFG, seed=0)
    folder = root / "transformer"
    save_sharded(folder, reference_state_dict(ref), config=CFG.to_diffusers_config())
    ref.dit.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS), adapter_name="a")
    ref.dit.add_adapter(LoraConfig(r=2, lora_alpha=1, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                   rank_pattern={"transformer_blocks.1.attn.to_q": 3},
                                   alpha_pattern={"to_v": 5}), adapter_name="b")
    randomise_lora(ref.dit, "a", seed=1)
    randomise_lora(ref.dit, "b", seed=2)
    files = {name: save_diffusers_lora(ref.dit, name, root / name) for name in ("a", "b")}
    return ref, folder, files, dit_inputs(CFG, 3, h=6, w=10)


def ours(folder) -> ContentVTransformer3DModel:
    return ContentVTransformer3DModel.from_pretrained(folder, dtype=torch.float32)


@torch.no_grad()
def test_one_adapter_matches_diffusers_peft(world):
    ref, folder, files, x = world
    adapter = read_lora(files["a"])
    assert len(adapter.layers) == 12 + 9  # the last block (context_pre_only) has no to_add_out / ff_context
    assert {lay.rank for lay in adapter.layers.values()} == {4} and {lay.scaling for lay in adapter.layers.values()} == {2.0}
    ref.dit.set_adapters("a")
    expected = ref(**x)
    ref.dit.disable_adapters()
    base = ref(**x)
    ref.dit.enable_adapters()
    model = ours(folder)
    assert rel_err(model(**x), base) <= 1e-5
    assert rel_err(expected, base) > 0.05  # the adapter changes the output a lot
    handle = apply_lora(model, adapter)
    err = rel_err(model(**x), expected)
    print(f"lora fp32 rel_err {err:.3g}")
    assert err <= 1e-5
    handle.scale = 0.5  # diffusers: set_adapters(weights=0.5) multiplies alpha / r by 0.5
    ref.dit.set_adapters("a", weights=0.5)
    assert rel_err(model(**x), ref(**x)) <= 1e-5
    ref.dit.set_adapters("a", weights=1.0)


@torch.no_grad()
def test_two_adapters_with_rank_and_alpha_patterns(world):
    ref, folder, files, x = world
    b = read_lora(files["b"])
    assert b.layers["transformer_blocks.1.attn.to_q"].rank == 3 and b.layers["transformer_blocks.0.attn.to_q"].rank == 2
    assert b.layers["transformer_blocks.0.attn.to_v"].scaling == 2.5 and b.layers["transformer_blocks.0.attn.to_k"].scaling == 0.5
    ref.dit.set_adapters(["a", "b"], weights=[0.8, 1.3])
    expected = ref(**x)
    ref.dit.set_adapters("a")
    model = ours(folder)
    base = model(**x)
    ha, hb = apply_lora(model, files["a"], 0.8), apply_lora(model, b, 1.3)
    assert rel_err(model(**x), expected) <= 1e-5
    # Removal in any order leaves the base model bit for bit (the weights were never touched).
    ha.remove()
    assert not torch.equal(model(**x), base)
    hb.remove()
    assert torch.equal(model(**x), base)
    with apply_lora(model, b, 0.0):  # scale 0: exactly the base too
        assert torch.equal(model(**x), base)
    assert torch.equal(model(**x), base)


@torch.no_grad()
def test_diffusers_load_lora_adapter_reads_the_same_file(world, tmp_path):
    """The files load in diffusers' own path too (load_lora_adapter with the transformer prefix), no keys left."""
    ref, folder, files, x = world
    fresh = reference_transformer(CFG, seed=0)
    # use_safetensors=True as the pipeline loader passes it (without it diffusers drops the metadata)
    fresh.dit.load_lora_adapter(files["b"], prefix="transformer", adapter_name="b", use_safetensors=True)
    ref.dit.set_adapters("b")
    expected = ref(**x)
    ref.dit.set_adapters("a")
    assert rel_err(fresh(**x), expected) <= 1e-6
    model = ours(folder)
    apply_lora(model, files["b"])
    assert rel_err(model(**x), expected) <= 1e-5


@torch.no_grad()
def test_merge_equals_hooks_and_unmerges(world):
    ref, folder, files, x = world
    model = ours(folder)
    base = model(**x)
    with apply_lora(model, files["a"], 0.7):
        hooked = model(**x)
    merge_lora(model, files["a"], 0.7)
    assert rel_err(model(**x), hooked) <= 1e-5
    merge_lora(model, files["a"], 0.7, sign=-1)
    assert rel_err(model(**x), base) <= 1e-6


@torch.no_grad()
def test_bf16_model_keeps_its_dtype(world):
    ref, folder, files, x = world
    model = ContentVTransformer3DModel.from_pretrained(folder, dtype=torch.bfloat16)
    ref.dit.set_adapters("a")
    expected = ref(**x)
    handle = apply_lora(model, files["a"])
    q = model.transformer_blocks[0].attn.to_q
    hook = next(iter(q._forward_hooks.values()))
    assert hook.down.dtype == hook.up.dtype == torch.bfloat16  # factors in the weight's dtype
    out = model(**x)
    assert out.dtype == torch.float32 and rel_err(out, expected) <= 2e-2
    handle.remove()


def test_files_without_metadata_prefix_or_alpha(world, tmp_path):
    """alpha = r without metadata (diffusers' rule); a kohya-style `.alpha` scalar; keys without `transformer.`."""
    _, folder, files, x = world
    a = read_lora(files["a"])
    plain = {}
    for name, lay in a.layers.items():
        plain[f"{name}.lora_A.weight"], plain[f"{name}.lora_B.weight"] = lay.down, lay.up
    save_file(plain, str(tmp_path / "plain.safetensors"))
    b = read_lora(tmp_path / "plain.safetensors")
    assert set(b.layers) == set(a.layers) and {lay.scaling for lay in b.layers.values()} == {1.0}
    with_alpha = {**plain, **{f"{n}.alpha": torch.tensor(8.0) for n in a.layers}}
    save_file(with_alpha, str(tmp_path / "alpha.safetensors"))
    assert {lay.scaling for lay in read_lora(tmp_path / "alpha.safetensors").layers.values()} == {2.0}
    model = ours(folder)
    with torch.no_grad(), apply_lora(model, a):
        y_a = model(**x)
    with torch.no_grad(), apply_lora(model, tmp_path / "alpha.safetensors"):
        assert torch.equal(model(**x), y_a)


def _write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, match", [
    ("no_module", r"transformer.transformer_blocks.7.attn.to_q.lora_A.weight names no module"),
    ("not_linear", r"transformer_blocks.0.attn.norm_q: the module is a RMSNorm"),
    ("shape", r"lora_A.weight \(4, 30\) / lora_B.weight \(32, 4\) do not fit the Linear \[32, 32\]"),
    ("rank", r"\(4, 32\) and .* \(32, 3\) are not the factors"),
    ("half", r"needs both lora_A.weight and lora_B.weight"),
    ("foreign", r"'transformer.transformer_blocks.0.attn.to_q.weight' is not a LoRA tensor"),
    ("text_encoder", r"'text_encoder.layers.0.q_proj.lora_A.weight' is for another component"),
    ("meta_rank", r"has rank 4, its metadata lora_adapter_metadata says r=8"),
    ("dora", r"DoRA"),
    ("pickle", r"not a readable safetensors file"),
    ("missing", r"no such file"),
])
def test_bad_files_name_file_key_and_shapes(case, match, tmp_path):
    q = "transformer.transformer_blocks.0.attn.to_q"
    a, b = torch.ones(4, 32), torch.ones(32, 4)
    files = {
        "no_module": lambda p: _write(p, {"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": a,
                                          "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": b}),
        "not_linear": lambda p: _write(p, {"transformer_blocks.0.attn.norm_q.lora_A.weight": torch.ones(4, 16),
                                           "transformer_blocks.0.attn.norm_q.lora_B.weight": torch.ones(16, 4)}),
        "shape": lambda p: _write(p, {f"{q}.lora_A.weight": torch.ones(4, 30), f"{q}.lora_B.weight": b}),
        "rank": lambda p: _write(p, {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": torch.ones(32, 3)}),
        "half": lambda p: _write(p, {f"{q}.lora_A.weight": a}),
        "foreign": lambda p: _write(p, {f"{q}.weight": torch.ones(32, 32)}),
        "text_encoder": lambda p: _write(p, {"text_encoder.layers.0.q_proj.lora_A.weight": a}),
        "meta_rank": lambda p: _write(p, {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b},
                                      {"lora_adapter_metadata": json.dumps({"transformer.r": 8})}),
        "dora": lambda p: _write(p, {f"{q}.lora_A.weight": a, f"{q}.lora_B.weight": b},
                                 {"lora_adapter_metadata": json.dumps({"r": 4, "use_dora": True})}),
        "pickle": lambda p: torch.save({f"{q}.lora_A.weight": a}, p),
        "missing": lambda p: None,
    }
    path = tmp_path / "lora.safetensors"
    files[case](path)
    with torch.device("meta"):
        model = ContentVTransformer3DModel(CFG)
    with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
        check_lora(read_lora(path), model)
    assert str(path) in str(e.value)


# ---------------------------------------------------------------------------------------------
# The generate CLI and the pipeline
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder_lora(tiny_folder, tmp_path_factory):  # noqa: F811
    """A LoRA for the tiny folder's DiT (which is reference_transformer(CFG, seed=0)), saved the diffusers way."""
    ref = reference_transformer(CFG, seed=0)
    ref.dit.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), adapter_name="s")
    randomise_lora(ref.dit, "s", seed=3)
    return save_diffusers_lora(ref.dit, "s", tmp_path_factory.mktemp("cli_lora"))


def test_generate_cli_with_lora(tiny_folder, folder_lora, tmp_path):  # noqa: F811
    from safetensors.torch import load_file

    from contentv_common.video_io import read_mp4
    from contentv_torch.generate import main

    def run(name, *extra):
        main(["--model", str(tiny_folder), "--prompt", "a red cat", "--frames", "5", "--height", "32", "--width", "48",
              "--steps", "2", "--guidance", "2", "--seed", "3", "--output", str(tmp_path / f"{name}.mp4"),
              "--latents-out", str(tmp_path / f"{name}.safetensors"), "--device", "cpu", "--quiet", *extra])
        return load_file(str(tmp_path / f"{name}.safetensors"))["latents"], read_mp4(tmp_path / f"{name}.mp4")[0]

    base, base_video = run("base")
    lora, lora_video = run("lora", "--lora", folder_lora)
    off, off_video = run("off", "--lora", folder_lora, "--lora-scale", "0")
    twice, _ = run("twice", "--lora", folder_lora, "--lora-scale", "0.5", "--lora", folder_lora, "--lora-scale", "0.5")
    assert torch.equal(off, base) and np.array_equal(off_video, base_video)
    assert rel_err(lora, base) > 0.05 and not np.array_equal(lora_video, base_video)
    assert rel_err(twice, lora) <= 1e-5  # two halves of one adapter = the adapter


def test_generate_lora_flags_pair_scales_with_files():
    from contentv_torch.generate import parse_args

    args = parse_args(["--model", "m", "--prompt", "p", "--lora", "a.safetensors", "--lora-scale", "0.8",
                       "--lora", "b.safetensors"])
    assert args.lora == [("a.safetensors", 0.8), ("b.safetensors", 1.0)]
    assert parse_args(["--model", "m", "--prompt", "p"]).lora == []


# ---------------------------------------------------------------------------------------------
# Our JAX-trained adapter, exported by `python -m convert --to peft`, on the torch side
# ---------------------------------------------------------------------------------------------
from test_lora_export import _jax_forward, trained  # noqa: E402,F401  (a 4-step rank-4 alpha-8 JAX LoRA run)


def test_jax_adapter_exported_to_peft_matches_jax_forward(trained, tmp_path):  # noqa: F811
    """JAX LoRA forward (base + adapter) vs torch base + the exported file as hooks: <= 1e-5 (fp32), the bar the
    issue sets for JAX LoRA vs torch merged."""
    from contentv_jax import lora as L
    from convert.cli import main as convert_main

    base_dir, ckpt, base, adapter = trained
    assert convert_main(["--to", "peft", str(ckpt), str(tmp_path / "a.safetensors")]) == 0
    x = dit_inputs(CFG, 2, h=4, w=6, seq=5)
    expected = _jax_forward(base, adapter, L.LoraSpec(4, 8.0), **x)
    model = ours(base_dir)
    with torch.no_grad(), apply_lora(model, tmp_path / "a.safetensors"):
        out = model(**x)
    assert rel_err(out, expected) <= 1e-5 and rel_err(out, model(**x).detach()) > 1e-3  # the adapter matters
