"""LoRA adapters for the Flax MM-DiT: the one home of adapter logic on the JAX side.

A targeted Dense layer W [in, out] gains two variables in the separate collection "lora": `lora_A` [in, r]
(logical axes (W's in axis, None)) and `lora_B` [r, out] ((None, W's out axis)), so they shard over fsdp /
tensor like the kernel, and its output becomes

    y = x W + b + (alpha / r) (x A) B

(Hu et al. 2021; PEFT's `LoraLayer`). A is initialised as PEFT does (kaiming-uniform with a = sqrt(5):
U(-1/sqrt(in), 1/sqrt(in))), B = 0, so at step 0 the model is the base model. Under `nn.scan` the adapter is
stacked per layer like the params ("layers" leading axis). The base params ("params") stay frozen: the trainer
differentiates only the "lora" collection, so only the adapter has optimizer state and EMA.

Targets are module-path patterns matched against the "/"-joined path of each Dense layer without its scan /
block prefix, e.g. "attn/to_q" matches transformer_blocks/attn/to_q and last_block/attn/to_q; fnmatch
wildcards work per path ("ff*/proj_*"); diffusers names ("attn.to_out.0", "ff.net.0.proj") are accepted
too. A pattern that matches no Dense layer of the model is an error naming it.
"""
from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

# diffusers' SD3 LoRA recipes (train_dreambooth_lora_sd3.py): attention q/k/v/out of both streams and both
# feed-forwards, in our Flax names.
DEFAULT_TARGETS = (
    "attn/to_q", "attn/to_k", "attn/to_v", "attn/to_out",
    "attn/add_q_proj", "attn/add_k_proj", "attn/add_v_proj", "attn/to_add_out",
    "ff/proj_in", "ff/proj_out", "ff_context/proj_in", "ff_context/proj_out",
)
# diffusers module-name pieces whose Flax module differs (everything else: "." -> "/").
_DIFFUSERS_PIECES = (("to_out.0", "to_out"), ("net.0.proj", "proj_in"), ("net.2", "proj_out"))
# Top-level modules holding scanned / separate blocks: not part of a target's path.
_BLOCK_PREFIXES = ("transformer_blocks", "last_block")
SPEC_FILE = "lora.json"  # written with a LoRA run's first checkpoint: rank, alpha, targets, base, num_layers


def normalize_target(pattern: str) -> str:
    """A target pattern in our "/" form (diffusers "." names translated)."""
    p = pattern.strip()
    if "/" not in p and "." in p:
        for old, new in _DIFFUSERS_PIECES:
            p = re.sub(rf"(^|\.){re.escape(old)}($|\.)", rf"\g<1>{new}\g<2>", p)
        p = p.replace(".", "/")
    return p


def module_name(path: tuple[str, ...] | str) -> str:
    """A Dense layer's path without its block prefix: ("transformer_blocks", "attn", "to_q") -> "attn/to_q"."""
    parts = path.split("/") if isinstance(path, str) else list(path)
    return "/".join(parts[1:] if parts and parts[0] in _BLOCK_PREFIXES else parts)


@dataclass(frozen=True)
class LoraSpec:
    """rank r > 0, alpha (the update is scaled by alpha / r), targets: patterns in our "/" form."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matches(self, path: tuple[str, ...] | str) -> bool:
        name = module_name(path)
        return any(fnmatch.fnmatchcase(name, t) for t in self.targets)

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}


def spec_from_config(config) -> LoraSpec | None:
    """The run's LoraSpec from config.lora (None when rank is 0 or the config has no lora section)."""
    if "lora" not in config or int(config.lora.rank) == 0:
        return None
    rank = int(config.lora.rank)
    alpha = float(config.lora.alpha) or float(rank)
    return LoraSpec(rank, alpha, tuple(normalize_target(t) for t in config.lora.targets))


class LoRADense(nn.Dense):
    """nn.Dense (same params, same math) plus, when `lora` targets this layer's path, the low-rank update from
    the "lora" collection. kernel_axes: the kernel's logical axes, given to lora_A / lora_B."""

    lora: LoraSpec | None = None
    kernel_axes: tuple[str | None, str | None] = (None, None)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = super().__call__(x)
        if self.lora is None or not self.lora.matches(self.path):
            return y
        fan_in, r = x.shape[-1], self.lora.rank
        # PEFT: kaiming_uniform_(A, a=sqrt(5)) on [r, in] -> U(+-1/sqrt(in)) = variance_scaling(1/3, fan_in, uniform)
        init_a = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0, out_axis=1)
        init_a = nn.with_logical_partitioning(init_a, (self.kernel_axes[0], None))
        init_b = nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, self.kernel_axes[1]))
        # the init functions run only when the adapter is created (an rng is needed then only)
        a = self.variable("lora", "lora_A", lambda: init_a(self.make_rng("params"), (fan_in, r), jnp.float32)).value
        b = self.variable("lora", "lora_B", lambda: init_b(None, (r, self.features), jnp.float32)).value
        dt = y.dtype
        return y + (self.lora.scale * ((x.astype(dt) @ a.astype(dt)) @ b.astype(dt))).astype(dt)


