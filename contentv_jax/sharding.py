"""Logical axis names and the one table mapping them to mesh axes.

Modules annotate parameters (`nn.with_logical_partitioning(init, ("embed", "heads"))`) and
activations (`constrain(x, ("batch", "length", "act_embed"))`) with the names below only; the
rules table maps each name to mesh axes. A name without a rule is an error at start-up.
Mesh axes, ordered by communication cost: data (pure data parallel), fsdp (parameters and batch
sharded), tensor (heads / mlp split), context (token sequence split of the joint attention).
"""
from __future__ import annotations

import warnings

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Parameter axes.
PARAM_AXES = (
    "layers",  # the scanned-layer axis of stacked parameters
    "embed",  # the model width (inner_dim) on the input side of a matmul
    "heads",  # attention projections' output (num_heads * head_dim)
    "mlp",  # feed-forward hidden width
    "joint",  # text context width (joint_attention_dim / pooled width)
    "conv_in",  # conv / patch input channels (small, never sharded)
    "conv_out",  # conv output channels
    "norm",  # norm scales and other small vectors
    "kernel",  # conv spatial / temporal kernel taps
)
# Activation axes.
ACTIVATION_AXES = ("batch", "length", "kv_length", "act_embed", "act_heads", "act_mlp", "act_channels")

DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("joint", None),
    ("conv_in", None),
    ("conv_out", None),
    ("norm", None),
    ("kernel", None),
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("kv_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_channels", None),
)


def check_rules(rules=DEFAULT_RULES) -> None:
    """Fail if a logical name used by the models has no rule, or a rule names an unknown mesh axis."""
    named = {n for n, _ in rules}
    missing = sorted(set(PARAM_AXES + ACTIVATION_AXES) - named)
    if missing:
        raise ValueError(f"logical axes without a sharding rule: {missing}")
    for name, target in rules:
        targets = target if isinstance(target, tuple) else (target,)
        bad = [t for t in targets if t is not None and t not in MESH_AXES]
        if bad:
            raise ValueError(f"rule {name!r} -> {target!r} names unknown mesh axes {bad}; mesh axes are {MESH_AXES}")


