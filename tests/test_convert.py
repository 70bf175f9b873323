"""python -m convert: every format in (written in its real on-disk layout), JAX and PyTorch out.

Original-format files (SD3.5 single file, Wan .pth) are written by our inverse key maps and checked against
diffusers' own single-file converters; the key shapes derived from a config (`expected_torch_shapes`) are
checked at full size against diffusers on the meta device and the Flax model's jax.eval_shape; round trips are
bit-exact in the same dtype.
"""
import dataclasses
import inspect
import json
import pathlib

import ml_dtypes
import numpy as np
import pytest
import torch

from contentv_common.config import PRESETS, TransformerConfig, VAEConfig
from contentv_common.formats import sd3_original, wan_original
from contentv_common.formats.keymap import flatten, torch_to_flax
from contentv_common.formats.sources import FORMATS, Source, detect, load_params, plan_flax
from contentv_common.formats.transformer_keys import transformer_rules
from contentv_common.weights import iter_tensors, save_sharded
from convert.cli import cli, main
from convert.export import convert
from convert.formats import UnsafeCheckpointError

TINY = PRESETS["tiny"].transformer
TINY_VAE = PRESETS["tiny"].vae


def _sd3_model(cfg: TransformerConfig, seed: int = 0, device=None):
    """A diffusers SD3Transformer2DModel (the SD3.5 layout, with the learned 2D pos_embed) with random weights."""
    from diffusers import SD3Transformer2DModel

    accepted = inspect.signature(SD3Transformer2DModel.__init__).parameters
    kw = {k: v for k, v in cfg.to_diffusers_config().items() if k in accepted}
    if device is not None:
        with torch.device(device):
            return SD3Transformer2DModel(**kw)
    torch.manual_seed(seed)
    m = SD3Transformer2DModel(**kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def _wan_model(cfg: VAEConfig, seed: int = 0):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    m = AutoencoderKLWan(**{k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    return m


def _np(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16) if t.dtype == torch.bfloat16 else t.numpy()


def _assert_trees_equal(a: dict, b: dict):
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        np.testing.assert_array_equal(np.ascontiguousarray(fa[k]).view(np.uint8), np.ascontiguousarray(fb[k]).view(np.uint8), err_msg=k)


def _torch_state(folder) -> dict[str, torch.Tensor]:
    return dict(iter_tensors(folder, framework="pt"))


def _run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()  # drop what earlier calls printed
    rc = cli(["-q", *map(str, argv)])
    return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# Inverse key maps, checked by diffusers' own single-file converters
# ---------------------------------------------------------------------------------------------------------
def test_sd3_original_inverse_is_what_diffusers_converts_back():
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    state = _sd3_model(TINY).state_dict()
    orig = sd3_original.diffusers_to_original(state, TINY)
    assert all(k.startswith("model.diffusion_model.") for k in orig)
    assert orig["model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"].shape == (3 * 32, 32)
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(orig))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    names, skipped = sd3_original.strip_keys(orig)
    assert not skipped
    inferred = sd3_original.infer_config({k: tuple(orig[v].shape) for k, v in names.items()})
    assert inferred == dataclasses.replace(TINY, sample_size=128)  # sample_size is not in the weights


def test_wan_original_inverse_is_what_diffusers_converts_back():
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    cfg = VAEConfig(base_dim=4, num_res_blocks=2)  # diffusers' converter hard-codes Wan2.1's 2 res blocks
    state = _wan_model(cfg).state_dict()
    orig = wan_original.diffusers_to_original(state, cfg)
    assert "decoder.upsamples.4.shortcut.weight" in orig and "encoder.downsamples.2.resample.1.weight" in orig and "encoder.downsamples.5.time_conv.weight" in orig
    back = convert_wan_vae_to_diffusers(dict(orig))
    assert sorted(back) == sorted(state)
    assert all(torch.equal(back[k], state[k]) for k in state)
    assert wan_original.infer_config({k: tuple(v.shape) for k, v in orig.items()}) == cfg


# ---------------------------------------------------------------------------------------------------------
# Full-size layouts: keys and shapes without weights
# ---------------------------------------------------------------------------------------------------------
def test_full_size_sd35_large_and_contentv_8b_keys_and_shapes():
    import jax
    import jax.numpy as jnp
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from flax import linen as nn

    from contentv_jax.transformer import ContentVTransformer
    from contentv_common.formats.sources import expected_torch_shapes

    cfg = PRESETS["contentv-8b"].transformer
    sd35 = _sd3_model(cfg, device="meta").state_dict()
    assert set(sd3_original.key_table(cfg, pos_embed=True)) == set(sd35)
    orig = sd3_original.diffusers_to_original(sd35, cfg)  # torch.cat works on meta tensors
    back = convert_sd3_transformer_checkpoint_to_diffusers(dict(orig))
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in sd35.items()}
    names, _ = sd3_original.strip_keys(orig)
    assert sd3_original.infer_config({k: tuple(orig[v].shape) for k, v in names.items()}) == cfg

    ours = expected_torch_shapes("transformer", cfg)  # from the config alone
    assert len(ours) == 1226 and sum(int(np.prod(s)) for s in ours.values()) == 8_056_627_520
    assert ours == {k: tuple(v.shape) for k, v in sd35.items() if k != "pos_embed.pos_embed"}

    src = Source("transformer", "meta", pathlib.Path("contentv-8b"), cfg, ours, dict.fromkeys(ours, np.dtype(np.float32)), None)
    planned = {t.key: t.shape for t in plan_flax(src)}
    p = cfg.patch_size
    abstract = jax.eval_shape(lambda: ContentVTransformer(cfg).init(
        jax.random.key(0), jnp.zeros((1, 1, p, p, 16)), jnp.zeros((1,)), jnp.zeros((1, 3, 4096)), jnp.zeros((1, 2048))))
    assert planned == {k: tuple(v.shape) for k, v in flatten(nn.unbox(abstract["params"])).items()}


def test_full_size_wan21_vae_keys_and_shapes():
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    from contentv_jax.vae import param_shapes
    from contentv_common.formats.sources import expected_torch_shapes

    cfg = VAEConfig()
    with torch.device("meta"):
        ref = AutoencoderKLWan().state_dict()
    ref_shapes = {k: tuple(v.shape) for k, v in ref.items()}
    assert set(wan_original.key_table(cfg)) == set(ref)
    orig = wan_original.diffusers_to_original(ref, cfg)
    assert {k: tuple(v.shape) for k, v in convert_wan_vae_to_diffusers(dict(orig)).items()} == ref_shapes
    assert wan_original.infer_config({k: tuple(v.shape) for k, v in orig.items()}) == cfg
    assert expected_torch_shapes("vae", cfg) == ref_shapes
    src = Source("vae", "meta", pathlib.Path("wan21"), cfg, ref_shapes, dict.fromkeys(ref, np.dtype(np.float32)), None)
    assert {t.key: t.shape for t in plan_flax(src)} == {k: tuple(v.shape) for k, v in flatten(param_shapes(cfg)).items()}


# ---------------------------------------------------------------------------------------------------------
# Real formats in, both frameworks out
# ---------------------------------------------------------------------------------------------------------
def test_sd35_single_file_and_diffusers_folder_to_torch_and_jax(tmp_path, capsys):
    from safetensors.torch import save_file

    from contentv_torch.transformer import ContentVTransformer3DModel

    m = _sd3_model(TINY, seed=1)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in m.state_dict().items()}
    orig = sd3_original.diffusers_to_original(state, TINY)
    orig["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, dtype=torch.bfloat16)  # a bundled VAE: skipped
    save_file(orig, tmp_path / "sd3.5_large.safetensors")
    m.to(torch.bfloat16).save_pretrained(tmp_path / "sd35", max_shard_size="30KB")  # sharded + index
    assert (tmp_path / "sd35" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert detect(tmp_path / "sd3.5_large.safetensors") == "sd3-original"
    assert detect(tmp_path / "sd35") == "diffusers-transformer"
    video = {k: v for k, v in state.items() if k != "pos_embed.pos_embed"}  # the 2D table is dropped
    want_flax = torch_to_flax(((k, _np(v)) for k, v in video.items()), transformer_rules(TINY))

    for name in ("sd3.5_large.safetensors", "sd35"):
        assert _run(capsys, "--to", "torch", tmp_path / name, tmp_path / f"{name}.torch") == (0, "")
        loaded = ContentVTransformer3DModel.from_pretrained(tmp_path / f"{name}.torch").state_dict()
        assert sorted(loaded) == sorted(video) and all(torch.equal(loaded[k], video[k]) for k in video)
        assert _run(capsys, "--to", "jax", tmp_path / name, tmp_path / f"{name}.jax") == (0, "")
        cfg, params = load_params(tmp_path / f"{name}.jax")
        assert cfg.num_layers == TINY.num_layers and cfg.joint_attention_dim == TINY.joint_attention_dim
        _assert_trees_equal(params, want_flax)
    _assert_trees_equal(load_params(tmp_path / "sd35")[1], want_flax)  # straight from SD3.5 into Flax
    from contentv_common.formats.transformer_keys import transformer_params_from_folder  # the trainer's --init-from reader

    _assert_trees_equal(transformer_params_from_folder(tmp_path / "sd3.5_large.safetensors.torch")[1], want_flax)
    _, p32 = load_params(tmp_path / "sd3.5_large.safetensors", dtype="float32")
    _assert_trees_equal(p32, torch_to_flax(((k, v.float().numpy()) for k, v in video.items()), transformer_rules(TINY)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_contentv_torch_jax_torch_round_trip_is_bit_exact(tmp_path, capsys, dtype):
    from contentv_torch.transformer import ContentVTransformer3DModel

    cfg = dataclasses.replace(TINY, num_layers=4)  # 3 scanned layers + the last block
    torch.manual_seed(0)
    model = ContentVTransformer3DModel(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(tmp_path / "cv", max_shard_bytes=40_000)
    assert _run(capsys, "--to", "jax", tmp_path / "cv", tmp_path / "jax", "--max-shard-gb", 40_000 / 2**30) == (0, "")
    assert (tmp_path / "jax" / "flax_params.safetensors.index.json").is_file()  # sharded Flax output
    assert _run(capsys, "--to", "torch", tmp_path / "jax", tmp_path / "back") == (0, "")
    a, b = _torch_state(tmp_path / "cv"), _torch_state(tmp_path / "back")
    assert sorted(a) == sorted(b) and all(a[k].dtype == dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "back" / "config.json").read_text()) == cfg.to_diffusers_config()
    _, params = load_params(tmp_path / "jax")
    assert params["transformer_blocks"]["attn"]["to_q"]["kernel"].shape == (3, 32, 32)
    if dtype == torch.float32:  # --dtype casts exactly as torch does (round to nearest even)
        assert _run(capsys, "--to", "torch", tmp_path / "jax", tmp_path / "bf16", "--dtype", "bfloat16") == (0, "")
        c = _torch_state(tmp_path / "bf16")
        assert all(torch.equal(c[k], a[k].to(torch.bfloat16)) for k in a)


def test_wan_pth_and_diffusers_vae_to_torch_and_jax(tmp_path, capsys):
    from contentv_torch.vae import WanVAE
    from contentv_common.formats.vae_keys import vae_params_from_folder

    ref = _wan_model(TINY_VAE, seed=2)
    state = ref.state_dict()
    torch.save(wan_original.diffusers_to_original(state, TINY_VAE), tmp_path / "Wan2.1_VAE.pth")
    ref.save_pretrained(tmp_path / "vae")
    assert detect(tmp_path / "Wan2.1_VAE.pth") == "wan-original" and detect(tmp_path / "vae") == "diffusers-vae"
    _, want_flax = vae_params_from_folder(tmp_path / "vae")

    assert _run(capsys, "--to", "torch", tmp_path / "Wan2.1_VAE.pth", tmp_path / "pth.torch") == (0, "")
    loaded = WanVAE.from_pretrained(tmp_path / "pth.torch").state_dict()
    assert sorted(loaded) == sorted(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    for name in ("Wan2.1_VAE.pth", "vae"):
        assert _run(capsys, "--to", "jax", tmp_path / name, tmp_path / f"{name}.jax") == (0, "")
        _assert_trees_equal(load_params(tmp_path / f"{name}.jax")[1], want_flax)
    assert _run(capsys, "--to", "torch", tmp_path / "vae.jax", tmp_path / "vae.back") == (0, "")
    back = _torch_state(tmp_path / "vae.back")
    assert all(torch.equal(back[k], state[k]) for k in state)


# ---------------------------------------------------------------------------------------------------------
# Training checkpoint -> diffusers folder / whole model folder (loads in ours and in the released class)
# ---------------------------------------------------------------------------------------------------------
def _released_contentv_class():
    """The released ContentV `SD3Transformer3DModel` (bytedance/ContentV contentv_transformer.py) as far as loading
    goes: an SD3Transformer2DModel subclass whose pos_embed is replaced by a module holding only the patch
    conv `proj`. The release hard-codes joint/pooled widths 4096/2048; here they are arguments so a tiny model fits."""
    from diffusers import SD3Transformer2DModel

    class PatchProj(torch.nn.Module):
        def __init__(self, p, cin, d):
            super().__init__()
            self.proj = torch.nn.Conv2d(cin, d, kernel_size=p, stride=p)

    class SD3Transformer3DModel(SD3Transformer2DModel):
        def __init__(self, in_channels=16, out_channels=16, patch_size=2, num_layers=38, num_attention_heads=38,
                     attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048):
            inner = num_attention_heads * attention_head_dim
            super().__init__(in_channels=in_channels, out_channels=out_channels, patch_size=patch_size,
                             num_layers=num_layers, attention_head_dim=attention_head_dim,
                             num_attention_heads=num_attention_heads, caption_projection_dim=inner,
                             joint_attention_dim=joint_attention_dim, pooled_projection_dim=pooled_projection_dim,
                             pos_embed_max_size=192, qk_norm="rms_norm")
            self.pos_embed = PatchProj(patch_size, in_channels, inner)

    return SD3Transformer3DModel


def _tiny_train_checkpoint(path):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import linen as nn

    from contentv_jax.checkpoint import Checkpointer
    from contentv_jax.train import TrainState
    from contentv_jax.transformer import ContentVTransformer

    p = TINY.patch_size
    init = jax.jit(lambda: nn.unbox(ContentVTransformer(TINY).init(
        jax.random.key(0), jnp.zeros((1, 1, p, p, 16)), jnp.zeros((1,)), jnp.zeros((1, 3, 32)), jnp.zeros((1, 32)))["params"]))
    rng = np.random.default_rng(1)
    params = jax.tree.map(lambda x: np.asarray(x) + 0.01 * rng.standard_normal(x.shape).astype(np.float32), init())
    ema = jax.tree.map(lambda x: 0.5 * x + 0.25, params)
    tx = optax.adamw(1e-3)
    state = TrainState(step=np.array(7, np.int32), params=params, opt_state=jax.jit(tx.init)(params), ema_params=ema,
                       rng=jax.random.key(2), nonfinite=np.zeros((), np.int32), skipped=np.zeros((), np.int32))
    ck = Checkpointer(path, every=1, async_save=False)
    ck.save(7, state, {"epoch": 0}, force=True)
    ck.close()
    return params, ema


def test_checkpoint_source_reads_sharded_stacked_leaves_row_by_row(tmp_path):
    """A checkpoint written from 2 devices with the layer axis sharded (stored chunks of 2 of the 4 stacked rows):
    contentv_jax.checkpoint.open_source reads every row of every leaf back exactly, under its diffusers key."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from contentv_common.formats.keymap import flax_to_torch
    from contentv_common.formats.sources import expected_torch_shapes
    from contentv_jax.checkpoint import Checkpointer, open_source

    cfg = dataclasses.replace(TINY, num_layers=5)
    rng = np.random.default_rng(0)
    shapes = expected_torch_shapes("transformer", cfg)
    params = torch_to_flax(((k, rng.standard_normal(s).astype(np.float32)) for k, s in shapes.items()),
                           transformer_rules(cfg))
    layers = NamedSharding(Mesh(np.array(jax.devices()[:2]), ("layers",)), PartitionSpec("layers"))
    placed = jax.tree.map(lambda x: jax.device_put(x, layers) if x.ndim and x.shape[0] == 4 else x, params)
    assert placed["transformer_blocks"]["attn"]["to_q"]["kernel"].sharding == layers
    ck = Checkpointer(tmp_path / "ckpt", every=1, async_save=False)
    ck.save(3, {"params": placed, "step": np.int32(3)}, {}, force=True)
    ck.close()
    want = dict(flax_to_torch(params, transformer_rules(cfg)))
    with open_source(tmp_path / "ckpt", config=cfg) as src:
        assert src.shapes == shapes
        for k in src.order:  # the converters' order: leaf by leaf, rows in order
            np.testing.assert_array_equal(src.read(k), want[k], err_msg=k)


@pytest.fixture(scope="module")
def tiny_contentv_folder(tmp_path_factory):
    from tiny_models import make_tiny_contentv_folder

    return make_tiny_contentv_folder(tmp_path_factory.mktemp("cv") / "ContentV-tiny")


def test_train_checkpoint_to_torch_folder_and_whole_model(tmp_path, capsys, tiny_contentv_folder):
    from contentv_torch.transformer import ContentVTransformer3DModel
    from contentv_common.formats.keymap import flax_to_torch

    params, ema = _tiny_train_checkpoint(tmp_path / "ckpt")
    assert detect(tmp_path / "ckpt") == "orbax" and detect(tmp_path / "ckpt" / "7") == "orbax"
    rules = transformer_rules(TINY)
    for flag, tree in (("--ema", ema), (None, params)):
        dst = tmp_path / f"out{flag}"
        assert _run(capsys, "--to", "torch", tmp_path / "ckpt", dst, *([flag] if flag else [])) == (0, "")
        got = _torch_state(dst)
        want = dict(flax_to_torch(tree, rules))
        assert sorted(got) == sorted(want) and all(np.array_equal(got[k].numpy(), want[k]) for k in want)
    assert json.loads((tmp_path / "out--ema" / "config.json").read_text())["_class_name"] == "SD3Transformer3DModel"

    # Whole ContentV-format folder: converted transformer + the other components of a model folder.
    dst = tmp_path / "model"
    assert _run(capsys, "--to", "torch", tmp_path / "ckpt", dst, "--ema", "--dtype", "bfloat16",
                "--components", tiny_contentv_folder) == (0, "")
    index = json.loads((tiny_contentv_folder / "model_index.json").read_text())
    assert {p.name for p in dst.iterdir()} == {k for k in index if not k.startswith("_")} | {"model_index.json"}
    ours = ContentVTransformer3DModel.from_pretrained(dst / "transformer")
    assert ours.proj_out.weight.dtype == torch.bfloat16
    from contentv_torch.pipeline import ContentVPipeline

    pipe = ContentVPipeline.from_pretrained(dst, dtype=torch.float32, device="cpu")  # our pipeline loads the folder
    assert torch.equal(pipe.transformer.proj_out.weight, ours.proj_out.weight.float())
    released, info = _released_contentv_class().from_pretrained(dst / "transformer", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    mine = ours.state_dict()
    assert all(torch.equal(v.to(torch.bfloat16), mine[k]) for k, v in released.state_dict().items())
    assert _torch_state(dst / "vae").keys() == _torch_state(tiny_contentv_folder / "vae").keys()
    assert _run(capsys, "--to", "torch", tmp_path / "ckpt", tmp_path / "linked", "--components", tiny_contentv_folder,
                "--link") == (0, "")
    assert (tmp_path / "linked" / "text_encoder_3").is_symlink() and not (tmp_path / "linked" / "transformer").is_symlink()

    # The whole ContentV folder -> JAX (transformer and VAE in the Flax format, the rest copied).
    assert _run(capsys, "--to", "jax", tiny_contentv_folder, tmp_path / "model.jax") == (0, "")
    assert detect(tmp_path / "model.jax" / "transformer") == "flax" and detect(tmp_path / "model.jax" / "vae") == "flax"
    _, tp = load_params(tmp_path / "model.jax" / "transformer")
    _assert_trees_equal(tp, torch_to_flax(((k, _np(v)) for k, v in _torch_state(tiny_contentv_folder / "transformer").items()), rules))


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------
def test_malicious_pickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (pathlib.Path.touch, (marker,))

    torch.save({"encoder.conv1.weight": torch.zeros(1), "x": Evil()}, tmp_path / "evil.pth")
    rc, err = _run(capsys, "--to", "torch", tmp_path / "evil.pth", tmp_path / "out")
    assert rc == 1 and err.startswith("python -m convert: error: ") and "refused to unpickle" in err and "evil.pth" in err
    assert not marker.exists() and not (tmp_path / "out").exists()
    with pytest.raises(UnsafeCheckpointError):
        convert(tmp_path / "evil.pth", tmp_path / "out", "jax")


def test_cli_errors_name_the_problem_and_leave_nothing(tmp_path, capsys):
    from contentv_torch.transformer import ContentVTransformer3DModel

    (tmp_path / "notes.txt").write_text("hello")
    rc, err = _run(capsys, "--to", "jax", tmp_path / "notes.txt", tmp_path / "o")
    assert rc == 1 and "unknown format" in err and all(f in err for f in FORMATS)
    (tmp_path / "empty").mkdir()
    rc, err = _run(capsys, "--to", "jax", tmp_path / "empty", tmp_path / "o")
    assert rc == 1 and "unknown format" in err
    rc, err = _run(capsys, "--to", "torch", tmp_path / "missing_dir", tmp_path / "o")
    assert rc == 1 and "no such file" in err

    torch.manual_seed(0)
    with torch.device("meta"):
        sd = ContentVTransformer3DModel(TINY).state_dict()
    sd = {k: torch.randn(v.shape) for k, v in sd.items()}
    save_sharded(tmp_path / "good", sd, config=TINY.to_diffusers_config())
    broken = dict(sd)
    del broken["transformer_blocks.1.attn.to_k.weight"]
    broken["context_embedder.weight"] = torch.zeros(3, 3)
    broken["extra.weight"] = torch.zeros(1)
    save_sharded(tmp_path / "broken", broken, config=TINY.to_diffusers_config())
    for to in ("torch", "jax"):
        rc, err = _run(capsys, "--to", to, tmp_path / "broken", tmp_path / "o")
        assert rc == 1 and "missing" in err and "Traceback" not in err
        assert "transformer_blocks.1.attn.to_k.weight" in err and "extra.weight" in err
        assert "context_embedder.weight: (3, 3) != expected (32, 32)" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "empty", "good", "notes.txt"]  # no half folder

    rc, err = _run(capsys, "--to", "torch", tmp_path / "good", tmp_path / "good")
    assert rc == 1 and "already exists" in err
    (tmp_path / "o").mkdir()
    rc, err = _run(capsys, "--to", "jax", tmp_path / "good", tmp_path / "o")
    assert rc == 1 and "already exists" in err and "--overwrite" in err
    assert _run(capsys, "--to", "jax", tmp_path / "good", tmp_path / "o", "--overwrite") == (0, "")
    assert detect(tmp_path / "o") == "flax"
    rc, err = _run(capsys, "--to", "jax", tmp_path / "good", tmp_path / "notes.txt" / "sub")  # parent is a file
    assert rc == 1 and "cannot write" in err
    rc, err = _run(capsys, "--to", "jax", tmp_path / "good", tmp_path / "o2", "--from", "wan-original")
    assert rc == 1 and "'wan-original' is a single file, this is a folder" in err
    rc, err = _run(capsys, "--to", "jax", tmp_path / "good", tmp_path / "o2", "--from", "diffusers-vae")
    assert rc == 1 and "diffusers-transformer" in err
    rc, err = _run(capsys, "--to", "jax", tmp_path / "good", tmp_path / "o2", "--ema")
    assert rc == 1 and "--ema" in err
    assert not (tmp_path / "o2").exists()
    with pytest.raises(SystemExit):
        main(["--to", "onnx", str(tmp_path / "good"), str(tmp_path / "o3")])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert [f for f in FORMATS if f not in out] == [], out


def test_save_flax_params_round_trips_an_in_memory_tree(tmp_path):
    """A Flax params tree held in memory (e.g. a VAE trained in JAX) -> our JAX format -> load_params, bit-exact,
    sharded when large; the folder is detected as 'flax' and an existing folder is kept without overwrite=True."""
    from convert.formats import save_flax_params
    from contentv_jax.vae import init_params
    import flax.linen as nn
    import jax

    cfg = PRESETS["tiny"].vae
    params = jax.tree.map(np.asarray, nn.meta.unbox(init_params(cfg, jax.random.key(0)))["params"])
    out = save_flax_params(cfg, params, tmp_path / "vae_flax", max_shard_bytes=20_000)
    assert detect(out) == "flax" and len(list(out.glob("flax_params-*.safetensors"))) > 1
    got_cfg, got = load_params(out)
    assert got_cfg == cfg
    want = flatten(params)
    assert set(flatten(got)) == set(want)
    for k, v in flatten(got).items():
        np.testing.assert_array_equal(v, want[k])
    with pytest.raises(FileExistsError):
        save_flax_params(cfg, params, out)


def test_folder_readers_check_every_key_and_shape_against_the_config_first(tmp_path):
    """The shapes a config implies (expected_torch_shapes) are what every folder reader checks before reading."""
    from contentv_common.formats.sources import expected_torch_shapes
    from contentv_common.formats.transformer_keys import transformer_params_from_folder
    from contentv_common.weights import KeyMismatchError

    shapes = expected_torch_shapes("transformer", TINY)
    tensors = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    tensors["proj_out.weight"] = np.zeros((3, 3), np.float32)
    del tensors["context_embedder.bias"]
    tensors["pos_embed.pos_embed"] = np.zeros((1, 4, TINY.inner_dim), np.float32)  # SD3.5's table: skipped, not an error
    folder = save_sharded(tmp_path / "bad", tensors, TINY.to_diffusers_config())
    with pytest.raises(KeyMismatchError) as e:
        transformer_params_from_folder(folder)
    msg = str(e.value)
    assert "context_embedder.bias" in msg and "proj_out.weight" in msg and "(3, 3)" in msg and "pos_embed.pos_embed" not in msg
