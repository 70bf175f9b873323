"""Declarative torch <-> Flax key maps (numpy arrays in and out; no framework imports).

A map is a list of `Rule`s over key *templates*: plain key strings in which `{name}` stands for a
decimal index. `{i}` is the scanned-layer index of a stacked rule (`stack=(a, b)` takes torch layers
a <= i < b into rows i - a of one stacked Flax array); any other `{name}` appears in both templates,
e.g. `Rule("decoder.up_blocks.{u}.resnets.{r}.conv1.weight", "decoder/up_{u}/res_{r}/conv1/kernel", "conv3d")`.
Every key must match exactly one rule (full match), in both directions; no ordered substring replacement.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from contentv_common.weights import KeyMismatchError

# torch layout -> Flax layout, and back.
TO_FLAX = {
    "copy": lambda w: w,
    "linear": lambda w: w.T,  # [out, in] -> [in, out]
    "conv2d": lambda w: w.transpose(2, 3, 1, 0),  # OIHW -> HWIO
    "conv3d": lambda w: w.transpose(2, 3, 4, 1, 0),  # OIDHW -> DHWIO
    "gamma_c111": lambda w: w.reshape(-1),  # Wan RMS-norm gamma [C, 1, 1, 1] -> [C]
    "gamma_c11": lambda w: w.reshape(-1),  # Wan RMS-norm gamma [C, 1, 1] -> [C]
}
TO_TORCH = {
    "copy": lambda w: w,
    "linear": lambda w: w.T,
    "conv2d": lambda w: w.transpose(3, 2, 0, 1),
    "conv3d": lambda w: w.transpose(4, 3, 0, 1, 2),
    "gamma_c111": lambda w: w.reshape(-1, 1, 1, 1),
    "gamma_c11": lambda w: w.reshape(-1, 1, 1),
}


def to_flax_shape(kind: str, torch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The Flax-layout shape of a torch-layout tensor of `torch_shape` (the layout function on a view, no data)."""
    return TO_FLAX[kind](np.broadcast_to(np.zeros((), np.uint8), torch_shape)).shape


def to_torch_shape(kind: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return TO_TORCH[kind](np.broadcast_to(np.zeros((), np.uint8), flax_shape)).shape


def _template_regex(template: str, sep: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    rx = "".join(re.escape(p) if k % 2 == 0 else rf"(?P<{p}>\d+)" for k, p in enumerate(parts))
    return re.compile(rx)


@dataclass(frozen=True)
class Rule:
    torch: str  # torch key template, e.g. "transformer_blocks.{i}.attn.to_q.weight"
    flax: str  # "/"-joined Flax path template, e.g. "blocks/attn/to_q/kernel"
    kind: str = "copy"  # layout change: copy | linear | conv2d | conv3d | gamma_c111 | gamma_c11
    stack: tuple[int, int] | None = None  # torch layers [a, b) -> rows of one stacked array
    _torch_re: Any = field(init=False, repr=False, compare=False)
    _flax_re: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if self.kind not in TO_FLAX:
            raise ValueError(f"Rule kind {self.kind!r} not in {sorted(TO_FLAX)}")
        if ("{i}" in self.torch) != (self.stack is not None) or "{i}" in self.flax:
            raise ValueError(f"Rule {self.torch!r}: '{{i}}' must appear in the torch template iff stack is set")
        object.__setattr__(self, "_torch_re", _template_regex(self.torch, "."))
        object.__setattr__(self, "_flax_re", _template_regex(self.flax, "/"))

    def to_flax_path(self, key: str) -> tuple[str, int | None] | None:
        """(Flax path, stacked row or None) for a torch key, or None if this rule does not match it."""
        m = self._torch_re.fullmatch(key)
        if m is None:
            return None
        names = m.groupdict()
        row = None
        if self.stack is not None:
            i = int(names.pop("i"))
            if not self.stack[0] <= i < self.stack[1]:
                return None
            row = i - self.stack[0]
        return self.flax.format(**names), row

    def to_torch_keys(self, path: str, rows: int | None) -> list[str] | None:
        """Torch keys for a Flax path (one per stacked row), or None if this rule does not match it."""
        m = self._flax_re.fullmatch(path)
        if m is None:
            return None
        names = m.groupdict()
        if self.stack is None:
            return [self.torch.format(**names)]
        if rows != self.stack[1] - self.stack[0]:
            raise KeyMismatchError(f"{path}: {rows} stacked layers, the map expects {self.stack[1] - self.stack[0]}")
        return [self.torch.format(i=self.stack[0] + r, **names) for r in range(rows)]


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    out = {}
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, p))
        else:
            out[p] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for path, v in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = v
    return tree


