"""Numerical parity of the PyTorch and JAX models on one checkpoint folder.

    python -m benchmarks.parity --checkpoint DIR [--inputs IN.safetensors] [--output OUT.safetensors]
                                [--dtype float32|bfloat16] [--seed 0] [--lora LORA_CKPT_DIR]

DIR is a diffusers-layout model folder (config.json + safetensors, single or sharded); its config's
`_class_name` picks the runner in RUNNERS. Both frameworks run the folder's weights on the same inputs
(from --inputs, or random ones with shapes from the config and small sizes); a table reports max_abs and
rel_err = ||a - b|| / ||b|| per compared pair, and pass / fail against the tolerance of the dtype:
  --dtype float32:  jax vs torch, both in fp32 (tolerance 1e-4);
  --dtype bfloat16: each side against the torch fp32 reference. The gated row is jax bf16 vs fp32, with tolerance
                    max(2e-2, 1.5 x the torch bf16 error): DESIGN.md's 2e-2 bound for bf16 paths, unless bf16 itself
                    is further off than that on this model (the torch bf16 row, e.g. the decoder of a narrow random
                    VAE: ~2e-2), in which case JAX must be as precise as PyTorch in bf16 within 1.5x. The torch bf16
                    row and the jax bf16 vs torch bf16 row are shown for information (two independent bf16
                    roundings differ by up to about the sum of their errors).
--output writes the outputs (torch layout, float32) atomically: `torch`, `jax` for one output, `torch.<name>`,
`jax.<name>` for several, plus `reference[.<name>]` (the torch fp32 output) in bfloat16 runs. Exit status 0 when
every gated row passes, 1 otherwise, 2 on bad arguments or inputs.

--lora (transformer folders): DIR is the base of a LoRA run whose checkpoint dir is LORA_CKPT_DIR; torch runs the base
with the adapter merged into its weights (W + alpha/r B A, as `python -m convert --to torch --merge` writes), JAX runs
the base with the unmerged adapter (the trainer's LoRA model): the parity of the two LoRA paths.

Transformer folders (`SD3Transformer3DModel`, or an SD3.5 Large `SD3Transformer2DModel`: its learned 2D position table
is not used): inputs keys `hidden_states` [B, C, T, H, W],
`encoder_hidden_states` [B, L, joint_attention_dim], `pooled_projections` [B, pooled_projection_dim],
`timestep` [B] in [0, 1000]; output [B, out_channels, T, H, W].
VAE folders (`AutoencoderKLWan`): inputs `video` [B, 3, F, H, W] in [-1, 1] and `latents` [B, z, T, h, w];
outputs `encode` (posterior mean, before latent normalisation) and `decode`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import rel_err
from contentv_common.cli import add_debug_flag, nonneg_int, output_file, run_cli
from contentv_common.config import read_json
from contentv_common.weights import CONFIG_NAME, atomic_file

# Parity tolerances on rel_err (DESIGN.md: Flax vs PyTorch fp32 <= 1e-4; bf16 paths <= 2e-2).
TOLERANCES = {"float32": 1e-4, "bfloat16": 2e-2}
# In reduced precision JAX may be this much further from fp32 than PyTorch is, where PyTorch exceeds the tolerance.
BF16_FLOOR_FACTOR = 1.5
PROG = "python -m benchmarks.parity"


@dataclass
class Row:
    """One line of the table: `output` compared as `pair`; rows with a `tol` decide the exit status."""

    output: str
    pair: str
    shape: tuple
    max_abs: float
    rel_err: float
    tol: float | None  # None: shown for information, not gated

    @property
    def ok(self) -> bool:
        return self.tol is None or self.rel_err <= self.tol


@dataclass
class ParityResult:
    """One compared output: both frameworks' results in the torch layout, float32; `reference` is the torch
    fp32 output of a reduced-precision run (each side is measured against it), None in fp32 runs."""

    name: str
    torch: np.ndarray
    jax: np.ndarray
    reference: np.ndarray | None = None

    def rows(self, tol: float) -> list[Row]:
        def row(pair, a, b, tol):
            return Row(self.name, pair, b.shape, float(np.max(np.abs(a.astype(np.float64) - b))), rel_err(a, b), tol)

        if self.reference is None:
            return [row("jax vs torch", self.jax, self.torch, tol)]
        floor = row("torch vs fp32", self.torch, self.reference, None)
        return [floor, row("jax vs fp32", self.jax, self.reference, max(tol, BF16_FLOOR_FACTOR * floor.rel_err)),
                row("jax vs torch", self.jax, self.torch, None)]

    def tensors(self, single: bool) -> dict[str, np.ndarray]:
        """The --output keys: `torch`, `jax` (single output) or `torch.<name>`, `jax.<name>`; `reference...` too."""
        out = {"torch": self.torch, "jax": self.jax}
        if self.reference is not None:
            out["reference"] = self.reference
        return out if single else {f"{k}.{self.name}": v for k, v in out.items()}


# (folder, inputs file or None, dtype name, seed) -> results
Runner = Callable[[Path, "Path | None", str, int], list[ParityResult]]


def read_inputs(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A .safetensors file -> {key: float32 array} holding exactly `required` (errors name the file and keys)."""
    from contentv_common.weights import iter_tensors

    tensors = {k: np.asarray(v).astype(np.float32) for k, v in iter_tensors(path, framework="flax")}
    missing = [k for k in required if k not in tensors]
    unexpected = sorted(set(tensors) - set(required))
    if missing or unexpected:
        raise ValueError(f"{path}: inputs file needs keys {list(required)}; missing {missing}, unexpected {unexpected}")
    return tensors


