"""bench.act_quant's small-M crossover section on the CPU: the fused kernel (in the Pallas interpreter) against the
dispatcher's XLA paths, unrotated and rotating, with the codes checked and every variant recorded."""

import jax

from bench import act_quant
from bench.kernels import make_inputs


def test_small_m_section_runs_and_checks(monkeypatch):
    from bench.layout import ensure_package_layout

    ensure_package_layout()
    from wanjax.kernels import act_quant_gpu

    real = act_quant_gpu.act_quant_lowrank_pallas
    monkeypatch.setattr(
        act_quant_gpu, "act_quant_lowrank_pallas", lambda *a, **kw: real(*a, **{**kw, "interpret": True})
    )
    monkeypatch.setattr(act_quant, "SMALL_M_BLOCK_ROWS", (32, 16))
    inp = make_inputs(jax.random.key(0), 64, 512, 256)
    res = {"times_ms": {}, "checks": {}, "errors": {}}
    recorded = []

    def rec(name, fn, *args):
        jax.block_until_ready(fn(*args))
        recorded.append(name)

    act_quant.run_small_m(inp, res, rec, lambda m: None)
    assert res["errors"] == {}
    assert recorded == [
        "aq_dispatch_xla",
        "aq_fused_bm32",
        "aq_fused_bm16",
        "aq_dispatch_xla_rot256",
        "aq_fused_rot256_bm32",
        "aq_fused_rot256_bm16",
    ]
    for name, c in res["checks"].items():  # codes within one step of the XLA path's (Triton division / bf16 rotation)
        assert c["code_maxdiff"] <= 1 and c["code_mismatch_frac"] < 5e-3, (name, c)
        assert c["scale_max_reldiff"] < 1e-3 and c["x_lr_relerr"] < 1e-2, (name, c)