def dense_paths(base_params) -> list[str]:
    """"/"-joined paths of every Dense layer (a module with a 2-D kernel, 3-D when stacked) of a params tree."""
    flat = flax.traverse_util.flatten_dict(nn.meta.unbox(base_params), sep="/")
    out = []
    for key, leaf in flat.items():
        mod, _, name = key.rpartition("/")
        stacked = mod.split("/")[0] == "transformer_blocks"
        if name == "kernel" and len(leaf.shape) == 2 + stacked:
            out.append(mod)
    return out


def check_targets(spec: LoraSpec, base_params) -> list[str]:
    """The Dense paths `spec` adapts; a pattern matching none of the model's Dense layers raises ValueError naming
    it and the layer names there are."""
    paths = dense_paths(base_params)
    names = sorted({module_name(p) for p in paths})
    unmatched = [t for t in spec.targets if not any(fnmatch.fnmatchcase(n, t) for n in names)]
    if unmatched:
        raise ValueError(f"lora.targets {unmatched} match no Dense layer of the model; its Dense layers are {names}")
    return [p for p in paths if spec.matches(p)]


def variables(params, base) -> dict:
    """The model's variables: `params` alone (full training, base None) or base params + adapter."""
    return {"params": params} if base is None else {"params": base, "lora": params}


# ----------------------------------------------------------------------------------------------
# The JSON next to a LoRA run's checkpoints: what export and resume need to know.


def spec_record(spec: LoraSpec, base: str, base_dtype: str, num_layers: int) -> dict[str, Any]:
    """The lora.json of a LoRA run: its spec, base model (path and dtype) and number of blocks."""
    return {**spec.to_json(), "base": str(base), "base_dtype": base_dtype, "num_layers": int(num_layers)}


def check_spec(checkpoint_dir: str | Path, spec: LoraSpec) -> None:
    """A checkpoint dir holding another rank / alpha / targets (its lora.json) is an error: its checkpoints hold a
    differently shaped adapter. A dir without lora.json but with checkpoints holds a full fine-tuning run."""
    from contentv_jax.checkpoint import saved_steps

    path = Path(checkpoint_dir) / SPEC_FILE
    if not path.is_file():
        if Path(checkpoint_dir).is_dir() and saved_steps(checkpoint_dir):
            raise ValueError(f"{checkpoint_dir} holds checkpoints of a full fine-tuning run (no {SPEC_FILE}); "
                             f"a LoRA run needs its own --checkpoint-dir")
        return
    old = read_spec(path.parent)
    if old != spec:
        raise ValueError(f"{path}: this checkpoint dir holds a LoRA adapter of rank {old.rank}, alpha {old.alpha:g}, "
                         f"targets {list(old.targets)}; the run asks for rank {spec.rank}, alpha {spec.alpha:g}, "
                         f"targets {list(spec.targets)}. Use the same lora settings or another --checkpoint-dir")


def read_spec(checkpoint_dir: str | Path) -> LoraSpec:
    record = read_record(checkpoint_dir)
    return LoraSpec(int(record["rank"]), float(record["alpha"]), tuple(record["targets"]))