# ------------------------------------------------------------------------------------------ transformer

TRANSFORMER_INPUTS = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep")


def random_transformer_inputs(cfg, seed: int, batch: int = 2, frames: int = 3, height: int = 8, width: int = 12,
                              text_tokens: int = 16) -> dict[str, np.ndarray]:
    """Small random inputs (torch layout) with distinct per-sample timesteps in [0, 1000)."""
    rng = np.random.default_rng(seed)
    return {
        "hidden_states": rng.standard_normal((batch, cfg.in_channels, frames, height, width)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, text_tokens, cfg.joint_attention_dim)).astype(np.float32),
        "pooled_projections": rng.standard_normal((batch, cfg.pooled_projection_dim)).astype(np.float32),
        "timestep": (1000 * (np.arange(batch) + rng.uniform(0.1, 0.9, batch)) / batch).astype(np.float32),
    }


def run_transformer(folder: Path, inputs_path: Path | None, dtype: str, seed: int,
                    lora: Path | None = None) -> list[ParityResult]:
    """torch `ContentVTransformer3DModel.from_pretrained(folder)` vs the Flax `ContentVTransformer` with the
    folder's weights through the key map; both compute in `dtype` (parameters cast to it); a bfloat16 run also
    computes the torch fp32 reference. lora: a LoRA run's checkpoint dir, merged into the torch weights and applied
    unmerged in JAX."""
    import jax
    import jax.numpy as jnp
    import torch

    from contentv_jax.transformer import ContentVTransformer
    from contentv_torch.transformer import ContentVTransformer3DModel
    from contentv_common.formats.transformer_keys import transformer_params_from_folder

    cfg = ContentVTransformer3DModel.from_config_file(folder)
    spec, adapter, adapter_torch = None, None, {}
    if lora is not None:
        from contentv_jax.lora import read_spec
        from contentv_common.formats.keymap import flax_to_torch
        from contentv_common.formats.peft_lora import lora_rules
        from convert.lora import read_checkpoint_adapter

        adapter, _ = read_checkpoint_adapter(lora)
        spec = read_spec(lora)
        adapter_torch = dict(flax_to_torch(adapter, lora_rules(cfg.num_layers)))
    inp = read_inputs(inputs_path, TRANSFORMER_INPUTS) if inputs_path else random_transformer_inputs(cfg, seed)
    t_in = {k: torch.from_numpy(v) for k, v in inp.items()}

    def torch_run(dt: str) -> np.ndarray:  # [B, C_out, T, H, W] float32
        model = ContentVTransformer3DModel.from_pretrained(folder, dtype=getattr(torch, dt))
        if adapter_torch:
            merge_lora_into(model, adapter_torch, spec.scale)
        try:
            model.check_inputs(**t_in)
        except ValueError as e:
            raise ValueError(f"{inputs_path or 'random inputs'}: {e}") from None
        with torch.no_grad():
            return model(**t_in).float().numpy()

    out_torch = torch_run(dtype)
    reference = None if dtype == "float32" else torch_run("float32")

    jdt = jnp.dtype(dtype)
    _, params = transformer_params_from_folder(folder)
    params = jax.tree.map(lambda w: jnp.asarray(w, jdt), params)
    jmodel = ContentVTransformer(cfg, dtype=jdt, param_dtype=jdt, lora=spec)
    variables = {"params": params} if adapter is None else {"params": params, "lora": adapter}
    # float32 means float32 matmuls on every backend (GPUs would otherwise use TF32).
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):
        out = jax.jit(jmodel.apply)(
            variables, inp["hidden_states"].transpose(0, 2, 3, 4, 1), inp["timestep"],
            inp["encoder_hidden_states"], inp["pooled_projections"],
        )  # [B, T, H, W, C_out]
    out_jax = np.asarray(out.astype(jnp.float32)).transpose(0, 4, 1, 2, 3)
    return [ParityResult("transformer" if lora is None else "lora", out_torch, out_jax, reference)]


