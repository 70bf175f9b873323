"""One-call GPU check: bf16 parity, training-step MFU and a full-size denoising step, as a markdown table.

    pip install torch==2.13.0 -e ".[dev]"            # (+ jax[cuda12] for the JAX rows; CPU-only JAX skips them)
    python -m benchmarks.gpu --out results/           # or benchmarks/gpu.sh; writes $OUT when set (else ./gpu_results)
    python -m benchmarks.gpu --smoke --out /tmp/g     # tiny sizes on the CPU (what the tests run)

Parts (each guarded: a failure becomes an 'error' row, the others still run), in an order that keeps the two
frameworks' GPU memory apart (torch parts free their cache before the JAX parts; JAX does not preallocate):
  1. peak     - measured bf16 matmul FLOP/s (torch; JAX too when it has a GPU) and the nominal peak;
  2. parity   - the `small` preset, inputs [2, 16, 3, 16, 24] with distinct timesteps: the diffusers reference in
                fp32 (TF32 off) vs our torch model in bf16 and fp32 and our JAX model in bf16 (rel_err; bf16 <= 2e-2,
                fp32 <= 1e-5 by DESIGN.md);
  3. attention - fwd + bwd of one attention at the 8B heads (38 x 64), bf16, 8,192 and 50,253 tokens (480p x 125):
                JAX cudnn vs our pure-JAX flash (vs XLA's [S, S] path at 8,192) vs torch SDPA: ms, TFLOP/s, rel_err;
  4. train    - 8B width (38 x 64 heads), 6 layers, 29 frames at 256x448 (latent 8x32x56), batch 1: the reference
                torch step (fp32 AdamW, bf16 autocast, SDPA) and our JAX trainer step (bf16 compute, cuDNN flash attention):
                s/step, tokens/s, MFU against the measured and the nominal bf16 peak;
  5. denoise  - one CFG denoising step (DiT batch 2) at 432x768, 125 frames (latent 32x54x96, 41,472 video tokens)
                with contentv-8b-shaped random bf16 weights: our torch DiT + Euler step, our JAX DiT + Euler step; and
                at the same tokens with 6 layers, our torch vs the diffusers reference (time ratio).
--smoke replaces every size by the tiny preset at a few tokens and runs on whatever device there is.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # before JAX loads: share the GPU with torch

import numpy as np

from benchmarks.common import load_reference_module, machine_info, markdown_table, rel_err, write_json, write_text
from benchmarks.speed import Case, ModelSize, jax_train_step, make_inputs, model_sizes, torch_train_step
from contentv_common.config import PRESETS, TransformerConfig

NOMINAL_BF16_PEAK = {"h100": 989e12, "h200": 989e12, "a100": 312e12}
TOL = {"bfloat16": 2e-2, "float32": 1e-5}


def jax_on_gpu() -> bool:
    try:
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    except Exception:  # noqa: BLE001 - no usable JAX: its rows are skipped
        return False


def _jax_flash() -> str:
    """cuDNN flash attention on a GPU (named, so a missing kernel fails loudly instead of falling back to the
    XLA path, whose S x S scores would not fit at 41k tokens); XLA attention on the CPU (smoke)."""
    return "cudnn" if jax_on_gpu() else "xla"


class Bench:
    """Collects result rows; `part(name)` runs one guarded part."""

    def __init__(self, smoke: bool, device: str):
        import torch

        self.smoke, self.device = smoke, device
        self.rows: list[dict] = []
        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        self.peak = None

    def part(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - record and go on: one call must report everything it can
            traceback.print_exc()
            self.rows.append({"part": name, "what": "error", "value": f"{type(e).__name__}: {str(e)[:200]}"})
        print(f"[gpu] {name} done in {time.perf_counter() - t0:.1f} s", flush=True)
        self.free()

    def add(self, part: str, what: str, value, unit: str = "", note: str = "") -> None:
        self.rows.append({"part": part, "what": what, "value": value, "unit": unit, "note": note})
        print(f"[gpu] {part:8s} {what}: {value} {unit} {note}", flush=True)

    def free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def timed(self, fn, warmup: int = 1, repeats: int = 2) -> float:
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))


# ------------------------------------------------------------------------------------------------ parts
def part_peak(b: Bench) -> None:
    from benchmarks.common import jax_matmul_peak, torch_matmul_peak

    n = 256 if b.smoke else 8192
    tp = torch_matmul_peak(n, "bfloat16", b.device, repeats=10)["flops_per_s"]
    b.add("peak", f"torch bf16 {n}^3 matmul", tp / 1e12, "TFLOP/s")
    b.peak = tp
    if jax_on_gpu():
        jp = jax_matmul_peak(n, "bfloat16", repeats=10)["flops_per_s"]
        b.add("peak", f"jax bf16 {n}^3 matmul", jp / 1e12, "TFLOP/s")
    if b.device == "cuda":
        import torch

        name = torch.cuda.get_device_name(0).lower()
        nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if k in name), None)
        if nominal:
            b.add("peak", "nominal dense bf16", nominal / 1e12, "TFLOP/s", name)


def part_parity(b: Bench) -> None:
    import torch

    from contentv_torch.transformer import ContentVTransformer3DModel

    cfg = PRESETS["tiny" if b.smoke else "small"].transformer
    ref_mod = load_reference_module()
    ref = ref_mod.reference_transformer(cfg, seed=0)
    sd = ref_mod.reference_state_dict(ref)
    rng = np.random.default_rng(1)
    L = 16 if b.smoke else 333
    inp = {"hidden_states": rng.standard_normal((2, cfg.in_channels, 3, 16, 24)).astype(np.float32),
           "encoder_hidden_states": rng.standard_normal((2, L, cfg.joint_attention_dim)).astype(np.float32),
           "pooled_projections": rng.standard_normal((2, cfg.pooled_projection_dim)).astype(np.float32),
           "timestep": np.array([137.0, 812.0], np.float32)}
    dev = b.device
    t_in = {k: torch.from_numpy(v).to(dev) for k, v in inp.items()}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        want = ref.to(dev)(**t_in).float().cpu().numpy()
        del ref
        for dt in (torch.float32, torch.bfloat16):
            ours = ContentVTransformer3DModel(cfg).eval()
            ours.load_state_dict(sd, strict=True)
            ours = ours.to(dev, dt)
            got = ours(**t_in)  # inputs are cast to the parameters' dtype inside; the output comes back fp32
            name = str(dt).split(".")[-1]
            err = rel_err(got.float().cpu().numpy(), want)
            b.add("parity", f"torch {name} vs reference fp32", f"{err:.2e}", "rel_err",
                  "PASS" if err <= TOL[name] else f"FAIL (tol {TOL[name]:.0e})")
            del ours
    if not (jax_on_gpu() or b.smoke):
        b.add("parity", "jax bf16 vs reference fp32", "skipped", "", "JAX has no GPU here")
        return
    import jax
    import jax.numpy as jnp

    from contentv_jax.transformer import ContentVTransformer
    from contentv_common.formats.keymap import torch_to_flax
    from contentv_common.formats.transformer_keys import transformer_rules

    params = torch_to_flax(((k, v.numpy()) for k, v in sd.items()), transformer_rules(cfg))
    params = jax.tree.map(lambda w: jnp.asarray(w, jnp.bfloat16), params)
    model = ContentVTransformer(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl="auto")
    out = jax.jit(model.apply)({"params": params}, inp["hidden_states"].transpose(0, 2, 3, 4, 1), inp["timestep"],
                               inp["encoder_hidden_states"], inp["pooled_projections"])
    err = rel_err(np.asarray(out.astype(jnp.float32)).transpose(0, 4, 1, 2, 3), want)
    b.add("parity", "jax bf16 vs reference fp32", f"{err:.2e}", "rel_err",
          "PASS" if err <= TOL["bfloat16"] else f"FAIL (tol {TOL['bfloat16']:.0e})")


def part_attention(b: Bench) -> None:
    """Attention forward + backward (dq, dk, dv) at the 8B heads (38 x 64), bf16, B=1: JAX cuDNN flash vs our
    pure-JAX flash (and XLA's [S, S] path where it fits) vs torch SDPA, at 8,192 tokens and at the 480p x 125-frame
    joint sequence (50,253). rel_err of each JAX output against the first JAX backend at the same size."""
    import jax
    import jax.numpy as jnp
    import torch

    from contentv_jax.attention import attention

    heads, head_dim = (2, 16) if b.smoke else (38, 64)
    seqs = (77, 333) if b.smoke else (8192, 50253)
    on_gpu = jax_on_gpu()
    for seq in seqs:
        rng = np.random.default_rng(0)
        q, k, v, do = (rng.standard_normal((1, seq, heads, head_dim)).astype(np.float32) for _ in range(4))
        flops = 3.5 * 4 * seq * seq * heads * head_dim  # fwd 4 S^2 N D; backward with the recompute 2.5x that
        impls = (["cudnn"] if on_gpu else []) + ["flash"] + (["xla"] if seq <= 8192 else [])
        first = None
        for impl in impls:
            args = [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, do)]

            @jax.jit
            def step(q, k, v, do, impl=impl):
                o, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, impl), q, k, v)
                return (o, *vjp(do))

            out = jax.block_until_ready(step(*args))
            s = b.timed(lambda: jax.block_until_ready(step(*args)))
            first = out[0] if first is None else first
            b.add("attention", f"jax {impl} fwd+bwd, S={seq}, {heads}x{head_dim} bf16", round(s * 1e3, 2), "ms",
                  f"{flops / s / 1e12:.3g} TFLOP/s, rel_err vs {impls[0]} {rel_err(np.asarray(out[0], np.float32), np.asarray(first, np.float32)):.1e}")
            del out, args
        tq, tk, tv = (torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).to(b.device, torch.bfloat16).requires_grad_()
                      for x in (q, k, v))
        tdo = torch.from_numpy(do.transpose(0, 2, 1, 3).copy()).to(b.device, torch.bfloat16)

        def torch_step():
            o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
            return torch.autograd.grad(o, (tq, tk, tv), tdo)

        s = b.timed(torch_step)
        b.add("attention", f"torch SDPA fwd+bwd, S={seq}, {heads}x{head_dim} bf16", round(s * 1e3, 2), "ms",
              f"{flops / s / 1e12:.3g} TFLOP/s")
        del tq, tk, tv, tdo
        b.free()


def _train_size(b: Bench) -> tuple[ModelSize, Case]:
    if b.smoke:
        return model_sizes()["tiny"], Case("tiny", 1, 2, 8, 12)
    eight_b = PRESETS["contentv-8b"]
    size = ModelSize("8b-width-6l", dataclasses.replace(eight_b.transformer, num_layers=6), eight_b.text)
    return size, Case(size.name, 1, 8, 32, 56)


def part_train(b: Bench) -> None:
    import torch

    from contentv_jax.metrics import train_step_flops

    size, case = _train_size(b)
    inputs = make_inputs(size, case, 0)
    flops = train_step_flops(size.transformer, (case.t, case.h, case.w), size.text.context_tokens, case.batch)
    tokens = case.tokens(size.transformer.patch_size)
    shape = f"{size.name}, latent {case.t}x{case.h}x{case.w}, {tokens} video tokens, B=1"

    def report(fw: str, s: float, note: str = "") -> None:
        b.add("train", f"{fw} step s", round(s, 4), "s", shape + note)
        b.add("train", f"{fw} tokens/s", round(tokens / s, 1), "tok/s")
        if b.peak:
            b.add("train", f"{fw} MFU (measured peak)", round(flops / s / b.peak, 3), "", f"{flops / 1e12:.2f} TFLOP/step")
        if b.device == "cuda":
            nominal = next((v for k, v in NOMINAL_BF16_PEAK.items() if k in torch.cuda.get_device_name(0).lower()), None)
            if nominal:
                b.add("train", f"{fw} MFU (nominal peak)", round(flops / s / nominal, 3))

    step, _ = torch_train_step(size, inputs, 0, device=b.device, autocast=torch.bfloat16)
    s = b.timed(lambda: step().item(), warmup=1, repeats=1 if b.smoke else 3)
    report("torch reference", s, ", fp32 AdamW + bf16 autocast")
    if b.device == "cuda":
        b.add("train", "torch peak memory", round(torch.cuda.max_memory_allocated() / 2**30, 2), "GiB")
    step = None  # free the reference model and its optimizer state before the JAX step
    b.free()
    if not (jax_on_gpu() or b.smoke):
        b.add("train", "jax step", "skipped", "", "JAX has no GPU here")
        return
    import jax

    jstep, info = jax_train_step(size, inputs, 0, dtype="bfloat16", remat="none", attention=_jax_flash())
    s = b.timed(lambda: jax.block_until_ready(jstep()), warmup=0, repeats=1 if b.smoke else 3)
    report("jax trainer", s, f", bf16 compute, compile {info['compile_s']:.0f} s")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        b.add("train", "jax peak memory", round(stats["peak_bytes_in_use"] / 2**30, 2), "GiB")


def _denoise_shape(b: Bench) -> tuple[TransformerConfig, Case, int]:
    if b.smoke:
        return PRESETS["tiny"].transformer, Case("tiny", 1, 2, 8, 12), PRESETS["tiny"].text.context_tokens
    p = PRESETS["contentv-8b"]
    return p.transformer, Case("contentv-8b", 1, 32, 54, 96), p.text.context_tokens


def _random_torch_dit(cfg, device: str, dtype):
    """Our torch DiT with random weights made on the device (no 32 GB fp32 copy on the host)."""
    import torch

    from contentv_torch.transformer import ContentVTransformer3DModel

    with torch.device("meta"):
        model = ContentVTransformer3DModel(cfg)
    model = model.to_empty(device=device).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))
            elif "norm_" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return model


def part_denoise(b: Bench) -> None:
    import torch

    from contentv_common.schedule import flow_match_sigmas
    from contentv_torch.pipeline import denoise

    cfg, case, L = _denoise_shape(b)
    dt = torch.bfloat16
    tokens = case.tokens(cfg.patch_size)
    sig = flow_match_sigmas(50, 3.0)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((1, cfg.in_channels, case.t, case.h, case.w)).astype(np.float32)).to(b.device)
    ctx, neg = (torch.from_numpy(rng.standard_normal((1, L, cfg.joint_attention_dim)).astype(np.float32)).to(b.device, dt)
                for _ in range(2))
    pool, negp = (torch.from_numpy(rng.standard_normal((1, cfg.pooled_projection_dim)).astype(np.float32)).to(b.device, dt)
                  for _ in range(2))
    where = f"latent {case.t}x{case.h}x{case.w} ({tokens} video tokens), CFG batch 2, bf16"

    def torch_step(model):
        return lambda: denoise(model, x, ctx, pool, neg, negp, sig[:2], 6.0, progress=False)

    model = _random_torch_dit(cfg, b.device, dt)
    b.add("denoise", f"torch ours {cfg.num_layers} layers s/step", round(b.timed(torch_step(model)), 3), "s", where)
    if b.device == "cuda":
        b.add("denoise", "torch ours peak memory", round(torch.cuda.max_memory_allocated() / 2**30, 2), "GiB")
    del model
    b.free()

    # Ours vs the diffusers reference at the same tokens, fewer layers (the reference is built on the host in fp32).
    few = dataclasses.replace(cfg, num_layers=2 if b.smoke else 6)
    ref_mod = load_reference_module()
    ref = ref_mod.reference_transformer(few, 0)
    ours = _random_torch_dit(few, b.device, dt)
    ours.load_state_dict({k: v.to(dt) for k, v in ref_mod.reference_state_dict(ref).items()}, strict=True)
    ref = ref.to(b.device, dt)
    from diffusers import FlowMatchEulerDiscreteScheduler

    def ref_step():
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        sched.set_timesteps(50)
        ts = sched.timesteps[0]
        v = ref(torch.cat([x, x]).to(dt), torch.cat([neg, ctx]), torch.cat([negp, pool]), ts.expand(2).to(b.device))
        v_u, v_c = v.float().chunk(2)
        return sched.step(v_u + 6.0 * (v_c - v_u), ts, x, return_dict=False)[0]

    t_ours, t_ref = b.timed(torch_step(ours)), b.timed(ref_step)
    b.add("denoise", f"torch ours / reference, {few.num_layers} layers", round(t_ours / t_ref, 3), "time ratio",
          f"ours {t_ours:.3f} s, reference {t_ref:.3f} s")
    ref = ours = None
    b.free()

    if not (jax_on_gpu() or b.smoke):
        b.add("denoise", "jax s/step", "skipped", "", "JAX has no GPU here")
        return
    import jax
    import jax.numpy as jnp

    from contentv_jax.transformer import ContentVTransformer

    model = ContentVTransformer(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention_impl=_jax_flash())
    xs = jnp.asarray(x.cpu().numpy().transpose(0, 2, 3, 4, 1))
    c2 = jnp.asarray(torch.cat([neg, ctx]).float().cpu().numpy(), jnp.bfloat16)
    p2 = jnp.asarray(torch.cat([negp, pool]).float().cpu().numpy(), jnp.bfloat16)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((2, 1, 2, 2, cfg.in_channels)), jnp.zeros((2,)),
                                 c2[:, :4], p2)["params"]  # random bf16 weights, made on the device

    @jax.jit
    def step(params, x, c, p, s, s_next):  # one CFG Euler step: x [1, T, H, W, C] fp32, c [2, L, J], p [2, P]
        v = model.apply({"params": params}, jnp.concatenate([x, x]).astype(jnp.bfloat16), jnp.full((2,), 1000.0 * s),
                        c, p).astype(jnp.float32)
        v_u, v_c = v[:1], v[1:]
        return x + (s_next - s) * (v_u + 6.0 * (v_c - v_u))

    t0 = time.perf_counter()
    run = lambda: jax.block_until_ready(step(params, xs, c2, p2, sig[0], sig[1]))  # noqa: E731
    run()
    b.add("denoise", f"jax ours {cfg.num_layers} layers s/step", round(b.timed(run, warmup=0), 3), "s",
          where + f", compile+first {time.perf_counter() - t0:.0f} s")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        b.add("denoise", "jax peak memory (process)", round(stats["peak_bytes_in_use"] / 2**30, 2), "GiB")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is (CPU in the tests)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu_results", help="results dir (default $OUT or ./gpu_results)")
    ap.add_argument("--parts", default="peak,parity,attention,train,denoise", help="comma-separated subset of the parts")
    args = ap.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    table = {"peak": part_peak, "parity": part_parity, "attention": part_attention, "train": part_train,
             "denoise": part_denoise}
    bad = [p for p in parts if p not in table]
    if bad:
        ap.error(f"--parts {bad} unknown; choose from {list(table)}")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        ap.error("no CUDA device: the full sizes need a GPU (use --smoke on the CPU)")
    b = Bench(args.smoke, device)
    t0 = time.perf_counter()
    for name in parts:
        b.part(name, lambda fn=table[name]: fn(b))
    info = machine_info()
    info["jax_gpu"] = jax_on_gpu()
    out = Path(args.out)
    md = (f"# benchmarks.gpu ({'smoke, ' if args.smoke else ''}{device}: {info.get('gpu', info['cpu_model'])})\n\n"
          f"{info['date_utc']} UTC, torch {info.get('torch')}, jax {info.get('jax')} (GPU: {info['jax_gpu']}), "
          f"total {time.perf_counter() - t0:.0f} s\n\n"
          + markdown_table(b.rows, [("part", "part"), ("what", "what"), ("value", "value"), ("unit", "unit"),
                                    ("note", "note")]) + "\n")
    write_text(out / "gpu_results.md", md)
    write_json(out / "gpu_results.json", {"benchmark": "gpu", "smoke": args.smoke, "machine": info, "rows": b.rows})
    print(md)
    return 1 if any(r["what"] == "error" or "FAIL" in str(r.get("note", "")) for r in b.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
