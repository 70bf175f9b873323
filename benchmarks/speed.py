"""Speed side by side with the references, measured in one run on this machine.

    python -m benchmarks.speed --json speed.json                  # default sizes: a few minutes on 2 CPU cores
    python -m benchmarks.speed --sizes full --json speed_full.json  # + the small preset and an 8B-wide 2-layer model
    python -m benchmarks.speed --sizes smoke --json s.json          # seconds: what the tests run

Training step (forward + backward + optimizer update), per case (model size, latent T x h x w, batch):
  jax   - our trainer: `contentv_jax.train` state / `make_train_step` / `StepCache` (fp32, AdamW + clipping + EMA,
          one device), with the flow-matching loss of `contentv_jax.flow`;
  torch - the reference: the diffusers SD3 transformer with the ContentV video patch embed (`tests/reference.py`),
          the same loss (logit-normal sigmas, v = eps - x0), `clip_grad_norm_`, `torch.optim.AdamW` and an EMA.
  The two frameworks' steps alternate (jax, torch, jax, ...) so machine load hits both alike. Model FLOPs come from
  `contentv_jax.metrics.train_step_flops` (3x the forward's matmul FLOPs); `frac_peak` = achieved FLOP/s / this
  machine's measured fp32 matmul FLOP/s in the same framework (`common.torch_matmul_peak` / `jax_matmul_peak`).
Attention (--only attention): forward + backward (dq, dk, dv for a random cotangent) of each JAX backend named by
  --attention (default xla, flash; flash:BQ:BKV for given blocks) against torch `scaled_dot_product_attention`,
  fp32, B=1, 8 heads x 64, at --attention-seq tokens (default 1,613 = the `small` 5x32x32 joint sequence, 4,096),
  calls alternating; the train step runs once per --attention backend, all alternating with the torch step.
Sampling (classifier-free guidance, the scheduler's shifted sigmas), same weights and inputs for all:
  ours_torch - `contentv_torch.pipeline.denoise` over `ContentVTransformer3DModel`;
  reference  - the released ContentV pipeline's loop: `FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=
               linspace(1, 0, N + 1)[:-1])` (the "contentv" sigma grid, every sampler's default) + the reference
               transformer;
  ours_jax   - `contentv_jax.sampler.make_sampler` (one jitted lax.scan over the steps) over our Flax DiT.
  Each runs in its own subprocess (clean peak memory): seconds per denoising step and the peak RSS the loop added
  over the loaded models; rel_err of the final latents against the reference.
Timings on a shared CPU are noisy: the JSON keeps every repeat and the load average.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np

from benchmarks.common import (RSSPeak, jax_matmul_peak, load_reference_module, machine_info, markdown_table,
                               rel_err, torch_matmul_peak, write_json)
from contentv_common.config import PRESETS, TextConfig, TransformerConfig


# ------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class ModelSize:
    """A benchmarked MM-DiT: its transformer config and the text widths / lengths feeding it."""

    name: str
    transformer: TransformerConfig
    text: TextConfig


def model_sizes() -> dict[str, ModelSize]:
    eight_b = PRESETS["contentv-8b"]
    return {
        "tiny": ModelSize("tiny", PRESETS["tiny"].transformer, PRESETS["tiny"].text),
        # Two 128-wide layers: cheap enough to reach a few thousand tokens, where attention's S^2 shows.
        "narrow": ModelSize("narrow", TransformerConfig(
            num_layers=2, num_attention_heads=2, attention_head_dim=64, joint_attention_dim=128,
            caption_projection_dim=128, pooled_projection_dim=128, sample_size=32, pos_embed_max_size=32),
            TextConfig(clip_l_hidden=32, clip_g_hidden=32, clip_l_projection=64, clip_g_projection=64,
                       t5_hidden=128, clip_max_tokens=16, t5_max_tokens=16)),
        "small": ModelSize("small", PRESETS["small"].transformer, PRESETS["small"].text),
        # The real width (38 heads x 64) and text, two layers: per-layer cost of the 8B model.
        "8b-width-2l": ModelSize("8b-width-2l", dataclasses.replace(eight_b.transformer, num_layers=2), eight_b.text),
    }


@dataclass(frozen=True)
class Case:
    """One benchmark shape: model, batch, latent frames T and latent height / width (latent pixels)."""

    model: str
    batch: int
    t: int
    h: int
    w: int

    def tokens(self, patch: int) -> int:
        return self.t * (self.h // patch) * (self.w // patch)


# (train cases, sampling cases, sampling steps) per --sizes.
SIZES: dict[str, tuple[list[Case], list[Case], int]] = {
    "smoke": ([Case("tiny", 2, 2, 8, 12)], [Case("tiny", 1, 2, 8, 12)], 2),
    "default": (
        [Case("tiny", 2, 3, 8, 12)]
        # frames: 1, 2, 4, 8 latent frames at 32 x 32 latents (256 tokens per frame)
        + [Case("narrow", 1, t, 32, 32) for t in (1, 2, 4, 8)]
        # resolution: 4 latent frames at 16^2, 32^2 (above), 48^2 latents
        + [Case("narrow", 1, 4, s, s) for s in (16, 48)],
        [Case("narrow", 1, 4, 24, 32)],
        4,
    ),
    "full": (
        [Case("tiny", 2, 3, 8, 12)]
        + [Case("narrow", 1, t, 32, 32) for t in (1, 2, 4, 8, 16)]
        + [Case("narrow", 1, 4, s, s) for s in (16, 48, 64)]
        + [Case("small", 1, t, 16, 16) for t in (1, 3, 5)]
        + [Case("8b-width-2l", 1, 2, 16, 16)],
        [Case("narrow", 1, 4, 24, 32), Case("small", 1, 3, 16, 16)],
        4,
    ),
}


SMOKE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def make_inputs(size: ModelSize, case: Case, seed: int) -> dict[str, np.ndarray]:
    """Random fp32 inputs, torch layout: latents [B, C, T, h, w], context [B, L, J], pooled [B, P], and negatives."""
    cfg, rng = size.transformer, np.random.default_rng(seed)
    b, L = case.batch, size.text.context_tokens

    def n(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    return {"latents": n(b, cfg.in_channels, case.t, case.h, case.w), "context": n(b, L, cfg.joint_attention_dim),
            "pooled": n(b, cfg.pooled_projection_dim), "neg_context": n(b, L, cfg.joint_attention_dim),
            "neg_pooled": n(b, cfg.pooled_projection_dim)}


# ------------------------------------------------------------------------------------ training step
def jax_train_step(size: ModelSize, inputs: dict, seed: int = 0, dtype: str = "float32", remat: str = "none",
                   attention: str = "xla", compiler_options: dict | None = None):
    """Our trainer's step on one device (compute `dtype`, fp32 params) -> (step() running one step and returning
    its metrics to block on, info {"compile_s", "temp_bytes", "params"}). compiler_options go to XLA (smoke runs
    turn LLVM optimisation off: faster compiles, slower steps)."""
    import jax

    from contentv_common.config import ModelPreset, VAEConfig
    from contentv_jax import configs as configs_lib
    from contentv_jax import sharding as shd
    from contentv_jax import train as tr
    from contentv_jax.optim import make_optimizer

    preset = ModelPreset(size.name, size.transformer, VAEConfig(), size.text)
    config = configs_lib.get_config("tiny")
    with config.unlocked():
        config.dtype, config.remat_policy, config.attention_impl = dtype, remat, attention
        config.flow.shift_mode, config.flow.shift, config.optim.grad_accum = "fixed", 1.0, 1
    mesh = shd.create_mesh("fsdp=1", devices=jax.devices()[:1])
    model = tr.build_model(config, preset)
    tx = make_optimizer(config.optim, config.steps)
    state, shardings = tr.create_train_state(model, tx, preset, mesh, seed)
    step_fn = tr.make_train_step(model, tx, config, size.transformer.patch_size)
    cache = tr.StepCache(step_fn, shardings, mesh, compiler_options=compiler_options)
    batch = tr.place_batch({"latents": inputs["latents"].transpose(0, 2, 3, 4, 1), "context": inputs["context"],
                            "pooled": inputs["pooled"]}, mesh)
    holder = {"state": state}

    def step():
        holder["state"], metrics = cache(holder["state"], batch)
        return metrics

    t0 = time.perf_counter()
    jax.block_until_ready(step())  # compile + first step
    compile_s = time.perf_counter() - t0
    (compiled,) = cache.compiled.values()
    mem = compiled.memory_analysis()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(holder["state"].params))
    return step, {"compile_s": compile_s, "temp_bytes": getattr(mem, "temp_size_in_bytes", None), "params": n_params}


def torch_train_step(size: ModelSize, inputs: dict, seed: int = 0, device: str = "cpu", autocast=None, ref=None):
    """The reference's training step: diffusers SD3 transformer + ContentV patch embed, the same flow-matching loss,
    clip_grad_norm_(1.0), torch AdamW (lr 1e-3, betas (0.9, 0.99), wd 0.01) and an EMA (decay 0.99) -> (step, info).
    fp32 parameters; `autocast` (e.g. torch.bfloat16) runs the forward / backward under torch.autocast.
    `ref`: an already built reference module (else built from `size`, seed)."""
    import contextlib

    import torch

    if ref is None:
        ref = load_reference_module().reference_transformer(size.transformer, seed)
    ref = ref.to(device).train()
    amp = (lambda: torch.autocast(torch.device(device).type, dtype=autocast)) if autocast else contextlib.nullcontext
    forward = type(ref).forward.__wrapped__  # the reference forward without its @torch.no_grad()
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    dt = params[0].dtype
    x0 = torch.from_numpy(inputs["latents"]).to(device, dt)
    ctx = torch.from_numpy(inputs["context"]).to(device, dt)
    pooled = torch.from_numpy(inputs["pooled"]).to(device, dt)
    g = torch.Generator(device).manual_seed(seed)

    def step():
        s = torch.sigmoid(torch.randn(x0.shape[0], generator=g, device=device))  # logit-normal(0, 1), shift 1
        eps = torch.randn(x0.shape, generator=g, device=device, dtype=dt)
        sb = s.view(-1, 1, 1, 1, 1).to(dt)
        with amp():
            pred = forward(ref, (1 - sb) * x0 + sb * eps, ctx, pooled, s * 1000)
        loss = torch.nn.functional.mse_loss(pred.float(), (eps - x0).float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - 0.99)
        return loss

    return step, {"params": sum(p.numel() for p in params)}


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time each (fn, sync) once per round, `repeats` rounds, in turn: {name: [seconds, ...]}."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, (fn, sync) in fns.items():
            t0 = time.perf_counter()
            sync(fn())
            times[name].append(time.perf_counter() - t0)
    return times


def bench_train(case: Case, peaks: dict, repeats: int, seed: int = 0, compiler_options: dict | None = None,
                attentions: tuple[str, ...] = ("xla",)) -> list[dict]:
    """One row per JAX attention backend in `attentions`: our step with that backend against the reference step,
    all steps alternating in one loop (the torch times are shared by the rows)."""
    import jax
    import torch

    from contentv_jax.metrics import train_step_flops

    size = model_sizes()[case.model]
    cfg = size.transformer
    inputs = make_inputs(size, case, seed)
    jax_steps = {att: jax_train_step(size, inputs, seed, attention=att, compiler_options=compiler_options)
                 for att in attentions}
    tstep, tinfo = torch_train_step(size, inputs, seed)
    tstep()  # warm-up (allocator, AdamW state creation)
    fns = {att: (step, jax.block_until_ready) for att, (step, _) in jax_steps.items()}
    fns["torch"] = (tstep, lambda r: r.item())
    times = alternate(fns, repeats)
    flops = train_step_flops(cfg, (case.t, case.h, case.w), size.text.context_tokens, case.batch)
    tokens = case.batch * case.tokens(cfg.patch_size)
    rows = []
    for att, (_, jinfo) in jax_steps.items():
        row = {"model": case.model, "attention": att, "params": jinfo["params"], "torch_params": tinfo["params"],
               "batch": case.batch, "latent": f"{case.t}x{case.h}x{case.w}", "video_tokens": tokens,
               "seq_len": case.tokens(cfg.patch_size) + size.text.context_tokens, "step_gflop": flops / 1e9,
               "jax_compile_s": jinfo["compile_s"],
               "jax_temp_mib": None if jinfo["temp_bytes"] is None else jinfo["temp_bytes"] / 2**20,
               "times_s": {"jax": times[att], "torch": times["torch"]}}
        for fw, ts in row["times_s"].items():
            s = float(np.median(ts))
            row[f"{fw}_s"] = s
            row[f"{fw}_tokens_per_s"] = tokens / s
            row[f"{fw}_gflops"] = flops / s / 1e9
            row[f"{fw}_frac_peak"] = flops / s / peaks[fw]
        row["torch_over_jax"] = row["torch_s"] / row["jax_s"]
        row["torch_over_jax_min"] = min(times["torch"]) / min(times[att])  # best-of-repeats: less load noise
        rows.append(row)
    del jax_steps, fns, tstep
    gc.collect()
    jax.clear_caches()
    torch.set_grad_enabled(True)
    return rows


# ----------------------------------------------------------------------------------------- attention
def parse_attention_impl(spec: str):
    """"NAME" (a contentv_jax.attention backend) or "flash:BQ:BKV" (flash with these blocks) -> fn(q, k, v)."""
    from contentv_jax import attention as A

    name, *blocks = spec.split(":")
    if name not in A.ATTENTION_IMPLS or (blocks and (name != "flash" or len(blocks) != 2)):
        raise ValueError(f"attention impl {spec!r}: expected one of {sorted(A.ATTENTION_IMPLS)} or flash:BQ:BKV")
    if blocks:
        bq, bkv = map(int, blocks)
        return lambda q, k, v: A.flash_attention(q, k, v, block_q=bq, block_kv=bkv)
    return lambda q, k, v: A.attention(q, k, v, name)


def bench_attention(seq: int, impls: list[str], repeats: int, heads: int = 8, head_dim: int = 64, batch: int = 1,
                    seed: int = 0, compiler_options: dict | None = None) -> list[dict]:
    """Attention forward + backward (the gradients of q, k, v for a random output cotangent), fp32, q = k = v
    length `seq`, per JAX backend in `impls`, against torch `scaled_dot_product_attention` in the same run (calls
    alternate). One row per JAX impl: seconds, the ratio to torch, rel_err of the output and dq against torch."""
    import jax
    import torch

    rng = np.random.default_rng(seed)
    q, k, v, do = (rng.standard_normal((batch, seq, heads, head_dim)).astype(np.float32) for _ in range(4))
    tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_() for x in (q, k, v))
    tdo = torch.from_numpy(do.transpose(0, 2, 1, 3).copy())  # torch layout [B, N, S, D]

    def torch_step():
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
        return (o, *torch.autograd.grad(o, (tq, tk, tv), tdo))

    fns, compile_s = {"torch": (torch_step, lambda r: r)}, {}
    for spec in impls:
        fn = parse_attention_impl(spec)
        step = jax.jit(lambda q, k, v, do, fn=fn: (lambda o, vjp: (o, *vjp(do)))(*jax.vjp(fn, q, k, v)))
        t0 = time.perf_counter()
        compiled = step.lower(q, k, v, do).compile(compiler_options)
        args = [jax.device_put(x) for x in (q, k, v, do)]
        jax.block_until_ready(compiled(*args))
        compile_s[spec] = time.perf_counter() - t0
        fns[spec] = ((lambda c=compiled: c(*args)), jax.block_until_ready)
    outs = {name: fn() for name, (fn, _) in fns.items()}  # warm-up and the outputs for the error check
    times = alternate(fns, repeats)
    to_np = lambda x: x.detach().numpy().transpose(0, 2, 1, 3) if isinstance(x, torch.Tensor) else np.asarray(x)
    ref = [to_np(x) for x in outs["torch"]]
    t_torch = float(np.median(times["torch"]))
    rows = []
    for spec in impls:
        s = float(np.median(times[spec]))
        got = [to_np(x) for x in outs[spec]]
        rows.append({"seq": seq, "heads": heads, "head_dim": head_dim, "batch": batch, "impl": spec, "s": s,
                     "torch_s": t_torch, "over_torch": s / t_torch,
                     "over_torch_min": min(times[spec]) / min(times["torch"]), "compile_s": compile_s[spec],
                     "rel_err_out": rel_err(got[0], ref[0]), "rel_err_dq": rel_err(got[1], ref[1]),
                     "times_s": times[spec], "torch_times_s": times["torch"]})
    return rows


# ------------------------------------------------------------------------------------------ sampling
SAMPLERS = ("reference", "ours_torch", "ours_jax")


def _sampling_worker(impl: str, case: Case, steps: int, guidance: float, shift: float, repeats: int, seed: int,
                     out_path: str) -> None:
    """Run one sampler in this (fresh) process: time the whole loop `repeats` times after a one-step warm-up,
    record the peak RSS it added, save the final latents [B, C, T, h, w] (.npy) for the rel_err check."""
    import torch

    from contentv_common.schedule import flow_match_sigmas

    size = model_sizes()[case.model]
    inputs = make_inputs(size, case, seed)
    ref_mod = load_reference_module()
    ref = ref_mod.reference_transformer(size.transformer, seed)
    sigmas = flow_match_sigmas(steps, shift, grid="contentv")
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}

    if impl == "reference":
        from diffusers import FlowMatchEulerDiscreteScheduler

        def run(n_steps):  # the released ContentV pipeline's loop (its sigma grid), diffusers parts
            sched = FlowMatchEulerDiscreteScheduler(shift=shift)
            sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
            x = t["latents"].clone()
            ctx, pool = torch.cat([t["neg_context"], t["context"]]), torch.cat([t["neg_pooled"], t["pooled"]])
            for ts in sched.timesteps[:n_steps]:
                v = ref(torch.cat([x, x]), ctx, pool, ts.expand(2 * x.shape[0]))
                v_u, v_c = v.chunk(2)
                x = sched.step(v_u + guidance * (v_c - v_u), ts, x, return_dict=False)[0]
            return x
    elif impl == "ours_torch":
        from contentv_torch.pipeline import denoise
        from contentv_torch.transformer import ContentVTransformer3DModel

        model = ContentVTransformer3DModel(size.transformer).eval()
        model.load_state_dict(ref_mod.reference_state_dict(ref), strict=True)
        del ref

        def run(n_steps):
            return denoise(model, t["latents"], t["context"], t["pooled"], t["neg_context"], t["neg_pooled"],
                           sigmas[: n_steps + 1] if n_steps < steps else sigmas, guidance, progress=False)
    elif impl == "ours_jax":
        run = _jax_sampler_run(size, ref_mod, ref, inputs, sigmas, guidance, steps)
        del ref
    else:
        raise ValueError(f"sampler {impl!r} unknown; choose one of {SAMPLERS}")

    gc.collect()
    np.asarray(run(steps if impl == "ours_jax" else 1))  # warm-up: JAX compiles its whole scan here, torch one step
    times, out = [], None
    with RSSPeak() as mem:
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = np.asarray(run(steps))
            times.append(time.perf_counter() - t0)
    np.save(out_path, out)
    print(json.dumps({"impl": impl, "times_s": times, "peak_delta_bytes": mem.delta_bytes,
                      "rss_before_bytes": mem.start_bytes}))


def _jax_sampler_run(size, ref_mod, ref, inputs, sigmas, guidance, steps):
    """`contentv_jax.sampler.make_sampler` over our Flax DiT with the reference weights (through the key map)
    -> run(n_steps) -> latents [B, C, T, h, w] (always all `steps`: one compiled shape)."""
    import jax.numpy as jnp

    from contentv_jax.sampler import make_sampler
    from contentv_jax.transformer import ContentVTransformer
    from contentv_common.formats.keymap import torch_to_flax
    from contentv_common.formats.transformer_keys import transformer_rules

    params = torch_to_flax(((k, v.numpy()) for k, v in ref_mod.reference_state_dict(ref).items()),
                           transformer_rules(size.transformer))
    sample = make_sampler(ContentVTransformer(size.transformer), guidance)
    args = [jnp.asarray(inputs["latents"].transpose(0, 2, 3, 4, 1))] + [
        jnp.asarray(inputs[k]) for k in ("context", "pooled", "neg_context", "neg_pooled")]
    sig = jnp.asarray(sigmas)

    def run(n_steps):
        return np.asarray(sample(params, *args, sig)).transpose(0, 4, 1, 2, 3)

    return run


def bench_sampling(case: Case, steps: int, repeats: int, seed: int = 0, guidance: float = 6.0,
                   shift: float = 3.0, tmpdir: str | None = None) -> list[dict]:
    """Run each sampler in a subprocess; rows with seconds per step, peak added RSS and rel_err vs the reference."""
    import tempfile

    rows, outs = [], {}
    with tempfile.TemporaryDirectory(dir=tmpdir) as tmp:
        for impl in SAMPLERS:
            if impl == "ours_jax" and importlib.util.find_spec("contentv_jax.sampler") is None:
                rows.append({"impl": impl, "skipped": "no contentv_jax.sampler"})
                continue
            out_path = os.path.join(tmp, f"{impl}.npy")
            cmd = [sys.executable, "-m", "benchmarks.speed", "--worker", impl, "--case", json.dumps(dataclasses.asdict(case)),
                   "--steps", str(steps), "--repeats", str(repeats), "--seed", str(seed), "--guidance", str(guidance),
                   "--shift", str(shift), "--worker-out", out_path]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"sampling worker {impl} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            outs[impl] = np.load(out_path)
            size = model_sizes()[case.model]
            per_step = float(np.median(res["times_s"])) / steps
            rows.append({"impl": impl, "model": case.model, "latent": f"{case.t}x{case.h}x{case.w}", "batch": case.batch,
                         "cfg_batch": 2 * case.batch, "seq_len": case.tokens(size.transformer.patch_size) + size.text.context_tokens,
                         "steps": steps, "s_per_step": per_step, "times_s": res["times_s"],
                         "peak_added_mib": res["peak_delta_bytes"] / 2**20,
                         "rss_before_mib": res["rss_before_bytes"] / 2**20})
    ref = outs.get("reference")
    for r in rows:
        if r["impl"] in outs and ref is not None:
            r["rel_err_vs_reference"] = rel_err(outs[r["impl"]], ref)
            r["time_vs_reference"] = r["s_per_step"] / next(x["s_per_step"] for x in rows if x["impl"] == "reference")
    return rows


# ------------------------------------------------------------------------------------------------ CLI
TRAIN_COLUMNS = [("model", "model"), ("attention", "jax attention"), ("params", "params"), ("latent", "latent TxHxW"), ("batch", "B"),
                 ("seq_len", "seq"), ("step_gflop", "GFLOP/step"), ("jax_s", "jax s/step"), ("torch_s", "torch s/step"),
                 ("torch_over_jax", "torch/jax time"), ("torch_over_jax_min", "torch/jax best"),
                 ("jax_tokens_per_s", "jax tok/s"),
                 ("torch_tokens_per_s", "torch tok/s"), ("jax_frac_peak", "jax frac peak"),
                 ("torch_frac_peak", "torch frac peak"), ("jax_compile_s", "jax compile s")]
ATTENTION_COLUMNS = [("seq", "seq"), ("heads", "heads"), ("head_dim", "head dim"), ("impl", "jax impl"),
                     ("s", "jax s"), ("torch_s", "torch SDPA s"), ("over_torch", "jax/torch time"),
                     ("over_torch_min", "jax/torch best"), ("rel_err_out", "rel_err out"),
                     ("rel_err_dq", "rel_err dq"), ("compile_s", "compile s")]
SAMPLE_COLUMNS = [("impl", "sampler"), ("model", "model"), ("latent", "latent TxHxW"), ("cfg_batch", "DiT batch"),
                  ("seq_len", "seq"), ("s_per_step", "s/step"), ("time_vs_reference", "time vs ref"),
                  ("peak_added_mib", "peak added MiB"), ("rel_err_vs_reference", "rel_err vs ref")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", choices=sorted(SIZES), default="default")
    ap.add_argument("--only", default="train,sampling", help="comma-separated: train, sampling, attention")
    ap.add_argument("--attention", default=None, metavar="IMPL,...",
                    help="JAX attention backends: of the train step (default xla) and of the attention section "
                         "(default xla,flash); flash:BQ:BKV picks flash blocks in the attention section")
    ap.add_argument("--attention-seq", default=None, metavar="S,...",
                    help="attention section sequence lengths (default 1613,4096; smoke 77)")
    ap.add_argument("--attention-heads", default="8x64", metavar="NxD", help="attention section heads x head_dim")
    ap.add_argument("--train-case", action="append", default=None, metavar="MODEL,B,T,H,W",
                    help=f"train only these cases (repeatable): a model of {sorted(model_sizes())}, batch, latent T, H, W")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default: 3, smoke 1)")
    ap.add_argument("--peak-n", type=int, default=None, help="matmul size of the peak measurement (default 2048)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write all results here (atomically)")
    ap.add_argument("--markdown", default=None, help="also write the tables here")
    # internal: one sampler in a fresh process
    ap.add_argument("--worker", choices=SAMPLERS, help=argparse.SUPPRESS)
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the size's)")
    ap.add_argument("--guidance", type=float, default=6.0, help="CFG scale of the sampling benchmark")
    ap.add_argument("--shift", type=float, default=3.0, help="scheduler shift of the sampling benchmark")
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    smoke = args.sizes == "smoke"
    repeats = args.repeats or (1 if smoke else 3)
    train_cases, sample_cases, steps = SIZES[args.sizes]
    steps = args.steps or steps
    if args.worker:
        _sampling_worker(args.worker, Case(**json.loads(args.case)), steps, args.guidance, args.shift, repeats,
                         args.seed, args.worker_out)
        return 0
    if args.train_case:
        try:
            train_cases = [Case(m, *map(int, rest)) for m, *rest in (c.split(",") for c in args.train_case)]
        except (TypeError, ValueError):
            ap.error(f"--train-case {args.train_case}: expected MODEL,B,T,H,W (e.g. narrow,1,4,32,32)")
        bad = [c.model for c in train_cases if c.model not in model_sizes()]
        if bad:
            ap.error(f"--train-case: unknown models {bad}; choose from {sorted(model_sizes())}")
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    if not parts or parts - {"train", "sampling", "attention"}:
        ap.error(f"--only {args.only!r}: choose from train, sampling, attention")
    try:
        att_impls = args.attention.split(",") if args.attention else None
        for spec in att_impls or ():
            parse_attention_impl(spec)
        att_seqs = [int(x) for x in (args.attention_seq or ("77" if smoke else "1613,4096")).split(",")]
        heads, head_dim = map(int, args.attention_heads.lower().split("x"))
    except ValueError as e:
        ap.error(f"--attention / --attention-seq / --attention-heads: {e}")
    train_atts = tuple(a for a in att_impls or ("xla",) if ":" not in a)

    from tqdm.auto import tqdm

    info = machine_info()
    n = args.peak_n or (512 if smoke else 2048)
    peaks = {"torch": torch_matmul_peak(n)["flops_per_s"], "jax": jax_matmul_peak(n)["flops_per_s"]}
    result = {"benchmark": "speed", "argv": sys.argv[1:] if argv is None else argv, "sizes": args.sizes,
              "machine": info, "matmul_peak_flops": peaks, "peak_matmul_n": n, "attention": [], "train": [],
              "sampling": []}
    print(f"{info['date_utc']} UTC, {info['nproc']} x {info['cpu_model']}, load {info['loadavg_1m']:.1f}; "
          f"fp32 {n}^3 matmul peak: torch {peaks['torch'] / 1e9:.1f} GFLOP/s, jax {peaks['jax'] / 1e9:.1f} GFLOP/s")
    if "attention" in parts:
        for seq in tqdm(att_seqs, desc="attention"):
            result["attention"] += bench_attention(seq, att_impls or ["xla", "flash"], repeats, heads, head_dim,
                                                   seed=args.seed)
        print(f"\n### Attention forward + backward, fp32, B=1, {heads} heads x {head_dim}, vs torch SDPA\n")
        print(markdown_table(result["attention"], ATTENTION_COLUMNS))
    if "train" in parts:
        for case in tqdm(train_cases, desc="train step"):
            rows = bench_train(case, peaks, repeats, args.seed, SMOKE_COMPILER_OPTIONS if smoke else None, train_atts)
            result["train"] += rows
            for row in rows:
                tqdm.write(f"{case} {row['attention']}: jax {row['jax_s']:.3f} s, torch {row['torch_s']:.3f} s")
        print("\n### Training step (forward + backward + AdamW), fp32, one CPU device\n")
        print(markdown_table(result["train"], TRAIN_COLUMNS))
    if "sampling" in parts:
        for case in tqdm(sample_cases, desc="sampling"):
            result["sampling"] += bench_sampling(case, steps, repeats, args.seed, args.guidance, args.shift)
        print(f"\n### Sampling ({steps} steps, CFG {args.guidance}, shift {args.shift}), fp32, CPU\n")
        print(markdown_table(result["sampling"], SAMPLE_COLUMNS))
    result["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
    if args.json:
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    if args.markdown:
        from benchmarks.common import write_text

        text = "\n\n".join([markdown_table(result["attention"], ATTENTION_COLUMNS) if result["attention"] else "",
                            markdown_table(result["train"], TRAIN_COLUMNS) if result["train"] else "",
                            markdown_table(result["sampling"], SAMPLE_COLUMNS) if result["sampling"] else ""])
        write_text(args.markdown, text.strip() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
