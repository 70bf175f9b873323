"""Smoke tests of the benchmark CLIs (benchmarks/speed.py, memory.py, gpu.py) at minimal sizes.

Timings are never asserted (a shared CPU makes them noise); what is asserted: each CLI runs, writes valid JSON
with the fields the report tables read, the numbers are consistent with each other, and the side-by-side
samplers agree with the reference (the benchmark's own rel_err check).
"""
import json

import numpy as np
import pytest

from benchmarks import common
from benchmarks import gpu as gpu_bench
from benchmarks import memory as memory_bench
from benchmarks import speed as speed_bench


def test_common_helpers(tmp_path):
    with common.RSSPeak(interval=0.001) as mem:
        block = np.ones(64 * 2**20, np.float32)  # 256 MiB, touched
        block[::1024] += 1
        del block
    assert mem.delta_bytes > 200 * 2**20, mem.delta_bytes
    t = common.time_fn(lambda: sum(range(1000)), repeats=3)
    assert len(t["times_s"]) == 3 and 0 < t["min_s"] <= t["median_s"]
    out = common.write_json(tmp_path / "a" / "x.json", {"v": np.float32(1.5), "n": 2})
    assert json.loads(out.read_text()) == {"v": 1.5, "n": 2}
    assert not list((tmp_path / "a").glob(".x.tmp-*"))  # atomic: no temp file left
    table = common.markdown_table([{"a": 1, "b": 0.5}, {"a": 2}], [("a", "A"), ("b", "B")])
    assert table.splitlines()[0] == "| A | B |" and table.splitlines()[-1] == "| 2 | - |"
    assert common.machine_info()["nproc"] >= 1


def test_speed_train_smoke(tmp_path):
    out = tmp_path / "speed.json"
    assert speed_bench.main(["--sizes", "smoke", "--only", "train", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["machine"]["cpu_model"] and res["matmul_peak_flops"]["jax"] > 0 and res["matmul_peak_flops"]["torch"] > 0
    (row,) = res["train"]
    # Both frameworks train the same model: the same parameter count (the reference's unused 2D pos table is a buffer).
    assert row["params"] == row["torch_params"] > 0
    for fw in ("jax", "torch"):
        assert row[f"{fw}_s"] > 0 and len(row["times_s"][fw]) == 1
        assert row[f"{fw}_tokens_per_s"] == pytest.approx(row["video_tokens"] / row[f"{fw}_s"])
        assert row[f"{fw}_frac_peak"] == pytest.approx(row["step_gflop"] * 1e9 / row[f"{fw}_s"] / res["matmul_peak_flops"][fw])
    assert row["video_tokens"] == 2 * 2 * 4 * 6 and row["seq_len"] == 2 * 4 * 6 + 93


def test_speed_sampling_smoke(tmp_path):
    out = tmp_path / "speed.json"
    assert speed_bench.main(["--sizes", "smoke", "--only", "sampling", "--json", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["sampling"]}
    assert set(rows) == set(speed_bench.SAMPLERS)
    for impl, r in rows.items():
        assert r["s_per_step"] > 0 and r["steps"] == 2 and r["peak_added_mib"] >= 0
    # Same weights, same inputs: our samplers land where the diffusers loop lands.
    assert rows["reference"]["rel_err_vs_reference"] == 0.0
    assert rows["ours_torch"]["rel_err_vs_reference"] < 1e-5
    assert rows["ours_jax"]["rel_err_vs_reference"] < 1e-4


def test_memory_smoke(tmp_path):
    out = tmp_path / "mem.json"
    argv = ["--model", "tiny", "--mesh", "fsdp=2", "--shape", "9x32x48", "--remat", "full", "--attention", "flash",
            "--json", str(out)]
    assert memory_bench.main(argv) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["seq_len"] == 3 * 2 * 3 + 93 and row["global_batch"] == 2 and row["devices"] == 2
    assert row["attention"] == "flash"
    # The state's per-device shard is what XLA counts among the arguments, and smaller than a full copy.
    from contentv_common.config import get_preset

    cfg = get_preset("tiny").transformer
    assert 0 < row["state_gib"] <= row["args_gib"] + 1e-9
    assert row["peak_gib"] == pytest.approx(row["args_gib"] + row["out_gib"] - row["alias_gib"] + row["temp_gib"])
    assert row["fits_64GB_npu"] and row["fits_80GB_h100"]
    assert row["scores_gib"] == pytest.approx(cfg.num_attention_heads * 111**2 * 4 / 2**30)


def test_bad_arguments_are_clear_errors(capsys):
    with pytest.raises(SystemExit):
        memory_bench.main(["--shape", "12x34"])
    assert "FRAMESxHEIGHTxWIDTH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_bench.main(["--smoke", "--parts", "peak,bogus"])
    assert "bogus" in capsys.readouterr().err


def test_gpu_smoke(tmp_path):
    assert gpu_bench.main(["--smoke", "--out", str(tmp_path), "--parts", "peak,parity,denoise"]) == 0
    md = (tmp_path / "gpu_results.md").read_text()
    rows = json.loads((tmp_path / "gpu_results.json").read_text())["rows"]
    parity = [r for r in rows if r["part"] == "parity"]
    assert len(parity) == 3 and all(r["note"] == "PASS" for r in parity), parity
    assert all(float(r["value"]) < 2e-2 for r in parity)
    assert any(r["part"] == "denoise" and "jax" in r["what"] for r in rows)
    assert "| parity |" in md and "error" not in {r["what"] for r in rows}


def test_vae_tiling_smoke(tmp_path):
    from benchmarks import vae_tiling

    out = tmp_path / "tiling.json"
    assert vae_tiling.main(["--preset", "tiny", "--shape", "5x32x48", "--tile", "24", "--stride", "16", "--json", str(out)]) == 0
    rows = {(r["op"], r["mode"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {(op, m) for op in ("encode", "decode") for m in ("untiled", "tiled")}
    assert all(r["seconds"] > 0 for r in rows.values())
    # tiles blend to something close to, but not exactly, the untiled result
    assert 10 < rows["encode", "tiled"]["psnr_db"] < 200 and 10 < rows["decode", "tiled"]["psnr_db"] < 200
    clip = vae_tiling.smooth_clip(5, 32, 48)
    assert clip.shape == (1, 3, 5, 32, 48) and clip.abs().max() <= 1 and clip.std() > 0.1
    with pytest.raises(SystemExit):
        vae_tiling.main(["--shape", "5x32"])
