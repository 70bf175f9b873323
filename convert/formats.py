"""Weight formats: detection, tensor-by-tensor readers, and a streaming safetensors writer.

Every input format is opened as a `Source`: one model component ("transformer" or "vae") whose tensors
are read one at a time under their diffusers key names, with the config and the shapes known from the
headers before any tensor is read. Every output is written by `write_torch` (a diffusers folder) or
`write_flax` (our JAX format) straight from a Source, tensor by tensor, so converting the 16 GB
ContentV-8B needs memory for about one tensor, not for the model.

The JAX format ("flax"): a folder with `config.json` (the diffusers config plus `"_contentv_format": "flax"`)
and `flax_params.safetensors` (or shards `flax_params-0000k-of-0000n.safetensors` + `flax_params.safetensors.
index.json`) holding the nested Flax params tree flattened with "/" keys (`transformer_blocks/attn/to_q/
kernel`, scanned layers stacked on a leading axis). Safetensors rather than orbax because it can be written
leaf by leaf (orbax saves a whole in-memory tree), read leaf by leaf or slice by slice without JAX or orbax,
and bit-exactly round-trips bf16. `load_params(path)` turns any supported source into the nested tree.
"""
from __future__ import annotations

import contextlib
import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy: safetensors' numpy reader needs it)
import numpy as np

from contentv_common.config import IGNORED_TRANSFORMER_KEYS, TransformerConfig, VAEConfig, read_json
from contentv_common.weights import (
    CONFIG_NAME,
    SAFETENSORS_DTYPES,
    KeyMismatchError,
    check_keys,
    read_safetensors_header,
    weight_index,
)
from convert.keymap import TO_FLAX, TO_TORCH, Rule, unflatten

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

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}
_ST_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}


class FormatError(ValueError):
    """An input that is not (or not recognisably) one of FORMATS."""


def _format_list() -> str:
    return "\n".join(f"  {k:22s} {v}" for k, v in FORMATS.items())


# ----------------------------------------------------------------------------------------------------------
# Components: what each model part needs from the rest of the project (imported lazily).
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Component:
    name: str
    config_class: type
    rules_fn: str  # "module:function" giving the torch <-> Flax Rule table for a config
    torch_model: str  # "module:Class" of our torch model (meta device: the expected keys and shapes)
    ignored_keys: tuple[str, ...] = ()  # diffusers keys a source may hold that the model drops on purpose


COMPONENTS = {
    "transformer": Component("transformer", TransformerConfig, "convert.transformer_keys:transformer_rules",
                             "contentv_torch.transformer:ContentVTransformer3DModel", IGNORED_TRANSFORMER_KEYS),
    "vae": Component("vae", VAEConfig, "convert.vae_keys:vae_rules", "contentv_torch.vae:WanVAE"),
}
_CLASS_NAMES = {"SD3Transformer2DModel": "transformer", "SD3Transformer3DModel": "transformer",
                "ContentVTransformer3DModel": "transformer", "AutoencoderKLWan": "vae", "WanVAE": "vae"}


def _import(spec: str):
    import importlib

    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def rules_for(component: str, cfg) -> list[Rule]:
    return _import(COMPONENTS[component].rules_fn)(cfg)


