"""Training configs as code: one small function per stage of the ContentV recipe (STYLE #1).

`get_config("tiny")`, `get_config("small/joint")`, `get_config("contentv-8b/sft")`: `<model>[/<stage>]`,
the model a preset of contentv_common.config.PRESETS, the stage one of STAGES (default the first).
Every function returns a locked `ml_collections.ConfigDict`; `--set optim.lr=3e-4` style overrides
must name existing fields (`apply_overrides`).

The recipe (ContentV paper, section 3): start from SD3.5 Large (`--init-from` a converted folder),
  1. video_lowres - video only, low resolution, short clips: the model learns motion first;
  2. joint        - joint image-video: image buckets (T = 1) beside the video buckets;
  3. duration     - clips grow to the full 5 s at 24 fps (121 frames), resolution still low;
  4. resolution   - then resolution grows to 480p;
  5. sft          - supervised fine-tuning on curated clips: lower lr, short warmup, slower EMA.
Each stage after the first starts from the previous stage's checkpoint (`--init-from <its checkpoint dir>`).
Buckets are (frames, height, width, batch) in pixels; each is one static shape and one compiled step,
dynamic batch size per bucket keeps tokens per step about constant.

Default (no arguments): `python -m contentv_jax.train` == `--config tiny` (stage video_lowres) trains the
tiny MM-DiT on the built-in synthetic captioned set on CPU; measured: loss 2.51 at step 10 -> 1.69 at
step 150, 60 s wall including start-up and compile (2-core shared CPU box, 2026-11-27).
"""
from __future__ import annotations

import ml_collections

from contentv_common.config import get_preset
from contentv_common.schedule import DEFAULT_SIGMA_GRID

STAGES = ("video_lowres", "joint", "duration", "resolution", "sft")

# Per model size: the pixel shapes of each stage. (frames, height, width, batch) per bucket.
_SHAPES = {
    "tiny": {
        "video_lowres": [(9, 32, 48, 8)],
        "joint": [(9, 32, 48, 8), (1, 32, 48, 16)],
        "duration": [(17, 32, 48, 8), (1, 32, 48, 16)],
        "resolution": [(17, 48, 64, 8), (1, 48, 64, 16)],
        "sft": [(17, 48, 64, 8)],
    },
    "small": {
        "video_lowres": [(9, 64, 64, 8)],
        "joint": [(9, 64, 64, 8), (1, 64, 64, 32)],
        "duration": [(17, 64, 64, 8), (1, 64, 64, 32)],
        "resolution": [(17, 128, 128, 8), (1, 128, 128, 32)],
        "sft": [(17, 128, 128, 8)],
    },
    # 8B: global batch sizes for 256 accelerators; 24 fps, 5 s = 121 frames at the end.
    "contentv-8b": {
        "video_lowres": [(29, 256, 448, 256)],
        "joint": [(29, 256, 448, 256), (1, 256, 448, 2048)],
        "duration": [(121, 256, 448, 128), (61, 256, 448, 256), (1, 256, 448, 2048)],
        "resolution": [(121, 480, 832, 64), (61, 480, 832, 128), (1, 480, 832, 1024)],
        "sft": [(121, 480, 832, 64)],
    },
}
# Per stage: (lr, warmup, steps, ema_decay) for (tiny/small, contentv-8b).
_OPTIM = {
    "video_lowres": ((1e-3, 20, 150, 0.99), (1e-4, 1000, 100_000, 0.9999)),
    "joint": ((1e-3, 20, 300, 0.99), (1e-4, 1000, 100_000, 0.9999)),
    "duration": ((5e-4, 20, 300, 0.99), (5e-5, 500, 50_000, 0.9999)),
    "resolution": ((5e-4, 20, 300, 0.99), (5e-5, 500, 50_000, 0.9999)),
    "sft": ((1e-4, 5, 100, 0.995), (1e-5, 100, 5_000, 0.99995)),
}


