"""The on-disk latent dataset format and the trainer's batch source over it (contentv_common.dataset).

Datasets here are written with random values at the tiny preset's shapes through `write_dataset` (the
encoder's end-to-end test is tests/test_encode_dataset.py).
"""
import json

import numpy as np
import pytest

from contentv_common.config import get_preset
from contentv_common.dataset import (
    MANIFEST_NAME,
    CorruptDataError,
    DatasetMismatchError,
    LatentDataset,
    ShardedLatentSource,
    dynamic_batch_sizes,
    write_dataset,
)
from contentv_jax.configs import get_config
from contentv_jax.data import Bucket, make_source

TINY = get_preset("tiny")
VIDEO, IMAGE = (9, 32, 48), (1, 32, 48)


def _samples(n_video=13, n_image=11, seed=0):
    rng = np.random.default_rng(seed)
    t = TINY.text
    out = []
    for i in range(n_video + n_image):
        bucket = VIDEO if i < n_video else IMAGE
        shape = Bucket(*bucket, 1).latent_shape(TINY)
        out.append({"bucket": bucket, "latents": rng.standard_normal(shape, np.float32),
                    "context": rng.standard_normal((t.context_tokens, t.t5_hidden), np.float32),
                    "pooled": rng.standard_normal(t.pooled_dim, np.float32), "caption": f"caption {i}", "source": f"f{i}.mp4"})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    samples = _samples()
    path = write_dataset(tmp_path_factory.mktemp("ds") / "data", samples, TINY.vae, shard_rows=4)
    return path, samples


def _source(path, **kw):
    kw.setdefault("prefetch", 0)
    return ShardedLatentSource(path, TINY, kw.pop("buckets", [Bucket(*VIDEO, 4), Bucket(*IMAGE, 2)]), **kw)


def _ids_of(src, batch):
    """Which record each row of a batch is (by exact latents match)."""
    ds = src.ds
    table = {ds[i]["latents"].tobytes(): i for i in range(len(ds))}
    return [table[x.tobytes()] for x in batch["latents"]]


def test_records_read_back_exactly_in_every_dtype(data, tmp_path):
    path, samples = data
    ds = LatentDataset(path)
    assert len(ds) == len(samples)
    got = {ds[i]["source"]: ds[i] for i in range(len(ds))}
    for s in samples:
        g = got[s["source"]]
        assert g["caption"] == s["caption"]
        for k in ("latents", "context", "pooled"):
            assert g[k].dtype == np.float32
            np.testing.assert_array_equal(g[k], s[k])
    assert ds.verify() == []
    # bfloat16 storage: exactly the bf16 rounding of the values
    import ml_dtypes

    bf = LatentDataset(write_dataset(tmp_path / "bf16", samples[:3], TINY.vae, dtype="bfloat16"))
    np.testing.assert_array_equal(bf[1]["context"], samples[1]["context"].astype(ml_dtypes.bfloat16).astype(np.float32))
    # grain's random-access protocol
    import grain.python as grain

    np.testing.assert_array_equal(grain.MapDataset.source(ds)[5]["latents"], ds[5]["latents"])


