"""`python -m contentv_torch.encode_dataset`: mp4s and PNGs written here -> shards, with the tiny ContentV folder."""
import json

import numpy as np
import pytest
from conftest import rel_err
from tiny_models import tiny_folder  # noqa: F401  (session fixture)

from contentv_common.config import get_preset
from contentv_common.dataset import MANIFEST_NAME, LatentDataset, ShardedLatentSource
from contentv_jax.data import Bucket
from contentv_torch import encode_dataset as ed
from contentv_common.video_io import write_mp4

BUCKETS = "9x32x48,5x32x32,1x32x48"
# file, frames, height, width, fps -> expected bucket (None: skipped)
MEDIA = [
    ("a.mp4", 12, 40, 60, 24, (9, 32, 48)),
    ("b.mp4", 7, 36, 36, 24, (5, 32, 32)),
    ("short.mp4", 3, 40, 60, 24, None),
    ("slow.mp4", 6, 40, 64, 12, (9, 32, 48)),  # 6 frames at 12 fps = 11 frames at 24 fps
    ("broken.mp4", 0, 0, 0, 0, None),
    ("missing.mp4", 0, 0, 0, 0, None),
    ("e.png", 1, 40, 60, 0, (1, 32, 48)),
    ("f.png", 1, 50, 70, 0, (1, 32, 48)),
]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    lines = []
    for i, (name, n, h, w, fps, _) in enumerate(MEDIA):
        # smooth moving gradients (codec-friendly) with a per-file colour
        yy, xx = np.mgrid[:h, :w] if h else (0, 0)
        frames = np.stack([np.stack([(xx * 3 + t * 9 + 40 * i) % 256, (yy * 4 + 20 * i) % 256,
                                     np.full_like(xx, 30 * i % 256)], -1) for t in range(n)]).astype(np.uint8) if n else None
        if name.endswith(".mp4") and n:
            write_mp4(root / name, frames, fps=fps)
        elif name.endswith(".png"):
            Image.fromarray(frames[0]).save(root / name)
        elif name == "broken.mp4":
            (root / name).write_bytes(rng.bytes(3000))
        lines.append(json.dumps({"file": name, "caption": f"a red cat on the sea {i}"}))
    (root / "clips.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def encoder(tiny_folder):  # noqa: F811
    return ed.Encoder(tiny_folder, "cpu")


def _args(tiny_folder, media, out, *extra):  # noqa: F811
    return ed.build_parser().parse_args(["--model", str(tiny_folder), "--captions", str(media / "clips.jsonl"),
                                         "--output", str(out), "--buckets", BUCKETS, "--shard-size", "3",
                                         "--batch-size", "2", "--device", "cpu", "--quiet", *extra])


@pytest.fixture(scope="module")
def encoded(tiny_folder, media, encoder, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("enc") / "data"
    manifest = ed.encode_dataset(_args(tiny_folder, media, out), encoder)
    return out, manifest


def test_encoded_records_are_the_encoders_outputs(encoded, encoder, media):
    out, _ = encoded
    ds = LatentDataset(out)
    expected = {name: b for name, *_, b in MEDIA if b is not None}
    assert sorted(ds[i]["source"] for i in range(len(ds))) == sorted(expected)
    buckets = ed.parse_buckets(BUCKETS, 16, 4)
    for i in range(len(ds)):
        rec = ds[i]
        assert ds.bucket_of(i) == expected[rec["source"]]
        # the same file encoded alone (batch 1) gives the stored tensors (batch 2 in the run)
        bucket, video, kind = ed.prepare({"file": media / rec["source"]}, buckets, 24)
        assert kind == ("image" if rec["source"].endswith(".png") else "video")
        latents = encoder.encode_video(video[None])[0]
        context, pooled = encoder.encode_text([rec["caption"]])
        assert rec["latents"].shape == Bucket(*bucket, 1).latent_shape(get_preset("tiny"))
        assert rel_err(rec["latents"], latents) < 1e-5
        assert rel_err(rec["context"], context[0]) < 1e-5 and rel_err(rec["pooled"], pooled[0]) < 1e-5
        assert np.abs(rec["latents"]).mean() > 0.05  # normalised, not zeros
    neg_context, neg_pooled = encoder.encode_text([""])
    stored_neg = ds.negative_prompt()
    assert rel_err(stored_neg[0], neg_context[0]) < 1e-6 and rel_err(stored_neg[1], neg_pooled[0]) < 1e-6
    # the trainer's source returns exactly the stored rows
    src = ShardedLatentSource(out, get_preset("tiny"), [Bucket(1, 32, 48, 2)], prefetch=0)
    batch = src.next()
    stored = np.stack([ds[i]["latents"] for i in range(len(ds)) if ds.bucket_of(i)[0] == 1])
    assert {x.tobytes() for x in batch["latents"]} == {x.tobytes() for x in stored}
    ev = src.eval_prompts(2)
    np.testing.assert_array_equal(ev["neg_context"][1], stored_neg[0])


def test_skipped_files_are_reported(encoded):
    _, manifest = encoded
    reasons = {s["source"]: s["reason"] for s in manifest["skipped"]}
    assert set(reasons) == {"short.mp4", "broken.mp4", "missing.mp4"}
    assert reasons["short.mp4"].startswith("too short: 3 frames")
    assert reasons["broken.mp4"].startswith("unreadable") and reasons["missing.mp4"] == "file missing"
    assert manifest["context_shape"] == [77 + 16, 32] and manifest["pooled_dim"] == 32


def test_interrupted_run_resumes_without_redoing_chunks(encoded, tiny_folder, media, encoder, tmp_path, monkeypatch):  # noqa: F811
    _, ref = encoded
    out = tmp_path / "data"
    calls = []
    real = encoder.encode_video

    def dies_in_chunk_1(videos):
        calls.append(videos.shape)
        if len(calls) == 3:  # chunk 0 needs two VAE batches (two buckets); the third is chunk 1's
            raise KeyboardInterrupt
        return real(videos)

    monkeypatch.setattr(encoder, "encode_video", dies_in_chunk_1)
    with pytest.raises(KeyboardInterrupt):
        ed.encode_dataset(_args(tiny_folder, media, out), encoder)
    assert not (out / MANIFEST_NAME).exists() and (out / "chunks" / "c00000.json").is_file()
    done = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir() if not p.name.startswith(".")}
    assert done and all(n.startswith("c00000") for n in done)
    calls.clear()
    monkeypatch.setattr(encoder, "encode_video", lambda v: (calls.append(v.shape), real(v))[1])
    manifest = ed.encode_dataset(_args(tiny_folder, media, out), encoder)
    assert [s[2] for s in calls] == [9, 1]  # chunk 1 (one video batch) and chunk 2 (two images) only
    assert all((out / "shards" / n).stat().st_mtime_ns == t for n, t in done.items())
    assert [r["crc32"] for r in manifest["records"]] == [r["crc32"] for r in ref["records"]]
    assert LatentDataset(out).verify() == []
    with pytest.raises(ValueError, match="fps"):
        ed.encode_dataset(_args(tiny_folder, media, out, "--fps", "12"), encoder)


def test_parts_split_the_work_and_the_last_writes_the_manifest(encoded, tiny_folder, media, encoder, tmp_path, monkeypatch):  # noqa: F811
    _, ref = encoded
    out = tmp_path / "data"
    real, calls = encoder.encode_video, []
    monkeypatch.setattr(encoder, "encode_video", lambda v: (calls.append(v.shape[2]), real(v))[1])
    assert ed.encode_dataset(_args(tiny_folder, media, out, "--part", "1/2"), encoder) is None  # chunk 1 only
    assert calls == [9] and not (out / MANIFEST_NAME).exists()
    manifest = ed.encode_dataset(_args(tiny_folder, media, out, "--part", "0/2"), encoder)  # chunks 0 and 2
    assert calls == [9, 9, 5, 1]
    assert [(r["source"], r["crc32"]) for r in manifest["records"]] == [(r["source"], r["crc32"]) for r in ref["records"]]


def test_bucket_choice_frame_sampling_and_crop():
    buckets = ed.parse_buckets("17x32x48,9x32x48,9x32x32,1x32x48,1x48x32", 16, 4)
    assert ed.choose_bucket(None, 100, 60, buckets) == (1, 48, 32)  # portrait image
    assert ed.choose_bucket(30, 40, 60, buckets) == (17, 32, 48)  # long enough for the longest
    assert ed.choose_bucket(12, 40, 60, buckets) == (9, 32, 48)
    assert ed.choose_bucket(12, 50, 50, buckets) == (9, 32, 32)
    with pytest.raises(ed.SkipFile, match="too short"):
        ed.choose_bucket(8, 40, 60, buckets)
    assert ed.available_frames(6, 12, 24) == 11 and ed.available_frames(48, 48, 24) == 24
    for bad in ("8x32x48", "9x30x48", "9x32"):
        with pytest.raises(ValueError, match=bad):
            ed.parse_buckets(bad, 16, 4)
    # frame i holds value i; 12 fps -> 24 fps shows each source frame twice; 48 -> 24 takes every second one
    frames = np.broadcast_to(np.arange(20, dtype=np.uint8)[:, None, None, None], (20, 32, 48, 3)).copy()
    v = ed.fit_clip(frames, 12.0, (9, 32, 48), 24)
    assert v.shape == (3, 9, 32, 48)
    np.testing.assert_allclose((v[0, :, 0, 0] + 1) * 127.5, [0, 0, 1, 1, 2, 2, 3, 3, 4], atol=1e-4)
    np.testing.assert_allclose((ed.fit_clip(frames, 48.0, (5, 32, 48), 24)[0, :, 0, 0] + 1) * 127.5, [0, 2, 4, 6, 8], atol=1e-4)
    # a 64 x 128 ramp (value = column) -> half size 32 x 64 -> the middle 48 columns (16..112 of the source)
    ramp = np.broadcast_to(np.arange(128, dtype=np.uint8)[None, None, :, None], (1, 64, 128, 3)).copy()
    img = (ed.fit_clip(ramp, None, (1, 32, 48), 24)[0, 0] + 1) * 127.5  # [32, 48]
    np.testing.assert_allclose(img[5, 2:-2], 2 * np.arange(8, 56)[2:-2] + 0.5, atol=0.05)


def test_cli_errors_name_the_input(tiny_folder, media, tmp_path, capsys):  # noqa: F811
    base = ["--model", str(tiny_folder), "--captions", str(media / "clips.jsonl"), "--output", str(tmp_path / "o")]
    assert ed.cli(base + ["--buckets", "9x32x47"]) == 2
    assert "9x32x47" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"file": "a.mp4", "caption": "x"}\n{"file": "b.mp4"}\n')
    assert ed.cli(base[:2] + ["--captions", str(bad), "--output", str(tmp_path / "o"), "--buckets", BUCKETS]) == 1
    assert "line 2" in capsys.readouterr().err
    assert ed.cli(["--model", str(tmp_path / "nomodel")] + base[2:] + ["--buckets", BUCKETS]) == 1
    assert "nomodel" in capsys.readouterr().err
