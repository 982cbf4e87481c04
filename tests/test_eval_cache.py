"""``wanjax eval --cache`` (issue 37): every precision run with the step cache and compared with its own uncached
run; the shared measurement of `wanjax.evaluation.cache` (also ``bench/cache_fidelity.py``'s)."""

import json
import os
import types

import numpy as np
import pytest

from helpers import MINI, QUICK_CALIB
from wanjax.cli import main


def test_compare_to_uncached_and_summarize():
    from wanjax.evaluation.cache import compare_to_uncached, summarize

    rng = np.random.default_rng(0)
    ref = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    noisy = np.clip(ref.astype(int) + rng.integers(-3, 4, ref.shape), 0, 255).astype(np.uint8)
    cache = types.SimpleNamespace(computed=5, skipped=3, schedule="CCSCCSSC")
    same = compare_to_uncached(ref, ref, cache)
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0)
    row = compare_to_uncached(noisy, ref, cache)
    assert 35 < row["psnr"] < 60 and 0.5 < row["ssim"] < 1
    assert (row["computed"], row["skipped"], row["schedule"]) == (5, 3, "CCSCCSSC")
    other = dict(row, computed=4, schedule="CCSCSSSC", psnr=30.0)
    s = summarize([row, other], steps=8)
    assert s["computed"] == 4.5 and s["computed_range"] == [4, 5] and s["skipped"] == 3.5
    assert s["speedup_forwards"] == pytest.approx(8 / 4.5) and s["schedule"] == ["CCSCCSSC", "CCSCSSSC"]
    assert s["psnr_min"] == 30.0 and s["psnr_mean"] == pytest.approx((row["psnr"] + 30) / 2)
    assert summarize([row], 8)["schedule"] == "CCSCCSSC"
    with pytest.raises(ValueError, match="no rows"):
        summarize([], 8)


def test_cache_eval_validates():
    from wanjax.evaluation.cache import CacheEval
    from wanjax.sampling.cache import CacheConfig

    assert CacheEval().validate().samples == 2
    with pytest.raises(ValueError, match="cache samples"):
        CacheEval(samples=0).validate()
    with pytest.raises(ValueError, match="max_skips"):
        CacheEval(CacheConfig(max_skips=-1)).validate()


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(MINI, "high_noise_model")), reason="models/mini not present")
def test_eval_cache_on_the_mini_model(tmp_path, capsys):
    """BF16 + rtn at 5 frames / 64x64 / 8 steps, one held-out clip, the cache calibrated per precision on one
    calibration clip: results.json and report.md carry each precision's cached-vs-uncached numbers."""
    (tmp_path / "eval.json").write_text(json.dumps([{"clip_seed": 1000, "split": "heldout"}]))
    (tmp_path / "calib.json").write_text(json.dumps([{"clip_seed": 11, "split": "train", "seed": 5}]))
    out = tmp_path / "report"
    argv = ["eval", "--model", MINI, "--recipes", "rtn", "--eval-set", str(tmp_path / "eval.json")]
    argv += ["--calib-set", str(tmp_path / "calib.json"), "--out", str(out), "--reservoir", "32", *QUICK_CALIB]
    assert main(argv + ["--cache", "--cache-threshold", "1", "--cache-samples", "1", "--no-compile-cache"]) == 0
    text = capsys.readouterr().out
    assert "eval: bf16 cached: 5.0/8 forwards computed (1.60x fewer)" in text
    res = json.loads((out / "results.json").read_text())
    assert res["cache"]["config"]["threshold"] == 1.0 and res["complete"]
    b, v = res["bf16"]["cache"], res["variants"][0]["cache"]
    assert (b["precision"], v["precision"]) == ("bf16", "w4a4:rtn")
    for c in (b, v):
        assert c["computed"] == 5 and c["skipped"] == 3 and c["schedule"] == "CCSCCSSC"  # the same plan: one rule
        assert 10 < c["psnr_mean"] < 99 and 0 < c["ssim_mean"] < 1 and 0 < c["latent_rel_l2"] < 1
        assert {"frame0_psnr", "direction_ok", "direction_agree", "denoise_s", "uncached_denoise_s"} <= set(c)
        assert "calibrated on 1 calibration sample(s)" in c["calibration"]
    assert b["psnr_mean"] > 35  # BF16 barely moves at 1.6x fewer forwards; rtn's own noise makes W4A4 move more
    report = (out / "report.md").read_text()
    assert "## Step cache" in report and "| bf16 | 5 / 8 | 1.60x | `CCSCCSSC` |" in report
    assert "| w4a4:rtn | 5 / 8 |" in report
