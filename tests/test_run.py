"""The run skeleton shared by the trainer and RLHF (contentv_jax/run.py): resume policy, non-finite guard, the
compiled-step cache over any step arguments, the sharding-rules config field, and both CLIs' handling of it."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contentv_common.cli import UsageError
from contentv_jax import configs
from contentv_jax import sharding as shd
from contentv_jax.checkpoint import Checkpointer
from contentv_jax.run import NonFiniteError, NonFiniteGuard, StepCache, resume_step


def test_resume_policy(tmp_path):
    assert resume_step("auto", None) is None and resume_step("no", None) is None
    with pytest.raises(UsageError, match="needs --checkpoint-dir"):
        resume_step("5", None)
    with pytest.raises(UsageError, match="expected auto, no or a step"):
        resume_step("latest", None)
    ckpt = Checkpointer(tmp_path / "ckpt", every=1, async_save=False)
    ckpt.save(3, {"x": np.zeros(2)}, {"index": 3}, force=True)
    assert resume_step("auto", ckpt) == 3 and resume_step("3", ckpt) == 3
    with pytest.raises(UsageError, match="already holds step 3"):
        resume_step("no", ckpt)  # closes the checkpointer: the run never starts


def test_nonfinite_guard_checks_every_step_one_behind():
    guard = NonFiniteGuard(3, None)
    for step, count in enumerate([0, 1, 2], start=1):
        guard.after_step(step, jnp.int32(count))  # step 3's count (2) is still pending
    guard.after_step(4, jnp.int32(3))  # checks step 3: 2 < 3
    with pytest.raises(NonFiniteError, match=r"step 4: 3 consecutive non-finite.*max_nonfinite=3.*none"):
        guard.flush()
    assert NonFiniteError.exit_code == 3


def test_step_cache_compiles_once_per_argument_shape_and_tree():
    mesh = shd.create_mesh("data=1", jax.devices()[:1])
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def step(state, x, extra):
        total = state + x.sum() + (0.0 if extra is None else extra.sum())
        return total, {"total": total}

    cache = StepCache(step, replicated, mesh)
    put = lambda a: jax.device_put(np.asarray(a, np.float32), replicated)  # noqa: E731
    state, m = cache(put(0.0), put(np.ones(2)), None)
    state, m = cache(state, put(np.ones(2)), None)
    assert cache.compiles == 1 and float(m["total"]) == 4.0
    state, m = cache(state, put(np.ones(2)), put(np.ones(3)))  # another argument tree: its own compile
    state, m = cache(state, put(np.ones(4)), None)  # another shape
    assert cache.compiles == 3 and float(m["total"]) == 13.0


def test_sharding_rules_are_a_validated_config_field():
    c = configs.get_config("tiny")
    assert shd.rules_from_config(c) == shd.DEFAULT_RULES
    configs.apply_overrides(c, ["sharding_rules=" + repr(tuple((n, None) for n, _ in shd.DEFAULT_RULES))])
    assert all(t is None for _, t in shd.rules_from_config(c))  # a fully replicated layout, no code edit
    for bad, match in [((("embed", "fsdp", 1),), "not a"), ((("nope", None),), "unknown logical"),
                       ((("layers", "gpu"),) + shd.DEFAULT_RULES[1:], "unknown mesh axes"),
                       (shd.DEFAULT_RULES + shd.DEFAULT_RULES[:1], "repeated")]:
        c.unlock()
        c.sharding_rules = bad
        with pytest.raises(ValueError, match=match):
            shd.rules_from_config(c)


@pytest.mark.parametrize("cli", ["train", "rlhf"])
@pytest.mark.parametrize("argv, message", [
    (["--resume", "5"], "needs --checkpoint-dir"),
    (["--config", "tiny/nope"], "unknown stage"),
])
def test_both_clis_share_config_and_resume_rules(cli, argv, message, capsys):
    """`--config <model>[/<stage>]` and `--resume` mean the same in both CLIs; errors exit 2 with one line."""
    from contentv_jax import rlhf, train

    main = {"train": train.cli, "rlhf": rlhf.cli}[cli]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and f"python -m contentv_jax.{cli}: error:" in err


def test_rlhf_config_is_a_stage():
    c = configs.get_config("tiny/rlhf", stages=("rlhf",))
    assert c.stage == "rlhf" and "rlhf" in c and c.max_nonfinite == 20
    with pytest.raises(ValueError, match="unknown stage"):
        configs.get_config("tiny/rlhf")  # the trainer's stages
