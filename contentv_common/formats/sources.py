"""Weight formats in: detection and tensor-by-tensor readers, without torch or JAX.

Every input format is opened as a `Source`: one model component ("transformer" or "vae") whose tensors
are read one at a time under their diffusers key names, with the config and the shapes known from the
headers before any tensor is read. `plan_flax` lays a Source out as the leaves of our Flax tree (stacked
scanned layers produced row by row); `iter_params` / `load_params` read any source into Flax params, and
`convert.formats` writes a Source out tensor by tensor, so converting the 16 GB ContentV-8B needs memory
for about one tensor, not for the model.

Two formats need a framework to read, and their readers live with it: a training checkpoint ("orbax",
`contentv_jax.checkpoint.open_source`) and a Wan `.pth` pickle ("wan-original", torch, in
`convert.formats`). Callers pass them as `openers` {format: open(path, **kw) -> Source}.

The JAX format ("flax"): a folder with `config.json` (the diffusers config plus `"_contentv_format": "flax"`)
and `flax_params.safetensors` (or shards `flax_params-0000k-of-0000n.safetensors` + `flax_params.safetensors.
index.json`) holding the nested Flax params tree flattened with "/" keys (`transformer_blocks/attn/to_q/
kernel`, scanned layers stacked on a leading axis). Safetensors rather than orbax because it can be written
leaf by leaf (orbax saves a whole in-memory tree), read leaf by leaf or slice by slice without JAX or orbax,
and bit-exactly round-trips bf16.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from contentv_common.config import IGNORED_TRANSFORMER_KEYS, TransformerConfig, VAEConfig, read_json
from contentv_common.weights import (
    CONFIG_NAME,
    DTYPES,
    SAFETENSORS_DTYPES,
    KeyMismatchError,
    check_keys,
    read_safetensors_header,
    weight_index,
)
from contentv_common.formats import sd3_original as sd3
from contentv_common.formats.keymap import TO_FLAX, TO_TORCH, Rule, to_flax_shape, to_torch_shape, unflatten
from contentv_common.formats.transformer_keys import transformer_rules, transformer_shapes
from contentv_common.formats.vae_keys import vae_rules, vae_shapes

log = logging.getLogger("convert")

FLAX_WEIGHTS_NAME = "flax_params.safetensors"
FLAX_INDEX_NAME = "flax_params.safetensors.index.json"
FLAX_FORMAT_TAG = "_contentv_format"

# name -> what it is (listed by --help and in "unknown format" errors).
FORMATS: dict[str, str] = {
    "sd3-original": "SD3.5 Large transformer, original single file (sd3.5_large.safetensors: "
                    "model.diffusion_model.*, joint_blocks, fused qkv)",
    "diffusers-transformer": "diffusers transformer/ folder: SD3.5 Large (SD3Transformer2DModel) or ContentV-8B "
                             "(SD3Transformer3DModel); config.json + safetensors, single or sharded + index",
    "wan-original": "Wan2.1 VAE, original checkpoint (Wan2.1_VAE.pth; read with torch.load(weights_only=True))",
    "diffusers-vae": "diffusers vae/ folder of AutoencoderKLWan (config.json + safetensors)",
    "flax": "our JAX params (transformer or VAE): config.json + flax_params*.safetensors of the '/'-flattened Flax tree",
    "orbax": "a contentv_jax training checkpoint (orbax; the checkpoint dir or one step dir); --ema picks the EMA params",
    "contentv-folder": "a whole ContentV / diffusers model folder (model_index.json, transformer/, vae/, text "
                       "encoders, tokenizers, scheduler/)",
}
COMPONENT_FORMATS = ("sd3-original", "diffusers-transformer", "wan-original", "diffusers-vae", "flax", "orbax")
# formats read by a framework's own loader, passed in as `openers` by the packages that have it
FRAMEWORK_FORMATS = {"orbax": "contentv_jax.checkpoint.open_source (JAX, orbax)",
                     "wan-original": "convert.formats.open_wan_original (torch)"}
Opener = Callable[..., "Source"]  # open(path, **kw) -> Source

CHECKPOINT_STATE_ITEM = "state"  # the orbax item of a training checkpoint's step dir that holds the train state



class FormatError(ValueError):
    """An input that is not (or not recognisably) one of FORMATS."""


def _format_list() -> str:
    return "\n".join(f"  {k:22s} {v}" for k, v in FORMATS.items())


# ----------------------------------------------------------------------------------------------------------
# Components: each model part's config, key map and the shapes its config implies
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Component:
    name: str
    config_class: type
    rules: Callable[[Any], list[Rule]]  # config -> the torch <-> Flax Rule table
    shapes: Callable[[Any], dict[str, tuple[int, ...]]]  # config -> {diffusers key: shape} of the model
    ignored_keys: tuple[str, ...] = ()  # diffusers keys a source may hold that the model drops on purpose


COMPONENTS = {
    "transformer": Component("transformer", TransformerConfig, transformer_rules, transformer_shapes,
                             IGNORED_TRANSFORMER_KEYS),
    "vae": Component("vae", VAEConfig, vae_rules, vae_shapes),
}
_CLASS_NAMES = {"SD3Transformer2DModel": "transformer", "SD3Transformer3DModel": "transformer",
                "ContentVTransformer3DModel": "transformer", "AutoencoderKLWan": "vae", "WanVAE": "vae"}


def rules_for(component: str, cfg) -> list[Rule]:
    return COMPONENTS[component].rules(cfg)


def expected_torch_shapes(component: str, cfg) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape of the model of `cfg` (from the config alone)."""
    return COMPONENTS[component].shapes(cfg)


