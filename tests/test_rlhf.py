"""RLHF (contentv_jax/rlhf.py) on the tiny preset with a tiny random CLIP reward and a diffusers-saved Wan VAE."""
from __future__ import annotations

import json

import numpy as np
import pytest

STEPS, EVAL_EVERY = 30, 10


def _config(**rlhf):
    from contentv_jax import configs as configs_lib
    from contentv_jax.rlhf import get_config

    c = get_config("tiny")
    # Small clips: 5 frames (2 latent frames) of 32 x 48 for the rollouts and the SFT batches.
    configs_lib.apply_overrides(c, ["data.buckets=[(5, 32, 48, 4)]", "rlhf.frames=5", "rlhf.height=32", "rlhf.width=48"])
    c.unlock()
    for k, v in rlhf.items():
        c.rlhf[k] = v
    c.lock()
    return c


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(reward, reward params) of a tiny transformers CLIPModel folder and a diffusers AutoencoderKLWan folder."""
    from contentv_common.config import get_preset
    from contentv_jax.reward import CLIPReward
    from tests.test_clip import make_tiny_clip_folder
    from tests.tiny_models import _write_vae

    root = tmp_path_factory.mktemp("rlhf")
    clip = make_tiny_clip_folder(root / "clip", seed=3, max_positions=32)  # room for "synthetic caption 12"
    _write_vae(root, get_preset("tiny"), seed=0)  # root/vae: AutoencoderKLWan(...).save_pretrained
    return {"reward": CLIPReward.from_folder(clip), "vae": str(root / "vae"), "root": root}


def test_rlhf_gradient_paths(parts):
    """The reward gradient reaches every DiT parameter group through the one sampler step with gradients and
    the (rematerialised) VAE decode, finite; the frozen VAE and reward parameters get exactly zero although
    the loss depends on them."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from contentv_common.config import get_preset
    from contentv_jax.data import make_source
    from contentv_jax.rlhf import PromptSet, load_vae, make_objective
    from contentv_jax.train import _dummy_inputs, build_model

    config = _config(vae=parts["vae"], decode_remat=True, batch=2, guidance=3.0)  # CFG path in rollout and grad step
    preset = get_preset("tiny")
    reward, reward_params = parts["reward"]
    prompts = PromptSet.from_source(make_source(config, preset), 16)
    model = build_model(config, preset)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), *_dummy_inputs(preset)))["params"]
    vae, vae_params = load_vae(config.rlhf, preset, 0)
    assert set(vae_params) == {"post_quant_conv", "decoder"}
    obj = make_objective(config, preset, model, vae, reward, prompts)
    batch = {k: jnp.asarray(v) for k, v in prompts.batch([0, 5], reward).items()}
    frozen = {"vae": vae_params, "reward": reward_params}

    loss_and_grads = jax.jit(jax.value_and_grad(lambda p, f, rng: obj.loss(p, f, batch, rng)[0], argnums=(0, 1)))
    rng = jax.random.PRNGKey(4)
    loss, (g_dit, g_frozen) = loss_and_grads(params, frozen, rng)
    assert np.isfinite(float(loss))
    for group, g in g_dit.items():
        leaves = [np.asarray(x) for x in jax.tree.leaves(g)]
        assert all(np.isfinite(x).all() for x in leaves), group
        norm = float(np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in leaves)))
        assert norm > 0, f"no reward gradient reaches {group}"
    assert all(not np.asarray(x).any() for x in jax.tree.leaves(g_frozen)), "gradient leaked into frozen params"
    # ... and the zeros are the stop-gradient's doing, not a disconnected graph: the loss moves with each.
    f_reward = {**frozen, "reward": {**reward_params, "logit_scale": np.asarray(reward_params["logit_scale"]) + 0.5}}
    f_vae = {**frozen, "vae": jax.tree.map(lambda x: x * 1.1, vae_params)}
    for other in (f_reward, f_vae):
        assert abs(float(loss_and_grads(params, other, rng)[0]) - float(loss)) > 1e-6


