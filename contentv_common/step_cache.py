"""Step caching and guidance schedules for flow-matching sampling: the rules, shared by the torch pipeline and
the JAX sampler (numpy only; the rule functions use plain arithmetic and an `xp.where`, so numpy scalars and
traced jax arrays both go through them).

A step cache skips the DiT's transformer blocks at a step whose output would change little, and reuses the
residual (blocks' output - input tokens) of the last computed step instead. Each policy measures a signal:
  teacache  the relative L1 change of block 0's modulated input since the previous step, rescaled by a fitted
            polynomial (identity until calibrated); accumulated over skipped steps.
  magcache  the calibrated magnitude ratio ||r_t|| / ||r_{t-1}|| of successive residuals; the error
            |1 - prod(ratios)| is accumulated over skipped steps.
  fbcache   the relative L1 change of block 0's residual since the last computed step (block 0 always runs).
A step computes when it is forced (warm-up / last step / too many skips in a row) or the accumulated error
reaches the threshold; computing resets the accumulators. cond and uncond branches each keep their own state.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

POLICIES = ("none", "teacache", "magcache", "fbcache")
DEFAULT_THRESHOLDS = {"none": 0.0, "teacache": 0.1, "magcache": 0.12, "fbcache": 0.08}
CALIBRATION_FILE = "step_cache.json"  # written next to the model by `python -m contentv_torch.calibrate_cache`


@dataclass(frozen=True)
class CachePolicy:
    """name: one of POLICIES; threshold >= 0 (0 never skips);
    warmup: fraction of the first steps always computed (MagCache's retention ratio; at least one step);
    max_skips: consecutive skipped steps allowed per branch (MagCache's K; 0: no limit);
    coefficients: TeaCache rescale polynomial, highest power first (identity when empty);
    mag_ratios: MagCache {branch: per-step ratios on a calibration grid}, resampled to any step count."""

    name: str = "none"
    threshold: float = 0.0
    warmup: float = 0.0
    max_skips: int = 0
    coefficients: tuple[float, ...] = ()
    mag_ratios: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"--cache {self.name!r}: choose one of {list(POLICIES)}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"--cache-threshold {self.threshold}: must be a finite number >= 0")
        if not 0 <= self.warmup <= 1:
            raise ValueError(f"cache warmup {self.warmup}: must be a fraction in [0, 1]")
        if self.name == "magcache" and not self.mag_ratios:
            raise ValueError("--cache magcache needs calibrated magnitude ratios: run `python -m "
                             f"contentv_torch.calibrate_cache --model DIR ...` first (writes DIR/{CALIBRATION_FILE})")

    @property
    def active(self) -> bool:
        return self.name != "none"

    def forced(self, step: int, num_steps: int) -> bool:
        """Steps that always run the blocks: the first (nothing cached yet), the warm-up fraction, the last."""
        return step < max(1, math.ceil(self.warmup * num_steps)) or step == num_steps - 1

    def ratio(self, branch: str, step: int, num_steps: int) -> float:
        """MagCache's calibrated ratio of `branch` at `step` of `num_steps`, resampled from the calibration grid."""
        r = np.asarray(self.mag_ratios.get(branch) or self.mag_ratios["cond"], np.float64)
        return float(np.interp(step / max(num_steps - 1, 1), np.linspace(0, 1, len(r)), r))


def make_policy(name: str, threshold: float | None = None, calibration: dict | None = None) -> CachePolicy:
    """The policy `name` with its defaults (MagCache's retention 0.2 and K = 2; TeaCache / fbcache: step 0 and the
    last step forced), `threshold` (None: DEFAULT_THRESHOLDS) and a calibration dict (`read_calibration`)."""
    cal = calibration or {}
    threshold = DEFAULT_THRESHOLDS.get(name, 0.0) if threshold is None else float(threshold)
    if name == "magcache":
        return CachePolicy(name, threshold, warmup=0.2, max_skips=2,
                           mag_ratios=cal.get("magcache", {}).get("ratios", {}))
    if name == "teacache":
        return CachePolicy(name, threshold, coefficients=tuple(cal.get("teacache", {}).get("coefficients", ())))
    return CachePolicy(name, threshold)


def read_calibration(folder: str | Path) -> dict:
    """The model folder's step_cache.json ({} when there is none)."""
    path = Path(folder) / CALIBRATION_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def fit_calibration(records: list[dict], degree: int = 4) -> dict:
    """Calibration from uncached runs. records: one per (run, branch, step >= 1) with "branch", "step",
    "num_steps", "input_change" (block 0's modulated-input rel L1 change), "output_change" (the blocks' output rel
    L1 change) and "ratio" (||r_t|| / ||r_{t-1}||). TeaCache: the polynomial mapping input to output change
    (least squares); MagCache: the mean ratio per branch and step."""
    x = np.array([r["input_change"] for r in records], np.float64)
    y = np.array([r["output_change"] for r in records], np.float64)
    deg = min(degree, max(len(np.unique(x)) - 1, 1))
    n = records[0]["num_steps"]
    ratios = {}
    for b in sorted({r["branch"] for r in records}):
        per = [[r["ratio"] for r in records if r["branch"] == b and r["step"] == s] for s in range(n)]
        ratios[b] = [1.0] + [float(np.mean(v)) if v else 1.0 for v in per[1:]]
    return {"teacache": {"coefficients": [float(c) for c in np.polyfit(x, y, deg)]},
            "magcache": {"ratios": ratios, "num_steps": n}}


def rescale(coefficients, x):
    """TeaCache's polynomial (highest power first) at x by Horner; identity without coefficients."""
    if not len(coefficients):
        return x
    y = 0.0 * x + coefficients[0]
    for c in coefficients[1:]:
        y = y * x + c
    return y


def init_state():
    """Per-branch accumulators: (error, ratio product, skips in a row)."""
    return (0.0, 1.0, 0)


def skip_rule(policy: CachePolicy, state, signal, forced, xp=np):
    """One step of the shared rule -> (compute, new state). signal: teacache the raw relative input change,
    magcache the step's magnitude ratio, fbcache block 0's residual change; forced: a bool (or traced bool)."""
    err, ratio, skips = state
    if policy.name == "teacache":
        err = err + abs(rescale(policy.coefficients, signal))  # a distance: a fitted polynomial may dip below 0
    elif policy.name == "magcache":
        ratio = ratio * signal
        err = err + abs(1.0 - ratio)
    else:  # fbcache: compared with the last computed step, no accumulation
        err = signal
    over = (skips >= policy.max_skips) if policy.max_skips else False
    compute = xp.logical_or(xp.logical_or(forced, err >= policy.threshold), over)
    new = (xp.where(compute, 0.0, err), xp.where(compute, 1.0, ratio), xp.where(compute, 0, skips + 1))
    return compute, new


# ---------------------------------------------------------------------------------------------
# Guidance schedules
# ---------------------------------------------------------------------------------------------
def parse_interval(text: str) -> tuple[float, float]:
    """--guidance-interval "START,END" -> (start, end), sigmas in [0, 1] with start <= end."""
    try:
        start, end = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--guidance-interval {text!r}: expected START,END (two numbers)") from None
    check_interval((start, end))
    return start, end


def check_interval(interval) -> None:
    start, end = interval
    if not (0 <= start <= end <= 1):
        raise ValueError(f"--guidance-interval {start},{end}: needs 0 <= START <= END <= 1 (sigmas)")


def check_truncation(fraction: float) -> None:
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValueError(f"--cfg-truncation {fraction}: must be a fraction of the steps in [0, 1]")


def guided_steps(sigmas, guidance: float, interval=None, truncation: float | None = None) -> np.ndarray:
    """[steps] bool: where classifier-free guidance runs (the uncond pass is made). No guidance (<= 1) -> none;
    interval (start, end): only where start <= sigma <= end; truncation f: only the first round(f * steps)."""
    s = np.asarray(sigmas, np.float64)[:-1]
    on = np.full(len(s), guidance > 1.0)
    if interval is not None:
        check_interval(interval)
        on &= (s >= interval[0]) & (s <= interval[1])
    if truncation is not None:
        check_truncation(truncation)
        on &= np.arange(len(s)) < round(truncation * len(s))
    return on
