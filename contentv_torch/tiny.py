"""Build a complete ContentV-format model folder offline, with random weights, in the real on-disk formats.

    make_tiny_contentv_folder(path, preset="tiny", seed=0, words=(), write_vae=None, write_transformer=None) -> Path

writes
    model_index.json                       diffusers pipeline index (+ "_contentv_preset": the preset name)
    transformer/                           our MM-DiT weights: config.json + diffusion_pytorch_model.safetensors
    vae/                                   the Wan2.1 VAE: config.json + diffusion_pytorch_model.safetensors
    text_encoder/, text_encoder_2/         transformers CLIPTextModelWithProjection (CLIP-L / bigG widths of the preset)
    text_encoder_3/                        transformers T5EncoderModel
    tokenizer/, tokenizer_2/               CLIPTokenizer from a hand-made byte-level vocab + merges
    tokenizer_3/                           T5Tokenizer (Unigram, built with `tokenizers`)
    scheduler/scheduler_config.json        FlowMatchEulerDiscreteScheduler with the preset's shift
Only for the tiny preset (or others whose text encoders are small enough to build on a CPU).

`words`: extra whole words for both tokenizers' vocabularies (each becomes one token), e.g. the caption
words of a synthetic set. `write_vae(root, preset, seed)` / `write_transformer(root, preset, seed)` write
`root/vae` and `root/transformer`; by default our own torch models with torch's random init
(`contentv_torch.vae.WanVAE`, `contentv_torch.transformer.ContentVTransformer3DModel`). The tests pass
writers that save the diffusers reference models instead (`tests/tiny_models.py`).
"""
from __future__ import annotations

import json
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from contentv_common.config import ModelPreset, get_preset
from contentv_common.weights import atomic_dir

WORDS = ("a", "the", "cat", "dog", "red", "blue", "car", "on", "in", "of", "sky", "sea", "big", "small", "video",
         "running", "flying", "bird", "tree", "street", "night", "sunset", "over", "with", "city")

Writer = Callable[[Path, ModelPreset, int], None]


def _all_words(words: Sequence[str]) -> list[str]:
    bad = [w for w in words if not w or not w.isalpha() or not w.islower()]
    if bad:
        raise ValueError(f"make_tiny_contentv_folder: extra words must be lower-case letters only, got {bad}")
    return list(WORDS) + [w for w in dict.fromkeys(words) if w not in WORDS]


def clip_vocab(words: Sequence[str] = ()) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE vocab: every byte, every byte + "</w>", whole-word merges for WORDS + words, specials."""
    from tokenizers.pre_tokenizers import ByteLevel

    chars = sorted(ByteLevel.alphabet())  # the 256 byte-level characters
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _all_words(words):  # merge left to right: "c a" -> "ca", "ca t</w>" -> "cat</w>"
        if len(word) < 2:
            continue
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            merge = (left, right)
            left = left + right
            if merge not in merges:
                merges.append(merge)
            vocab.setdefault(left, len(vocab))
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return vocab, merges


def t5_vocab(words: Sequence[str] = ()) -> list[tuple[str, float]]:
    """Unigram pieces: <pad>=0, </s>=1, <unk>=2, "▁", letters, digits, punctuation, whole words."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation]
    pieces += [("▁" + c, -4.0) for c in string.ascii_lowercase]
    pieces += [("▁" + w, -1.0) for w in _all_words(words) if len(w) > 1]
    return pieces


def _write_tokenizers(root: Path, clip_max_tokens: int, words: Sequence[str]) -> tuple[int, int, int, int]:
    from transformers import CLIPTokenizer, T5Tokenizer

    vocab, merges = clip_vocab(words)
    clip = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=clip_max_tokens)
    clip.save_pretrained(root / "tokenizer")
    # SD3's bigG tokenizer pads with "!" instead of <|endoftext|>; keep that difference.
    clip2 = CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=clip_max_tokens)
    clip2.save_pretrained(root / "tokenizer_2")
    pieces = t5_vocab(words)
    t5 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    t5.save_pretrained(root / "tokenizer_3")
    for name in ("tokenizer", "tokenizer_2"):
        _write_legacy_bpe_files(root / name, vocab, merges)
    _write_spiece_model(root / "tokenizer_3" / "spiece.model", pieces)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        _portable_tokenizer_config(root / name / "tokenizer_config.json")
    return len(vocab), clip.bos_token_id, clip.eos_token_id, len(pieces)


# transformers 4.x reads a tokenizer folder through the files of its slow classes (CLIPTokenizer: vocab.json +
# merges.txt; T5Tokenizer: spiece.model) and chokes on 5.x-only tokenizer_config.json fields; 5.x reads
# tokenizer.json. Writing both makes one folder readable by either, like the released model's folders.


