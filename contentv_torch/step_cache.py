"""The step cache of one sampling run in PyTorch: the policies of `contentv_common.step_cache` on the DiT.

    cache = StepCache(make_policy("teacache", 0.1), num_steps=50)
    transformer.step_cache = cache      # the pipeline does this while it denoises
    cache.begin_step(i, ("uncond", "cond"))   # denoise, before each DiT call: which branches the batch holds
    ... transformer(...)                # blocks_forward hands its blocks to cache.blocks

The batch is len(branches) equal chunks of rows ([uncond; cond] with CFG). Every branch keeps its own state,
and only the branches that compute run the blocks (as one sub-batch); a skipped branch gets its input tokens
plus its last computed residual. Under sequence parallelism the signals are summed over the sp group first, so
every rank of the group takes the same decision; under CFG parallelism a rank holds one branch (`local`).
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from contentv_common.step_cache import CachePolicy, init_state, skip_rule


class StepCache:
    """policy: a CachePolicy; num_steps: of the run; group: the sp process group (None: one process);
    record=True (with policy "none"): compute every step and keep calibration records (`records`)."""

    def __init__(self, policy: CachePolicy, num_steps: int, group=None, record: bool = False):
        self.policy, self.num_steps, self.group, self.record = policy, num_steps, group, record
        self.branches: tuple[str, ...] = ("cond",)
        self.step = 0
        self.state: dict[str, dict] = {}
        self.evaluations = 0  # branch passes through the blocks (CFG without caching: 2 per step)
        self.skipped = 0  # branch passes replaced by a cached residual
        self.records: list[dict] = []

    def begin_step(self, step: int, branches: tuple[str, ...]) -> None:
        self.step, self.branches = step, tuple(branches)

    @contextlib.contextmanager
    def local(self, index: int):
        """This rank holds only branch `index` of the batch (CFG parallelism)."""
        saved = self.branches
        self.branches = (saved[index],)
        try:
            yield
        finally:
            self.branches = saved

    def _sums(self, *values: torch.Tensor) -> list[float]:
        """Scalars summed over the sp group (so all its ranks decide alike), as Python floats."""
        v = torch.stack([t.double() for t in values])
        if self.group is not None:
            dist.all_reduce(v, group=self.group)
        return v.tolist()

    def _rel_l1(self, a: torch.Tensor, b: torch.Tensor | None) -> float:
        if b is None:
            return float("inf")
        num, den = self._sums((a - b).abs().sum(), b.abs().sum())
        return num / max(den, 1e-30)

    def blocks(self, tr, x: torch.Tensor, ctx: torch.Tensor, temb: torch.Tensor, attn_fn) -> torch.Tensor:
        """The transformer blocks of `tr` on x [N, S, D], ctx [N, L, D], temb [N, D] -> x [N, S, D], skipping the
        branches the policy lets skip."""
        p, names = self.policy, self.branches
        rows = x.shape[0] // len(names)
        blocks = list(tr.transformer_blocks)
        first = p.name == "fbcache"
        if first:  # block 0 runs for every branch: its residual is the signal
            x1, ctx1 = blocks[0](x, ctx, temb, attn_fn)
            probe, start, blocks = x1 - x, x1, blocks[1:]
        else:
            start, ctx1 = x, ctx
            probe = blocks[0].norm1(x, temb)[0] if p.name == "teacache" or self.record else None
        compute = []
        for j, b in enumerate(names):
            st = self.state.setdefault(b, {"rule": init_state(), "prev": None, "residual": None})
            sl = slice(j * rows, (j + 1) * rows)
            if p.name == "magcache":
                signal = p.ratio(b, self.step, self.num_steps)
            elif probe is not None:
                signal = self._rel_l1(probe[sl], st["prev"])
            else:
                signal = 0.0
            forced = p.forced(self.step, self.num_steps) or st["residual"] is None or not p.active
            c, st["rule"] = skip_rule(p, st["rule"], signal, forced)
            if probe is not None and (c or not first):  # fbcache: compared with the last computed step
                st["prev"] = probe[sl]
            if self.record:
                st["input_change"] = signal
            compute.append(bool(c))
        idx = [j for j, c in enumerate(compute) if c]
        out = {}
        if idx:
            sel = torch.cat([torch.arange(j * rows, (j + 1) * rows, device=x.device) for j in idx])
            full = len(idx) == len(names)
            h, c = (start, ctx1) if full else (start[sel], ctx1[sel])
            t = temb if full else temb[sel]
            for block in blocks:
                h, c = block(h, c, t, attn_fn)
            for k, j in enumerate(idx):
                st, sl = self.state[names[j]], slice(k * rows, (k + 1) * rows)
                residual = h[sl] - start[j * rows:(j + 1) * rows]
                if self.record:
                    self._record(names[j], st, h[sl], residual)
                st["residual"] = residual
                out[j] = h[sl]
        self.evaluations += len(idx)
        self.skipped += len(names) - len(idx)
        for j in range(len(names)):
            if j not in out:
                out[j] = start[j * rows:(j + 1) * rows] + self.state[names[j]]["residual"]
        return torch.cat([out[j] for j in range(len(names))]) if len(names) > 1 else out[0]

    def _record(self, branch: str, st: dict, out: torch.Tensor, residual: torch.Tensor) -> None:
        """Calibration data: block 0's input change, the blocks' output change, the residual norm ratio."""
        if st.get("out") is not None:
            out_change = self._rel_l1(out, st["out"])
            sq_now, sq_prev = self._sums(residual.double().pow(2).sum(), st["residual"].double().pow(2).sum())
            self.records.append({"branch": branch, "step": self.step, "num_steps": self.num_steps,
                                 "input_change": st["input_change"], "output_change": out_change,
                                 "ratio": (sq_now / max(sq_prev, 1e-30)) ** 0.5})
        st["out"] = out