def test_rlhf_raises_heldout_reward(parts, tmp_path):
    """A short RLHF run (2 devices, fsdp=2): the held-out reward of full samples rises while the flow-matching
    loss of a fixed SFT batch does not rise; metrics and checkpoints go through the trainer's code."""
    import jax

    from contentv_jax import sharding as shd
    from contentv_jax.checkpoint import Checkpointer
    from contentv_jax.rlhf import rlhf

    config = _config(vae=parts["vae"], eval_every=EVAL_EVERY, lam=2.0)
    config.unlock()
    config.steps, config.log_every, config.checkpoint_every = STEPS, 5, STEPS
    config.optim.lr = 2e-3
    config.lock()
    mesh = shd.create_mesh("fsdp=2", jax.devices()[:2])
    metrics = tmp_path / "metrics.jsonl"
    out = rlhf(config, mesh=mesh, checkpoint_dir=str(tmp_path / "ckpt"), metrics_file=str(metrics), reward=parts["reward"])
    ev, hist = out["evals"], out["history"]
    print("evals", json.dumps(ev, indent=1))
    assert [e["step"] for e in ev] == list(range(0, STEPS + 1, EVAL_EVERY))
    assert all(np.isfinite(list(h.values())).all() for h in hist)
    r0, r1 = ev[0]["reward_heldout"], ev[-1]["reward_heldout"]
    f0, f1 = ev[0]["fm_loss_eval"], ev[-1]["fm_loss_eval"]
    assert r1 > r0 + 0.05, f"held-out reward did not rise: {r0:.4f} -> {r1:.4f}"
    # The regulariser holds the SFT objective: from this random-init DiT it even falls (2.63 -> ~2.0 measured);
    # without it (rlhf.fm_every=0) the same run took it from 2.63 to 6.0 while the reward climbed to 4.1.
    assert f1 < 1.1 * f0, f"FM loss rose: {f0:.4f} -> {f1:.4f}"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert {"reward", "fm_loss", "grad_norm", "reward_heldout", "fm_loss_eval"} <= set().union(*records)
    ckpt = Checkpointer(tmp_path / "ckpt")
    try:
        assert ckpt.latest_step() == STEPS
    finally:
        ckpt.close()


def test_prompt_file(tmp_path):
    """--prompts: `contentv_torch.encode_prompts` encodes each line once with the folder's CLIP-L / bigG / T5 (the
    DiT's conditioning) and the empty prompt as the CFG negative into a safetensors file that RLHF reads without
    torch; the held-out split takes the last lines."""
    from contentv_common.config import get_preset
    from contentv_jax.rlhf import PromptSet
    from contentv_torch.encode_prompts import main as encode_prompts_main
    from tests.tiny_models import make_tiny_contentv_folder

    t = get_preset("tiny").text
    folder = make_tiny_contentv_folder(tmp_path / "model")
    lines = ["a red car on the street", "", "a bird flying over the sea", "the city at night", "a big dog"]
    (tmp_path / "prompts.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "prompts.safetensors"
    assert encode_prompts_main(["--model", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                                "--output", str(out)]) == 0
    ps = PromptSet.from_file(out)
    assert ps.prompts == [p for p in lines if p]
    assert ps.context.shape == (4, t.context_tokens, t.t5_hidden) and ps.pooled.shape == (4, t.pooled_dim)
    assert ps.negative_context.shape == (t.context_tokens, t.t5_hidden) and ps.negative_pooled.shape == (t.pooled_dim,)
    assert np.isfinite(ps.context).all() and not np.allclose(ps.context[0], ps.context[1])
    assert not np.allclose(ps.negative_pooled, ps.pooled[0])
    with pytest.raises(ValueError, match="encode_prompts"):  # the old text file is refused, naming the tool
        PromptSet.from_file(tmp_path / "prompts.txt")
    train, held = ps.split(1)
    assert held.prompts == ["a big dog"] and len(train.prompts) == 3
    with pytest.raises(ValueError, match="num_heldout"):
        ps.split(4)
