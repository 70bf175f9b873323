"""End to end on one CPU: synthetic clips -> JAX VAE -> encode_dataset -> JAX MM-DiT -> convert -> PyTorch generate.

    python -m examples.e2e --out e2e_out            # the whole run (3207 s on a loaded shared 2-core box)
    python -m examples.e2e --out e2e_out --quick    # every phase with a handful of steps (CI: tests/test_e2e.py)
    python -m examples.e2e --out e2e_lora --phases lora --base e2e_out/ContentV-shapes-trained   # phase 8 alone

Phases (each shows a progress bar and ends with a one-line summary):
  1. clips     coloured squares / circles moving left / right / up / down on a plain background
               (examples/shapes.py), 9 frames at 32x48, as mp4 files + captions.jsonl (encode_dataset's input);
               colour x direction pairs of examples.shapes.HELDOUT_PAIRS are never in it.
  2. vae       a tiny Wan2.1 VAE (the `tiny` preset's) trained from scratch in JAX (contentv_jax.vae_train:
               reconstruction + KL), its latent mean / std measured, written in our JAX format (vae_flax/) and
               converted with `convert` into the vae/ of a ContentV folder (ContentV-shapes/) whose text encoders,
               tokenizers and MM-DiT are the frozen tiny random ones built offline (contentv_torch.tiny).
  3. encode    python -m contentv_torch.encode_dataset: the clips -> a latent dataset (dataset/).
  4. train     python -m contentv_jax.train --config tiny --data dataset/: the tiny MM-DiT, from scratch (ckpt/), with
               caption dropout 0.1 (flow.caption_dropout: the empty prompt's embeddings, so CFG has an unconditional model).
  5. convert   python -m convert --to torch ckpt/ ContentV-shapes-trained/ --components ContentV-shapes/.
  6. generate  python -m contentv_torch.generate (guidance 4.0) for every held-out caption and 6 seen (training)
               captions, with the trained folder and with ContentV-shapes/ (same pipeline, random MM-DiT: the
               baseline) -> samples/{trained,untrained}/p<i>-{heldout,seen}-*.mp4, contact_sheet.png /
               contact_sheet_untrained.png (rows = prompts, columns = frames).
  7. check     per generated video: is the dominant non-background colour the prompt's, does the colour mass move
               in the prompt's direction (examples.shapes.analyse); accuracies for both models, held-out and seen
               prompts apart -> report.json. Also the analyser on training clips and on their VAE round trips:
               if those pass, a generated video's failure is the MM-DiT's, not the VAE's.
  8. lora      teach the trained base a concept it never saw: the word "diagonally" (a shape moving down and to the
               right at once; examples.shapes.NEW_DIRECTIONS; the tokenizers have no token for it) with a LoRA:
               clips of the 6 "a <colour> <shape> moving diagonally" captions plus old training captions' clips
               (prior preservation) -> encode_dataset -> contentv_jax.train --init-from <base folder> --lora-rank
               --val-data <new-concept validation clips> -> convert --to peft -> generate the new captions and the
               old prompts with and without --lora -> lora/report.json: accuracies per group, every video read with
               "diagonally" among the analyser's answers; the run's loss and val_loss. All under --out/lora/;
               --phases lora --base DIR runs it on an earlier run's trained folder (read only).
Every output is written atomically; a rerun replaces --out's contents phase by phase.

Measured (2026-12-05 13:31-14:25 UTC, 2 shared CPU cores, load 4-9 from other agents' work): 3207 s wall in all
(VAE 2222 s for 600 steps on 9-frame windows, recon MSE 0.87 -> 0.016; encode 83 s; MM-DiT 16000 steps with caption
dropout 0.1, 386 s, loss 1.75 -> 0.72; convert 10 s; generate 472 s; check 29 s). The analyser reads 100% of the
training clips and of their VAE round trips right. Guidance 4.0, 8 videos per prompt (48 per figure):
  trained    held-out colour 67% / direction 50% / both 38%;  seen 98% / 98% / 96%
  untrained  held-out colour 33% / direction 19% / both  4%;  seen 33% / 25% / 10%
Every frame's own colour is as right as the first's (held-out 67% on frames 0-6, 65% / 62% on 7-8; seen 96-98%), and
no held-out video has a blue frame for a non-blue prompt (seen: one video of 48, blue from frame 0). The earlier run (2026-11-27: 5-frame VAE windows, 2 videos per prompt:
held-out 92% / 42% / 42% over 12 videos) drifted to blue / cyan on the last latent frame (frames 5-8): with 5-frame
windows the decoder's temporal upsamples only ever start latent frame 1 from a zero cache, so the time-conv tap that
reads the previous chunk got no gradient and stayed at its random init (tests/test_e2e.py); a 9-frame decode is the
first to use it. Held-out pairs are composed only partly; 12 videos per figure overstated the colour (92%).

LoRA phase, measured (2026-12-05 17:46-17:51 UTC, same machine, load ~2.5; `--phases lora --base
/tmp/e2e_full/ContentV-shapes-trained`): 326 s (encode 49 s, LoRA rank 8 alpha 8, 3000 steps on 48 new-concept +
144 replay clips, 59 s; generate 208 s). val_loss on the 12 new-concept validation clips 1.929 (step 0 = the base)
-> 0.965 (250) -> 0.886 (1000) -> 0.855 (3000). 8 videos per prompt, 48 per cell, colour / direction / both, every
video read with "diagonally" among the answers:
  base        new concept 33% /  2% /  0%;  held-out 69% / 54% / 33%;  seen 98% / 94% / 94%
  base + LoRA new concept 90% / 90% / 79%;  held-out 62% / 50% / 21%;  seen 94% / 92% / 85%
The new word's motion is learnt (direction 2% -> 90%; chance among 5 directions is 20%) and the old concepts mostly
kept (seen -4 / -2 / -9 points), but held-out composition loses 12 points on both-right (33% -> 21%). The misses
concentrate on the old directions that are parts of the new one: held-out "blue ... moving down" (both 10 -> 5 of
16) and seen "green ... moving right" (15 -> 10), turning diagonal or red (the random tiny text encoders give every
caption embeddings with cosine 0.999 to each other, so what the adapter learns for "diagonally" leaks to its
neighbours). Measured alternatives on the same data did not keep more: 2 / 4 replay clips per caption, 600 / 1500
steps, rank 4, video-stream-only targets, caption dropout 0 (seen both 62-71% on a 24-video probe where this setting
had 71%), --lora-scale 0.9 / 0.7 at generation (new both 50% / 8%); and at 48 videos per cell: replay 16, lr 3e-4,
extra replay of the down / right captions, 6000 steps, 96 new clips, attention-only targets (held-out -2 but new
direction 79%, seen both -11), attention-only at rank 16 or 6000 steps -- none keeps every old cell within 10 points
with new direction >= 80% (table: benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python examples/e2e.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm.auto import tqdm

from contentv_common.weights import atomic_dir, atomic_file
from examples import shapes

FRAMES, HEIGHT, WIDTH, FPS = 9, 32, 48, 24
PRESET = "tiny"


@dataclass(frozen=True)
class Settings:
    """The sizes of one run; `full()` is the default run, `quick()` the CI one."""

    clips_per_caption: int
    vae_steps: int
    vae_batch: int
    vae_frames: int  # training windows of the clips (4k+1 frames; 9 = the first chunk + two cached chunks, the
    # fewest that train the decoder's temporal-upsample taps on a real cache: with 5 they stay at init -> blue drift)
    vae_lr: float
    kl_weight: float
    dit_steps: int
    dit_lr: float
    caption_dropout: float  # the trainer's flow.caption_dropout: what classifier-free guidance needs
    sample_steps: int
    guidance: float  # generate --guidance (1.0: no CFG)
    videos_per_prompt: int
    prompts: int  # held-out prompts to generate (0: all)
    seen_prompts: int  # training captions also generated (every 3rd; 0: none): can it make what it was shown?
    # 8. LoRA: the new concept's clips (shapes.new_captions()), old training clips mixed in so the adapter keeps what
    # the base knows (prior preservation, as DreamBooth-style recipes do), validation clips of the new concept
    lora_clips_per_caption: int
    lora_replay_per_caption: int
    lora_val_clips_per_caption: int
    lora_rank: int
    lora_alpha: float
    lora_targets: str  # train --lora-targets (comma-separated module patterns; "": the trainer's default)
    lora_steps: int
    lora_lr: float
    lora_eval_every: int  # validation loss every N steps (and at step 0 and the last)

    @staticmethod
    def full() -> Settings:
        return Settings(clips_per_caption=12, vae_steps=600, vae_batch=4, vae_frames=9, vae_lr=5e-4, kl_weight=1e-6, dit_steps=16000,
                        dit_lr=1e-3, caption_dropout=0.1, sample_steps=16, guidance=4.0, videos_per_prompt=8, prompts=0,
                        seen_prompts=6, lora_clips_per_caption=8, lora_replay_per_caption=8, lora_val_clips_per_caption=2,
                        lora_rank=8, lora_alpha=8.0, lora_targets="", lora_steps=3000, lora_lr=1e-3, lora_eval_every=250)

    @staticmethod
    def quick() -> Settings:
        return Settings(clips_per_caption=1, vae_steps=2, vae_batch=2, vae_frames=1, vae_lr=2e-3, kl_weight=1e-6, dit_steps=2,
                        dit_lr=1e-3, caption_dropout=0.1, sample_steps=2, guidance=2.0, videos_per_prompt=1, prompts=2,
                        seen_prompts=1, lora_clips_per_caption=1, lora_replay_per_caption=1, lora_val_clips_per_caption=1,
                        lora_rank=2, lora_alpha=2.0, lora_targets="", lora_steps=2, lora_lr=1e-3, lora_eval_every=1)


def _summary(phase: str, text: str, t0: float) -> None:
    tqdm.write(f"[{phase}] {text} ({time.time() - t0:.1f} s)")


def _run(cmd: list[str], phase: str, log: Path, quiet: bool = False, threads: int | None = None) -> None:
    """Run one of the project's CLIs; its output goes to the terminal (to `log` instead when quiet).
    A failure raises naming the command and the log's last lines."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    if quiet:
        with open(log, "w") as f:
            rc = subprocess.run(cmd, check=False, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    else:
        rc = subprocess.run(cmd, env=env, check=False).returncode
    if rc:
        tail = log.read_text()[-3000:] if quiet and log.is_file() else "(see the output above)"
        raise RuntimeError(f"[{phase}] `{' '.join(cmd)}` failed with exit code {rc}:\n{tail}")


# ---- 1. clips ---------------------------------------------------------------------------------------------
def write_clips(folder: Path, jobs: list[shapes.Caption], seed: int, desc: str) -> Path:
    """folder/: c<i>.mp4 for each caption of `jobs` + captions.jsonl ({"file", "caption"} per line)."""
    from contentv_common.video_io import write_mp4

    rng = np.random.default_rng(seed)
    with atomic_dir(folder, overwrite=True) as root:
        lines = []
        for i, cap in enumerate(tqdm(jobs, desc=desc, unit="clip")):
            write_mp4(root / f"c{i:04d}.mp4", shapes.render(cap, FRAMES, HEIGHT, WIDTH, rng), fps=FPS)
            lines.append(json.dumps({"file": f"c{i:04d}.mp4", "caption": cap.text}))
        (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def make_clips(out: Path, s: Settings, seed: int) -> Path:
    """out/clips/: the training captions' clips (encode_dataset's input)."""
    t0 = time.time()
    jobs = [c for c in shapes.captions("train") for _ in range(s.clips_per_caption)]
    write_clips(out / "clips", jobs, seed, "[1/8 clips] render + mp4")
    _summary("1/8 clips", f"{len(jobs)} clips ({len(shapes.captions('train'))} training captions x "
             f"{s.clips_per_caption}), {FRAMES}x{HEIGHT}x{WIDTH} at {FPS} fps -> {out / 'clips'}", t0)
    return out / "clips"


def read_clips(clips: Path) -> np.ndarray:
    """The clips of captions.jsonl as video [N, F, H, W, 3] float32 in [-1, 1] (read back from the mp4s)."""
    from contentv_common.video_io import read_mp4

    files = [json.loads(line)["file"] for line in (clips / "captions.jsonl").read_text().splitlines() if line]
    videos = np.stack([read_mp4(clips / f)[0] for f in files])
    if videos.shape[1:] != (FRAMES, HEIGHT, WIDTH, 3):
        raise ValueError(f"{clips}: clips are {videos.shape[1:]}, expected {(FRAMES, HEIGHT, WIDTH, 3)}")
    return videos.astype(np.float32) / 127.5 - 1.0


# ---- 2. VAE ----------------------------------------------------------------------------------------------
def train_vae(out: Path, clips: Path, s: Settings, seed: int, fast_compile: bool = False) -> Path:
    """Train the tiny Wan VAE on the clips; write vae_flax/ and the ContentV folder ContentV-shapes/ (random tiny
    text encoders + MM-DiT, the trained VAE converted by `convert`). Returns the folder."""
    from contentv_common.config import get_preset
    from contentv_jax.vae_train import VAETrainer, latent_stats, with_latent_stats
    from contentv_torch.tiny import make_tiny_contentv_folder
    from convert.export import convert
    from convert.formats import save_flax_params

    t0 = time.time()
    videos = read_clips(clips)
    cfg = get_preset(PRESET).vae
    trainer = VAETrainer(cfg, lr=s.vae_lr, kl_weight=s.kl_weight, seed=seed, sample=False,
                         compiler_options={"xla_backend_optimization_level": 0} if fast_compile else None)
    rng = np.random.default_rng(seed + 1)
    bar = tqdm(range(s.vae_steps), desc="[2/8 vae] train (recon + KL, JAX)", unit="step")
    first = last = None
    for _ in bar:
        start = int(rng.integers(0, FRAMES - s.vae_frames + 1))
        m = trainer.step(videos[rng.integers(0, len(videos), s.vae_batch), start:start + s.vae_frames])
        first = first or m
        last = m
        bar.set_postfix(recon=f"{m['recon']:.4f}", kl=f"{m['kl']:.1f}")
    mean, std = latent_stats(cfg, trainer.params, videos)
    cfg = with_latent_stats(cfg, mean, std)
    save_flax_params(cfg, trainer.params, out / "vae_flax", overwrite=True)
    folder = out / "ContentV-shapes"
    make_tiny_contentv_folder(folder, PRESET, seed=seed, words=shapes.WORDS)
    convert(out / "vae_flax", folder / "vae", "torch", overwrite=True)  # replaces the random vae/ (atomically)
    _summary("2/8 vae", f"{s.vae_steps} steps, recon MSE {first['recon']:.4f} -> {last['recon']:.4f}, "
             f"KL {last['kl']:.1f}, latent std {float(np.mean(std)):.2f} -> {folder}", t0)
    return folder


# ---- 3-5: the CLIs -----------------------------------------------------------------------------------------
def encode(out: Path, clips: Path, folder: Path, data: Path | None = None, phase: str = "3/8 encode") -> Path:
    """python -m contentv_torch.encode_dataset: clips/ -> a latent dataset (default out/dataset/)."""
    t0 = time.time()
    data = data or out / "dataset"
    tqdm.write(f"[{phase}] python -m contentv_torch.encode_dataset")
    _run([sys.executable, "-m", "contentv_torch.encode_dataset", "--model", str(folder), "--captions",
          str(clips / "captions.jsonl"), "--output", str(data), "--buckets", f"{FRAMES}x{HEIGHT}x{WIDTH}",
          "--fps", str(FPS), "--batch-size", "16", "--device", "cpu", "--overwrite"], phase,
         data.parent / f"{data.name}-encode.log")
    manifest = json.loads((data / "manifest.json").read_text())
    _summary(phase, f"latent dataset -> {data} ({len(manifest['records'])} clips, "
             f"{len(manifest['skipped'])} skipped)", t0)
    return data


def train_dit(out: Path, data: Path, s: Settings, seed: int, fast_compile: bool = False) -> Path:
    t0 = time.time()
    ckpt, metrics = out / "ckpt", out / "metrics.jsonl"
    tqdm.write("[4/8 train] python -m contentv_jax.train")
    _run([sys.executable, "-m", "contentv_jax.train", "--config", PRESET, "--data", str(data), "--steps",
          str(s.dit_steps), "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(s.dit_steps), "--resume", "no",
          "--metrics-file", str(metrics), "--log-every", str(max(1, min(50, s.dit_steps // 4))), "--seed", str(seed),
          "--set", f"optim.lr={s.dit_lr}", "--set", f"optim.warmup_steps={min(20, s.dit_steps)}",
          "--set", f"data.buckets=[({FRAMES},{HEIGHT},{WIDTH},8)]", "--set", f"flow.caption_dropout={s.caption_dropout}"] + (["--fast-compile"] if fast_compile else []),
         "4/8 train", out / "train.log")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    _summary("4/8 train", f"{s.dit_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} -> {ckpt}" if losses
             else f"{s.dit_steps} steps -> {ckpt}", t0)
    return ckpt


def convert_ckpt(out: Path, ckpt: Path, folder: Path) -> Path:
    t0 = time.time()
    trained = out / "ContentV-shapes-trained"
    tqdm.write("[5/8 convert] python -m convert")
    _run([sys.executable, "-m", "convert", "--to", "torch", str(ckpt), str(trained), "--components", str(folder),
          "--overwrite", "-q"], "5/8 convert", out / "convert.log")
    _summary("5/8 convert", f"{ckpt} -> {trained} (transformer/ from the checkpoint, the rest from {folder.name}/)", t0)
    return trained


# ---- 6. generate + contact sheet -----------------------------------------------------------------------------
def generate(out: Path, models: dict[str, tuple[Path, list[str]]], prompts: list[shapes.Caption], s: Settings,
             seed: int, phase: str = "6/8 generate", main_model: str = "trained", workers: int = 2) -> dict:
    """{model name: [(caption, [video paths])]} after running generate (guidance `s.guidance`) for every (model,
    prompt); models: name -> (ContentV folder, extra generate flags such as --lora FILE). Videos go to
    out/samples/<name>/, contact sheets to out/contact_sheet.png (`main_model`) and out/contact_sheet_<name>.png.
    `workers` CLI processes at a time, one torch thread each (their start-up is single-threaded)."""
    from concurrent.futures import ThreadPoolExecutor

    from contentv_torch.generate import video_paths
    from contentv_common.video_io import read_mp4

    t0 = time.time()
    (out / "logs").mkdir(parents=True, exist_ok=True)

    def job(name: str, i: int, cap: shapes.Caption) -> list[Path]:
        split = "new" if cap.new else "heldout" if cap.heldout else "seen"
        mp4 = out / "samples" / name / f"p{i:02d}-{split}-{cap.text.replace(' ', '_')}.mp4"
        folder, extra = models[name]
        _run([sys.executable, "-m", "contentv_torch.generate", "--model", str(folder), "--prompt", cap.text,
              "--frames", str(FRAMES), "--height", str(HEIGHT), "--width", str(WIDTH), "--steps", str(s.sample_steps),
              "--guidance", str(s.guidance), "--seed", str(seed + i), "--num-videos", str(s.videos_per_prompt),
              "--output", str(mp4), "--fps", str(FPS), "--device", "cpu", "--quiet", *extra], phase,
             out / "logs" / f"generate-{name}-{i:02d}.log", quiet=True, threads=1)
        return video_paths(mp4, s.videos_per_prompt)

    jobs = [(name, i, cap) for name in models for i, cap in enumerate(prompts)]
    with ThreadPoolExecutor(workers) as pool, tqdm(total=len(jobs), desc=f"[{phase}] python -m contentv_torch.generate",
                                                   unit="prompt") as bar:
        futures = [pool.submit(job, *j) for j in jobs]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        paths = [f.result() for f in futures]
    done: dict[str, list] = {name: [] for name in models}
    for (name, _, cap), p in zip(jobs, paths):
        done[name].append((cap, p))
    for name, rows in done.items():
        sheet = out / ("contact_sheet.png" if name == main_model else f"contact_sheet_{name}.png")
        write_contact_sheet(sheet, [read_mp4(paths[0])[0] for _, paths in rows])
    n = sum(len(p) for rows in done.values() for _, p in rows)
    counts = {k: sum(f(c) for c in prompts) for k, f in (("new", lambda c: c.new), ("held-out", lambda c: c.heldout),
                                                          ("seen", lambda c: not c.new and not c.heldout))}
    _summary(phase, f"{n} videos for {' + '.join(f'{v} {k}' for k, v in counts.items() if v)} prompts x "
             f"{list(models)}, guidance {s.guidance} -> {out / 'samples'}, {out / 'contact_sheet*.png'}", t0)
    return done


def write_contact_sheet(path: Path, videos: list[np.ndarray], gap: int = 2) -> Path:
    """videos: one [F, H, W, 3] uint8 per row -> a PNG grid (rows = prompts, columns = frames), `gap` px apart."""
    from PIL import Image

    f, h, w, _ = videos[0].shape
    sheet = np.full((len(videos) * (h + gap) + gap, f * (w + gap) + gap, 3), 255, np.uint8)
    for r, v in enumerate(videos):
        for c in range(f):
            sheet[gap + r * (h + gap):gap + r * (h + gap) + h, gap + c * (w + gap):gap + c * (w + gap) + w] = v[c]
    with atomic_file(path) as tmp:
        Image.fromarray(sheet).save(tmp, format="PNG")
    return path


# ---- 7. check --------------------------------------------------------------------------------------------------
def check(out: Path, done: dict, clips: Path, settings: Settings, timings: dict) -> dict:
    from contentv_common.video_io import read_mp4

    t0 = time.time()
    # The analyser on real training clips first: it must read the ground truth right, or its numbers mean nothing.
    lines = [json.loads(x) for x in (clips / "captions.jsonl").read_text().splitlines() if x]
    by_text = {c.text: c for c in shapes.captions()}
    real = [shapes.score(by_text[x["caption"]], shapes.analyse(read_mp4(clips / x["file"])[0]))["both"] for x in lines]
    # Then the trained VAE alone: encode -> decode (posterior mean) of training clips, read by the same analyser.
    # If these fail, no MM-DiT can pass; if they pass, the generated videos' failures are the MM-DiT's.
    report = {"frames": FRAMES, "height": HEIGHT, "width": WIDTH, "settings": asdict(settings),
              "heldout_pairs": sorted(map(list, shapes.HELDOUT_PAIRS)),
              "analyser_accuracy_on_training_clips": float(np.mean(real)),
              "analyser_accuracy_on_vae_roundtrips": vae_roundtrip_accuracy(out / "ContentV-shapes" / "vae", clips,
                                                                            lines[::6]),
              "models": {}}
    for name, rows in done.items():
        per = score_videos(out, rows)
        held = [r for r in per if by_text[r["prompt"]].heldout]
        seen = [r for r in per if not by_text[r["prompt"]].heldout]
        report["models"][name] = {  # the top-level accuracies are the held-out prompts'
            "videos": len(held), **accuracies(held),
            "seen": {"videos": len(seen), **accuracies(seen)},
            "per_video": per,
        }
    report["timings_s"] = timings
    with atomic_file(out / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    def fmt(m):
        if not m["videos"]:
            return "-"
        return (f"colour {m['colour_accuracy']:.0%} direction {m['direction_accuracy']:.0%} both {m['both_accuracy']:.0%}"
                f" last-frame colour {m['last_frame_colour_accuracy']:.0%}")

    parts = [f"{n}: held-out {fmt(m)} | seen {fmt(m['seen'])}" for n, m in report["models"].items()]
    _summary("7/8 check", f"{'; '.join(parts)} (analyser on training clips {report['analyser_accuracy_on_training_clips']:.0%}, "
             f"on their VAE round trips {report['analyser_accuracy_on_vae_roundtrips']:.0%})"
             f" -> {out / 'report.json'}", t0)
    return report


def score_videos(out: Path, rows: list, directions=shapes.DIRECTIONS) -> list[dict]:
    """rows [(caption, [video paths])] -> one dict per video: what the analyser reads (directions: the names it may
    answer) and whether colour, direction and both match the prompt, and the last frame's own colour."""
    from contentv_common.video_io import read_mp4

    per = []
    for cap, paths in rows:
        for p in paths:
            frames = read_mp4(p)[0]
            a = shapes.analyse(frames, directions)
            last = shapes.analyse(frames[-1:]).colour  # the drift check: the last frame's own colour
            per.append({"prompt": cap.text, "video": str(p.relative_to(out)), "colour": a.colour,
                        "direction": a.direction, "shift": a.shift, "foreground": a.foreground,
                        **shapes.score(cap, a), "last_frame_colour": last == cap.colour})
    return per


def accuracies(rows: list[dict]) -> dict:
    """Mean of each score over `rows` (score_videos' dicts); None for no rows."""
    return {f"{k}_accuracy": float(np.mean([r[k] for r in rows])) if rows else None
            for k in ("colour", "direction", "both", "last_frame_colour")}


def vae_roundtrip_accuracy(vae: Path, clips: Path, lines: list[dict], directions=shapes.DIRECTIONS) -> float:
    """Fraction of the clips `lines` ({"file", "caption"}) whose round trip through the VAE folder `vae` (PyTorch,
    fp32: decode of the posterior mean, clamped, to uint8) the analyser scores right on colour and direction."""
    import torch

    from contentv_common.video_io import read_mp4
    from contentv_torch.pipeline import to_uint8_frames
    from contentv_torch.vae import WanVAE

    model = WanVAE.from_pretrained(vae, dtype=torch.float32)
    by_text, hits = {c.text: c for c in shapes.captions() + shapes.new_captions()}, []
    for x in lines:
        video = torch.from_numpy(read_mp4(clips / x["file"])[0]).float() / 127.5 - 1.0  # [F, H, W, 3]
        with torch.no_grad():
            frames = to_uint8_frames(model.decode(model.encode(video.permute(3, 0, 1, 2)[None])[0]))[0]
        hits.append(shapes.score(by_text[x["caption"]], shapes.analyse(frames, directions))["both"])
    return float(np.mean(hits))


# ---- 8. LoRA: teach the trained base a new concept -------------------------------------------------------------
def lora_clips(out: Path, s: Settings, seed: int) -> tuple[Path, Path]:
    """out/lora/clips/ (the new concept's captions x lora_clips_per_caption, then every old training caption x
    lora_replay_per_caption) and out/lora/val_clips/ (the new concept only, other random starts)."""
    t0 = time.time()
    new, old = shapes.new_captions(), shapes.captions("train")
    jobs = [c for c in new for _ in range(s.lora_clips_per_caption)] + \
        [c for c in old for _ in range(s.lora_replay_per_caption)]
    train = write_clips(out / "lora" / "clips", jobs, seed + 100, "[8/8 lora] clips")
    val = write_clips(out / "lora" / "val_clips", [c for c in new for _ in range(s.lora_val_clips_per_caption)],
                      seed + 200, "[8/8 lora] validation clips")
    _summary("8/8 lora: clips", f"{len(new) * s.lora_clips_per_caption} new-concept clips ({len(new)} captions "
             f"'... moving {next(iter(shapes.NEW_DIRECTIONS))}' x {s.lora_clips_per_caption}) + "
             f"{len(old) * s.lora_replay_per_caption} old ones -> {train}; "
             f"{len(new) * s.lora_val_clips_per_caption} validation clips -> {val}", t0)
    return train, val


def train_lora(out: Path, base: Path, data: Path, val: Path, s: Settings, seed: int, fast_compile: bool = False) -> Path:
    """python -m contentv_jax.train with --lora-rank on the frozen base (--init-from the base folder, the very
    weights generate applies the adapter to), validation loss on the new concept's clips; then
    python -m convert --to peft: the adapter as a diffusers LoRA file. Returns the file."""
    t0 = time.time()
    root = out / "lora"
    ckpt, metrics, lora_file = root / "ckpt", root / "metrics.jsonl", root / "lora.safetensors"
    tqdm.write("[8/8 lora] python -m contentv_jax.train --lora-rank")
    _run([sys.executable, "-m", "contentv_jax.train", "--config", PRESET, "--data", str(data), "--val-data", str(val),
          "--init-from", str(base), "--lora-rank", str(s.lora_rank), "--lora-alpha", str(s.lora_alpha),
          "--steps", str(s.lora_steps), "--eval-every", str(s.lora_eval_every), "--checkpoint-dir", str(ckpt),
          "--checkpoint-every", str(s.lora_steps), "--resume", "no", "--metrics-file", str(metrics),
          "--log-every", str(max(1, min(50, s.lora_steps // 4))), "--seed", str(seed),
          "--set", f"optim.lr={s.lora_lr}", "--set", f"optim.warmup_steps={min(20, s.lora_steps)}",
          "--set", f"data.buckets=[({FRAMES},{HEIGHT},{WIDTH},8)]", "--set", f"flow.caption_dropout={s.caption_dropout}",
          "--set", "eval.num_prompts=0"] + (["--lora-targets", s.lora_targets] if s.lora_targets else [])
         + (["--fast-compile"] if fast_compile else []),
         "8/8 lora", root / "train.log")
    tqdm.write("[8/8 lora] python -m convert --to peft")
    _run([sys.executable, "-m", "convert", "--to", "peft", str(ckpt), str(lora_file), "--overwrite", "-q"],
         "8/8 lora", root / "convert.log")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    _summary("8/8 lora: train", f"rank {s.lora_rank} alpha {s.lora_alpha:g}, {s.lora_steps} steps, loss "
             f"{losses[0]:.3f} -> {losses[-1]:.3f}, val_loss (new concept) {vals[0]:.3f} -> {vals[-1]:.3f} -> "
             f"{lora_file}", t0)
    return lora_file


def check_lora_phase(out: Path, done: dict, val: Path, base: Path, s: Settings, timings: dict) -> dict:
    """out/lora/report.json: per model (base without / with the adapter) the new concept's accuracies and the old
    prompts' (held-out and seen), every video read with the new direction among the analyser's answers (so an
    adapter that turned old prompts diagonal loses points); the LoRA run's loss and val_loss curves."""
    from contentv_common.video_io import read_mp4

    t0 = time.time()
    root = out / "lora"
    directions = shapes.ALL_DIRECTIONS
    lines = [json.loads(x) for x in (val / "captions.jsonl").read_text().splitlines() if x]
    by_text = {c.text: c for c in shapes.captions() + shapes.new_captions()}
    real = [shapes.score(by_text[x["caption"]], shapes.analyse(read_mp4(val / x["file"])[0], directions))["both"]
            for x in lines]
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines() if line.strip()]
    report = {"new_concept": f"moving {next(iter(shapes.NEW_DIRECTIONS))} {shapes.NEW_DIRECTIONS}",
              "settings": asdict(s), "base": str(base),
              "analyser_accuracy_on_new_clips": float(np.mean(real)),
              "analyser_accuracy_on_new_vae_roundtrips": vae_roundtrip_accuracy(base / "vae", val, lines, directions),
              "loss": [[r["step"], r["loss"]] for r in records if "loss" in r],
              "val_loss": [[r["step"], r["val_loss"]] for r in records if "val_loss" in r],
              "models": {}}
    for name, rows in done.items():
        per = score_videos(root, rows, directions)
        groups = {"new": [r for r in per if by_text[r["prompt"]].new],
                  "heldout": [r for r in per if by_text[r["prompt"]].heldout],
                  "seen": [r for r in per if not by_text[r["prompt"]].new and not by_text[r["prompt"]].heldout]}
        report["models"][name] = {**{k: {"videos": len(v), **accuracies(v)} for k, v in groups.items()},
                                  "per_video": per}
    report["timings_s"] = timings
    with atomic_file(root / "report.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))

    def fmt(m):
        return "-" if not m["videos"] else f"{m['colour_accuracy']:.0%}/{m['direction_accuracy']:.0%}/{m['both_accuracy']:.0%}"

    parts = [f"{n}: new {fmt(m['new'])}, held-out {fmt(m['heldout'])}, seen {fmt(m['seen'])}"
             for n, m in report["models"].items()]
    _summary("8/8 lora: check", f"colour/direction/both -- {'; '.join(parts)} (analyser on new clips "
             f"{report['analyser_accuracy_on_new_clips']:.0%}, on their VAE round trips "
             f"{report['analyser_accuracy_on_new_vae_roundtrips']:.0%}) -> {root / 'report.json'}", t0)
    return report


def run_lora_phase(out: Path, base: Path, s: Settings, seed: int, fast_compile: bool = False) -> dict:
    """Phase 8 on a trained base folder: new-concept clips -> encode -> LoRA train + export -> generate the new
    concept's and the old prompts with and without the adapter -> check. Everything under out/lora/."""
    timings: dict[str, float] = {}

    def timed(name, fn, *a):
        t = time.time()
        result = fn(*a)
        timings[name] = round(time.time() - t, 1)
        return result

    root = out / "lora"
    train_clips, val_clips = timed("clips", lora_clips, out, s, seed)
    data = timed("encode", encode, root, train_clips, base, root / "dataset", "8/8 lora: encode")
    val = timed("encode_val", encode, root, val_clips, base, root / "val_dataset", "8/8 lora: encode")
    lora_file = timed("train", train_lora, out, base, data, val, s, seed, fast_compile)
    prompts = shapes.new_captions()[:s.prompts or None] + old_prompts(s)
    done = timed("generate", generate, root, {"base": (base, []), "lora": (base, ["--lora", str(lora_file)])},
                 prompts, s, seed, "8/8 lora: generate", "lora")
    return check_lora_phase(out, done, val_clips, base, s, timings)


def old_prompts(s: Settings) -> list[shapes.Caption]:
    """The base phases' prompts: the held-out captions (the first s.prompts; 0: all), then every 3rd training
    caption (the first s.seen_prompts)."""
    held = shapes.captions("heldout")
    return (held[:s.prompts] if s.prompts else held) + shapes.captions("train")[::3][:s.seen_prompts]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m examples.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="e2e_out", help="working / output folder (default e2e_out)")
    ap.add_argument("--quick", action="store_true", help="every phase with a handful of steps (CI)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default="base,lora", type=lambda v: v.split(","), metavar="base,lora",
                    help="base: phases 1-7 (the base model and its check); lora: phase 8 on --base (default both)")
    ap.add_argument("--base", type=Path, metavar="DIR",
                    help="lora alone: the trained ContentV folder to adapt, e.g. e2e_out/ContentV-shapes-trained "
                         "(read only; default: --out's)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help=f"override a run size, e.g. --set dit_steps=1200; fields: {list(Settings.__dataclass_fields__)}")
    args = ap.parse_args(argv)
    if not args.phases or not set(args.phases) <= {"base", "lora"}:
        ap.error(f"--phases {','.join(args.phases)}: expected base, lora or base,lora")
    if args.base is not None and "base" in args.phases:
        ap.error("--base is the trained folder of an earlier run: give it with --phases lora only")
    base = args.base or Path(args.out) / "ContentV-shapes-trained"
    if args.phases == ["lora"] and not (base / "model_index.json").is_file():
        ap.error(f"--phases lora needs a trained ContentV folder: {base} has no model_index.json (run the base "
                 "phases first, or give --base)")
    s = Settings.quick() if args.quick else Settings.full()
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or key not in Settings.__dataclass_fields__:
            ap.error(f"--set {item!r}: expected FIELD=VALUE with FIELD one of {list(Settings.__dataclass_fields__)}")
        kind = type(getattr(s, key))
        try:
            s = Settings(**{**asdict(s), key: kind(value)})
        except ValueError:
            ap.error(f"--set {item!r}: {value!r} is not a {kind.__name__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    start = time.time()

    def timed(name, fn, *a):
        t = time.time()
        result = fn(*a)
        timings[name] = round(time.time() - t, 1)
        return result

    reports = {}
    if "base" in args.phases:
        clips = timed("clips", make_clips, out, s, args.seed)
        folder = timed("vae", train_vae, out, clips, s, args.seed, args.quick)
        data = timed("encode", encode, out, clips, folder)
        ckpt = timed("train", train_dit, out, data, s, args.seed, args.quick)
        trained = timed("convert", convert_ckpt, out, ckpt, folder)
        done = timed("generate", generate, out, {"trained": (trained, []), "untrained": (folder, [])}, old_prompts(s),
                     s, args.seed)
        timings["total_before_check"] = round(time.time() - start, 1)
        reports["base"] = check(out, done, clips, s, timings)
    if "lora" in args.phases:
        reports["lora"] = run_lora_phase(out, base, s, args.seed, args.quick)
    written = [out / "report.json"] * ("base" in reports) + [out / "lora" / "report.json"] * ("lora" in reports)
    tqdm.write(f"done in {time.time() - start:.0f} s: {', '.join(map(str, written))}")
    return reports


if __name__ == "__main__":
    main()
