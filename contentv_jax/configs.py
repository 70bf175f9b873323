"""Training configs as code: one small function per stage of the ContentV recipe (readable, diffable,
no copied YAML files to drift apart).

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

import math
from pathlib import Path

import ml_collections

from contentv_common.cli import UsageError
from contentv_common.config import get_preset
from contentv_common.schedule import DEFAULT_SIGMA_GRID
from contentv_jax.lora import DEFAULT_TARGETS as LORA_DEFAULT_TARGETS
from contentv_jax.sharding import DEFAULT_RULES

STAGES = ("video_lowres", "joint", "duration", "resolution", "sft")  # the trainer's; "rlhf" is contentv_jax.rlhf's

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
    # Validation loss (contentv_jax.validation), evaluated every eval.every steps: a held-out dataset folder in the
    # same format (--val-data), or this fraction of the training dataset's records held out by a hash of their
    # source name (--val-fraction; the same split for every seed, process count, mesh and resume).
    c.data.val_data = ""
    c.data.val_fraction = 0.0

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
    c.sharding_rules = DEFAULT_RULES  # (logical axis name, mesh axes) pairs; validated by sharding.rules_from_config
    c.peak_tflops_per_device = 0.0  # 0: look it up from the device kind (metrics.peak_flops)

    # LoRA fine-tuning (contentv_jax.lora): rank 0 = off (full fine-tuning). With rank r > 0 only the adapters of
    # the targeted Dense layers train; the base (init_from) is frozen in base_dtype, without optimizer state / EMA.
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 0
    c.lora.alpha = 0.0  # the update is scaled by alpha / rank; 0: alpha = rank (scale 1, diffusers' SD3 recipe)
    c.lora.targets = list(LORA_DEFAULT_TARGETS)  # module-path patterns, ours ("attn/to_q") or diffusers' ("attn.to_q")
    c.lora.base_dtype = "bfloat16" if big else "float32"
    c.lora.init = ""  # a diffusers / PEFT LoRA .safetensors to start the adapter from (--lora-init)

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
    # Validation loss: the flow-matching loss of the raw (not EMA) params at these fixed noise levels (no shift
    # applied), noise fixed per (val_seed, record, sigma); val_loss = their mean (the midpoint rule over s in (0, 1)).
    c.eval.val_sigmas = tuple((k + 0.5) / 8 for k in range(8))
    c.eval.val_max_records = 256  # the first N validation records in manifest order (0: all)
    c.eval.val_batch = 0  # records per validation forward (0: one per batch shard of the mesh)
    c.eval.val_seed = 0  # fixed apart from --seed, so runs with different seeds are compared at the same noise
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


def rlhf(model: str = "tiny") -> ml_collections.ConfigDict:
    """RLHF after SFT (contentv_jax.rlhf). `python -m contentv_jax.rlhf --config <model>[/rlhf] --reward <CLIP folder>`.

    rlhf.lam: reward weight; grad_window (lo, hi): the gradient step k is drawn uniformly from these indices
    of the rollout schedule (0 = pure noise, rollout_steps - 1 = the last step); fm_every / fm_weight: the
    flow-matching regulariser on SFT batches (0 = never); decode_remat: rematerialise the VAE decoder in
    the backward pass; frames / height / width / batch: the generated clips (only latent frame 0 is decoded);
    eval_every: steps between evaluations (mean reward of full samples, `eval_noise` fixed noises per prompt).
    """
    preset = get_preset(model)
    big = model == "contentv-8b"
    c = sft(model)
    c.unlock()
    c.stage = "rlhf"
    c.steps = 2000 if big else 60
    c.optim.lr = 1e-5 if big else 3e-4
    c.optim.warmup_steps = 50 if big else 0
    c.optim.decay = "constant"
    c.log_every = 10 if big else 5
    frames, height, width, _ = c.data.buckets[0]
    c.rlhf = ml_collections.ConfigDict()
    r = c.rlhf
    r.reward = ""  # transformers CLIPModel folder (PickScore: yuvalkirstain/PickScore_v1)
    r.reward_processor = ""  # folder with preprocessor_config.json + CLIPTokenizer files (default: r.reward)
    r.vae = ""  # Wan VAE folder (diffusers layout); empty: random VAE of the preset (plumbing only)
    r.prompts = ""  # prompt-embeddings file (python -m contentv_torch.encode_prompts); empty: the SFT source's captions
    r.num_prompts = 1024 if big else 16  # dataset captions used as prompts (without r.prompts)
    r.num_heldout = 4  # prompts kept out of training, scored every eval_every steps
    r.lam = 1e-3 if big else 1.0
    r.rollout_steps = 25 if big else preset.num_steps
    r.guidance = preset.guidance_scale if big else 1.0
    r.shift = preset.shift
    r.sigma_grid = c.eval.sigma_grid  # the rollout's sigma grid, as the sampler's (schedule.SIGMA_GRIDS)
    r.grad_window = (15, 24) if big else (preset.num_steps // 2, preset.num_steps - 1)
    r.fm_every = 1
    r.fm_weight = 1.0
    r.decode_remat = big
    r.frames, r.height, r.width = (29, 256, 448) if big else (frames, height, width)
    r.batch = 64 if big else 4
    r.eval_every = 200 if big else 10
    r.eval_noise = 1 if big else 2  # noise draws per evaluation prompt (fixed for the whole run)
    c.lock()
    return c


_STAGE_FNS = {"video_lowres": video_lowres, "joint": joint, "duration": duration, "resolution": resolution, "sft": sft,
              "rlhf": rlhf}


def get_config(spec: str = "tiny", stages=STAGES) -> ml_collections.ConfigDict:
    """'<model>[/<stage>]' -> the stage's locked config, the stage one of `stages` (default its first: the trainer
    runs STAGES, `contentv_jax.rlhf` the "rlhf" stage); unknown names raise naming the choices."""
    model, _, stage = spec.partition("/")
    stage = stage or stages[0]
    if model not in _SHAPES:
        raise ValueError(f"--config {spec!r}: unknown model {model!r}; choose one of {sorted(_SHAPES)}")
    if stage not in stages:
        raise ValueError(f"--config {spec!r}: unknown stage {stage!r}; choose one of {list(stages)}")
    return _STAGE_FNS[stage](model)


def _parse_value(text: str, like):
    import ast

    if isinstance(like, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        raise ValueError(f"cannot parse {text!r} as a {type(like).__name__}") from None
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
        try:
            node[leaf] = _parse_value(text.strip(), node[leaf])
        except (ValueError, TypeError) as e:  # ConfigDict refuses a type change with a TypeError
            raise ValueError(f"--set {item!r}: {e}") from None
    return config


# ------------------------------------------------------------------------------------------------
# Validation: every numeric field, after --set and the flags are applied and before anything is built or
# written. A bad value stops the run naming the field; none is replaced by a default.


def _number(v, kind=(int, float)) -> bool:
    return isinstance(v, kind) and not isinstance(v, bool) and math.isfinite(v)


def _at_least(lo, kind=int):
    name = "an integer" if kind is int else "a finite number"
    return lambda v: None if _number(v, kind) and v >= lo else f"must be {name} >= {lo}"


def _positive(v):
    return None if _number(v) and v > 0 else "must be a finite number > 0"


def _unit(closed_top: bool = True):
    return lambda v: (None if _number(v) and 0 <= v and (v <= 1 if closed_top else v < 1)
                      else f"must be in [0, 1{']' if closed_top else ')'}")


def _finite(v):
    return None if _number(v) else "must be a finite number"


def _guidance(v):
    return None if _number(v) and (v == 0 or v >= 1) else "must be a finite number >= 1 (or 0 = off)"


def _buckets(v):
    ok = len(v) > 0 and all(len(b) == 4 and all(_number(x, int) and x >= 1 for x in b) for b in v)
    return None if ok else "must be a non-empty list of (frames, height, width, batch) positive integers"


def _targets(v):
    ok = len(v) > 0 and all(isinstance(t, str) and t.strip() for t in v)
    return None if ok else "must be a non-empty list of module-path patterns, e.g. ['attn/to_q', 'ff/proj_in']"


def _sigmas(v):
    ok = len(v) > 0 and all(_number(s) and 0 <= s <= 1 for s in v) and len(set(v)) == len(v)
    return None if ok else "must be a non-empty list of distinct noise levels in [0, 1]"


_FIELD_CHECKS = {
    "steps": _at_least(1), "seed": _at_least(0), "log_every": _at_least(1), "checkpoint_every": _at_least(1),
    "keep_checkpoints": _at_least(1), "max_nonfinite": _at_least(1), "peak_tflops_per_device": _at_least(0, float),
    "optim.lr": _positive, "optim.warmup_steps": _at_least(0), "optim.end_lr_ratio": _unit(),
    "optim.b1": _unit(False), "optim.b2": _unit(False), "optim.eps": _positive,
    "optim.weight_decay": _at_least(0, float), "optim.clip_norm": _at_least(0, float),
    "optim.grad_accum": _at_least(1), "optim.ema_decay": _unit(),
    "flow.logit_mean": _finite, "flow.logit_std": _positive, "flow.shift": _positive,
    "flow.shift_base_tokens": _at_least(1), "flow.shift_max_tokens": _at_least(1), "flow.shift_base": _finite,
    "flow.shift_max": _finite, "flow.caption_dropout": _unit(),
    "data.buckets": _buckets, "data.num_captions": _at_least(1), "data.tokens_per_step": _at_least(0),
    "data.image_ratio": lambda v: None if _number(v) and v <= 1 else "must be <= 1 (< 0: natural proportions)",
    "data.val_fraction": _unit(False), "eval.val_sigmas": _sigmas, "eval.val_max_records": _at_least(0),
    "eval.val_batch": _at_least(0), "eval.val_seed": _at_least(0),
    "eval.every": _at_least(0), "eval.num_prompts": _at_least(0), "eval.num_steps": _at_least(1),
    "eval.guidance": _guidance, "eval.shift": _positive, "eval.frames": _at_least(1), "eval.height": _at_least(1),
    "eval.width": _at_least(1), "eval.fps": _positive,
    "lora.rank": _at_least(0), "lora.alpha": _at_least(0, float), "lora.targets": _targets,
    "lora.base_dtype": lambda v: None if v in ("float32", "bfloat16") else "must be float32 or bfloat16",
    # the RLHF stage (contentv_jax.rlhf.get_config)
    "rlhf.num_prompts": _at_least(1), "rlhf.num_heldout": _at_least(1), "rlhf.lam": _finite,
    "rlhf.rollout_steps": _at_least(1), "rlhf.guidance": _guidance, "rlhf.shift": _positive,
    "rlhf.fm_every": _at_least(0), "rlhf.fm_weight": _at_least(0, float), "rlhf.frames": _at_least(1),
    "rlhf.height": _at_least(1), "rlhf.width": _at_least(1), "rlhf.batch": _at_least(1),
    "rlhf.eval_every": _at_least(0), "rlhf.eval_noise": _at_least(1),
}


def validate_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check every numeric field (ranges, finiteness) and the few cross-field rules; the first bad one raises
    a UsageError naming it. Fields a config does not have (the rlhf section of a training config) are skipped.
    Returns the config."""
    def get(field):
        node = config
        for part in field.split("."):
            if part not in node:
                return _MISSING
            node = node[part]
        return node

    for field, check in _FIELD_CHECKS.items():
        value = get(field)
        if value is not _MISSING and (problem := check(value)):
            raise UsageError(f"config field {field}={value!r}: {problem}")
    for field in _PATH_FIELDS:  # checked now: the run would otherwise fail after creating its outputs
        value = get(field)
        if value not in (_MISSING, "", None) and not (field == "data.name" and value == "synthetic") \
                and not Path(value).exists():
            raise UsageError(f"config field {field}={value!r}: no such file or folder")
    if get("lora.rank") not in (_MISSING, 0) and not config.init_from:
        raise UsageError(f"config field lora.rank={config.lora.rank}: a LoRA run trains an adapter on a base model; "
                         f"give the base with --init-from")
    window = get("rlhf.grad_window")
    if window is not _MISSING:
        lo, hi = window
        if not (_number(lo, int) and _number(hi, int) and 0 <= lo <= hi < config.rlhf.rollout_steps):
            raise UsageError(f"config field rlhf.grad_window={tuple(window)!r}: needs 0 <= lo <= hi < "
                             f"rlhf.rollout_steps ({config.rlhf.rollout_steps})")
    return config


_MISSING = object()
# Fields naming inputs (empty = none); data.name is a dataset path unless "synthetic".
_PATH_FIELDS = ("init_from", "lora.init", "data.name", "data.val_data", "eval.vae", "rlhf.reward",
                "rlhf.reward_processor", "rlhf.vae",
                "rlhf.prompts")
