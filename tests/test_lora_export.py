"""LoRA export / import (convert/lora.py): our trained adapter -> the diffusers / PEFT LoRA file that diffusers'
SD3 loaders take with no missing or unexpected keys and the same outputs; `--merge` -> a torch folder whose forward
equals our JAX LoRA forward; PEFT -> ours -> PEFT is exact, and `train --lora-init` starts from such a file.

Tiny preset in fp32 on CPU. The base is the diffusers reference (tests/reference.py) saved as a transformer folder;
tolerances: torch vs torch <= 1e-5, JAX vs torch <= 1e-5 (the issue's bar for the merged model).
"""
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import rel_err
from reference import dit_inputs, reference_state_dict, reference_transformer
from safetensors import safe_open

from contentv_common.config import get_preset
from contentv_common.weights import save_sharded
from contentv_jax import configs
from contentv_jax import lora as L
from contentv_jax import sharding as shd
from contentv_jax import train as T
from contentv_jax.transformer import ContentVTransformer
from contentv_common.formats import peft_lora as PL
from convert.cli import main as convert_main
from contentv_common.formats.sources import load_params

PRESET = get_preset("tiny")
CFG = PRESET.transformer
FAST = {"xla_backend_optimization_level": 0}



def _jax_forward(params, adapter=None, spec=None, **x):
    """Our Flax model on the torch inputs (channels-last in, [B, C, T, H, W] out)."""
    model = ContentVTransformer(CFG, lora=spec)
    variables = {"params": params} if adapter is None else {"params": params, "lora": adapter}
    out = model.apply(variables, jnp.asarray(x["hidden_states"].permute(0, 2, 3, 4, 1).numpy()),
                      jnp.asarray(x["timestep"].numpy()), jnp.asarray(x["encoder_hidden_states"].numpy()),
                      jnp.asarray(x["pooled_projections"].numpy()))
    return torch.from_numpy(np.array(out)).permute(0, 4, 1, 2, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base folder, LoRA checkpoint dir, base params, adapter): a rank-4 alpha-8 adapter trained 4 steps on the
    reference base at a high learning rate (so B is well away from zero)."""
    root = tmp_path_factory.mktemp("lora")
    ref = reference_transformer(CFG, seed=0)
    base_dir = root / "transformer"
    save_sharded(base_dir, reference_state_dict(ref), config=CFG.to_diffusers_config())
    c = configs.get_config("tiny")
    c.steps, c.log_every, c.checkpoint_every, c.init_from = 4, 1, 4, str(base_dir)
    c.optim.warmup_steps, c.optim.lr = 0, 3e-2
    c.lora.rank, c.lora.alpha = 4, 8.0
    mesh = shd.create_mesh("data=1", jax.devices()[:1])
    out = T.train(c, checkpoint_dir=str(root / "ckpt"), log=lambda s: None, compiler_options=FAST, mesh=mesh)
    adapter = jax.device_get(out["state"].params)
    _, base = load_params(base_dir)
    return base_dir, root / "ckpt", base, adapter


def _sd3_pipeline(dit):
    """A StableDiffusion3Pipeline holding only the transformer: load_lora_weights' own code path (no text encoder
    keys in our file, so the absent encoders are never touched)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(transformer=dit, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)


