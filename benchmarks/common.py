"""Helpers shared by the benchmark scripts: timing, peak memory, matmul peaks, machine facts, JSON / markdown out.

Nothing here imports torch or JAX at module level: `benchmarks.memory` must set XLA_FLAGS before JAX loads.
"""
from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from contentv_common.weights import atomic_file

REPO = Path(__file__).resolve().parents[1]
GiB = float(1 << 30)


# ------------------------------------------------------------------------------------------- parity
def rel_err(a, b) -> float:
    """||a - b|| / ||b|| in float64 (arrays or tensors on the CPU): the project's parity measure."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"rel_err: shape mismatch {a.shape} vs {b.shape}")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


# ------------------------------------------------------------------------------------------- timing
def time_fn(fn: Callable[[], Any], sync: Callable[[Any], Any] = lambda r: r, warmup: int = 1, repeats: int = 3,
            min_time: float = 0.0) -> dict:
    """Call `fn` `warmup` times untimed, then at least `repeats` times (and until `min_time` s have passed),
    `sync(result)` inside each timing (block_until_ready / cuda synchronize).
    Returns {"median_s", "min_s", "times_s": [...]} (wall-clock seconds per call)."""
    for _ in range(warmup):
        sync(fn())
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times}


# ------------------------------------------------------------------------------------------- memory
def _rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; falls back to the peak on other systems)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    """Peak RSS of this process so far (ru_maxrss; kB on Linux)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if platform.system() == "Darwin" else r * 1024


class RSSPeak:
    """Peak resident memory inside a `with` block, sampled by a thread every `interval` s.

    `peak_bytes` is the highest RSS seen, `delta_bytes` = peak - RSS at entry (what the block added).
    Sampling can miss spikes shorter than `interval`; steps here take tens of milliseconds or more.
    """

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self):
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "RSSPeak":
        self.start_bytes = self.peak_bytes = _rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, _rss_bytes())

    @property
    def delta_bytes(self) -> int:
        return self.peak_bytes - self.start_bytes


# ------------------------------------------------------------------------------------- matmul peaks
def torch_matmul_peak(n: int = 2048, dtype: str = "float32", device: str = "cpu", repeats: int = 5) -> dict:
    """Measured FLOP/s of an n x n x n matmul in torch (2 n^3 FLOPs per call): the machine's practical peak."""
    import torch

    dev = torch.device(device)
    a = torch.randn(n, n, dtype=getattr(torch, dtype), device=dev)
    b = torch.randn(n, n, dtype=getattr(torch, dtype), device=dev)
    sync = (lambda r: torch.cuda.synchronize()) if dev.type == "cuda" else (lambda r: r)
    t = time_fn(lambda: a @ b, sync, warmup=2, repeats=repeats)
    return {"framework": "torch", "n": n, "dtype": dtype, "seconds": t["min_s"], "flops_per_s": 2 * n**3 / t["min_s"]}


def jax_matmul_peak(n: int = 2048, dtype: str = "float32", repeats: int = 5) -> dict:
    """The same measurement in JAX on its default device (jitted, result blocked on)."""
    import jax
    import jax.numpy as jnp

    ka, kb = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(ka, (n, n), jnp.dtype(dtype))
    b = jax.random.normal(kb, (n, n), jnp.dtype(dtype))
    f = jax.jit(jnp.matmul)
    t = time_fn(lambda: f(a, b), jax.block_until_ready, warmup=2, repeats=repeats)
    return {"framework": "jax", "n": n, "dtype": dtype, "seconds": t["min_s"], "flops_per_s": 2 * n**3 / t["min_s"]}


# ------------------------------------------------------------------------------------ machine facts
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Where and when: CPU count and model, load average, date (UTC), library versions, GPU if any."""
    info: dict[str, Any] = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
    }
    for mod in ("torch", "jax", "jaxlib", "flax", "optax", "diffusers"):
        if importlib.util.find_spec(mod) is not None:
            try:
                info[mod] = __import__(mod).__version__
            except Exception:  # noqa: BLE001 - a broken optional install must not stop a benchmark
                info[mod] = "unimportable"
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------------- reference
def load_reference_module():
    """tests/reference.py (the diffusers-built ContentV reference) imported by path: it is not a package."""
    path = REPO / "tests" / "reference.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the diffusers reference is needed for the side-by-side benchmarks "
                                "(run from a source checkout)")
    spec = importlib.util.spec_from_file_location("contentv_tests_reference", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------- output
def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON atomically (temp file + rename)."""
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float) + "\n")
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(text)
    return path


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.{digits}g}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(digits - 2, 1)}f}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """rows: dicts; columns: (key, header) pairs. Missing keys print as '-'."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    sep = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])
