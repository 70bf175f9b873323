"""ContentV text-to-video sampling in PyTorch (CUDA, Ascend NPU, CPU).

    pipe = ContentVPipeline.from_pretrained("ContentV-8B", device="cuda", offload=True, tiled_vae=True)
    out = pipe("a red fox running through snow", seed=0)   # out.frames [B, F, H, W, 3] uint8
    lora = pipe.load_lora("style.safetensors", scale=0.8)   # a diffusers LoRA on the DiT; lora.remove() undoes it

Steps: SD3.5 prompt encoding (`text.py`) -> flow-matching Euler over the scheduler's shifted sigmas (the
released ContentV grid linspace(1, 0, N + 1)[:-1] by default, SD3's `set_timesteps(N)` grid on request) with
classifier-free guidance (cond and uncond batched in one DiT call, `denoise`) -> latent de-normalisation
-> Wan VAE decode (tiled when enabled). The DiT runs in bf16 on CUDA / NPU and fp32 on CPU, the VAE in fp32.
Sampling defaults are the released model's (432x768, 125 frames, 50 steps, CFG 6.0) unless the folder's
`model_index.json` names a smaller preset of ours (`"_contentv_preset": "tiny"`), whose defaults apply then.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from contentv_common import preflight
from contentv_common.config import ModelPreset, TransformerConfig, VAEConfig, get_preset, read_json
from contentv_common.latents import denormalize_latents
from contentv_common.schedule import NUM_TRAIN_TIMESTEPS, flow_match_sigmas
from contentv_common.step_cache import guided_steps, make_policy, read_calibration
from contentv_common.weights import weight_index

SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# Scheduler options we do not implement, with the values that make them inactive.
_UNSUPPORTED_SCHEDULER_OPTIONS = {
    "use_dynamic_shifting": False, "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "stochastic_sampling": False,
}
_IGNORED_SCHEDULER_OPTIONS = {"base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len", "time_shift_type"}


# ---------------------------------------------------------------------------------------------
# The folder, read without loading weights
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What a ContentV folder is, from its JSON files only (cheap: checked before any weight is read)."""

    folder: Path
    preset: ModelPreset  # sampling defaults + text lengths (contentv-8b unless model_index names another)
    transformer: TransformerConfig
    vae: VAEConfig
    shift: float
    num_train_timesteps: int

    def latent_shape(self, batch: int, frames: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        """(B, z, T, h, w) for a video of `frames` x `height` x `width`; bad sizes raise ValueError."""
        t, h, w, c = self.vae.latent_shape(frames, height, width, self.transformer.patch_size)
        return (batch, c, t, h, w)

    @property
    def pixel_multiple(self) -> int:
        """Pixel sizes must be multiples of this: VAE spatial factor x patch size (16 for ContentV)."""
        return self.vae.spatial_factor * self.transformer.patch_size


def read_scheduler_config(path: str | Path) -> tuple[float, int]:
    """scheduler_config.json of a FlowMatchEulerDiscreteScheduler -> (shift, num_train_timesteps).
    Options this sampler does not implement raise ValueError naming them."""
    cfg = read_json(path)
    if cfg.get("_class_name", SCHEDULER_CLASS) != SCHEDULER_CLASS:
        raise ValueError(f"{path}: scheduler {cfg['_class_name']!r} is not supported (only {SCHEDULER_CLASS})")
    bad = {k: cfg[k] for k, off in _UNSUPPORTED_SCHEDULER_OPTIONS.items() if k in cfg and cfg[k] != off}
    if bad:
        off = {k: _UNSUPPORTED_SCHEDULER_OPTIONS[k] for k in bad}
        raise ValueError(f"{path}: unsupported scheduler options {bad}; this sampler implements the fixed-shift "
                         f"flow-matching Euler schedule only (inactive values: {off})")
    unknown = sorted(set(cfg) - set(_UNSUPPORTED_SCHEDULER_OPTIONS) - _IGNORED_SCHEDULER_OPTIONS
                     - {"shift", "num_train_timesteps"} - {k for k in cfg if k.startswith("_")})
    if unknown:
        raise ValueError(f"{path}: unknown scheduler options {unknown}")
    return float(cfg.get("shift", 1.0)), int(cfg.get("num_train_timesteps", NUM_TRAIN_TIMESTEPS))


def read_model_info(folder: str | Path) -> ModelInfo:
    """Check that `folder` is a ContentV folder and read its configs (no weights). Clear errors name the file."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found (no hub access here: pass a local directory)")
    index = read_json(folder / "model_index.json")
    missing = [s for s in ("transformer", "vae", "scheduler", "text_encoder", "text_encoder_2", "text_encoder_3",
                           "tokenizer", "tokenizer_2", "tokenizer_3") if not (folder / s).is_dir()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing component folders {missing} of a ContentV model")
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        weight_index(folder / sub)  # every weight file's header, so a truncated one is named before loading
    preset = get_preset(index.get("_contentv_preset", "contentv-8b"))
    transformer = TransformerConfig.from_diffusers_config(read_json(folder / "transformer" / "config.json"))
    vae = VAEConfig.from_diffusers_config(read_json(folder / "vae" / "config.json"))
    if vae.z_dim != transformer.in_channels:
        raise ValueError(f"{folder}: VAE z_dim {vae.z_dim} != transformer in_channels {transformer.in_channels}")
    shift, n_train = read_scheduler_config(folder / "scheduler" / "scheduler_config.json")
    return ModelInfo(folder, preset, transformer, vae, shift, n_train)


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------
def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu. "npu[:i]" imports torch_npu (only then) and turns off its
    internal formats; a missing torch_npu is a clear error."""
    if isinstance(name, torch.device):
        name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind = name.split(":")[0]
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401  (registers torch.npu)
        except ImportError as e:
            raise ImportError(f"--device npu needs Ascend torch_npu, which is not importable ({e}); install the "
                              "torch-npu build matching your torch and CANN (`pip install -e .[npu]`)") from None
        torch.npu.config.allow_internal_format = False
    elif kind == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    elif kind not in ("cuda", "cpu"):
        raise ValueError(f"unknown device {name!r}; choose auto, cuda[:i], npu[:i] or cpu")
    return torch.device(name)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 for the DiT and text encoders on CUDA / NPU, fp32 on CPU."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def free_memory(device: str) -> tuple[int | None, str]:
    """(free bytes, a name for it) of the device a --device string asks for, for the pre-flight checks; None
    where it cannot be told without starting the device (NPU)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            return None, device  # resolve_device names the problem
        index = torch.device(device if device != "auto" else "cuda").index or 0
        return torch.cuda.mem_get_info(index)[0], f"CUDA device {index}"
    if device in ("auto", "cpu"):
        return preflight.host_available_bytes(), "host memory"
    return None, device


def _empty_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "npu":
        torch.npu.empty_cache()


# ---------------------------------------------------------------------------------------------
# The denoising loop
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def denoise(
    transformer,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled: torch.Tensor,
    neg_embeds: torch.Tensor | None,
    neg_pooled: torch.Tensor | None,
    sigmas,
    guidance: float,
    progress: bool = True,
    guided=None,
    cache=None,
) -> torch.Tensor:
    """Flow-matching Euler sampling with classifier-free guidance.

    transformer: callable (hidden_states [N, C, T, h, w], encoder_hidden_states [N, L, D_ctx],
        pooled_projections [N, P], timestep [N] in [0, 1000]) -> velocity [N, C, T, h, w]
        (the DiT, a compiled DiT, or a parallel wrapper of it);
    latents: initial noise [B, C, T, h, w] (computed in fp32 whatever the DiT's dtype);
    prompt_embeds [B, L, D_ctx], pooled [B, P]; neg_*: the same shapes, or None for no guidance;
    sigmas: [steps + 1] from 1 down to 0 (`flow_match_sigmas`); guidance: CFG scale (> 1 guides, like diffusers).
    With guidance, [uncond; cond] run as one batch of 2B; v = v_u + g (v_c - v_u); x += (s_next - s) v.
    guided: [steps] bools, where CFG runs (`contentv_common.step_cache.guided_steps`; None: every step); at the
    other steps only the cond pass runs and v = v_c. cache: a `contentv_torch.step_cache.StepCache` installed on
    the DiT (told each step which branches the batch holds).
    Returns the final latents [B, C, T, h, w] fp32 (normalised DiT space, not yet de-normalised).
    """
    cfg = guidance > 1.0
    if cfg and (neg_embeds is None or neg_pooled is None):
        raise ValueError(f"guidance {guidance} > 1 needs negative prompt embeddings")
    b = latents.shape[0]
    if prompt_embeds.shape[0] != b or pooled.shape[0] != b:
        raise ValueError(f"latents batch {b} != prompt_embeds batch {prompt_embeds.shape[0]} "
                         f"/ pooled batch {pooled.shape[0]}")
    ctx = torch.cat([neg_embeds, prompt_embeds]) if cfg else prompt_embeds
    pool = torch.cat([neg_pooled, pooled]) if cfg else pooled
    sigmas = torch.as_tensor(np.asarray(sigmas, np.float32))
    timesteps = sigmas[:-1] * NUM_TRAIN_TIMESTEPS  # float32, as diffusers' scheduler.timesteps
    x = latents.float()
    for i in tqdm(range(len(timesteps)), desc="denoise", disable=not progress):
        guide = cfg and (guided is None or bool(guided[i]))
        if cache is not None:
            cache.begin_step(i, ("uncond", "cond") if guide else ("cond",))
        x_in = torch.cat([x, x]) if guide else x
        t = timesteps[i].to(x.device).expand(x_in.shape[0])
        if guide or not cfg:
            v = transformer(x_in, ctx, pool, t).float()
        else:  # outside the guidance schedule: the cond pass alone
            v = transformer(x_in, prompt_embeds, pooled, t).float()
        if guide:
            v_u, v_c = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    return x


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """VAE output [B, 3, F, H, W] in [-1, 1] -> [B, F, H, W, 3] uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


@dataclass
class ContentVOutput:
    """frames: [B, F, H, W, 3] uint8 (None for output_type="latent");
    latents: final latents [B, z, T, h, w] fp32 on the CPU, in the DiT's normalised space (before the VAE);
    dit_evaluations: branch passes through the DiT's blocks in this process (CFG, no cache: 2 per step)."""

    frames: np.ndarray | None
    latents: torch.Tensor
    dit_evaluations: int | None = None


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------
class ContentVPipeline:
    """Text encoders + DiT + VAE + the folder's schedule. Build with `from_pretrained`."""

    def __init__(self, info: ModelInfo, text_encoders, transformer, vae, device: torch.device, dtype: torch.dtype,
                 offload: bool = False, compile: bool = False, parallel=None):
        self.info, self.text_encoders, self.transformer, self.vae = info, text_encoders, transformer, vae
        self.device, self.dtype, self.offload = device, dtype, offload
        self.parallel = parallel
        dit = transformer if parallel is None else parallel.wrap(transformer)
        self._dit = torch.compile(dit) if compile else dit

    @classmethod
    def from_pretrained(
        cls,
        folder: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "auto",
        offload: bool = False,
        tiled_vae: bool = False,
        compile: bool = False,
        attention: str | None = None,
        parallel=None,
    ) -> "ContentVPipeline":
        """Load every component from a local ContentV folder.

        dtype: of the DiT and text encoders (None: bf16 on CUDA / NPU, fp32 on CPU); the VAE is always fp32.
        offload: keep the models on the CPU and move each to the device only while it runs (8B on 24 GB).
        tiled_vae: decode in overlapping spatial tiles. compile: `torch.compile` the DiT.
        attention: backend name ("sdpa", "npu"; None: by device). parallel: a `parallel.ParallelState`.
        """
        from contentv_torch.attention import default_backend_for
        from contentv_torch.text import TextEncoders
        from contentv_torch.transformer import ContentVTransformer3DModel
        from contentv_torch.vae import WanVAE

        info = read_model_info(folder)
        device = resolve_device(device)
        dtype = default_dtype(device) if dtype is None else dtype
        home = torch.device("cpu") if offload else device
        text = TextEncoders.from_pretrained(info.folder, dtype=dtype, device=home)
        dit = ContentVTransformer3DModel.from_pretrained(info.folder / "transformer", dtype=dtype, device=home)
        dit.set_attention_backend(attention or default_backend_for(device))
        vae = WanVAE.from_pretrained(info.folder / "vae", dtype=torch.float32, device=home)
        if tiled_vae:
            vae.enable_tiling()
        return cls(info, text, dit, vae, device, dtype, offload=offload, compile=compile, parallel=parallel)

    @contextlib.contextmanager
    def _on_device(self, module: torch.nn.Module):
        """With offload: move `module` to the device for the block, back to the CPU after it."""
        if self.offload:
            module.to(self.device)
        try:
            yield module
        finally:
            if self.offload:
                module.to("cpu")
                _empty_cache(self.device)

    def load_lora(self, adapter, scale: float = 1.0):
        """Apply a diffusers / PEFT LoRA safetensors file (or a read `contentv_torch.lora.LoraAdapter`) to the DiT
        as forward hooks (no second copy of the model; several stack, each with its scale). Returns the
        `LoraHandle`: change `.scale` between calls, `.remove()` to return to the base model exactly."""
        from contentv_torch.lora import apply_lora

        return apply_lora(self.transformer, adapter, scale)

    def prepare_latents(self, shape, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Gaussian noise of `shape` drawn on the CPU in fp32 (the same on every device), moved to the device."""
        if generator is None:
            generator = torch.Generator("cpu")
            generator.manual_seed(seed) if seed is not None else generator.seed()
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device).to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] = "",
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        latents: torch.Tensor | None = None,
        num_videos_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        output_type: str = "np",
        progress: bool = True,
        sigma_grid: str = "contentv",
        cache="none",
        cache_threshold: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
        cfg_truncation: float | None = None,
    ) -> ContentVOutput:
        """Sample videos. None takes the model's default (432x768, 125 frames, 50 steps, CFG 6.0 for ContentV-8B).

        latents: initial noise [B, z, T, h, w] with B = len(prompts) * num_videos_per_prompt (else drawn from
        `generator` / `seed`); output_type "np" (decoded frames) or "latent" (skip the VAE);
        sigma_grid: "contentv" (the released pipeline's) or "sd3" (see `flow_match_sigmas`).
        cache / cache_threshold: a step-cache policy name of `contentv_common.step_cache` (its default threshold
        when None; calibration from the folder's step_cache.json), or a `contentv_torch.step_cache.StepCache` to
        use as it is (calibration records through one); guidance_interval (start, end): CFG only for sigmas
        inside it; cfg_truncation f: no uncond pass after the first f of the steps.
        All sizes are checked before any model runs.
        """
        p = self.info.preset
        frames, height, width = frames or p.frames, height or p.height, width or p.width
        steps, guidance = steps or p.num_steps, p.guidance_scale if guidance is None else guidance
        max_sequence_length = max_sequence_length or p.text.t5_max_tokens
        if output_type not in ("np", "latent"):
            raise ValueError(f"output_type must be 'np' or 'latent', got {output_type!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        shape = self.info.latent_shape(len(prompts) * num_videos_per_prompt, frames, height, width)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape} for "
                             f"{len(prompts)} prompt(s) "
                             f"x {num_videos_per_prompt} video(s) of {frames} frames at {height}x{width}")
        sigmas = flow_match_sigmas(steps, self.info.shift, self.info.num_train_timesteps, grid=sigma_grid)
        guided = guided_steps(sigmas, guidance, guidance_interval, cfg_truncation)
        if isinstance(cache, str):
            cache = make_policy(cache, cache_threshold, read_calibration(self.info.folder) if cache != "none" else None)

        with self._on_device(self.text_encoders):
            emb = self.text_encoders.encode(prompts, negative_prompt, num_videos_per_prompt,
                                            do_classifier_free_guidance=guidance > 1.0,
                                            max_sequence_length=max_sequence_length)
        x = self.prepare_latents(shape, seed, generator) if latents is None else latents.to(self.device, torch.float32)
        if self.parallel is not None:
            x = self.parallel.broadcast(x)  # every rank denoises rank 0's noise, whatever the seeds
        step_cache = None
        if not hasattr(cache, "policy") and cache.active:  # a policy (not a ready StepCache, as calibration passes)
            from contentv_torch.step_cache import StepCache

            step_cache = StepCache(cache, steps, group=None if self.parallel is None else self.parallel.sp_group)
        elif hasattr(cache, "policy"):
            step_cache = cache
        with self._on_device(self.transformer):
            self.transformer.step_cache = step_cache
            try:
                x = denoise(self._dit, x, emb.prompt_embeds, emb.pooled, emb.negative_embeds, emb.negative_pooled,
                            sigmas, guidance, progress=progress and (self.parallel is None or self.parallel.rank == 0),
                            guided=guided, cache=step_cache)
            finally:
                self.transformer.step_cache = None
        evals = step_cache.evaluations if step_cache else int(sum(2 if g else 1 for g in guided))
        if output_type == "latent":
            return ContentVOutput(None, x.cpu(), evals)
        return ContentVOutput(self.decode(x, progress=progress), x.cpu(), evals)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress: bool = False) -> np.ndarray:
        """Normalised latents [B, z, T, h, w] -> frames [B, 4(T-1)+1, 8h, 8w, 3] uint8 (one video at a time)."""
        with self._on_device(self.vae):
            z = denormalize_latents(latents.to(self.device, torch.float32), self.vae.config, channel_axis=1)
            return np.concatenate([to_uint8_frames(self.vae.decode(z[i : i + 1], progress=progress))
                                   for i in range(z.shape[0])])
