"""Memory planning: per-device memory of a training step, from XLA's compiled memory analysis.

    python -m benchmarks.memory --mesh data=2,fsdp=128 --shape 125x480x832 --remat full --attention flash \
        --json m.json                                              # contentv-8b, 480p x 125 frames, 256 devices
    python -m benchmarks.memory --mesh data=2,fsdp=32,context=4 --attention ring --json ring.json  # context parallel
    python -m benchmarks.memory --json mem.json                    # the default grid: fsdp 8 / 64 / data 2 x fsdp
                                                                   # 128, remat full / none, the config's attention
    python -m benchmarks.memory --grid full --json mem_full.json   # + smaller shapes, fsdp 128 / 256, save_attention
    python -m benchmarks.memory --model tiny --mesh fsdp=2 --shape 9x32x48 --remat full,none --json s.json  # smoke
    python -m benchmarks.memory --mesh fsdp=8 --shape 125x480x832 --remat full --lora-rank 0,64 --json lora.json
                                                                   # full fine-tuning vs LoRA rank 64, same mesh

Nothing is allocated: the trainer's state (`contentv_jax.train.TrainState`: fp32 params, AdamW moments, EMA) is
`jax.eval_shape`d, given the trainer's shardings (`sharding.logical_shardings`), and the trainer's jitted step
(`train.StepCache`, donation and shardings as in training) is lowered on abstract inputs and compiled for N
virtual CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=N`, set here before JAX is imported). One
row per (shape, mesh, remat policy) with the attention backend of `--attention` (default: the config's; "auto" is
flash on CPU); the per-device batch is `--per-device-batch` (default 1), so the global batch is that times the
mesh's batch shards. Columns (GiB per device):
  state    - the train state's shard on one device, summed from its shardings (params + 2 moments + EMA, fp32),
             plus a LoRA run's frozen base (`--lora-rank R`: the trainer's state is then the adapter, its AdamW
             moments and EMA; the base params, in `--lora-base-dtype`, are a step input), split into
             params (the trained params, or a LoRA run's base), adapter, AdamW (moments) and EMA;
  replicated - the part of `state` in arrays over 1M elements that no mesh axis divides, so every device holds
             them whole (`sharding.replicated_report`; contentv-8b's 2432-wide kernels on fsdp 256: 2432 = 128 x 19);
  args/out/alias/temp - XLA's CompiledMemoryStats; peak = args + out - alias + temp (donated state aliases);
  host temp - XLA's host-memory temporaries (activations a remat policy offloads to pinned_host);
  scores   - one fp32 attention score tensor [B_local, heads, S, S] of one layer (analytic): what the `xla`
             attention backend materialises (several of them); flash / ring / ulysses never do.
Caveats: CPU buffer assignment and fusion differ from GPU/TPU/NPU compilers, and CPU XLA may keep bf16 dot
operands in fp32; treat the numbers as a plan, not a promise. XLA's LLVM optimisation is turned off
(`xla_backend_optimization_level=0`) to halve compile time: buffer assignment happens before it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

DEFAULT_SHAPES = ("125x480x832",)
FULL_SHAPES = ("1x480x832", "29x256x448", "61x256x448", "121x256x448", "61x480x832", "125x480x832")
DEFAULT_MESHES = ("fsdp=8", "fsdp=64", "data=2,fsdp=128")
FULL_MESHES = ("fsdp=8", "fsdp=64", "fsdp=128", "data=2,fsdp=128", "fsdp=256")
DEFAULT_REMATS = ("full", "none")
FULL_REMATS = ("full", "save_attention", "none")
BUDGETS_GIB = {"64GB_npu": 64.0, "80GB_h100": 80.0}
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def parse_shape(text: str) -> tuple[int, int, int]:
    """'125x480x832' -> (frames, height, width) in pixels."""
    parts = text.lower().split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--shape {text!r}: expected FRAMESxHEIGHTxWIDTH in pixels, e.g. 125x480x832")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def mesh_devices(spec: str) -> int:
    """Devices a mesh spec needs: 'data=2,fsdp=128' -> 256 (parsed here: JAX must not be imported yet)."""
    n = 1
    for part in spec.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {spec!r}: expected axis=size pairs with explicit positive sizes, e.g. data=2,fsdp=128")
        n *= int(value)
    return n


def ensure_devices(n: int) -> None:
    """Make JAX see >= n CPU devices: set XLA_FLAGS if JAX is not imported yet, else check the count."""
    if "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        flags = " ".join(f for f in flags.split() if not f.startswith("--xla_force_host_platform_device_count"))
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    if jax.device_count() < n:
        raise RuntimeError(f"the meshes need {n} devices but JAX was already imported with {jax.device_count()}; "
                           f"run `python -m benchmarks.memory` in a fresh process (it sets XLA_FLAGS itself)")


def _state_bytes_per_device(abstract_state, shardings) -> int:
    import jax
    import numpy as np

    total = 0
    for x, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
        total += int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize
    return total


def _tree_bytes_per_device(tree) -> int:
    """Bytes of one device's shards of a tree of ShapeDtypeStructs carrying shardings."""
    import jax
    import numpy as np

    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def measure(model_name: str, shape: tuple[int, int, int], mesh_spec: str, remat: str, per_device_batch: int = 1,
            dtype: str = "bfloat16", attention: str | None = None, lora_rank: int = 0,
            lora_base_dtype: str = "bfloat16") -> dict:
    """Compile one training step on abstract inputs and return its per-device memory (see the module doc)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from contentv_common.config import get_preset
    from contentv_jax import configs as configs_lib
    from contentv_jax import lora as lora_lib
    from contentv_jax import sharding as shd
    from contentv_jax import train as tr
    from contentv_jax.data import BATCH_KEYS, Bucket
    from contentv_jax.optim import make_optimizer

    preset = get_preset(model_name)
    config = configs_lib.get_config(model_name)
    with config.unlocked():
        config.remat_policy, config.dtype = remat, dtype
        config.attention_impl = attention or config.attention_impl
        config.lora.rank, config.lora.base_dtype = lora_rank, lora_base_dtype
    mesh = shd.create_mesh(mesh_spec, devices=jax.devices()[: mesh_devices(mesh_spec)])
    model = tr.build_model(config, preset)
    tx = make_optimizer(config.optim, config.steps)

    # the trainer's state, abstractly (train.create_train_state steps 1-2, nothing allocated)
    # (LoRA: the state is the adapter's; the frozen base is a step input, as contentv_jax.train passes it)
    lora = model.lora is not None
    boxed = jax.eval_shape(tr.train_state_init(model, tx, preset, "lora" if lora else "params"), jax.random.PRNGKey(0))
    shardings = shd.logical_shardings(boxed, mesh)
    state = tr.abstract_with_shardings(nn.meta.unbox(boxed), shardings)
    base_args = ()
    if lora:
        base, base_shardings = lora_lib.abstract_base(model, preset, mesh, shd.DEFAULT_RULES, lora_lib.base_dtype(config))
        base_args = (tr.abstract_with_shardings(base, base_shardings),)

    frames, height, width = shape
    t, h, w, c = Bucket(frames, height, width, 1).latent_shape(preset)
    batch = per_device_batch * shd.batch_divisor(mesh)
    L = preset.text.context_tokens
    cfg = preset.transformer
    shapes = {"latents": (batch, t, h, w, c), "context": (batch, L, cfg.joint_attention_dim),
              "pooled": (batch, cfg.pooled_projection_dim)}
    null_text = (np.zeros((L, cfg.joint_attention_dim), np.float32), np.zeros((cfg.pooled_projection_dim,), np.float32))
    # The trainer's step, caption dropout included (only the empty prompt's shapes matter here).
    cache = tr.StepCache(tr.make_train_step(model, tx, config, cfg.patch_size, null_text), shardings, mesh)
    abstract_batch = {n: jax.ShapeDtypeStruct(shapes[n], jnp.float32, sharding=shd.batch_sharding(mesh, len(shapes[n])))
                      for n in BATCH_KEYS}

    t0 = time.perf_counter()
    # The trainer's own jit (shardings, donation); LLVM optimisation off: buffer assignment happens before it.
    compiled = cache.lower(state, abstract_batch, *base_args).compile(FAST_COMPILE)
    compile_s = time.perf_counter() - t0
    m = compiled.memory_analysis()
    gib = float(1 << 30)
    tokens = cfg.video_tokens((t, h, w))
    seq = tokens + L
    row = {
        "model": model_name, "shape": f"{frames}x{height}x{width}", "latent": f"{t}x{h}x{w}", "mesh": mesh_spec,
        "devices": mesh.size, "remat": remat, "attention": config.attention_impl, "dtype": dtype, "global_batch": batch, "per_device_batch": per_device_batch,
        "video_tokens": tokens, "seq_len": seq,
        "lora_rank": lora_rank, "base_dtype": lora_base_dtype if lora else "float32",
        "state_gib": (_state_bytes_per_device(state, shardings) + sum(map(_tree_bytes_per_device, base_args))) / gib,
        "params_gib": _tree_bytes_per_device(base_args[0] if lora else state.params) / gib,
        "adapter_gib": _tree_bytes_per_device(state.params) / gib if lora else 0.0,
        "adamw_gib": _tree_bytes_per_device(state.opt_state) / gib,
        "ema_gib": _tree_bytes_per_device(state.ema_params) / gib,
        "replicated_gib": sum(b for _, _, b in shd.replicated_report(boxed, shardings)) / gib,
        "args_gib": m.argument_size_in_bytes / gib, "out_gib": m.output_size_in_bytes / gib,
        "alias_gib": m.alias_size_in_bytes / gib, "temp_gib": m.temp_size_in_bytes / gib,
        "host_temp_gib": m.host_temp_size_in_bytes / gib,
        "scores_gib": per_device_batch * cfg.num_attention_heads * seq * seq * 4 / gib,
        "compile_s": compile_s,
    }
    row["peak_gib"] = row["args_gib"] + row["out_gib"] - row["alias_gib"] + row["temp_gib"]
    for name, budget in BUDGETS_GIB.items():
        row[f"fits_{name}"] = row["peak_gib"] <= budget
    return row


COLUMNS = [("shape", "frames x H x W"), ("mesh", "mesh"), ("attention", "attention"), ("remat", "remat"),
           ("lora_rank", "LoRA rank"), ("global_batch", "batch"), ("seq_len", "seq"), ("params_gib", "params GiB"),
           ("adapter_gib", "adapter GiB"), ("adamw_gib", "AdamW GiB"), ("ema_gib", "EMA GiB"), ("state_gib", "state GiB"),
           ("replicated_gib", "replicated GiB"), ("temp_gib", "temp GiB"), ("host_temp_gib", "host temp GiB"),
           ("peak_gib", "peak GiB"), ("scores_gib", "1 score tensor GiB"), ("fits_64GB_npu", "fits 64 GB"),
           ("fits_80GB_h100", "fits 80 GB"), ("compile_s", "compile s")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="contentv-8b", help="preset name (contentv-8b, small, tiny)")
    ap.add_argument("--grid", choices=("default", "full"), default="default",
                    help="default: 480p x 125 frames on fsdp 8 / 64 / data 2 x fsdp 128, remat full / none; "
                         "full: more shapes, meshes (fsdp 128, 256) and remat policies (an hour or more here)")
    ap.add_argument("--shape", action="append", help="FRAMESxHEIGHTxWIDTH pixels (repeatable; overrides the grid's)")
    ap.add_argument("--mesh", action="append", help="mesh spec, e.g. fsdp=64 or data=2,fsdp=128 (repeatable)")
    ap.add_argument("--remat", default=None, help="comma-separated remat policies (contentv_jax.transformer.REMAT_CHOICES)")
    ap.add_argument("--per-device-batch", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="compute dtype")
    ap.add_argument("--attention", default=None, help="attention backend (contentv_jax.attention.ATTENTION_IMPLS: "
                    "flash, xla, ring, ulysses, ...; default: the config's, auto = flash on CPU)")
    ap.add_argument("--lora-rank", default="0", help="comma-separated LoRA ranks, one row each (0 = full "
                    "fine-tuning; R > 0: rank-R adapters on the default targets over a frozen base)")
    ap.add_argument("--lora-base-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                    help="dtype of a LoRA run's frozen base (default bfloat16)")
    ap.add_argument("--json", type=str, default=None, help="write the rows + machine facts here (atomically)")
    args = ap.parse_args(argv)

    full = args.grid == "full"
    try:
        shapes = [parse_shape(s) for s in (args.shape or (FULL_SHAPES if full else DEFAULT_SHAPES))]
        meshes = list(args.mesh or (FULL_MESHES if full else DEFAULT_MESHES))
        remats = args.remat.split(",") if args.remat else list(FULL_REMATS if full else DEFAULT_REMATS)
        need = max(mesh_devices(m) for m in meshes)
        ranks = [int(r) for r in args.lora_rank.split(",")]
        if any(r < 0 for r in ranks):
            raise ValueError(f"--lora-rank {args.lora_rank!r}: ranks must be >= 0")
        if args.per_device_batch < 1:
            raise ValueError("--per-device-batch must be >= 1")
    except ValueError as e:
        ap.error(str(e))
    ensure_devices(need)

    from tqdm.auto import tqdm

    from benchmarks.common import machine_info, markdown_table, write_json

    from contentv_jax.attention import ATTENTION_IMPLS
    from contentv_jax.transformer import REMAT_CHOICES

    bad = [r for r in remats if r not in REMAT_CHOICES]
    if bad:
        ap.error(f"--remat {bad} unknown; choose from {list(REMAT_CHOICES)}")
    if args.attention is not None and args.attention not in ATTENTION_IMPLS:
        ap.error(f"--attention {args.attention!r} unknown; choose from {sorted(ATTENTION_IMPLS)}")
    rows = []
    for s, m, r, k in tqdm([(s, m, r, k) for s in shapes for m in meshes for r in remats for k in ranks], desc="compile"):
        row = measure(args.model, s, m, r, args.per_device_batch, args.dtype, args.attention, k, args.lora_base_dtype)
        rows.append(row)
        tqdm.write(f"{row['shape']} {m} {row['attention']} remat={r} lora={k}: peak {row['peak_gib']:.1f} GiB/device "
                   f"(state {row['state_gib']:.1f}, temp {row['temp_gib']:.1f}), compiled in {row['compile_s']:.0f} s")
    print(f"\nper-device memory of a {args.model} training step ({args.dtype} compute, fp32 state), "
          f"XLA compiled memory analysis on {need} virtual CPU devices\n")
    print(markdown_table(rows, COLUMNS))
    if args.json:
        write_json(args.json, {"benchmark": "memory", "argv": sys.argv[1:] if argv is None else argv,
                               "machine": machine_info(), "rows": rows})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