def base(model: str = "tiny") -> ml_collections.ConfigDict:
    """Fields every stage shares; the stage functions fill in shapes and the schedule."""
    preset = get_preset(model)  # validates the name
    big = model == "contentv-8b"
    c = ml_collections.ConfigDict()
    c.model = preset.name
    c.stage = ""
    c.seed = 0
    c.steps = 150
    c.init_from = ""  # converted SD3.5 / ContentV folder or an earlier stage's checkpoint dir
    c.dtype = "bfloat16" if big else "float32"  # compute dtype; params are always float32 masters
    c.remat_policy = "save_attention" if big else "none"
    c.attention_impl = "auto"  # flash on CPU (O(S) memory), cudnn on GPU in bf16, splash on TPU
    # contentv-8b: the model width 2432 = 128 x 19 divides by fsdp <= 128 only (a larger fsdp would replicate the
    # attention kernels on every device), so data takes the rest: 256 devices -> data=2,fsdp=128 (0.94 GiB of
    # fp32 params + AdamW + EMA per device). Fewer than 128 devices: --mesh fsdp=-1 (any power of two <= 128).
    c.mesh = "data=-1,fsdp=128" if big else "fsdp=-1"

    c.data = ml_collections.ConfigDict()
    c.data.name = "synthetic"  # or a dataset path (the on-disk dataset plugs in through contentv_jax.data)
    c.data.buckets = [(9, 32, 48, 8)]  # (frames, height, width, global batch) in pixels
    c.data.bucket_weights = [1.0]
    c.data.num_captions = 16  # synthetic set: distinct captions (fixed random text embeddings each)
    c.data.image_ratio = -1.0  # dataset: probability of an image batch (< 0: images and videos in one stream)
    c.data.tokens_per_step = 0  # dataset: batch sizes from this token budget per bucket (0: the buckets' own)
    # dataset: a corrupt / unreadable shard or record: "error" stops the run with an error naming the file and
    # record; "skip" logs them, drops unreadable shards, replaces rows failing their checksum by good rows of the
    # batch and counts both in the metrics (data_unreadable_records, data_corrupt_records). --on-corrupt.
    c.data.on_corrupt = "error"

    c.flow = ml_collections.ConfigDict()
    c.flow.timestep_sampling = "logit_normal"
    c.flow.logit_mean = 0.0
    c.flow.logit_std = 1.0
    c.flow.shift_mode = "tokens" if big else "fixed"
    c.flow.shift = 1.0
    c.flow.shift_base_tokens = 256
    c.flow.shift_max_tokens = 4096
    c.flow.shift_base = 0.5
    c.flow.shift_max = 1.15
    c.flow.loss_weighting = "none"
    # Per-sample probability of training on the empty prompt's embeddings instead of the caption's (SD3-style
    # 0.1): what classifier-free guidance at sampling time needs. The tiny preset keeps 0.0 so its measured
    # runs and tests are unchanged; the dataset source needs negative.safetensors (encode_dataset writes it).
    c.flow.caption_dropout = 0.0 if model == "tiny" else 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.optim.decay = "cosine"
    c.optim.end_lr_ratio = 0.1
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95 if big else 0.99
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1  # micro-batches per step (the bucket batch must divide by it)
    c.optim.ema_decay = 0.99

    c.log_every = 10
    c.checkpoint_every = 500 if big else 50
    c.keep_checkpoints = 3
    c.max_nonfinite = 20  # consecutive skipped (non-finite) updates before the run stops
    c.peak_tflops_per_device = 0.0  # 0: look it up from the device kind (metrics.peak_flops)

    c.eval = ml_collections.ConfigDict()
    c.eval.every = {"tiny": 0, "small": 500}.get(model, 2000)  # 0: none (the tiny default run stays short)
    c.eval.num_prompts = 2
    c.eval.num_steps = preset.num_steps
    c.eval.guidance = preset.guidance_scale
    c.eval.shift = preset.shift
    c.eval.sigma_grid = DEFAULT_SIGMA_GRID  # "contentv" (the released pipeline's) or "sd3" (schedule.SIGMA_GRIDS)
    c.eval.frames = preset.frames if not big else 61
    c.eval.height = preset.height
    c.eval.width = preset.width
    c.eval.fps = preset.fps
    c.eval.vae = ""  # converted Wan VAE folder; empty: a randomly initialised VAE of the preset (plumbing only)
    return c