def merge_lora_into(model, adapter_torch: dict, scale: float) -> None:
    """Merge an adapter ({"<module>.lora_A.weight": [r, in], ".lora_B.weight": [out, r]}) into a torch model's
    Linear weights in place (`contentv_common.formats.peft_lora.merged_weight`, the --merge formula)."""
    import torch

    from contentv_common.formats.peft_lora import merged_weight

    params = dict(model.named_parameters())
    for key in adapter_torch:
        if key.endswith(".lora_A.weight"):
            m = key.removesuffix(".lora_A.weight")
            w = params[f"{m}.weight"]
            merged = merged_weight(w.detach().float().numpy(), adapter_torch[key], adapter_torch[f"{m}.lora_B.weight"], scale)
            with torch.no_grad():
                w.copy_(torch.from_numpy(merged).to(w.dtype))


# ------------------------------------------------------------------------------------------ vae

VAE_INPUTS = ("video", "latents")


def random_vae_inputs(cfg, seed: int, batch: int = 2, frames: int = 9, height: int = 16, width: int = 24) -> dict[str, np.ndarray]:
    """Small random inputs (torch layout): `video` [B, 3, F, H, W] in [-1, 1], `latents` [B, z, T, H/8, W/8]."""
    rng = np.random.default_rng(seed)
    s = cfg.spatial_factor
    return {
        "video": np.tanh(rng.standard_normal((batch, 3, frames, height, width))).astype(np.float32),
        "latents": rng.standard_normal((batch, cfg.z_dim, cfg.latent_frames(frames), height // s, width // s)).astype(np.float32),
    }


def run_vae(folder: Path, inputs_path: Path | None, dtype: str, seed: int) -> list[ParityResult]:
    """torch `WanVAE.from_pretrained(folder)` vs the Flax `WanVAE` with the folder's weights through the key map,
    both in `dtype` (a bfloat16 run also computes the torch fp32 reference): `encode` = the posterior mean (raw,
    before latent normalisation) of `video`, `decode` = the decoded `latents`. Inputs from --inputs (keys `video` and/or `latents`; an absent key is drawn at random)."""
    import jax
    import jax.numpy as jnp
    import torch

    from contentv_common.weights import iter_tensors
    from contentv_jax.vae import WanVAE as FlaxWanVAE
    from contentv_torch.vae import WanVAE
    from contentv_common.formats.vae_keys import vae_params_from_folder

    cfg = WanVAE.from_config_file(folder)
    inp = random_vae_inputs(cfg, seed)
    if inputs_path is not None:
        given = {k: np.asarray(v).astype(np.float32) for k, v in iter_tensors(inputs_path, framework="flax")}
        unexpected = sorted(set(given) - set(VAE_INPUTS))
        if unexpected:
            raise ValueError(f"{inputs_path}: unexpected keys {unexpected}; a VAE inputs file holds {list(VAE_INPUTS)}")
        inp.update(given)

    def torch_run(dt: str) -> tuple[np.ndarray, np.ndarray]:  # (mean [B, z, T, h, w], video [B, 3, F, H, W]) float32
        model, tdt = WanVAE.from_pretrained(folder, dtype=getattr(torch, dt)), getattr(torch, dt)
        try:
            with torch.no_grad():
                return (model.encode(torch.from_numpy(inp["video"]).to(tdt))[0].float().numpy(),
                        model.decode(torch.from_numpy(inp["latents"]).to(tdt)).float().numpy())
        except ValueError as e:
            raise ValueError(f"{inputs_path or 'random inputs'}: {e}") from None

    enc_torch, dec_torch = torch_run(dtype)
    enc_ref, dec_ref = (None, None) if dtype == "float32" else torch_run("float32")

    jdt = jnp.dtype(dtype)
    _, params = vae_params_from_folder(folder)
    params = {"params": jax.tree.map(lambda w: jnp.asarray(w, jdt), params)}
    jmodel = FlaxWanVAE(cfg, dtype=jdt, param_dtype=jdt)
    with jax.default_matmul_precision("highest" if dtype == "float32" else "default"):  # no TF32 convs on GPUs
        mean = jax.jit(lambda p, x: jmodel.apply(p, x, method="encode")[0])(params, inp["video"].transpose(0, 2, 3, 4, 1).astype(jdt))
        dec = jax.jit(lambda p, z: jmodel.apply(p, z, method="decode"))(params, inp["latents"].transpose(0, 2, 3, 4, 1).astype(jdt))
    to_torch_layout = lambda a: np.asarray(a.astype(jnp.float32)).transpose(0, 4, 1, 2, 3)  # [B, T, H, W, C] -> [B, C, T, H, W]
    return [ParityResult("encode", enc_torch, to_torch_layout(mean), enc_ref),
            ParityResult("decode", dec_torch, to_torch_layout(dec), dec_ref)]


# `_class_name` of the folder's config.json -> runner.
RUNNERS: dict[str, Runner] = {
    "SD3Transformer3DModel": run_transformer,
    "SD3Transformer2DModel": run_transformer,  # SD3.5 Large, as `python -m convert` and `--init-from` take it
    "AutoencoderKLWan": run_vae,
}


def format_table(rows: list[Row], dtype: str) -> str:
    head = f"{'output':<14}{'compared':<15}{'dtype':<10}{'shape':<24}{'max_abs':>11}{'rel_err':>11}{'tol':>9}  result"
    lines = [head, "-" * len(head)]
    for r in rows:
        ok = "info" if r.tol is None else "PASS" if r.ok else "FAIL"
        lines.append(f"{r.output:<14}{r.pair:<15}{dtype:<10}{r.shape!s:<24}{r.max_abs:>11.3e}{r.rel_err:>11.3e}"
                     f"{'-' if r.tol is None else f'{r.tol:.2g}':>9}  {ok}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, type=Path, help="diffusers-layout model folder")
    ap.add_argument("--inputs", type=Path, help=".safetensors with the model's input keys (default: random)")
    ap.add_argument("--output", type=output_file, help="write keys `torch` and `jax` here (.safetensors)")
    ap.add_argument("--dtype", default="float32", choices=sorted(TOLERANCES))
    ap.add_argument("--seed", type=nonneg_int, default=0, help="seed of the random inputs")
    ap.add_argument("--lora", type=Path, default=None, help="a LoRA run's checkpoint dir whose base is --checkpoint: "
                    "torch runs the merged model, JAX the base + adapter")
    add_debug_flag(ap)
    args = ap.parse_args(argv)

    try:
        if not args.checkpoint.is_dir():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint}: not a model folder")
        kind = read_json(args.checkpoint / CONFIG_NAME).get("_class_name")
        if kind not in RUNNERS:
            raise ValueError(f"{args.checkpoint / CONFIG_NAME}: _class_name {kind!r} has no parity runner; "
                             f"known: {sorted(RUNNERS)}")
        if args.inputs is not None and not args.inputs.is_file():
            raise FileNotFoundError(f"--inputs {args.inputs}: no such file")
        if args.lora is not None and RUNNERS[kind] is not run_transformer:
            raise ValueError(f"--lora applies to transformer folders; {args.checkpoint} holds a {kind}")
        extra = {"lora": args.lora} if args.lora is not None else {}
        results = RUNNERS[kind](args.checkpoint, args.inputs, args.dtype, args.seed, **extra)
    except (ValueError, FileNotFoundError) as e:
        ap.error(str(e))

    rows = [row for r in results for row in r.rows(TOLERANCES[args.dtype])]
    print(f"parity of {args.checkpoint} ({kind}), rel_err(a vs b) = ||a - b|| / ||b||"
          + ("; fp32 = the torch float32 reference" if args.dtype != "float32" else ""))
    print(format_table(rows, args.dtype))
    if args.output is not None:
        from safetensors.numpy import save_file

        tensors = {k: v for r in results for k, v in r.tensors(single=len(results) == 1).items()}
        with atomic_file(args.output) as tmp:
            save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp))
        print(f"wrote {args.output}")
    return 0 if all(r.ok for r in rows) else 1


def cli(argv: list[str] | None = None) -> int:
    """The command line: `main` behind the shared error boundary."""
    return run_cli(PROG, main, argv, user_errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(cli())
