"""bench.eval_seeds_table: runs merged per calibration seed, paired differences, and its refusals."""

import json

import numpy as np
import pytest

from bench import eval_seeds_table as est


def _write(tmp_path, name, seed, psnr, eval_set=("a", "b"), reservoir=256):
    p = tmp_path / name
    p.write_text(
        json.dumps(
            {
                "eval_set": list(eval_set),
                "calib": {"reservoir": reservoir, "seed": seed},
                "platform": "cpu",
                "variants": [{"name": n, "psnr": v} for n, v in psnr.items()],
            }
        )
    )
    return str(p)


def test_merge_and_paired_differences(tmp_path, capsys):
    files = [
        _write(tmp_path, "s0.json", 0, {"default": 36.0, "svdquant": 35.5}),
        _write(tmp_path, "s0b.json", 0, {"default": 36.0, "x": 36.4}),
        _write(tmp_path, "s1.json", 1, {"default": 36.5, "svdquant": 35.7, "x": 36.6}),
    ]
    runs = est.load_runs(files)
    assert [r["seed"] for r in runs] == [0, 1] and runs[0]["psnr"] == {"default": 36.0, "svdquant": 35.5, "x": 36.4}
    s = est.summarize(runs, "default")
    np.testing.assert_allclose(s["x"]["diff_ref"]["mean"], (0.4 + 0.1) / 2)
    np.testing.assert_allclose(s["svdquant"]["diff_ref"]["sd"], np.std([-0.5, -0.8], ddof=1))
    assert s["default"]["psnr"] == [36.0, 36.5] and s["default"]["sd"] == pytest.approx(np.std([36, 36.5], ddof=1))
    out = tmp_path / "sum.json"
    assert est.main(files + ["--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| variant | seed 0 | seed 1 |") and "| x | 36.40 | 36.60 |" in table[4]
    assert json.loads(out.read_text())["variants"]["x"]["diff_ref"]["n"] == 2


def test_refusals(tmp_path, capsys):
    a = _write(tmp_path, "a.json", 1, {"default": 36.47})
    assert est.main([a, _write(tmp_path, "b.json", 1, {"default": 36.40})]) == 2
    assert "default at seed 1 measured 36.40 dB, another run of that seed 36.47 dB" in capsys.readouterr().err
    assert est.main([a, _write(tmp_path, "c.json", 2, {"default": 36.4}, eval_set=("z",))]) == 2
    assert est.main([a, _write(tmp_path, "d.json", 2, {"default": 36.4}, reservoir=1024)]) == 2
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"eval_set": [], "platform": "cpu", "variants": []}))
    assert est.main([str(old)]) == 2 and "no 'calib' entry" in capsys.readouterr().err
