"""Several GPUs / NPUs under torchrun: Ulysses sequence parallelism + CFG parallelism of the DiT.

World = cfg x sp ranks, rank = cfg_rank * sp + sp_rank.
- **CFG parallelism** (cfg = 2): the denoiser's batch [uncond; cond] is split in two; each half runs on
  one group of sp ranks and the velocities are all-gathered back, so every rank holds the same latents.
- **Ulysses sequence parallelism** (sp ranks): after `embed`, the video tokens [B, N, D] and the text
  tokens [B, L, D] are each padded to a multiple of sp and split, so a rank holds N/sp + L/sp tokens
  through every block. Attention all-to-alls q, k, v from [B, H, S/sp, hd] (all heads, a slice of the
  tokens) to [B, H/sp, S, hd] (a slice of the heads, all tokens), drops the padded keys, runs the inner
  backend (SDPA / NPU), and all-to-alls back. Heads are zero-padded to a multiple of sp (38 heads run on
  4 or 8 ranks). Tokens are gathered again before `head`.
Per-token work (norms, MLPs, projections) is exact under any split; attention sees the same keys, so the
result equals one device's up to summation order.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from contentv_torch.attention import AttentionFn, default_backend_for, get_attention_backend

_BACKENDS = {"cuda": "nccl", "npu": "hccl", "cpu": "gloo"}


def world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass
class ParallelState:
    """This rank's place in the cfg x sp grid and its process groups (None for a degree of 1)."""

    rank: int
    sp: int
    cfg: int
    sp_group: object | None
    cfg_group: object | None
    device: torch.device

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def cfg_rank(self) -> int:
        return self.rank // self.sp

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (in place)."""
        dist.broadcast(x, src=0)
        return x

    def wrap(self, transformer) -> "ParallelTransformer":
        return ParallelTransformer(transformer, self)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def make_state(sp: int, cfg: int, device: torch.device | str = "cpu") -> ParallelState:
    """Build the sp and cfg groups on an initialised default process group of world size sp * cfg.
    Every rank must call this (group creation is collective)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if sp < 1 or cfg not in (1, 2) or sp * cfg != world:
        raise ValueError(f"sequence-parallel degree {sp} x cfg degree {cfg} must equal the world size {world} "
                         "(cfg is 1, or 2 with --cfg-parallel)")
    sp_group = cfg_group = None
    for c in range(cfg):
        ranks = [c * sp + s for s in range(sp)]
        g = dist.new_group(ranks)
        if rank in ranks and sp > 1:
            sp_group = g
    for s in range(sp):
        ranks = [c * sp + s for c in range(cfg)]
        g = dist.new_group(ranks)
        if rank in ranks and cfg > 1:
            cfg_group = g
    return ParallelState(rank, sp, cfg, sp_group, cfg_group, torch.device(device))


