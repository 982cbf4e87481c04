"""bench.quantize_block on CPU at TINY shapes: it runs a recipe per block Linear, times it and extrapolates."""

import json

import bench.quantize_block as qb


def test_quantize_block_tiny(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    assert (
        qb.main(
            ["--config", "TINY", "--rows", "32", "--recipe", "default", "--layers", "blocks.self_attn.q,blocks.ffn.fc2"]
        )
        == 0
    )
    res = json.loads((tmp_path / "bench/results/quantize_block.json").read_text())
    r = res["recipes"]["default"]
    assert [x["path"] for x in r["layers"]] == ["blocks.self_attn.q", "blocks.ffn.fc2"]
    assert r["layers"][1]["K"] == 128 and r["layers"][1]["N"] == 64
    assert all(x["warm_s"] > 0 and len(x["sqnr_db_per_bin"]) == 3 for x in r["layers"])
    # extrapolation: 2 of 10 layers timed -> x5, times 2 blocks (TINY) and 2 experts
    assert abs(r["both_experts_extrapolated_s"] - r["block_warm_s"] * 5 * 2 * 2) < 1e-9


def test_layer_shapes_full_size():
    from wanjax.config import I2V_A14B

    s = qb.layer_shapes(I2V_A14B)
    assert len(s) == 10 and s["blocks.ffn.fc1"] == (5120, 13824) and s["blocks.cross_attn.k"] == (5120, 5120)
