"""bench.pipeline's generation variants on CPU (TINY, W4A4 experts in reference mode): the Lightning preset with
random Lightning-layout LoRAs applied through the real reader, and cached loops after the uncached one."""

import pytest

from bench import pipeline as bp, pipeline_variants as pv


def _run(out, *extra):
    mp = pytest.MonkeyPatch()
    mp.setenv("WANJAX_KERNELS", "reference")
    mp.delenv("OUT", raising=False)
    try:
        return bp.main(
            ["--config", "TINY", "--res", "tiny", "--inprocess", "--skip-bf16", "--skip-w4a4", "--skip-diffusers"]
            + ["--skip-t5", "--skip-vae", "--pipeline-experts", "w4a4", "--results-dir", str(out), *extra]
        )
    finally:
        mp.undo()


def test_cache_specs_parse():
    assert pv.cache_specs("0.05, 0.13:3") == [(0.05, 2), (0.13, 3)]
    assert pv.cache_specs("") == []
    with pytest.raises(SystemExit):
        bp.parse_args(["--pipeline-cache", "x"])


def test_lightning_preset_with_random_loras_on_w4a4_experts(tmp_path):
    results = _run(tmp_path, "--pipeline-preset", "lightning", "--pipeline-lora-rank", "4", "--pipeline-warm-repeat")
    p = results["phases"]["pipeline"]
    assert "error" not in p, p.get("error")
    assert p["preset"] == "lightning" and p["lora_rank"] == 4
    lora = p["stages"]["lora"]
    assert "error" not in lora, lora.get("error")
    assert set(lora["files"]) == {"high", "low"} and all(f["rank"] == 4 for f in lora["files"].values())
    assert len(lora["active"]) == 2
    den = p["stages"]["denoise"]
    assert den["steps_planned"] == den["steps_done"] == 4
    assert den["experts_used"] == ["high", "high", "low", "low"]
    warm = p["stages"]["warm_repeat"]  # the same generation again, everything compiled
    assert "error" not in warm, warm.get("error")
    assert warm["denoise_s"] > 0 and warm["total_s"] >= warm["denoise_s"]


def test_cached_loop_after_the_uncached_one(tmp_path):
    results = _run(tmp_path, "--pipeline-steps", "20", "--pipeline-cache", "0.14:2")
    p = results["phases"]["pipeline"]
    assert "error" not in p, p.get("error")
    (run,) = p["cache_runs"]
    assert "loop_s" in run, run
    assert run["computed"] + run["skipped_forwards"] == 20 and run["computed"] < 20
    assert run["planned_computed"] == run["computed"] and len(run["schedule"]) == 20
    assert run["fewer_forwards"] == pytest.approx(20 / run["computed"])


def test_uncached_loop_capped_then_cached(tmp_path):
    results = _run(tmp_path, "--pipeline-steps", "20", "--pipeline-uncached-steps", "5", "--pipeline-cache", "0.14:2")
    p = results["phases"]["pipeline"]
    den = p["stages"]["denoise"]
    assert den["stopped_early"] and den["steps_done"] == 5 and "extrapolated" in den["stop_reason"]
    assert p["generation"]["extrapolated"]
    (run,) = p["cache_runs"]
    assert run["computed"] + run["skipped_forwards"] == 20
