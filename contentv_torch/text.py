"""The three SD3.5 text encoders of ContentV (CLIP-L, OpenCLIP-bigG, T5-XXL) and their prompt encoding.

Loaded with transformers from a ContentV / SD3.5 folder (`text_encoder/`, `text_encoder_2/`,
`text_encoder_3/`, `tokenizer/`, `tokenizer_2/`, `tokenizer_3/`), local files only. Encoding is exactly
diffusers `StableDiffusion3Pipeline.encode_prompt`:
  CLIP-L, CLIP-bigG: penultimate hidden states [B, 77, 768] and [B, 77, 1280], concatenated on channels
      and zero-padded to the T5 width -> [B, 77, 4096]; pooled = the two text projections -> [B, 2048];
  T5: last hidden state over `max_sequence_length` tokens -> [B, 256, 4096];
  prompt_embeds = concat on the sequence -> [B, 77 + 256, 4096].
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_MAX_SEQUENCE_LENGTH = 256  # the T5 tokens SD3.5 / ContentV use


@dataclass
class PromptEmbeds:
    """prompt_embeds: [B, S_text, D_ctx]; pooled: [B, D_pooled]; negative_* the same shapes (None without CFG).
    B = len(prompts) * num_videos_per_prompt, each prompt's copies adjacent."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None


def _subfolder(folder: Path, name: str) -> Path:
    sub = folder / name
    if not sub.is_dir():
        raise FileNotFoundError(f"{folder}: missing the {name}/ folder of a ContentV / SD3.5 model")
    return sub


def _load(cls, folder: Path, name: str, **kw):
    """`cls.from_pretrained(folder/name)`; a missing or unreadable file is a ValueError naming the component,
    as the transformer and VAE loaders name theirs (transformers raises many error types for bad files)."""
    sub = _subfolder(folder, name)
    try:
        return cls.from_pretrained(sub, **kw)
    except Exception as e:  # transformers / safetensors / tokenizers raise many error types for a bad file
        raise ValueError(f"{sub}: cannot load the {name} component ({type(e).__name__}: {e})") from e


class TextEncoders(torch.nn.Module):
    """CLIP-L + CLIP-bigG + T5 with their tokenizers. `encode(...)` mirrors SD3's `encode_prompt`."""

    def __init__(self, tokenizer, tokenizer_2, tokenizer_3, text_encoder, text_encoder_2, text_encoder_3):
        super().__init__()
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizer, tokenizer_2, tokenizer_3
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoder, text_encoder_2, text_encoder_3

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> "TextEncoders":
        """Load the six components from `folder` (local files only; no hub)."""
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: not a model folder (no hub access here: pass a local directory)")
        toks = [_load(AutoTokenizer, folder, f"tokenizer{s}", local_files_only=True) for s in ("", "_2", "_3")]
        kw = dict(dtype=dtype, local_files_only=True)
        clip_l = _load(CLIPTextModelWithProjection, folder, "text_encoder", **kw)
        clip_g = _load(CLIPTextModelWithProjection, folder, "text_encoder_2", **kw)
        t5 = _load(T5EncoderModel, folder, "text_encoder_3", **kw)
        return cls(*toks, clip_l, clip_g, t5).to(device).eval()

    @property
    def device(self) -> torch.device:
        return self.text_encoder.device

    @property
    def clip_max_length(self) -> int:
        return self.tokenizer.model_max_length

    @torch.no_grad()
    def _clip(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts [B] -> penultimate hidden states [B, 77, D_clip], text projection [B, P_clip]."""
        tokenizer, encoder = [(self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)][index]
        ids = tokenizer(prompts, padding="max_length", max_length=self.clip_max_length, truncation=True,
                        return_tensors="pt").input_ids
        self._warn_truncated(tokenizer, prompts, ids, f"CLIP ({self.clip_max_length} tokens)")
        out = encoder(ids.to(self.device), output_hidden_states=True)
        return out.hidden_states[-2].to(self.text_encoder.dtype), out[0]

    @torch.no_grad()
    def _t5(self, prompts: list[str], max_sequence_length: int) -> torch.Tensor:
        """prompts [B] -> last hidden state [B, max_sequence_length, D_t5]."""
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        self._warn_truncated(self.tokenizer_3, prompts, ids, f"T5 (max_sequence_length={max_sequence_length})")
        return self.text_encoder_3(ids.to(self.device))[0].to(self.text_encoder_3.dtype)

    @staticmethod
    def _warn_truncated(tokenizer, prompts, ids, what):
        full = tokenizer(prompts, padding="longest", return_tensors="pt").input_ids
        if full.shape[-1] > ids.shape[-1]:
            dropped = tokenizer.batch_decode(full[:, ids.shape[-1] - 1 : -1])
            log.warning("prompt truncated to %s: dropped %r", what, dropped)

    def _encode(self, prompts: list[str], n: int, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts [B] -> ([B*n, 77 + L, D_t5], [B*n, P_l + P_g])."""
        l_embeds, l_pooled = self._clip(0, prompts)
        g_embeds, g_pooled = self._clip(1, prompts)
        t5 = self._t5(prompts, max_sequence_length)
        clip = torch.cat([l_embeds, g_embeds], dim=-1)  # [B, 77, D_l + D_g]
        if clip.shape[-1] > t5.shape[-1]:
            raise ValueError(f"CLIP widths {clip.shape[-1]} exceed the T5 width {t5.shape[-1]}")
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # [B, 77, D_t5]
        embeds = torch.cat([clip, t5], dim=-2)
        pooled = torch.cat([l_pooled, g_pooled], dim=-1)
        return embeds.repeat_interleave(n, dim=0), pooled.repeat_interleave(n, dim=0)

    def encode(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = "",
        num_videos_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    ) -> PromptEmbeds:
        """Encode prompts (and the negative prompts when guiding) as SD3.5 does. A single negative prompt is
        used for every prompt; a list must match the prompts' count."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        if num_videos_per_prompt < 1:
            raise ValueError(f"num_videos_per_prompt must be >= 1, got {num_videos_per_prompt}")
        embeds, pooled = self._encode(prompts, num_videos_per_prompt, max_sequence_length)
        out = PromptEmbeds(embeds, pooled)
        if do_classifier_free_guidance:
            negative_prompt = negative_prompt or ""
            negs = len(prompts) * [negative_prompt] if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            out.negative_embeds, out.negative_pooled = self._encode(negs, num_videos_per_prompt, max_sequence_length)
        return out