def test_export_loads_in_diffusers_with_same_output(trained, tmp_path):
    from peft import get_peft_model_state_dict

    base_dir, ckpt, base, adapter = trained
    out_file = tmp_path / "lora.safetensors"
    assert convert_main(["--to", "peft", str(ckpt), str(out_file)]) == 0
    with safe_open(str(out_file), "np") as f:
        keys, meta = set(f.keys()), json.loads(f.metadata()[PL.METADATA_KEY])
    assert meta["transformer.r"] == 4 and meta["transformer.lora_alpha"] == 8.0
    assert all(k.startswith("transformer.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    assert "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight" in keys
    assert "transformer.transformer_blocks.1.ff.net.0.proj.lora_A.weight" in keys  # the last block

    ref = reference_transformer(CFG, seed=0)
    pipe = _sd3_pipeline(ref.dit)
    pipe.load_lora_weights(str(out_file), adapter_name="ours")
    # every file key is an adapter weight of the model and every adapter weight came from the file, value for value
    loaded = get_peft_model_state_dict(ref.dit, adapter_name="ours")
    with safe_open(str(out_file), "pt") as f:
        assert {"transformer." + k for k in loaded} == keys
        assert all(torch.equal(loaded[k.removeprefix("transformer.")], f.get_tensor(k)) for k in keys)
    x = dit_inputs(CFG, 2, h=4, w=6, seq=5)
    spec = L.LoraSpec(4, 8.0)
    with torch.no_grad():
        diffusers_out = ref(**x)
    ours = _jax_forward(base, adapter, spec, **x)
    merged = _jax_forward(L.merge_params(base, adapter, spec.scale), **x)
    base_out = _jax_forward(base, **x)
    assert rel_err(ours, base_out) > 1e-3  # the adapter changes the model
    assert rel_err(diffusers_out, merged) <= 1e-5
    assert rel_err(ours, merged) <= 1e-5
    # ...and through the transformer's own loader (which reads the LoraConfig metadata given weight_name)
    ref2 = reference_transformer(CFG, seed=0)
    ref2.dit.load_lora_adapter(str(tmp_path), weight_name=out_file.name, prefix="transformer", adapter_name="ours")
    with torch.no_grad():
        assert rel_err(ref2(**x), diffusers_out) <= 1e-6
    # --fold-alpha: the same model for a loader that never sees the metadata (alpha taken as r)
    folded = tmp_path / "folded.safetensors"
    assert convert_main(["--to", "peft", str(ckpt), str(folded), "--fold-alpha"]) == 0
    ref3 = reference_transformer(CFG, seed=0)
    ref3.dit.load_lora_adapter(str(folded), prefix="transformer", adapter_name="ours")
    with torch.no_grad():
        assert rel_err(ref3(**x), diffusers_out) <= 1e-6


def test_merge_folder_matches_jax_lora_forward(trained, tmp_path):
    from contentv_torch.transformer import ContentVTransformer3DModel

    base_dir, ckpt, base, adapter = trained
    dst = tmp_path / "merged"
    assert convert_main(["--to", "torch", str(ckpt), str(dst), "--merge"]) == 0  # base from lora.json
    model = ContentVTransformer3DModel.from_pretrained(dst).float().eval()
    x = dit_inputs(CFG, 2, h=4, w=6, seq=5)
    with torch.no_grad():
        torch_out = model(**x)
    torch_out = getattr(torch_out, "sample", torch_out)
    ours = _jax_forward(base, adapter, L.LoraSpec(4, 8.0), **x)
    assert rel_err(ours, torch_out) <= 1e-5
    # --base given explicitly; --merge with --to peft and a missing base are errors
    assert convert_main(["--to", "torch", str(ckpt), str(tmp_path / "m2"), "--merge", "--base", str(base_dir)]) == 0
    from contentv_common.cli import UsageError
    with pytest.raises(UsageError, match="--merge needs --to torch"):
        convert_main(["--to", "peft", str(ckpt), str(tmp_path / "x.safetensors"), "--merge"])
    with pytest.raises(FileNotFoundError, match="pass --base"):
        convert_main(["--to", "torch", str(ckpt), str(tmp_path / "m3"), "--merge", "--base", str(tmp_path / "nope")])


def test_peft_round_trip_and_lora_init(trained, tmp_path):
    """A diffusers-saved PEFT adapter (random A and B, alpha != r) -> ours -> PEFT is exact; its JAX forward
    equals diffusers'; `train --lora-init` starts from it."""
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig, get_peft_model_state_dict

    base_dir, _, base, _ = trained
    ref = reference_transformer(CFG, seed=0)
    targets = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2"]  # diffusers' train_dreambooth_lora_sd3.py default
    torch.manual_seed(0)
    ref.dit.add_adapter(LoraConfig(r=2, lora_alpha=6, target_modules=targets, init_lora_weights=False))
    state = get_peft_model_state_dict(ref.dit)
    StableDiffusion3Pipeline.save_lora_weights(tmp_path / "d", transformer_lora_layers=state,
                                               transformer_lora_adapter_metadata={"r": 2, "lora_alpha": 6,
                                                                                  "target_modules": targets})
    src = tmp_path / "d" / "pytorch_lora_weights.safetensors"
    adapter, rank, alpha = PL.read_peft(src, CFG.num_layers)
    assert (rank, alpha) == (2, 6.0)
    back = PL.write_peft(adapter, rank, alpha, CFG.num_layers, tmp_path / "back.safetensors")
    with safe_open(str(src), "np") as a, safe_open(str(back), "np") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(np.array_equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
        assert PL.read_peft(back, CFG.num_layers)[1:] == (2, 6.0)
    x = dit_inputs(CFG, 2, h=4, w=6, seq=5)
    with torch.no_grad():
        diffusers_out = ref(**x)
    spec = L.LoraSpec(2, 6.0, tuple(L.normalize_target(t) for t in targets))
    assert rel_err(_jax_forward(base, adapter, spec, **x), diffusers_out) <= 1e-5

    # --lora-init: with warmup the first update has learning rate 0, so after 1 step the adapter is the file's
    c = configs.get_config("tiny")
    c.steps, c.log_every, c.init_from, c.lora.init = 1, 1, str(base_dir), str(src)
    c.lora.rank, c.lora.alpha, c.lora.targets = 2, 6.0, targets
    mesh = shd.create_mesh("data=1", jax.devices()[:1])
    out = T.train(c, log=lambda s: None, compiler_options=FAST, mesh=mesh)
    got = flax.traverse_util.flatten_dict(jax.device_get(out["state"].params), sep="/")
    want = flax.traverse_util.flatten_dict(adapter, sep="/")
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    c.lora.alpha = 2.0
    with pytest.raises(ValueError, match=r"alpha 6.*--lora-alpha 2"):
        T.train(c, log=lambda s: None, compiler_options=FAST, mesh=mesh)
    c.lora.alpha, c.lora.targets = 6.0, ["attn.to_q"]
    with pytest.raises(ValueError, match="unexpected"):
        T.train(c, log=lambda s: None, compiler_options=FAST, mesh=mesh)


def test_parity_cli_jax_lora_vs_torch_merged(trained, tmp_path):
    from benchmarks import parity

    base_dir, ckpt, _, _ = trained
    out = tmp_path / "p.safetensors"
    assert parity.main(["--checkpoint", str(base_dir), "--lora", str(ckpt), "--output", str(out)]) == 0
    with safe_open(str(out), "np") as f:
        j, t = f.get_tensor("jax"), f.get_tensor("torch")
    assert rel_err(j, t) <= 1e-5
    # the adapter is really applied on both sides: the plain base differs
    plain = tmp_path / "plain.safetensors"
    assert parity.main(["--checkpoint", str(base_dir), "--output", str(plain)]) == 0
    with safe_open(str(plain), "np") as f:
        assert rel_err(f.get_tensor("torch"), t) > 1e-3