def expected_torch_shapes(component: str, cfg) -> dict[str, tuple[int, ...]]:
    """diffusers key -> shape of our torch model for `cfg`, built on the meta device (no memory)."""
    import torch

    with torch.device("meta"):
        model = _import(COMPONENTS[component].torch_model)(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


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
    from convert import sd3_original as sd3

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
    _check_names(set(oshapes), {p.original for p in table.values()}, f"{path} (SD3 original keys, without {sd3.PREFIX})")
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


def _check_names(found: set[str], expected: set[str], what: str) -> None:
    check_keys({k: () for k in found}, {k: () for k in expected}, what)


def torch_to_numpy(t) -> np.ndarray:
    """A CPU torch tensor -> numpy without a float copy (bf16 via its bits, as ml_dtypes.bfloat16)."""
    import torch

    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def open_wan_original(path: Path) -> Source:
    from convert import wan_original as wan

    sd = wan.load_pth(path)
    if wan.MARKER not in sd:
        raise FormatError(f"{path}: not a Wan2.1 VAE checkpoint (no key {wan.MARKER!r}; it has e.g. {sorted(sd)[:5]})")
    oshapes = {k: tuple(v.shape) for k, v in sd.items()}
    cfg = wan.infer_config(oshapes)
    table = wan.key_table(cfg)
    _check_names(set(oshapes), set(table.values()), f"{path} (Wan original keys)")
    shapes = {k: oshapes[o] for k, o in table.items()}
    dtypes = {k: torch_to_numpy(sd[o].new_empty(0)).dtype for k, o in table.items()}
    return Source("vae", "wan-original", path, cfg, shapes, dtypes, lambda k: torch_to_numpy(sd[table[k]]))


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


def _torch_shape(kind: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    return TO_TORCH[kind](np.broadcast_to(np.zeros((), np.uint8), flax_shape)).shape


def _source_from_flax_leaves(component: str, fmt: str, path: Path, cfg, flax_shapes, flax_dtypes, read_leaf_row) -> Source:
    """A Source over a flat Flax tree: read_leaf_row(path, row or None) -> the Flax-layout array."""
    kmap = _flax_key_map(rules_for(component, cfg), flax_shapes, str(path))
    shapes, dtypes = {}, {}
    for k, (p, row, rule) in kmap.items():
        shapes[k] = _torch_shape(rule.kind, flax_shapes[p][1:] if row is not None else flax_shapes[p])
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

    src = _source_from_flax_leaves(component, "flax", path, cfg, shapes, dtypes, read_leaf_row)
    src._stack = stack
    return src


def open_orbax(path: Path, ema: bool = False, step: int | None = None, config: Any = None) -> Source:
    """A contentv_jax training checkpoint (the directory of step dirs, or one step dir) as a Source of its
    raw or EMA params (`ema`), read through `contentv_jax.checkpoint.open_params` (the format's one owner): no
    optimizer state is read and each leaf row by row. The transformer config is read off the shapes unless
    `config` is given."""
    from contentv_jax.checkpoint import NotACheckpointError, open_params

    path = Path(path).absolute()
    try:
        flax_shapes, flax_dtypes, read_leaf_row = open_params(path, ema=ema, step=step)
    except NotACheckpointError as e:
        raise FormatError(str(e)) from None
    if config is None:
        config = infer_transformer_config_from_flax(flax_shapes)
    return _source_from_flax_leaves("transformer", "orbax", path, config, flax_shapes, flax_dtypes, read_leaf_row)


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
            from convert import sd3_original as sd3

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
    from contentv_jax.checkpoint import is_checkpoint_dir

    if is_checkpoint_dir(path) or (path / "state").is_dir():
        return "orbax"
    raise FormatError(f"{path}: unknown format (no config.json, model_index.json or orbax steps); known formats:\n"
                      f"{_format_list()}")


def open_source(path: str | Path, fmt: str | None = None, *, ema: bool = False, step: int | None = None,
                config: Any = None) -> Source:
    """Open one model component in format `fmt` (detected when None)."""
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
    if fmt == "wan-original":
        return open_wan_original(path)
    if fmt == "orbax":
        return open_orbax(path, ema=ema, step=step, config=config)
    if not (path / CONFIG_NAME).is_file():
        raise FormatError(f"{path}: format {fmt!r} needs a folder with config.json")
    src = open_flax_folder(path) if fmt == "flax" else open_diffusers_folder(path)
    if fmt != "flax" and src.format != fmt:
        src.close()
        raise FormatError(f"{path}: --from {fmt} but the folder holds a {src.component} ({src.format})")
    return src


# ----------------------------------------------------------------------------------------------------------
# Streaming safetensors writer
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


def _write_file(path: Path, planned: list[Planned], bar) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in planned:
        header[t.key] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in planned:
            written = 0
            for c in t.chunks():
                c = np.ascontiguousarray(c)
                if c.dtype != t.dtype:
                    c = c.astype(t.dtype)
                f.write(c.reshape(-1).view(np.uint8).data)
                written += c.nbytes
            if written != t.nbytes:
                raise ValueError(f"{t.key}: wrote {written} bytes, planned {t.nbytes} for shape {t.shape} {t.dtype}")
            bar.update(1)


def write_safetensors(folder: Path, planned: list[Planned], weights_name: str, index_name: str,
                      max_shard_bytes: int = 5 * 2**30, desc: str = "tensors") -> None:
    """Write `planned` into `folder` as one safetensors file or shards + index (diffusers naming), each
    tensor streamed to disk as it is produced. `folder` should be a temporary dir (see atomic_dir)."""
    from tqdm.auto import tqdm

    shards: list[list[Planned]] = [[]]
    size = 0
    for t in planned:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    stem = weights_name[: -len(".safetensors")]
    names = [weights_name] if len(shards) == 1 else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with tqdm(total=len(planned), desc=desc, unit="tensor", disable=not log.isEnabledFor(logging.INFO)) as bar:
        for name, shard in zip(names, shards):
            _write_file(folder / name, shard, bar)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                 "weight_map": {t.key: n for n, s in zip(names, shards) for t in s}}
        (folder / index_name).write_text(json.dumps(index, indent=2, sort_keys=True))


# ----------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------
def _out_dtype(src_dtype: np.dtype, dtype: str | None) -> np.dtype:
    if dtype is None or not np.issubdtype(src_dtype, np.floating) and src_dtype != DTYPES["bfloat16"]:
        return np.dtype(src_dtype)
    return DTYPES[dtype]


def check_source(src: Source) -> None:
    """Strict key/shape check of a source against our torch model for its config (every missing, unexpected
    and mis-shaped key named). Without torch, the Rule table's coverage is checked by the Flax writer."""
    try:
        expected = expected_torch_shapes(src.component, src.config)
    except ImportError:
        log.warning("torch not installed: checking keys against the Rule table only")
        return
    check_keys(src.shapes, expected, f"{src.path} ({src.format})")


def torch_config(src: Source) -> dict[str, Any]:
    return src.config.to_diffusers_config()


def plan_torch(src: Source, dtype: str | None = None) -> list[Planned]:
    """Every tensor of the source under its diffusers key, cast to `dtype` (None: as stored)."""
    return [Planned(k, src.shapes[k], _out_dtype(src.dtypes[k], dtype), (lambda k=k: iter([src.read(k)])))
            for k in (src.order or sorted(src.shapes))]


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
        row_shape = _torch_shape_to_flax(rule.kind, src.shapes[first])
        dt = _out_dtype(src.dtypes[first], dtype)
        if rule.stack is None:
            out.append(Planned(path, row_shape, dt, (lambda k=first, kind=rule.kind: iter([TO_FLAX[kind](src.read(k))]))))
        else:
            keys = [rows[r] for r in range(len(rows))]
            for k in keys:
                if _torch_shape_to_flax(rule.kind, src.shapes[k]) != row_shape:
                    raise KeyMismatchError(f"{src.path}: {k} has shape {src.shapes[k]}, other layers of {path} differ")
            out.append(Planned(path, (len(keys), *row_shape), dt,
                               (lambda keys=keys, kind=rule.kind: (TO_FLAX[kind](src.read(k)) for k in keys))))
    return out


def _torch_shape_to_flax(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return TO_FLAX[kind](np.broadcast_to(np.zeros((), np.uint8), shape)).shape


def write_torch(src: Source, folder: Path, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30,
                config: Mapping[str, Any] | None = None) -> None:
    """The source as a diffusers-layout folder (config.json + safetensors [+ index]) inside `folder` (which
    exists, normally an atomic_dir temp)."""
    from contentv_common.weights import INDEX_NAME, WEIGHTS_NAME

    check_source(src)
    write_safetensors(folder, plan_torch(src, dtype), WEIGHTS_NAME, INDEX_NAME, max_shard_bytes, desc=f"{src.component} -> torch")
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config or torch_config(src)), indent=2))


