"""bench.mxfp4 on CPU: the layer it builds and its correctness checks run (the GPU timing itself runs only there)."""

import bench.mxfp4 as bm


def test_run_shape_cpu_small():
    bm._layout()
    res = bm.run_shape(16, 64, 64, 1, lambda *_: None)
    assert not res["errors"]
    # on CPU "pallas" falls back to the exact bf16 path: both must equal the f32 reference of the quantized layer
    assert res["checks"]["xla_rel_l2_vs_reference"] < 1e-6
    assert res["checks"]["pallas_rel_l2_vs_reference"] < 1e-6
    assert res["checks"]["pallas_inexact_rows"] == 0
    assert res["checks"]["pallas_prepared_rel_l2_vs_reference"] < 1e-6  # weights re-encoded once (prepare_weights)
    assert res["checks"]["pallas_prepared_inexact_rows"] == 0 and res["checks"]["prepared_weight_inexact_rows"] == 0
    assert set(res["median_ms"]) == {"reference", "xla", "pallas", "pallas_prepared", "pallas_prepared_bf16out", "bf16"}


def test_main_without_gpu_is_a_notice(capsys):
    assert bm.main([]) == 0
    assert "no GPU" in capsys.readouterr().out
