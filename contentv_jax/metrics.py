"""Analytic FLOPs / MFU, and the metrics writer (JSONL + TensorBoard).

`transformer_flops` is the one FLOP formula of the project (the benchmarks reuse it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from contentv_common.config import TransformerConfig

# Dense bf16 peak FLOP/s per device, by a substring of `jax.Device.device_kind` (lower case).
PEAK_FLOPS = {
    "tpu v4": 275e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v5p": 459e12,
    "tpu v5": 459e12,
    "tpu v6": 918e12,
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "cpu": 1e11,  # a rough stand-in so the CPU run prints a number; not a measured peak
}


def transformer_flops(cfg: TransformerConfig, latent_shape, text_tokens: int, batch: int = 1) -> float:
    """Matmul FLOPs of one MM-DiT forward pass (2 per multiply-add), for `batch` samples.

    latent_shape: (T, H, W) latent frames and pixels; N = T*(H/p)*(W/p) video tokens, L = text tokens,
    S = N + L, D = inner_dim. Per joint block: q/k/v 6*S*D^2, attention 4*S^2*D, output projections
    2*S*D^2, MLP 16*S*D^2 (the last, context_pre_only block has no context output projection / MLP:
    2*N*D^2 and 16*N*D^2), adaLN 2*D*6D per stream. Plus patch embedding, context / pooled / timestep
    embedders and the output head. A training step is 3x this (forward + backward; remat recompute not counted).
    """
    p, d = cfg.patch_size, cfg.inner_dim
    n = cfg.video_tokens(latent_shape)
    s = n + text_tokens
    block = 6 * s * d * d + 4 * s * s * d + 2 * s * d * d + 16 * s * d * d + 2 * 2 * d * 6 * d
    last = 6 * s * d * d + 4 * s * s * d + 2 * n * d * d + 16 * n * d * d + 2 * d * 6 * d + 2 * d * 2 * d
    embed = (
        2 * n * p * p * cfg.in_channels * d  # patch conv
        + 2 * text_tokens * cfg.joint_attention_dim * d  # context embedder
        + 2 * (256 * d + d * d) + 2 * (cfg.pooled_projection_dim * d + d * d)  # timestep / pooled MLPs
        + 2 * d * 2 * d + 2 * n * d * p * p * cfg.out_channels  # norm_out + proj_out
    )
    return float(batch) * ((cfg.num_layers - 1) * block + last + embed)


def train_step_flops(cfg: TransformerConfig, latent_shape, text_tokens: int, batch: int) -> float:
    """Model FLOPs of one training step (forward + backward = 3x forward)."""
    return 3.0 * transformer_flops(cfg, latent_shape, text_tokens, batch)


def peak_flops(device_kind: str, override_tflops: float = 0.0) -> float:
    """Peak FLOP/s of one device: the override (TFLOP/s) if > 0, else PEAK_FLOPS by device kind (else CPU's)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    kind = device_kind.lower()
    for key, value in PEAK_FLOPS.items():
        if key in kind:
            return value
    return PEAK_FLOPS["cpu"]


class MetricsWriter:
    """One JSON record per logged step to `jsonl_path` (each with `step`), and TensorBoard scalars to `tb_dir`.

    `truncate_after(step)` drops records past a resumed step, so the file reads like one uninterrupted run.
    Only process 0 should write (pass `enabled=False` elsewhere).
    """

    def __init__(self, jsonl_path: str | os.PathLike | None, tb_dir: str | os.PathLike | None, enabled: bool = True):
        # Files and folders are made at the first write, so a run that fails before its first step leaves none.
        self.path = Path(jsonl_path) if jsonl_path and enabled else None
        self._tb_dir = tb_dir if enabled else None
        self._tb = None

    def truncate_after(self, step: int) -> None:
        if self.path is None or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line)
            except (ValueError, KeyError):  # a line cut short by a killed process
                continue
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
        if self._tb is None and self._tb_dir:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(self._tb_dir))
        if self._tb is not None:
            for k, v in record.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
