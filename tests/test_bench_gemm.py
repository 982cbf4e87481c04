"""bench.gemm on the CPU: every path runs through the dispatcher, agrees with its reference backend, and lands in the
JSON and the markdown table; a failing path is recorded and the others go on."""

import json

import numpy as np
import pytest

from bench import gemm


def test_smoke_run_json_and_table(tmp_path, capsys):
    assert (
        gemm.main(["--ms", "72", "--shapes", "256x512", "--iters", "2", "--results-dir", str(tmp_path), "--name", "g"])
        == 0
    )
    payload = json.loads((tmp_path / "g.json").read_text())
    (row,) = payload["rows"]
    assert (row["M"], row["K"], row["N"]) == (72, 256, 512) and row["errors"] == {}
    names = [p for p, _ in gemm.PATHS]
    assert sorted(row["wall_ms"]) == sorted(names) and row["device_ms"] == {}
    assert all(t > 0 for t in row["wall_ms"].values())
    assert row["checks"]["xla_int8_exact_vs_int32_reference"] is True
    for p in names:
        assert row["checks"][f"{p}_finite"] is True
        if p not in ("xla_bf16", "xla_int8"):
            assert row["checks"][f"{p}_rel_l2_vs_reference"] <= 1e-2, p
    wb = row["weight_bytes"]
    assert wb["bf16"] == 2 * 256 * 512 and wb["int4_packed+scales"] == 256 * 512 // 2 + 4 * 512
    assert wb["fp8_prepared+scales"] == 256 * 512 + 4 * 512
    assert row["speedup_wall_ms"]["xla_bf16"] == 1.0
    capsys.readouterr()
    assert gemm.main(["--table", str(tmp_path / "g.json")]) == 0
    table = capsys.readouterr().out
    assert "| path (ms, x vs XLA bf16; wall time) | M=72, 256x512 |" in table
    for _, label in gemm.PATHS:
        assert f"| {label} | " in table


def test_a_failing_path_is_recorded(monkeypatch, tmp_path):
    real = gemm.path_fns

    def broken(L, backend):
        fns = real(L, backend)
        if backend is None:

            def boom(*a):
                raise RuntimeError("planted failure")

            fns["e2e_g128"] = (boom, fns["e2e_g128"][1], False)
        return fns

    monkeypatch.setattr(gemm, "path_fns", broken)
    res = gemm.run_shape(64, 256, 512, 2, lambda m: None, paths={"xla_bf16", "e2e_w4a4", "e2e_g128"})
    assert "planted failure" in res["errors"]["e2e_g128"] and "e2e_g128" not in res["wall_ms"]
    assert sorted(res["wall_ms"]) == ["e2e_w4a4", "xla_bf16"]


def test_rel_err_and_unknown_path():
    assert gemm.rel_err(np.ones(4), np.ones(4)) == 0.0
    assert gemm.rel_err(np.array([1.0, np.nan]), np.ones(2)) == float("inf")
    assert gemm.rel_err(np.array([2.0, 0.0]), np.array([1.0, 0.0])) == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="unknown paths"):
        gemm.main(["--paths", "nope"])


def test_table_uses_device_times_and_marks_errors():
    wb = {"bf16": 2 * 2**20, "int4_packed+scales": 2**19, "lowrank_r32": 2**16}
    row = {
        "M": 32760,
        "K": 5120,
        "N": 5120,
        "device_ms": {"xla_bf16": 2.0, "e2e_w4a4": 1.25},
        "wall_ms": {"xla_bf16": 9.0, "e2e_w4a4": 9.0},
        "errors": {"e2e_g128": "boom"},
        "weight_bytes": wb,
    }
    text = gemm.table({"rows": [row]})
    assert text.startswith("| path (ms, x vs XLA bf16; device time) | M=32760, 5120x5120 |")
    lines = {ln.split(" | ")[0][2:]: ln for ln in text.splitlines() if ln.startswith("| ")}
    assert lines[dict(gemm.PATHS)["e2e_w4a4"]].endswith("| 1.250 · 1.60x |")
    assert lines[dict(gemm.PATHS)["e2e_g128"]].endswith("| error |")
    assert lines[dict(gemm.PATHS)["e2e_mxfp4"]].endswith("| - |")
    assert "bf16 2.0 MiB, int4 packed + scales 0.5 MiB" in text


def test_gpu_branch_runs_references_on_the_host(monkeypatch):
    """With a GPU the reference checks run on the host CPU (device_put of their inputs); here the GPU branch is
    forced on the CPU (CUPTI replaced) and every reference must still be computed and agree."""
    import jax

    put = []
    real_put = jax.device_put

    def spy(x, device=None, *a, **kw):
        put.append(device)
        return real_put(x, device, *a, **kw)

    monkeypatch.setattr(gemm, "_on_gpu", lambda: True)
    monkeypatch.setattr(gemm, "cupti_ms", lambda f, *a, iters=0: 1.0)
    monkeypatch.setattr(jax, "device_put", spy)
    res = gemm.run_shape(64, 256, 512, 2, lambda m: None, paths={"xla_bf16", "e2e_w4a4", "e2e_g128"})
    assert res["errors"] == {} and res["device_ms"] == {"xla_bf16": 1.0, "e2e_w4a4": 1.0, "e2e_g128": 1.0}
    assert put.count(jax.devices("cpu")[0]) == 2
    assert res["checks"]["e2e_g128_rel_l2_vs_reference"] <= 1e-2