def read_record(checkpoint_dir: str | Path) -> dict[str, Any]:
    """The lora.json of a LoRA checkpoint dir (rank, alpha, targets, base, base_dtype)."""
    path = Path(checkpoint_dir) / SPEC_FILE
    if not path.is_file():
        raise ValueError(f"{checkpoint_dir}: no {SPEC_FILE}; not the checkpoint dir of a LoRA run "
                         f"(python -m contentv_jax.train --lora-rank R)")
    try:
        record = json.loads(path.read_text())
        int(record["rank"]), float(record["alpha"]), list(record["targets"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a valid LoRA record ({e!r}); expected rank, alpha, targets") from None
    return record


def merge_params(base, adapter, scale: float):
    """Base params with each adapted kernel replaced by W + scale * A B (in W's dtype): the model the adapter makes,
    as plain params in our tree (evaluation sampling, tests; `python -m convert --merge` merges in the torch layout,
    tensor by tensor, with contentv_common.formats.peft_lora.merged_weight). Works on jax and numpy trees; stacked (scanned) layers
    multiply row by row."""
    flat = flax.traverse_util.flatten_dict(base, sep="/")
    for mod, ab in flax.traverse_util.flatten_dict(adapter, sep="/", is_leaf=lambda _, v: "lora_A" in v).items():
        k = flat[f"{mod}/kernel"]
        delta = ab["lora_A"].astype("float32") @ ab["lora_B"].astype("float32")
        flat[f"{mod}/kernel"] = (k.astype("float32") + scale * delta).astype(k.dtype)
    return flax.traverse_util.unflatten_dict(flat, sep="/")


def base_dtype(config):
    from contentv_jax.train import DTYPES

    name = config.lora.base_dtype
    if name not in DTYPES:
        raise ValueError(f"config lora.base_dtype {name!r} unknown; choose one of {sorted(DTYPES)}")
    return DTYPES[name]


def abstract_base(model, preset, mesh, rules, dtype):
    """(abstract base params [unboxed ShapeDtypeStructs in `dtype`], their NamedShardings): the model's "params"
    collection sharded by its logical axis names, as the full trainer shards its params."""
    from contentv_jax import sharding as shd
    from contentv_jax.train import _dummy_inputs

    boxed = jax.eval_shape(lambda r: model.init(r, *_dummy_inputs(preset))["params"], jax.random.PRNGKey(0))
    shardings = shd.logical_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), nn.meta.unbox(boxed))
    return abstract, shardings


def _place(tree, shardings, dtype):
    """A params tree of host / device arrays -> the same tree in `dtype`, each leaf on its sharding of `shardings`."""
    flat_sh = flax.traverse_util.flatten_dict(shardings, sep="/")
    flat = flax.traverse_util.flatten_dict(tree, sep="/")
    return flax.traverse_util.unflatten_dict(
        {k: jax.device_put(jnp.asarray(v, dtype), flat_sh[k]) for k, v in flat.items()}, sep="/")


def load_base(config, model, preset, mesh, rules, *, ckpt=None, base_params=None, log=print):
    """A LoRA run's frozen base params, placed shard by shard in lora.base_dtype: `base_params` (a params tree, for
    programs and tests) or config.init_from (any format `--init-from` reads). Checks the targets against the model
    and the run's Checkpointer `ckpt` dir's lora.json (a resume with another rank, alpha or targets is an error), and
    has `ckpt` write lora.json with its first checkpoint (so a run that fails before one leaves no directory)."""
    from contentv_jax.run import load_init_params

    spec = model.lora
    dtype = base_dtype(config)
    abstract, shardings = abstract_base(model, preset, mesh, rules, dtype)
    adapted = check_targets(spec, abstract)
    if base_params is None and not config.init_from:
        raise ValueError("lora.rank > 0 trains an adapter on a base model: give it with --init-from")
    if ckpt is not None:
        check_spec(ckpt.directory, spec)
        base_name = Path(config.init_from).absolute() if config.init_from else "(base params given by the program)"
        record = spec_record(spec, base_name, config.lora.base_dtype, preset.transformer.num_layers)
        ckpt.sidecars[SPEC_FILE] = json.dumps(record, indent=2) + "\n"
    if base_params is None:
        base = load_init_params(config.init_from, abstract, shardings)
    else:
        base = _place(nn.meta.unbox(base_params), shardings, dtype)
    log(f"LoRA rank {spec.rank} alpha {spec.alpha:g} on {len(adapted)} Dense layers "
        f"({', '.join(sorted({module_name(p) for p in adapted}))}); base {config.lora.base_dtype}, frozen")
    return base


def init_adapter(path: str, state, state_shardings, spec: LoraSpec, num_layers: int):
    """`state` with its adapter (and the adapter's EMA) set from a diffusers / PEFT LoRA file (`--lora-init`):
    continue training an exported or third-party adapter. Its rank, alpha and modules must be the run's."""
    from contentv_common.formats.peft_lora import adapter_from_peft

    want = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(state.params, sep="/").items()}
    adapter = adapter_from_peft(path, want, spec.rank, spec.alpha, num_layers)
    placed = _place(adapter, state_shardings.params, jnp.float32)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=state_shardings.params)
    return state.replace(params=placed, ema_params=copy(placed))