def write_flax(src: Source, folder: Path, dtype: str | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """The source as our JAX format (config.json + flax_params*.safetensors) inside `folder`."""
    check_source(src)
    _write_flax_folder(folder, plan_flax(src, dtype), torch_config(src), max_shard_bytes, f"{src.component} -> jax")


def save_flax_params(config: TransformerConfig | VAEConfig, params, folder: str | Path, overwrite: bool = False,
                     max_shard_bytes: int = 5 * 2**30) -> Path:
    """An in-memory Flax params tree (numpy / jax arrays) of a model of `config` as our JAX format at `folder`,
    atomically: what `python -m convert` reads back (`load_params`, `--to torch`)."""
    from contentv_common.weights import atomic_dir
    from convert.keymap import flatten

    leaves = {k: np.asarray(v) for k, v in flatten(params).items()}
    planned = [Planned(k, v.shape, v.dtype, (lambda v=v: iter([v]))) for k, v in sorted(leaves.items())]
    with atomic_dir(folder, overwrite=overwrite) as root:
        _write_flax_folder(root, planned, config.to_diffusers_config(), max_shard_bytes, "params -> jax")
    return Path(folder)


def _write_flax_folder(folder: Path, planned: list[Planned], config: Mapping[str, Any], max_shard_bytes: int,
                       desc: str) -> None:
    write_safetensors(folder, planned, FLAX_WEIGHTS_NAME, FLAX_INDEX_NAME, max_shard_bytes, desc=desc)
    (folder / CONFIG_NAME).write_text(json.dumps({**config, FLAX_FORMAT_TAG: "flax"}, indent=2))


def iter_params(path: str | Path, fmt: str | None = None, dtype: str | None = None,
                expected: Mapping[str, tuple[int, ...]] | None = None, **kw) -> Iterator[tuple[Any, str, np.ndarray]]:
    """Yield (config, "/"-joined Flax path, numpy array) leaf by leaf from any single-component source: our flax
    folder, a diffusers folder (SD3.5's pos_embed.pos_embed dropped), an SD3 original file, a Wan .pth, or a
    training checkpoint (kw: ema, step). Keys and shapes are checked strictly before the first leaf (against
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