def test_batches_are_bucketed_deterministic_and_cover_each_epoch(data):
    path, samples = data
    a, b = _source(path, seed=3), _source(path, seed=3, prefetch=2)
    seq_a = [a.next() for _ in range(8)]
    seq_b = [b.next() for _ in range(8)]
    for x, y in zip(seq_a, seq_b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    shapes = {x["latents"].shape for x in seq_a}
    assert shapes == {(4, 3, 4, 6, 16), (2, 1, 4, 6, 16)}
    assert all(x["context"].shape[1:] == (TINY.text.context_tokens, 32) and x["pooled"].shape[1:] == (32,) for x in seq_a)
    # epoch 0: 13 videos -> 3 batches of 4, 11 images -> 5 batches of 2; every record at most once
    epoch = [i for x in seq_a for i in _ids_of(a, x)]
    assert len(epoch) == len(set(epoch)) == 3 * 4 + 5 * 2
    # rows are the records' own text embeddings
    x = seq_a[0]
    for row, i in enumerate(_ids_of(a, x)):
        np.testing.assert_array_equal(x["context"][row], samples[i]["context"])
    assert [list(i) for _, i in _source(path, seed=4).peek(8)] != [list(i) for _, i in _source(path, seed=3).peek(8)]


def test_state_restore_continues_the_exact_sequence(data):
    path, _ = data
    src = _source(path, seed=1, prefetch=3)
    for _ in range(11):  # past the end of epoch 0 (8 batches)
        src.next()
    state = json.loads(json.dumps(src.state()))  # what the checkpoint stores
    assert state["kind"] == "shards" and state["step"] == 11 and state["streams"] == [[1, 3]]
    expected = [src.next() for _ in range(7)]
    fresh = _source(path, seed=1, prefetch=2)
    fresh.next()  # a different position first: restore must discard it (and anything prefetched)
    fresh.restore(state)
    for x in expected:
        y = fresh.next()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    with pytest.raises(ValueError, match="seed"):
        _source(path, seed=2).restore(state)
    with pytest.raises(ValueError, match="buckets"):
        _source(path, seed=1, buckets=[Bucket(*VIDEO, 2), Bucket(*IMAGE, 2)]).restore(state)


def test_two_hosts_partition_each_global_batch(data):
    path, _ = data
    whole = _source(path, seed=5)
    hosts = [_source(path, seed=5, process_index=p, process_count=2) for p in range(2)]
    seen = [set(), set()]
    for _ in range(8):
        g = whole.next()
        parts = [h.next() for h in hosts]
        for k in g:  # global batch = host 0 rows then host 1 rows
            np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
        for p in range(2):
            seen[p].update(_ids_of(whole, parts[p]))
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    with pytest.raises(ValueError, match="divide"):
        _source(path, buckets=[Bucket(*VIDEO, 3)], process_count=2)


def test_image_ratio_and_dynamic_batches(data):
    path, _ = data
    src = _source(path, seed=0, image_ratio=0.25)
    kinds = [b.frames == 1 for b, _ in src.peek(400)]
    assert 0.18 < np.mean(kinds) < 0.32
    assert not any(b.frames == 1 for b, _ in _source(path, image_ratio=0.0).peek(50))
    with pytest.raises(ValueError, match="image_ratio"):
        _source(path, image_ratio=1.5)
    assert len(_source(path, image_ratio=-1.0).streams) == 1  # the trainer config's "natural proportions"
    # token budget: tiny video bucket (9, 32, 48) = 3 x 2 x 3 = 18 tokens, image = 6 tokens
    assert [b.batch for b in dynamic_batch_sizes([VIDEO, IMAGE], TINY, 40)] == [2, 6]
    assert [b.batch for b in dynamic_batch_sizes([VIDEO, IMAGE], TINY, 40, multiple=4)] == [4, 4]
    src = _source(path, buckets=None, tokens_per_step=40)
    assert {(b.frames, b.batch) for b in src.buckets} == {(9, 2), (1, 6)}


def test_eval_prompts_are_the_first_records(data):
    path, _ = data
    ev = _source(path).eval_prompts(3)
    ds = LatentDataset(path)
    assert ev["names"] == [ds[i]["caption"] for i in range(3)]
    np.testing.assert_array_equal(ev["context"][2], ds[2]["context"])
    assert ev["neg_context"].shape == (3, TINY.text.context_tokens, 32) and not ev["neg_context"].any()  # no negative stored


def test_make_source_takes_a_dataset_folder(data):
    path, _ = data
    c = get_config("tiny/joint")  # the trainer's own config, as `--data DIR --set data.buckets=...` makes it
    c.data.name, c.data.buckets = str(path), [(9, 32, 48, 4), (1, 32, 48, 2)]
    src = make_source(c, TINY)
    assert isinstance(src, ShardedLatentSource) and src.next()["latents"].shape[2:] == (4, 6, 16)
    c.data.name = str(path / "nope")
    with pytest.raises(ValueError, match="nope"):
        make_source(c, TINY)


def test_mismatched_model_is_refused(data):
    path, _ = data
    with pytest.raises(DatasetMismatchError, match="context_shape.*model: \\(333, 4096\\)"):
        ShardedLatentSource(path, get_preset("small"), [Bucket(*VIDEO, 4)])
    # a dataset of 8-channel latents (another VAE) for the 16-channel tiny model
    import dataclasses

    vae8 = dataclasses.replace(TINY.vae, z_dim=8, latents_mean=(0.0,) * 8, latents_std=(1.0,) * 8)
    samples = [{**s, "latents": s["latents"][..., :8]} for s in _samples(4, 0)]
    other = write_dataset(path.parent / "z8", samples, vae8)
    with pytest.raises(DatasetMismatchError, match="latent_channels 8 \\(model: 16\\).*latent shape \\[3, 4, 6, 8\\]"):
        _source(other)


def _copy(path, dst):
    import shutil

    shutil.copytree(path, dst)
    return dst


def test_corrupt_shard_and_record_are_named(data, tmp_path):
    path, _ = data
    ds = LatentDataset(path)
    victim = ds.shards[1]["file"]
    # a shard whose header is garbage
    broken = _copy(path, tmp_path / "broken")
    raw = bytearray((broken / victim).read_bytes())
    raw[8:40] = b"\xff" * 32
    (broken / victim).write_bytes(bytes(raw))
    with pytest.raises(CorruptDataError, match=victim):
        _source(broken)
    skipping = _source(broken, on_corrupt="skip")
    assert skipping.ds.bad_shards == [victim] and skipping.ds.skipped_records == ds.shards[1]["rows"]
    assert victim in LatentDataset(broken, on_corrupt="skip").bad_shards
    # a truncated shard
    cut = _copy(path, tmp_path / "cut")
    (cut / victim).write_bytes((path / victim).read_bytes()[:-100])
    with pytest.raises(CorruptDataError, match=victim):
        LatentDataset(cut)
    # flipped bytes inside one record: found when read, named with its shard and row
    flip = _copy(path, tmp_path / "flip")
    raw = bytearray((flip / victim).read_bytes())
    raw[-3] ^= 0xFF  # the last row's pooled vector
    (flip / victim).write_bytes(bytes(raw))
    rec = max(i for i, r in enumerate(ds.records) if r["shard"] == 1)
    with pytest.raises(CorruptDataError, match=f"record {rec} .*{victim} row {ds.records[rec]['row']}.*checksum"):
        LatentDataset(flip)[rec]
    assert LatentDataset(flip).verify() == [victim]
    # skip mode: batches keep their shape, the bad record is counted
    src = _source(flip, on_corrupt="skip")
    for _ in range(8):  # one epoch: the bad record is in it
        b = src.next()
        assert b["latents"].shape[0] in (4, 2)
    assert src.corrupt_records == 1
    with pytest.raises(CorruptDataError, match=victim):
        src = _source(flip)
        for _ in range(8):
            src.next()
    (flip / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(CorruptDataError, match="manifest.json"):
        LatentDataset(flip)


def test_null_text_is_the_stored_negative_prompt(data, tmp_path):
    """Caption dropout's empty prompt: negative.safetensors when the manifest names it, else a clear error."""
    import shutil

    from contentv_common.dataset import write_manifest, write_negative

    path, _ = data
    with pytest.raises(ValueError, match="negative.*caption_dropout"):
        _source(path).null_text()
    copy = shutil.copytree(path, tmp_path / "with_negative")
    t = TINY.text
    ctx = np.random.default_rng(3).standard_normal((t.context_tokens, t.t5_hidden)).astype(np.float32)
    pooled = np.linspace(-1, 1, t.pooled_dim, dtype=np.float32)
    manifest = json.loads((copy / "manifest.json").read_text())
    write_manifest(copy, {**manifest, "negative": write_negative(copy, ctx, pooled)})
    c, p = _source(copy).null_text()
    np.testing.assert_array_equal(c, ctx)
    np.testing.assert_array_equal(p, pooled)