def rules_from_config(config) -> tuple[tuple[str, object], ...]:
    """The validated rules table of `config.sharding_rules` ((logical name, mesh axis | (axes) | None), ...;
    default DEFAULT_RULES): changing the layout is a config change (`--set sharding_rules=...`), not a code edit.
    Malformed entries, repeated or unknown logical names, unknown mesh axes and missing rules raise ValueError."""
    items = config.get("sharding_rules", None) or DEFAULT_RULES
    rules = []
    for item in items:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"sharding_rules: entry {item!r} is not a (logical name, mesh axes) pair")
        name, target = item
        rules.append((name, tuple(target) if isinstance(target, (tuple, list)) else target))
    names = [n for n, _ in rules]
    unknown = sorted(set(names) - set(PARAM_AXES + ACTIVATION_AXES))
    if unknown:
        raise ValueError(f"sharding_rules: unknown logical names {unknown}; the names are {PARAM_AXES + ACTIVATION_AXES}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"sharding_rules: repeated logical names {repeated}")
    check_rules(tuple(rules))
    return tuple(rules)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    """Activation sharding constraint by logical names; a no-op outside a mesh / rules context."""
    return nn.with_logical_constraint(x, names)


# ---------------------------------------------------------------------------------------------
# Meshes and placements (trainer side): a mesh from (axis, size) pairs, -1 = the rest, so one spec fits any device count.


def parse_mesh_spec(spec: str | dict | None) -> dict[str, int]:
    """'data=2,fsdp=2,tensor=2' -> {'data': 2, 'fsdp': 2, 'tensor': 2, 'context': 1}.

    Axes not named get size 1; at most one axis may be -1 ("the rest"). An empty spec means
    fsdp=-1 (all devices on fsdp). Unknown axis names and bad sizes are errors naming the flag.
    """
    if spec is None or spec == "":
        spec = {"fsdp": -1}
    if isinstance(spec, str):
        sizes: dict[str, int] = {}
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or not value.strip().lstrip("-").isdigit():
                raise ValueError(f"--mesh {spec!r}: expected 'axis=size,...' (e.g. data=2,fsdp=-1), got {part!r}")
            sizes[name.strip()] = int(value)
        spec = sizes
    unknown = sorted(set(spec) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"--mesh: unknown axes {unknown}; mesh axes are {MESH_AXES}")
    sizes = {a: int(spec.get(a, 1)) for a in MESH_AXES}
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad or list(sizes.values()).count(-1) > 1:
        raise ValueError(f"--mesh {spec!r}: sizes must be positive, with at most one -1 (the rest)")
    return sizes


def create_mesh(spec: str | dict | None = None, devices=None) -> jax.sharding.Mesh:
    """A `Mesh` with axes MESH_AXES (data, fsdp, tensor, context) over all (or the given) devices.

    Axes are laid out in MESH_AXES order, slowest-varying first, so `tensor` and `context` (most
    communication) land on neighbouring devices. Multi-host: `jax.devices()` spans every process.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec)
    fixed = 1
    for s in sizes.values():
        fixed *= s if s != -1 else 1
    for a, s in sizes.items():
        if s == -1:
            if len(devices) % fixed:
                raise ValueError(f"--mesh {spec!r}: {len(devices)} devices do not divide by the fixed axes ({fixed})")
            sizes[a] = len(devices) // fixed
    total = 1
    for s in sizes.values():
        total *= s
    if total != len(devices):
        raise ValueError(f"--mesh {spec!r} = {sizes} needs {total} devices, there are {len(devices)}")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(tuple(sizes.values()), devices)
    except Exception:  # non-TPU / odd topologies: plain row-major order
        import numpy as np

        grid = np.asarray(devices, dtype=object).reshape(tuple(sizes.values()))
    return jax.sharding.Mesh(grid, MESH_AXES)


# A mesh axis that may move to another dim of a parameter when its own dim does not divide (FSDP only needs
# each parameter split somewhere; tensor / context parallelism need their particular dims) ...
RELOCATABLE_MESH_AXES = ("fsdp",)
# ... onto a dim with one of these logical names (never the scan axis or conv taps).
NOT_RELOCATION_TARGETS = (None, "layers", "kernel")


def _fit_spec(spec: jax.sharding.PartitionSpec, shape, mesh: jax.sharding.Mesh, names=()) -> jax.sharding.PartitionSpec:
    """Make `spec` valid for `shape` on `mesh`, never silently replicating a large axis:
    1. a dim whose mesh axes do not divide its size is replicated (e.g. 2 heads on tensor=4);
    2. a RELOCATABLE_MESH_AXES axis (size > 1) left unused, by step 1 or because the rules never named it for
       this array (e.g. fsdp=256 and the 2432-wide `embed` dim of contentv-8b: 2432 = 128 x 19), shards the
       largest other dim it divides whose logical name (`names`) is not in NOT_RELOCATION_TARGETS.
    Arrays no axis can divide stay replicated: `replicated_report` lists the large ones."""
    ndim = len(shape)
    names = tuple(names) + (None,) * (ndim - len(names))
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (ndim - len(spec))):
        out.append(axes if dim % _axes_size(axes, mesh) == 0 else None)
    used = {a for axes in out for a in (axes if isinstance(axes, tuple) else (axes,)) if a is not None}
    for axis in RELOCATABLE_MESH_AXES:
        n = mesh.shape.get(axis, 1)
        if n == 1 or axis in used:
            continue
        free = [i for i in range(ndim) if _axes_size(out[i], mesh) == 1 and names[i] not in NOT_RELOCATION_TARGETS
                and shape[i] % n == 0]  # unsharded dims (or sharded over size-1 axes only)
        if free:
            out[max(free, key=lambda i: shape[i])] = axis
            used.add(axis)
    return jax.sharding.PartitionSpec(*out)


def _axes_size(axes, mesh: jax.sharding.Mesh) -> int:
    n = 1
    for a in axes if isinstance(axes, tuple) else (axes,) if axes is not None else ():
        n *= mesh.shape[a]
    return n


def logical_to_mesh_spec(names, rules=DEFAULT_RULES) -> jax.sharding.PartitionSpec:
    """Logical names of one array's dims -> a mesh PartitionSpec through `rules`.

    Unlike `nn.logical_to_mesh_axes`, a logical name may repeat (conv kernels: ("kernel", "kernel", ...));
    a mesh axis already used by an earlier dim is not used again (that dim is replicated).
    """
    table = dict(rules)
    out, used = [], set()
    for name in names:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule; rules name {sorted(table)}")
        target = table[name]
        axes = tuple(a for a in (target if isinstance(target, tuple) else (target,)) if a is not None and a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return jax.sharding.PartitionSpec(*out)


def logical_shardings(abstract_tree, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of (possibly `nn.Partitioned`-boxed) abstract arrays.

    Leaves with logical names (from `nn.with_logical_partitioning`) are mapped through `rules`;
    unannotated leaves (scalars, optimizer counters) are replicated; a dim the mesh axes do not divide
    is replicated and fsdp moves to another dim it divides (`_fit_spec`). Returns a tree shaped like the
    unboxed tree.
    """
    check_rules(rules)

    def one(x):
        names = x.names if isinstance(x, nn.Partitioned) else ()
        shape = nn.meta.unbox(x).shape
        spec = _fit_spec(logical_to_mesh_spec(names, rules), shape, mesh, names)
        return jax.sharding.NamedSharding(mesh, spec)

    return jax.tree.map(one, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def replicated_report(abstract_tree, shardings, min_elements: int = 1 << 20) -> list[tuple[str, tuple, int]]:
    """(path, shape, bytes) of every leaf with more than `min_elements` elements that is fully replicated on a
    mesh whose parameter axes (fsdp, tensor) have more than one device: each device then holds all of it.
    abstract_tree: arrays / ShapeDtypeStructs (or `nn.Partitioned` boxes of them); shardings: the same tree."""
    leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(abstract_tree))
    out = []
    for (path, x), s in zip(leaves, jax.tree.leaves(shardings), strict=True):
        mesh_shape = dict(s.mesh.shape)
        if mesh_shape.get("fsdp", 1) * mesh_shape.get("tensor", 1) == 1 or x.size <= min_elements:
            continue
        if s.is_fully_replicated:
            out.append((jax.tree_util.keystr(path), tuple(x.shape), int(x.size) * x.dtype.itemsize))
    return out


def warn_replicated(abstract_tree, shardings, what: str = "state", min_elements: int = 1 << 20) -> list:
    """Warn (RuntimeWarning, listing them) about the large replicated leaves of `replicated_report`."""
    rep = replicated_report(abstract_tree, shardings, min_elements)
    if rep:
        gib = sum(b for _, _, b in rep) / 2**30
        listing = "\n  ".join(f"{p} {shape}" for p, shape, _ in rep)
        warnings.warn(f"{len(rep)} {what} arrays over {min_elements} elements are REPLICATED on every device "
                      f"({gib:.2f} GiB on each device; optimizer moments and EMA are placed alike): no mesh axis "
                      f"divides their dims. Pick fsdp / tensor sizes that divide the model widths (contentv-8b: "
                      f"2432 = 128 x 19, so fsdp <= 128 and data for the rest, e.g. --mesh data=2,fsdp=128 on 256 "
                      f"devices)\n  {listing}", RuntimeWarning, stacklevel=2)
    return rep


def batch_sharding(mesh: jax.sharding.Mesh, ndim: int, rules=DEFAULT_RULES) -> jax.sharding.NamedSharding:
    """Sharding of a batch array [B, ...]: B over the mesh axes of the logical 'batch' axis."""
    spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
    return jax.sharding.NamedSharding(mesh, spec)


def batch_slot(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> tuple[int, int]:
    """(index, count): which of the `count` equal row ranges of every global batch this process feeds.

    The rows a process feeds are those its devices hold under the batch sharding. When the batch axes span the
    processes, each feeds its own range (count = process count); when a mesh axis the batch is not split over
    spans them (e.g. --mesh context=8 over two 4-device hosts), processes holding the same rows form one slot
    and must read the same data, or the 'replicated' global batch would differ between hosts.
    """
    n = batch_divisor(mesh, rules)
    rows: dict[int, set] = {}
    for device, index in batch_sharding(mesh, 1, rules).devices_indices_map((n,)).items():
        rows.setdefault(device.process_index, set()).update(range(*index[0].indices(n)))
    slots = sorted({tuple(sorted(r)) for r in rows.values()})
    size = len(slots[0])
    if any(len(s) != size or s != tuple(range(s[0], s[0] + size)) for s in slots) or len(slots) * size != n:
        raise ValueError(f"mesh {dict(mesh.shape)}: the batch shards of the processes are not equal contiguous ranges "
                         f"({slots}); order the mesh so each process holds whole batch shards")
    return slots.index(tuple(sorted(rows[jax.process_index()]))), len(slots)


def place_rows(x, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> jax.Array:
    """This process's rows [b, ...] (its `batch_slot` of the global batch) -> the global array [b * slots, ...]
    sharded over the batch axes (multi-host safe: processes sharing a slot hold the same rows)."""
    global_shape = (x.shape[0] * batch_slot(mesh, rules)[1], *x.shape[1:])
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x, global_shape)


def batch_divisor(mesh: jax.sharding.Mesh, rules=DEFAULT_RULES) -> int:
    """How many shards the batch axis is split into (global batch sizes must be multiples of it)."""
    axes = batch_sharding(mesh, 1, rules).spec[0]
    axes = axes if isinstance(axes, tuple) else (axes,) if axes else ()
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n
