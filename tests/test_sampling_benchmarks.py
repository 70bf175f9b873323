"""benchmarks.sampling_quality and benchmarks.compile_speed on the tiny folder: a few steps, every output written,
the uncached row exact and the rows' counts consistent."""
import json

import pytest

from contentv_common.cli import UsageError
from tiny_models import one_torch_thread, tiny_folder  # noqa: F401  (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sampling_quality_rows_and_outputs(tiny_folder, tmp_path):
    from benchmarks import sampling_quality as sq

    out = tmp_path / "sq"
    res = sq.main(["--model", str(tiny_folder), "--steps", "4", "--videos", "1", "--repeats", "1", "--captions",
                   "heldout", "--configs", "none", "teacache:0", "fbcache:1e9", "truncation:0.5", "--out", str(out)])
    rows = {r["config"]: r for r in res["rows"]}
    n = 6  # held-out captions x 1 video
    assert rows["none"]["dit_evaluations"] == 2 * 4 * n and rows["none"]["latent_rel_err"] == 0
    assert rows["teacache:0"]["latent_rel_err"] == 0 and rows["teacache:0"]["psnr_db"] == float("inf")
    assert rows["fbcache:1e9"]["dit_evaluations"] == 2 * 2 * n  # step 0 and the last step only
    assert rows["truncation:0.5"]["dit_evaluations"] == (2 * 2 + 2) * n and rows["truncation:0.5"]["latent_rel_err"] > 0
    for r in rows.values():
        assert 0 <= r["both"] <= 1 and 0 <= r["last_frame_colour"] <= 1 and r["seconds"] > 0
    assert json.loads(out.with_suffix(".json").read_text())["videos"] == n
    assert out.with_suffix(".md").read_text().count("\n| ") == 4 and out.with_suffix(".png").stat().st_size > 1000
    for bad in (["--configs", "teacache"], ["--configs", "teacache:-1"], ["--configs", "truncation:2"]):
        with pytest.raises(UsageError):
            sq.main(["--model", str(tiny_folder), *bad])


def test_compile_speed_eager_rows(tmp_path):
    from benchmarks import compile_speed

    res = compile_speed.main(["--steps", "3", "--batch", "1", "--repeats", "1", "--modes", "eager", "--caches", "none",
                              "fbcache:1e9", "--out", str(tmp_path / "c.json")])
    rows = {r["cache"]: r for r in res["rows"]}
    assert rows["none"]["dit_evaluations"] == 6 and rows["fbcache:1e9"]["dit_evaluations"] == 4
    assert rows["none"]["speedup_vs_eager_none"] == 1.0 and rows["fbcache:1e9"]["steady_s"] > 0