def init_parallel(device: str = "auto", sp: int | None = None, cfg_parallel: bool = False) -> ParallelState:
    """Under torchrun: pick this rank's device (cuda:LOCAL_RANK / npu:LOCAL_RANK / cpu), start the process
    group (nccl / hccl / gloo) and build the groups. sp defaults to world size / cfg degree."""
    from contentv_torch.pipeline import resolve_device

    world, local = world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    cfg = 2 if cfg_parallel else 1
    sp = sp or max(world // cfg, 1)
    if world == 1 or sp * cfg != world:
        raise ValueError(f"--sp {sp} x cfg degree {cfg} needs {sp * cfg} processes, this run has world size {world}; "
                         f"launch with `torchrun --nproc-per-node {sp * cfg} -m contentv_torch.generate ...`")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = resolve_device(device if ":" in device or device == "cpu" else f"{device}:{local}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    elif dev.type == "npu":
        torch.npu.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(_BACKENDS[dev.type])
    return make_state(sp, cfg, dev)


# ---------------------------------------------------------------------------------------------
# Ulysses attention
# ---------------------------------------------------------------------------------------------
def _seq_to_heads(x: torch.Tensor, p: int, group) -> torch.Tensor:
    """[B, H, S_local, hd] (H % p == 0) -> [B, H/p, p*S_local, hd]: rank r gets heads r*H/p.. of every rank's tokens."""
    b, h, s, d = x.shape
    send = x.reshape(b, p, h // p, s, d).transpose(0, 1).contiguous()  # [p, B, H/p, S_local, hd], chunk j -> rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r] = rank r's tokens, my heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s, d)


def _heads_to_seq(x: torch.Tensor, p: int, group) -> torch.Tensor:
    """[B, H/p, p*S_local, hd] -> [B, H, S_local, hd] (inverse of _seq_to_heads)."""
    b, hl, s, d = x.shape
    send = x.reshape(b, hl, p, s // p, d).permute(2, 0, 1, 3, 4).contiguous()  # [p, B, H/p, S_local, hd]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r] = rank r's heads of my tokens
    return recv.transpose(0, 1).reshape(b, p * hl, s // p, d)


@dataclass(frozen=True, eq=False)
class UlyssesAttention:
    """An attention backend `fn(q, k, v) -> out` on this rank's tokens [B, H, S_local, hd].

    keep: indices of the real (not padded) tokens in the gathered sequence [p * S_local] (None: all real);
    only they serve as keys and values.
    """

    inner: AttentionFn
    group: object
    size: int
    keep: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        p, h = self.size, q.shape[1]
        pad = (-h) % p  # zero heads: uniform attention over zero values, sliced off below
        if pad:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, pad)) for t in (q, k, v))
        q, k, v = (_seq_to_heads(t, p, self.group) for t in (q, k, v))  # [B, Hp/p, S, hd]
        if self.keep is not None:
            k, v = k.index_select(2, self.keep), v.index_select(2, self.keep)
        o = self.inner(q, k, v)  # [B, Hp/p, S, hd]
        return _heads_to_seq(o.contiguous(), p, self.group)[:, :h]


def token_layout(n: int, m: int, p: int, device) -> tuple[int, int, torch.Tensor | None]:
    """Per-rank lengths of n video and m text tokens split over p ranks, and the indices of the real tokens
    in the gathered sequence [rank 0: video chunk | text chunk, rank 1: ...] (None when nothing is padded)."""
    nl, ll = math.ceil(n / p), math.ceil(m / p)
    if nl * p == n and ll * p == m:
        return nl, ll, None
    keep = [r * (nl + ll) + i for r in range(p) for i in range(nl) if r * nl + i < n]
    keep += [r * (nl + ll) + nl + j for r in range(p) for j in range(ll) if r * ll + j < m]
    return nl, ll, torch.tensor(sorted(keep), device=device)


def _shard(x: torch.Tensor, per_rank: int, rank: int) -> torch.Tensor:
    """[B, S, D] -> this rank's [B, per_rank, D] chunk of x zero-padded to per_rank * p tokens."""
    x = x[:, rank * per_rank : (rank + 1) * per_rank]
    return torch.nn.functional.pad(x, (0, 0, 0, per_rank - x.shape[1])) if x.shape[1] < per_rank else x


def _all_gather(x: torch.Tensor, group, size: int, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class ParallelTransformer(torch.nn.Module):
    """The DiT's forward, computed over the cfg x sp ranks; same signature and result as the DiT.

    forward(hidden_states [N, C, T, H, W], encoder_hidden_states [N, L, D_ctx], pooled [N, P], timestep [N])
      -> [N, C_out, T, H, W] on every rank (N % cfg == 0: each cfg group computes one N/cfg slice).
    """

    def __init__(self, transformer, state: ParallelState):
        super().__init__()
        self.transformer, self.state = transformer, state
        backend = transformer.attention_backend
        self.inner: AttentionFn = get_attention_backend(backend or default_backend_for(state.device))

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        st = self.state
        inputs = (hidden_states, encoder_hidden_states, pooled_projections, timestep)
        if st.cfg == 1:
            return self._sp_forward(*inputs)
        cache = self.transformer.step_cache
        if (len(cache.branches) == st.cfg) if cache is not None else hidden_states.shape[0] % st.cfg == 0:
            inputs = tuple(t.chunk(st.cfg)[st.cfg_rank] for t in inputs)
            with cache.local(st.cfg_rank) if cache is not None else contextlib.nullcontext():
                out = self._sp_forward(*inputs)
            return _all_gather(out, st.cfg_group, st.cfg, dim=0)
        # One branch (a step outside the guidance schedule): the last cfg group (the cond one, whose step cache
        # state it is) computes it and sends it to the others, so every rank holds the same velocity.
        last = st.cfg - 1
        if st.cfg_rank == last:
            out = self._sp_forward(*inputs).contiguous()
        else:
            b, _, t, h, w = hidden_states.shape
            out = hidden_states.new_empty((b, self.transformer.config.out_channels, t, h, w))
        dist.broadcast(out, src=last * st.sp + st.sp_rank, group=st.cfg_group)
        return out

    def _sp_forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        tr, st = self.transformer, self.state
        x, ctx, temb = tr.embed(hidden_states, encoder_hidden_states, pooled_projections, timestep)
        if st.sp > 1:
            n = x.shape[1]
            nl, ll, keep = token_layout(n, ctx.shape[1], st.sp, x.device)
            x, ctx = _shard(x, nl, st.sp_rank), _shard(ctx, ll, st.sp_rank)  # [B, N/sp, D], [B, L/sp, D]
            saved = tr.attention_backend
            tr.set_attention_backend(UlyssesAttention(self.inner, st.sp_group, st.sp, keep))
            try:
                x = tr.blocks_forward(x, ctx, temb)  # [B, N/sp, D]
            finally:
                tr.set_attention_backend(saved)
            x = _all_gather(x, st.sp_group, st.sp, dim=1)[:, :n]  # [B, N, D]
        else:
            x = tr.blocks_forward(x, ctx, temb)
        p = tr.config.patch_size
        t, hh, ww = hidden_states.shape[2:]
        return tr.head(x, temb, (t, hh // p, ww // p)).to(hidden_states.dtype)