def _write_legacy_bpe_files(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json + merges.txt of a byte-level BPE tokenizer (the files 4.x's slow CLIPTokenizer reads)."""
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def _write_spiece_model(path: Path, pieces: list[tuple[str, float]]) -> None:
    """A SentencePiece unigram model of `pieces` (pad 0, </s> 1, <unk> 2, as T5's) for 4.x's slow T5Tokenizer."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    m = sp.ModelProto()
    types = {"<pad>": sp.ModelProto.SentencePiece.CONTROL, "</s>": sp.ModelProto.SentencePiece.CONTROL,
             "<unk>": sp.ModelProto.SentencePiece.UNKNOWN}
    for piece, score in pieces:
        m.pieces.add(piece=piece, score=score, type=types.get(piece, sp.ModelProto.SentencePiece.NORMAL))
    m.trainer_spec.model_type = sp.TrainerSpec.UNIGRAM
    m.trainer_spec.vocab_size = len(pieces)
    m.trainer_spec.pad_id, m.trainer_spec.eos_id, m.trainer_spec.unk_id, m.trainer_spec.bos_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = True
    path.write_bytes(m.SerializeToString())


def _portable_tokenizer_config(path: Path) -> None:
    """Drop the tokenizer_config.json fields that only transformers 5.x understands ("backend"; a list
    "extra_special_tokens", which 4.x expects as a dict)."""
    cfg = json.loads(path.read_text())
    cfg.pop("backend", None)
    if not isinstance(cfg.get("extra_special_tokens", {}), dict):
        cfg.pop("extra_special_tokens")
    path.write_text(json.dumps(cfg, indent=2))


def _write_text_encoders(root: Path, preset: ModelPreset, seed: int, clip_vocab_size: int, bos: int, eos: int,
                         t5_vocab_size: int) -> None:
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    t = preset.text
    clips = [("text_encoder", t.clip_l_hidden, t.clip_l_projection),
             ("text_encoder_2", t.clip_g_hidden, t.clip_g_projection)]
    for i, (name, hidden, proj) in enumerate(clips):
        torch.manual_seed(seed + 1 + i)
        cfg = CLIPTextConfig(vocab_size=clip_vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                             projection_dim=proj, num_hidden_layers=3, num_attention_heads=2,
                             max_position_embeddings=t.clip_max_tokens, hidden_act="gelu",
                             bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
        CLIPTextModelWithProjection(cfg).eval().save_pretrained(root / name)
    torch.manual_seed(seed + 3)
    cfg = T5Config(vocab_size=t5_vocab_size, d_model=t.t5_hidden, d_kv=8, d_ff=2 * t.t5_hidden, num_layers=2,
                   num_heads=4, feed_forward_proj="gated-gelu", relative_attention_num_buckets=8,
                   relative_attention_max_distance=32, dropout_rate=0.0, is_encoder_decoder=False, use_cache=False)
    T5EncoderModel(cfg).eval().save_pretrained(root / "text_encoder_3")


def write_random_vae(root: Path, preset: ModelPreset, seed: int) -> None:
    """root/vae: our torch Wan VAE of the preset, torch's default random init (seed + 4)."""
    from contentv_torch.vae import WanVAE

    torch.manual_seed(seed + 4)
    WanVAE(preset.vae).eval().save_pretrained(root / "vae")


def write_random_transformer(root: Path, preset: ModelPreset, seed: int) -> None:
    """root/transformer: our torch MM-DiT of the preset, torch's default random init (seed + 5)."""
    from contentv_torch.transformer import ContentVTransformer3DModel

    torch.manual_seed(seed + 5)
    ContentVTransformer3DModel(preset.transformer).eval().save_pretrained(root / "transformer")


def write_scheduler_and_index(root: Path, preset: ModelPreset) -> None:
    """root/scheduler/scheduler_config.json (the preset's shift) and root/model_index.json."""
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.31.0",
         "num_train_timesteps": 1000, "shift": preset.shift}, indent=2))
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "_diffusers_version": "0.31.0",
        "_contentv_preset": preset.name,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"],  # as the release: a class diffusers can import
        "vae": ["diffusers", "AutoencoderKLWan"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))


def make_tiny_contentv_folder(path: str | Path, preset: str = "tiny", seed: int = 0, words: Sequence[str] = (),
                              write_vae: Writer | None = None, write_transformer: Writer | None = None) -> Path:
    """Write a whole ContentV-format folder at `path` (atomically; an existing folder is replaced) and return it."""
    p = get_preset(preset)
    path = Path(path)
    with torch.random.fork_rng(devices=[]), atomic_dir(path, overwrite=True) as root:
        clip_size, bos, eos, t5_size = _write_tokenizers(root, p.text.clip_max_tokens, words)
        _write_text_encoders(root, p, seed, clip_size, bos, eos, t5_size)
        (write_vae or write_random_vae)(root, p, seed)
        (write_transformer or write_random_transformer)(root, p, seed)
        write_scheduler_and_index(root, p)
    return path
