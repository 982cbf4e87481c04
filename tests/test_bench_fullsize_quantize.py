"""bench.fullsize_quantize on CPU with the TINY config: the official-layout checkpoint is written once, the streamed
quantization is killed after some units and resumed by a second call, the artifact loads, and the result file has
the calls, their units, the peaks and a projection for both budgets (from 1 of TINY's 2 blocks, scaled to 2)."""

import json
import os

import bench.fullsize_quantize as fq


def test_tiny_killed_then_resumed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    work = tmp_path / "w"
    argv = ["--tiny", "--work", str(work), "--recipe", "rtn", "--reservoir", "32", "--samples", "2", "--name", "fq"]
    argv += ["--num-layers", "1"]  # 1 of TINY's 2 blocks measured, the projection scaled to 2
    # 1. killed after 10 units (2 trajectories, 6 capture units, 2 quantized units)
    assert fq.main(argv + ["--max-units", "10"]) == 0
    res = json.loads((tmp_path / "bench/results/fq.json").read_text())
    (c1,) = res["calls"]
    assert c1["killed"] and not c1["done"] and len(c1["units"]) == 10
    assert c1["checkpoint"]["high"]["written"] and os.path.islink(work / "model" / "low_noise_model")
    assert not (work / "artifact").exists()
    expert = work / "model" / "high_noise_model"
    assert (expert / "config.json").is_file() and (expert / "diffusion_pytorch_model.safetensors.index.json").is_file()

    # 2. the next call resumes: the checkpoint is not written again, no unit is redone, the artifact is published
    assert fq.main(argv) == 0
    res = json.loads((tmp_path / "bench/results/fq.json").read_text())
    c1, c2 = res["calls"]
    assert c2["done"] and not c2["checkpoint"]["high"]["written"]
    kinds = [u["kind"] for u in c2["units"]]
    assert "trajectory" not in kinds and kinds.count("quantize") == 2 * 10 - 2 and kinds[-1] == "publish"
    assert set(res["artifact"]) == {"high", "low"} and res["artifact_load_s"] > 0
    assert all(u["disk_work_bytes"] > 0 and u["rss_bytes"] > 0 for u in c2["units"])
    proj = res["projection"]
    assert (proj["measured_blocks"], proj["projected_blocks"]) == (1, 2)
    for name, n in (("seed", 12), ("fast", 4)):
        p = proj[name]
        assert p["complete"] and p["compute_s"] > 0 and p["samples"] == n
    assert (
        res["projection"]["fast"]["captured_steps_per_sample"] < res["projection"]["seed"]["captured_steps_per_sample"]
    )

    # 3. a third call finds the artifact and only reports
    assert fq.main(argv) == 0
    res = json.loads((tmp_path / "bench/results/fq.json").read_text())
    assert len(res["calls"]) == 3 and res["calls"][2]["done"] and not res["calls"][2]["units"]


def test_draw_official_stds():
    import numpy as np

    w = fq.draw_official("blocks.0.ffn.0.weight", (64, 256), 0).astype(np.float32)
    assert w.dtype == np.float32 and abs(w.std() * 16 - 1) < 0.05  # 1/sqrt(fan_in = 256)
    n = fq.draw_official("blocks.0.self_attn.norm_q.weight", (64,), 0).astype(np.float32)
    assert abs(n.mean() - 1) < 0.05
    a = fq.draw_official("blocks.0.self_attn.q.weight", (64, 64), 0)
    assert np.array_equal(a, fq.draw_official("blocks.0.self_attn.q.weight", (64, 64), 0))  # deterministic
    assert not np.array_equal(a, fq.draw_official("blocks.1.self_attn.q.weight", (64, 64), 0))