def component_of_config(config: Mapping[str, Any], where: str) -> str:
    name = config.get("_class_name")
    if name in _CLASS_NAMES:
        return _CLASS_NAMES[name]
    if "attention_head_dim" in config and "joint_attention_dim" in config:
        return "transformer"
    if "base_dim" in config and "z_dim" in config:
        return "vae"
    raise FormatError(f"{where}: config.json (_class_name={name!r}) is neither an SD3/ContentV transformer nor a Wan VAE")


# ----------------------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """One model component, readable tensor by tensor under diffusers key names.

    shapes / dtypes come from headers (nothing is read until `read(key)`); `dropped` names keys the source
    holds that the ContentV model does not use (SD3.5's `pos_embed.pos_embed`)."""

    component: str
    format: str
    path: Path
    config: Any  # TransformerConfig | VAEConfig
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    read: Callable[[str], np.ndarray]
    dropped: tuple[str, ...] = ()
    order: list[str] | None = None  # the cheapest reading order, when it matters (default: sorted keys)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack, repr=False)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _drop_ignored(component: str, shapes: dict, dtypes: dict) -> tuple[str, ...]:
    dropped = tuple(k for k in COMPONENTS[component].ignored_keys if k in shapes)
    for k in dropped:
        shapes.pop(k)
        dtypes.pop(k)
        log.info("dropping %s (SD3's learned 2D position table; ContentV adds a fixed 3D sin-cos table)", k)
    return dropped


class _SafetensorsFile:
    """One safetensors file read with positioned reads, not mmap: the process holds only the arrays it asked
    for (an mmap'ed 5 GB shard that is read through stays resident and counts in the RSS)."""

    def __init__(self, path: Path):
        self.path = path
        self.raw = open(path, "rb", buffering=0)
        try:
            self.base, header = read_safetensors_header(self.raw)
            self.entries = {k: (np.dtype(SAFETENSORS_DTYPES[e["dtype"]]), tuple(e["shape"]), tuple(e["data_offsets"]))
                            for k, e in header.items()}
        except Exception as e:  # struct / JSON / unknown dtype
            self.raw.close()
            raise ValueError(f"{path}: not a readable safetensors file ({e!r})") from None

    def read(self, key: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor, or rows [a, b) of its leading axis."""
        dtype, shape, (start, end) = self.entries[key]
        if rows is not None:
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            start, end, shape = start + rows[0] * row_bytes, start + rows[1] * row_bytes, (rows[1] - rows[0], *shape[1:])
        out = np.empty(shape, dtype)
        view = memoryview(out.reshape(-1).view(np.uint8))
        self.raw.seek(self.base + start)
        done = 0
        while done < end - start:
            got = self.raw.readinto(view[done:])
            if not got:
                raise ValueError(f"{self.path}: truncated data for {key}")
            done += got
        return out


class _SafetensorsFiles:
    """key -> its file, opened on demand and closed with the Source."""

    def __init__(self, stack: contextlib.ExitStack, index: Mapping[str, Path]):
        self.stack, self.index, self.handles = stack, index, {}

    def __call__(self, key: str) -> _SafetensorsFile:
        f = self.index[key]
        if f not in self.handles:
            self.handles[f] = _SafetensorsFile(f)
            self.stack.callback(self.handles[f].raw.close)
        return self.handles[f]

    def header(self, keys=None) -> tuple[dict, dict]:
        shapes, dtypes = {}, {}
        for k in self.index if keys is None else keys:
            dtypes[k], shapes[k], _ = self(k).entries[k]
        return shapes, dtypes


def open_diffusers_folder(path: Path) -> Source:
    cfg_json = read_json(path / CONFIG_NAME)
    component = component_of_config(cfg_json, str(path))
    cfg = COMPONENTS[component].config_class.from_diffusers_config(cfg_json)
    src = Source(component, f"diffusers-{component}", path, cfg, {}, {}, lambda k: None)
    files = _SafetensorsFiles(src._stack, weight_index(path))
    src.shapes, src.dtypes = files.header()
    src.dropped = _drop_ignored(component, src.shapes, src.dtypes)
    src.read = lambda k: files(k).read(k)
    return src


def open_sd3_original(path: Path) -> Source:
    src = Source("transformer", "sd3-original", path, None, {}, {}, lambda k: None)
    index = weight_index(path)
    files = _SafetensorsFiles(src._stack, index)
    names, skipped = sd3.strip_keys(index)
    if skipped:
        prefixes = sorted({k.split(".")[0] + "." for k in skipped})
        log.info("%s: skipping %d tensors of other bundled models (%s)", path, len(skipped), ", ".join(prefixes))
    if sd3.MARKER not in names:
        raise FormatError(f"{path}: not an SD3 original file (no {sd3.PREFIX}{sd3.MARKER})")
    fshapes, fdtypes = files.header(names.values())
    oshapes = {k: fshapes[full] for k, full in names.items()}
    src.config = sd3.infer_config(oshapes)
    table = sd3.key_table(src.config, pos_embed="pos_embed" in oshapes)
    check_names(set(oshapes), {p.original for p in table.values()}, f"{path} (SD3 original keys, without {sd3.PREFIX})")
    for key, piece in table.items():
        o = names[piece.original]
        shape = list(oshapes[piece.original])
        if piece.op == "qkv":
            shape[0] //= 3
        src.shapes[key] = tuple(shape)
        src.dtypes[key] = fdtypes[o]
    src.dropped = _drop_ignored("transformer", src.shapes, src.dtypes)

    def read(key: str) -> np.ndarray:
        piece = table[key]
        full = names[piece.original]
        if piece.op == "qkv":  # read only this third of the fused tensor
            n = src.shapes[key][0]
            return files(full).read(full, (piece.part * n, (piece.part + 1) * n))
        return np.asarray(sd3.apply(piece, files(full).read(full)), order="C")

    src.read = read
    return src


def check_names(found: set[str], expected: set[str], what: str) -> None:
    check_keys({k: () for k in found}, {k: () for k in expected}, what)


def _flax_key_map(rules: list[Rule], flax_shapes: Mapping[str, tuple[int, ...]], what: str):
    """diffusers key -> (Flax path, stacked row or None, rule) for every leaf of a flat Flax tree."""
    out = {}
    for path, shape in flax_shapes.items():
        hits = [(r, ks) for r in rules if (ks := r.to_torch_keys(path, shape[0] if r.stack else None)) is not None]
        if len(hits) != 1:
            raise KeyMismatchError(f"{what}: Flax path {path!r} matches {len(hits)} rules")
        rule, keys = hits[0]
        for row, k in enumerate(keys):
            out[k] = (path, row if rule.stack else None, rule)
    return out


def source_from_flax_leaves(component: str, fmt: str, path: Path, cfg, flax_shapes, flax_dtypes, read_leaf_row) -> Source:
    """A Source over a flat Flax tree ("/"-joined paths -> shapes, dtypes): read_leaf_row(path, row or None) -> that
    leaf (or its row `row` of the stacked axis) in the Flax layout."""
    kmap = _flax_key_map(rules_for(component, cfg), flax_shapes, str(path))
    shapes, dtypes = {}, {}
    for k, (p, row, rule) in kmap.items():
        shapes[k] = to_torch_shape(rule.kind, flax_shapes[p][1:] if row is not None else flax_shapes[p])
        dtypes[k] = flax_dtypes[p]

    def read(key: str) -> np.ndarray:
        p, row, rule = kmap[key]
        return np.asarray(TO_TORCH[rule.kind](read_leaf_row(p, row)), order="C")

    order = sorted(kmap, key=lambda k: (kmap[k][0], kmap[k][1] or 0))  # leaf by leaf, rows in order
    return Source(component, fmt, path, cfg, shapes, dtypes, read, order=order)


def open_flax_folder(path: Path) -> Source:
    cfg_json = read_json(path / CONFIG_NAME)
    component = component_of_config(cfg_json, str(path))
    cfg = COMPONENTS[component].config_class.from_diffusers_config(cfg_json)
    stack = contextlib.ExitStack()
    files = _SafetensorsFiles(stack, weight_index(path))
    shapes, dtypes = files.header()

    def read_leaf_row(p, row):
        return files(p).read(p, (row, row + 1))[0] if row is not None else files(p).read(p)

    src = source_from_flax_leaves(component, "flax", path, cfg, shapes, dtypes, read_leaf_row)
    src._stack = stack
    return src


def infer_transformer_config_from_flax(shapes: Mapping[str, tuple[int, ...]]) -> TransformerConfig:
    """TransformerConfig from the Flax tree's shapes (sample_size / pos_embed_max_size keep their defaults)."""
    try:
        p, _, cin, d = shapes["pos_embed/kernel"]
        head_dim = shapes["last_block/attn/norm_q/scale"][0]
        layers = shapes["transformer_blocks/attn/to_q/kernel"][0] + 1 if "transformer_blocks/attn/to_q/kernel" in shapes else 1
        joint = shapes["context_embedder/kernel"][0]
        pooled = shapes["time_text_embed/text_embedder/linear_1/kernel"][0]
        cout = shapes["proj_out/kernel"][1] // (p * p)
    except KeyError as e:
        raise KeyMismatchError(f"Flax transformer params: cannot read the config off the shapes, {e} is missing") from None
    return TransformerConfig(patch_size=p, in_channels=cin, out_channels=cout, num_layers=layers,
                             num_attention_heads=d // head_dim, attention_head_dim=head_dim, joint_attention_dim=joint,
                             caption_projection_dim=d, pooled_projection_dim=pooled)


def saved_steps(path: str | Path) -> list[int]:
    """The steps of a training checkpoint dir: its numbered step dirs with a `state` item (names only: orbax
    would create the folder)."""
    path = Path(path)
    if not path.is_dir():
        return []
    return sorted(int(p.name) for p in path.iterdir()
                  if p.is_dir() and p.name.isdigit() and (p / CHECKPOINT_STATE_ITEM).exists())


# ----------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------
def detect(path: str | Path) -> str:
    """The FORMATS name of `path`, from its names and headers (no tensor is read)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            keys = weight_index(path)
            if any(k.endswith(sd3.MARKER) for k in keys):
                return "sd3-original"
            raise FormatError(f"{path}: a safetensors file that is not an SD3 original checkpoint (a diffusers "
                              f"file needs its folder with config.json); known formats:\n{_format_list()}")
        if path.suffix in (".pth", ".pt", ".ckpt", ".bin"):
            return "wan-original"
        raise FormatError(f"{path}: unknown format (suffix {path.suffix!r}); known formats:\n{_format_list()}")
    if (path / "model_index.json").is_file():
        return "contentv-folder"
    if (path / CONFIG_NAME).is_file():
        cfg = read_json(path / CONFIG_NAME)
        if cfg.get(FLAX_FORMAT_TAG) == "flax":
            return "flax"
        return f"diffusers-{component_of_config(cfg, str(path))}"
    if saved_steps(path) or (path / CHECKPOINT_STATE_ITEM).is_dir():
        return "orbax"
    raise FormatError(f"{path}: unknown format (no config.json, model_index.json or orbax steps); known formats:\n"
                      f"{_format_list()}")


def open_source(path: str | Path, fmt: str | None = None, *, openers: Mapping[str, Opener] | None = None,
                **kw) -> Source:
    """Open one model component in format `fmt` (detected when None). The FRAMEWORK_FORMATS are read by
    `openers[fmt](path, **kw)` (kw: ema, step, config for a training checkpoint)."""
    path = Path(path)
    fmt = fmt or detect(path)
    if fmt not in COMPONENT_FORMATS:
        raise FormatError(f"{path}: format {fmt!r} is not one model component; choose one of {list(COMPONENT_FORMATS)}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if fmt in ("sd3-original", "wan-original") and not path.is_file():
        raise FormatError(f"{path}: format {fmt!r} is a single file, this is a folder")
    if fmt == "sd3-original":
        return open_sd3_original(path)
    if fmt in FRAMEWORK_FORMATS:
        if not openers or fmt not in openers:
            raise FormatError(f"{path}: a {fmt} source is read by {FRAMEWORK_FORMATS[fmt]}, not available here")
        return openers[fmt](path, **kw)
    if kw:
        raise FormatError(f"{path}: {sorted(kw)} apply to training checkpoints (orbax), not to {fmt}")
    if not (path / CONFIG_NAME).is_file():
        raise FormatError(f"{path}: format {fmt!r} needs a folder with config.json")
    src = open_flax_folder(path) if fmt == "flax" else open_diffusers_folder(path)
    if fmt != "flax" and src.format != fmt:
        src.close()
        raise FormatError(f"{path}: --from {fmt} but the folder holds a {src.component} ({src.format})")
    return src


# ----------------------------------------------------------------------------------------------------------
# Planning: what a writer or a loader reads, leaf by leaf
# ----------------------------------------------------------------------------------------------------------
@dataclass
class Planned:
    """One output tensor: its bytes are the concatenation of the C-order arrays `chunks()` yields."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    chunks: Callable[[], Iterator[np.ndarray]]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def out_dtype(src_dtype: np.dtype, dtype: str | None) -> np.dtype:
    if dtype is None or not np.issubdtype(src_dtype, np.floating) and src_dtype != DTYPES["bfloat16"]:
        return np.dtype(src_dtype)
    return DTYPES[dtype]


def check_source(src: Source) -> None:
    """Strict key/shape check of a source against the model its config describes (every missing, unexpected
    and mis-shaped key named)."""
    check_keys(src.shapes, expected_torch_shapes(src.component, src.config), f"{src.path} ({src.format})")


def plan_flax(src: Source, dtype: str | None = None) -> list[Planned]:
    """Every leaf of the Flax tree; stacked (scanned) leaves are produced row by row from their torch layers."""
    rules = rules_for(src.component, src.config)
    leaves: dict[str, dict] = {}
    unexpected = []
    for k in sorted(src.shapes):
        hits = [(r, m) for r in rules if (m := r.to_flax_path(k)) is not None]
        if len(hits) != 1:
            if not hits:
                unexpected.append(k)
                continue
            raise KeyMismatchError(f"{src.path}: key {k!r} matches {len(hits)} rules")
        rule, (path, row) = hits[0]
        leaf = leaves.setdefault(path, {"rule": rule, "rows": {}, "key": k})
        leaf["rows"][row] = k
    bad_rows = [f"{p} rows {sorted(set(range(l['rule'].stack[1] - l['rule'].stack[0])) - set(l['rows']))}"
                for p, l in leaves.items() if l["rule"].stack and len(l["rows"]) != l["rule"].stack[1] - l["rule"].stack[0]]
    if unexpected or bad_rows:
        raise KeyMismatchError(f"{src.path} ({src.format}): weights do not match the Flax model\n  "
                               f"unexpected keys ({len(unexpected)}): {unexpected}\n  missing stacked layers: {bad_rows}")
    out = []
    for path in sorted(leaves):
        leaf = leaves[path]
        rule, rows = leaf["rule"], leaf["rows"]
        first = rows[min(rows, key=lambda r: -1 if r is None else r)]
        row_shape = to_flax_shape(rule.kind, src.shapes[first])
        dt = out_dtype(src.dtypes[first], dtype)
        if rule.stack is None:
            out.append(Planned(path, row_shape, dt, (lambda k=first, kind=rule.kind: iter([TO_FLAX[kind](src.read(k))]))))
        else:
            keys = [rows[r] for r in range(len(rows))]
            for k in keys:
                if to_flax_shape(rule.kind, src.shapes[k]) != row_shape:
                    raise KeyMismatchError(f"{src.path}: {k} has shape {src.shapes[k]}, other layers of {path} differ")
            out.append(Planned(path, (len(keys), *row_shape), dt,
                               (lambda keys=keys, kind=rule.kind: (TO_FLAX[kind](src.read(k)) for k in keys))))
    return out


def iter_params(path: str | Path, fmt: str | None = None, dtype: str | None = None,
                expected: Mapping[str, tuple[int, ...]] | None = None, **kw) -> Iterator[tuple[Any, str, np.ndarray]]:
    """Yield (config, "/"-joined Flax path, numpy array) leaf by leaf from any single-component source: our flax
    folder, a diffusers folder (SD3.5's pos_embed.pos_embed dropped), an SD3 original file, a Wan .pth, or a
    training checkpoint (kw: openers, ema, step; see open_source). Keys and shapes are checked strictly before the first leaf (against
    the source's own config, and against `expected` {Flax path: shape} of the model to fill when given); a
    caller can place each leaf on its devices (jax.device_put with its sharding) before the next one is read."""
    with open_source(path, fmt, **kw) as src:
        check_source(src)
        planned = plan_flax(src, dtype)
        if expected is not None:
            check_keys({t.key: t.shape for t in planned}, expected, f"{path} ({src.format}) vs the model")
        for t in planned:
            chunks = [np.asarray(c).astype(t.dtype, copy=False) for c in t.chunks()]
            yield src.config, t.key, (chunks[0] if len(t.shape) == chunks[0].ndim else np.stack(chunks))


def load_params(path: str | Path, fmt: str | None = None, dtype: str | None = None, **kw) -> tuple[Any, dict]:
    """(config, nested Flax params of numpy arrays) from any source `iter_params` reads (the whole tree in
    host memory: for initialising a model)."""
    flat, cfg = {}, None
    for cfg, key, leaf in iter_params(path, fmt, dtype, **kw):
        flat[key] = leaf
    if cfg is None:
        raise KeyMismatchError(f"{path}: no parameters")
    return cfg, unflatten(flat)
