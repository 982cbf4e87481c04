"""bench.gemm --qkv on the CPU: three W4A4 / W4A8 q/k/v linears vs one fused linear run through the dispatcher,
agree with their reference backend and with each other, and land in the JSON and the markdown table."""

import json

import pytest

from bench import gemm


def test_qkv_smoke_run_json_and_table(tmp_path, capsys):
    argv = ["--qkv", "--ms", "40", "--shapes", "256x128", "--iters", "2", "--results-dir", str(tmp_path)]
    assert gemm.main([*argv, "--name", "q"]) == 0
    payload = json.loads((tmp_path / "q.json").read_text())
    assert payload["settings"]["qkv"] is True
    (row,) = payload["rows"]
    assert (row["M"], row["K"], row["N"]) == (40, 256, 128) and row["errors"] == {}
    names = [p for p, _ in gemm.QKV_PATHS]
    assert sorted(row["wall_ms"]) == sorted(names) and row["device_ms"] == {}
    for p in names:
        assert row["checks"][f"{p}_finite"] is True
        if p != "qkv_bf16":
            assert row["checks"][f"{p}_rel_l2_vs_reference"] <= 1e-2, p
    # the fused linear computes the three separate ones' numbers (one act quant, the same integer products)
    for a in ("w4a4", "w4a8"):
        assert row["checks"][f"qkv_fused_{a}_rot_rel_l2_vs_qkv_sep_{a}_rot"] <= 1e-6
        assert row["checks"][f"qkv_split_{a}_rot_rel_l2_vs_qkv_sep_{a}_rot"] <= 1e-6  # parts=3: one GEMM per part
        assert row["fused_gain_wall_ms"][a] > 0 and row["split_gain_wall_ms"][a] > 0
    capsys.readouterr()
    assert gemm.main(["--table", str(tmp_path / "q.json")]) == 0
    table = capsys.readouterr().out
    assert "| path (ms, x vs XLA bf16; wall time) | M=40, q/k/v 256x128 |" in table
    for _, label in gemm.QKV_PATHS:
        assert f"| {label} | " in table


def test_qkv_fused_layer_is_the_three_layers():
    L = gemm.qkv_layers(gemm.jax.random.key(0), 8, 256, 64)
    f = L["fused"]
    assert f["w_packed"].shape == (192, 128) and f["down"].shape == (256, 3 * gemm.R)
    assert f["up"].shape == (3 * gemm.R, 192) and not f["up"][: gemm.R, 64:].any()  # block-diagonal


def test_qkv_unknown_path():
    with pytest.raises(SystemExit, match="unknown paths"):
        gemm.main(["--qkv", "--paths", "qkv_nope"])