def _stage(model: str, stage: str) -> ml_collections.ConfigDict:
    c = base(model)
    c.stage = stage
    buckets = _SHAPES[model][stage]
    c.data.buckets = buckets
    c.data.bucket_weights = [1.0] * len(buckets)
    lr, warm, steps, ema = _OPTIM[stage][model == "contentv-8b"]
    c.optim.lr, c.optim.warmup_steps, c.steps, c.optim.ema_decay = lr, warm, steps, ema
    if stage == "sft":
        c.optim.decay = "constant"
        c.flow.loss_weighting = "none"
    c.lock()
    return c


def video_lowres(model: str = "tiny") -> ml_collections.ConfigDict:
    """Stage 1: video only, low resolution. `python -m contentv_jax.train --config tiny/video_lowres`."""
    return _stage(model, "video_lowres")


def joint(model: str = "tiny") -> ml_collections.ConfigDict:
    """Stage 2: joint image-video buckets. `python -m contentv_jax.train --config tiny/joint --init-from ckpt/`."""
    return _stage(model, "joint")


def duration(model: str = "tiny") -> ml_collections.ConfigDict:
    """Stage 3: longer clips at low resolution. `--config <model>/duration --init-from <joint ckpt>`."""
    return _stage(model, "duration")


def resolution(model: str = "tiny") -> ml_collections.ConfigDict:
    """Stage 4: resolution growth (480p for contentv-8b). `--config <model>/resolution --init-from <ckpt>`."""
    return _stage(model, "resolution")


def sft(model: str = "tiny") -> ml_collections.ConfigDict:
    """Stage 5: SFT on curated clips, lower constant lr. `--config <model>/sft --init-from <ckpt>`."""
    return _stage(model, "sft")


_STAGE_FNS = {"video_lowres": video_lowres, "joint": joint, "duration": duration, "resolution": resolution, "sft": sft}


def get_config(spec: str = "tiny") -> ml_collections.ConfigDict:
    """'<model>[/<stage>]' -> the stage's locked config; unknown names raise naming the choices."""
    model, _, stage = spec.partition("/")
    stage = stage or STAGES[0]
    if model not in _SHAPES:
        raise ValueError(f"--config {spec!r}: unknown model {model!r}; choose one of {sorted(_SHAPES)}")
    if stage not in _STAGE_FNS:
        raise ValueError(f"--config {spec!r}: unknown stage {stage!r}; choose one of {list(STAGES)}")
    return _STAGE_FNS[stage](model)


def _parse_value(text: str, like):
    import ast

    if isinstance(like, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"--set: cannot parse {text!r} as a {type(like).__name__}") from None
    if isinstance(like, float) and isinstance(value, int):
        value = float(value)
    return value


def apply_flags(config: ml_collections.ConfigDict, args, flag_fields) -> ml_collections.ConfigDict:
    """Set the fields of the CLI flags that were given: flag_fields ((argparse dest, "section.field"), ...);
    a flag left at None keeps the config's value. Returns the same config."""
    for flag, field in flag_fields:
        value = getattr(args, flag)
        if value is not None:
            section, _, leaf = field.rpartition(".")
            (config[section] if section else config)[leaf] = value
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides) -> ml_collections.ConfigDict:
    """['optim.lr=3e-4', 'data.buckets=[(9,32,48,8)]'] -> the same (locked) config with those fields set.
    Unknown fields and type changes raise naming the field."""
    for item in overrides or ():
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected field=value")
        node, *_ = config, None
        *parents, leaf = key.strip().split(".")
        for p in parents:
            if p not in node:
                raise ValueError(f"--set {item!r}: no config section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ValueError(f"--set {item!r}: no config field {key!r}")
        node[leaf] = _parse_value(text.strip(), node[leaf])
    return config