def _one(hits: list, what: str):
    if len(hits) != 1:
        raise KeyMismatchError(f"{what} matches {len(hits)} rules" + (f": {[h[0].torch for h in hits]}" if hits else ""))
    return hits[0]


def torch_to_flax(tensors: Iterable[tuple[str, Any]], rules: list[Rule], what: str = "weights") -> dict:
    """Stream (torch key, array) pairs into a nested Flax params dict of numpy arrays.

    Stacked layers go into one preallocated array per path; every row must be filled. Unexpected keys
    and missing layers are reported together, by name.
    """
    flat: dict[str, np.ndarray] = {}
    rows_seen: dict[str, set[int]] = {}
    unexpected = []
    for key, w in tensors:
        hits = [(r, *m) for r in rules if (m := r.to_flax_path(key)) is not None]
        if not hits:
            unexpected.append(key)
            continue
        rule, path, row = _one(hits, f"{what}: torch key {key!r}")
        w = np.asarray(TO_FLAX[rule.kind](np.asarray(w)))
        if row is None:
            if path in flat:
                raise KeyMismatchError(f"{what}: two torch keys map to the Flax path {path}")
            flat[path] = np.asarray(w, order="C")  # (ascontiguousarray would turn 0-d scalars into [1])
            continue
        if path not in flat:
            flat[path] = np.empty((rule.stack[1] - rule.stack[0], *w.shape), w.dtype)
            rows_seen[path] = set()
        if flat[path].shape[1:] != w.shape:
            raise KeyMismatchError(f"{what}: {key} has shape {w.shape}, other layers of {path} have {flat[path].shape[1:]}")
        flat[path][row] = w
        rows_seen[path].add(row)
    missing_rows = [f"{p} rows {sorted(set(range(len(flat[p]))) - s)}" for p, s in rows_seen.items() if len(s) != len(flat[p])]
    if unexpected or missing_rows:
        raise KeyMismatchError(
            f"{what}: unexpected keys {sorted(unexpected)}" + (f"; missing stacked layers: {missing_rows}" if missing_rows else "")
        )
    return unflatten(flat)


def flax_to_torch(params: Mapping, rules: list[Rule]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (torch key, numpy array) for every leaf of a Flax params tree, unstacking scanned layers."""
    for path, w in flatten(params).items():
        w = np.asarray(w)
        hits = [(r, keys) for r in rules if (keys := r.to_torch_keys(path, w.shape[0] if r.stack and w.ndim else None)) is not None]
        rule, keys = _one(hits, f"Flax path {path!r}")
        if rule.stack is None:
            yield keys[0], np.asarray(TO_TORCH[rule.kind](w), order="C")
        else:
            for row, key in enumerate(keys):
                yield key, np.asarray(TO_TORCH[rule.kind](w[row]), order="C")


def read_flax_params(path, rules: list[Rule], what: str | None = None, ignore: Iterable[str] = ()) -> dict:
    """A diffusers weight folder (or .safetensors file) -> nested Flax params of numpy arrays, streaming; keys in
    `ignore` are skipped (never read).

    Reads through safetensors' flax backend (no torch needed; bf16 stays bf16 via ml_dtypes)."""
    from contentv_common.weights import iter_tensors, weight_index

    keys = [k for k in weight_index(path) if k not in set(ignore)]
    tensors = ((k, np.asarray(t)) for k, t in iter_tensors(path, framework="flax", keys=keys))
    return torch_to_flax(tensors, rules, what or str(path))
