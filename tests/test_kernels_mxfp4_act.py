"""kernels/mxfp4_act_gpu.act_to_fp8_pallas: MXFP4 activation quantization straight into e4m3 rows (plus the rank-r
projection) in one Pallas Triton kernel, run in the Pallas interpreter against the XLA ``mxfp4_gpu.act_to_fp8``.

Triton lowering needs a GPU to compile, so this kernel is not lowered on CPU; it runs on the GPU in bench.act_quant.
"""

import numpy as np
import pytest
import jax.numpy as jnp

from kernel_inputs import act_inputs

from wanjax.kernels import dispatch
from wanjax.kernels import reference as ref
from wanjax.kernels.mxfp4_act_gpu import act_to_fp8_pallas, supports
from wanjax.kernels.mxfp4_gpu import act_to_fp8


_inputs = act_inputs


def _f32(a):
    return np.asarray(jnp.asarray(a).astype(jnp.float32))


@pytest.mark.parametrize(
    "m,k,r,rule,off,bm,ck,rev,progs",
    [
        (37, 512, 32, "safe_ceil", 0, 16, 128, True, 0),  # M not a multiple of the block: last block shifted back
        (16, 13824, 16, "safe_ceil", 0, 16, 256, False, 0),  # the FFN-down K
        (21, 384, 0, "ocp_floor", 1, 16, 128, True, 0),  # no low-rank branch, the OCP rule with an exponent offset
        (40, 640, 64, "safe_ceil", -1, 32, 64, False, 0),
        (70, 256, 16, "safe_ceil", 0, 16, 128, True, 2),
    ],
)  # persistent grid: 2 programs walk 5 row blocks
def test_kernel_interpreter_matches_xla(m, k, r, rule, off, bm, ck, rev, progs):
    """e4m3 values and row scales identical to the XLA path, same inexact-row count, x_lr within bf16 rounding."""
    x, smooth, down = _inputs(m, k, r, m * k + r)
    x8, s, bad, lr = act_to_fp8_pallas(
        x, smooth, down, 0.9, off, scale_rule=rule, block_rows=bm, chunk=ck, reverse=rev, programs=progs, interpret=True
    )
    x8_0, s0, bad0 = act_to_fp8(x, smooth, 0.9, off, scale_rule=rule)
    assert x8.dtype == jnp.float8_e4m3fn and x8.shape == (m, k)
    np.testing.assert_array_equal(_f32(x8), _f32(x8_0))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))
    assert int(bad) == int(bad0)
    if r == 0:
        assert lr is None
        return
    lr_ref = np.asarray(ref.lowrank_down(x, down, smooth), np.float32)
    assert np.linalg.norm(_f32(lr) - lr_ref) <= 1e-2 * np.linalg.norm(lr_ref)


def test_kernel_inexact_rows_zero_rows_and_non_finite():
    """A row whose blocks span more than 8 binades is counted inexact (as in the XLA path); an all-zero row gets
    scale 2**-126 and zero codes; a row with a NaN or inf gets a NaN scale and is not counted inexact."""
    x, smooth, _ = _inputs(32, 256, 0, 7)
    x = x.at[2, :64].multiply(1e-5)  # two blocks ~17 binades below the row's largest
    x = x.at[5].set(0.0)
    x = x.at[9, 100].set(jnp.nan).at[11, 7].set(jnp.inf)
    x8, s, bad, _ = act_to_fp8_pallas(x, smooth, None, 1.0, 0, block_rows=16, chunk=128, interpret=True)
    x8_0, s0, bad0 = act_to_fp8(x, smooth, 1.0, 0)
    s, s0 = np.asarray(s), np.asarray(s0)
    assert int(bad) == int(bad0) == 1
    assert np.isnan(s[9]) and np.isnan(s[11]) and np.all(np.isnan(s0[[9, 11]]))
    np.testing.assert_array_equal(np.delete(s, [9, 11]), np.delete(s0, [9, 11]))
    assert s[5] == 2.0**-126 and not np.any(_f32(x8)[5])
    np.testing.assert_array_equal(_f32(x8), _f32(x8_0))


def test_supports_and_errors():
    assert supports(32760, 5120, 32) and supports(32760, 13824, 0)
    assert not supports(63, 5120, 32)  # fewer rows than one 64-row block
    assert not supports(64, 5120, 24)  # r not a power of two
    assert not supports(64, 5120 + 32, 16)  # K not a multiple of the 256-wide chunk
    assert supports(16, 512, 16, block_rows=16, chunk=128)
    x, smooth, down = _inputs(8, 256, 16, 0)
    with pytest.raises(ValueError, match="unsupported shape M=8"):
        act_to_fp8_pallas(x, smooth, down, interpret=True)
    with pytest.raises(ValueError, match="scale_rule"):
        act_to_fp8_pallas(x, smooth, down, scale_rule="floor", interpret=True)
    with pytest.raises(ValueError, match=r"smooth must be \[K=256\]"):
        act_to_fp8_pallas(x, smooth[:8], down, interpret=True)


def test_linear_fp8_routes_fused_kernel(monkeypatch):
    """mxfp4_linear_fp8 on a GPU with the "pallas" backend runs the Triton activation kernel (here through its
    interpreter) for M >= FUSED_ACT_QUANT_MIN_M, the XLA path below it or with act_quant_impl="xla"; the GEMM is the
    XLA one here (N = 256 runs on "xla"-like math once _gpu_gemm is false off a GPU)."""
    from wanjax.kernels import mxfp4_act_gpu
    from wanjax.kernels.mxfp4_gpu import prepare_weights
    from wanjax.numerics.fp4 import quantize_mxfp4
    from wanjax.numerics.pack import pack_nibbles

    calls = []
    orig = mxfp4_act_gpu.act_to_fp8_pallas

    def spy(*a, **kw):
        calls.append(a[0].shape)
        return orig(*a, **{**kw, "block_rows": 16, "chunk": 128, "interpret": True})

    monkeypatch.setattr(mxfp4_act_gpu, "act_to_fp8_pallas", spy)
    monkeypatch.setattr(dispatch, "_platform", lambda: "gpu")
    monkeypatch.setattr(dispatch, "_gpu_gemm", lambda *a: False)  # no Mosaic GPU on CPU: the XLA GEMM
    monkeypatch.setattr(dispatch, "FUSED_ACT_QUANT_MIN_M", 64)
    x, smooth, down = _inputs(70, 256, 16, 1)
    rng = np.random.default_rng(3)
    qt = quantize_mxfp4(jnp.asarray(rng.standard_normal((128, 256)) * 0.02, jnp.float32), scale_rule="ocp_floor")
    w8, s_w, _ = prepare_weights(pack_nibbles(qt.codes), qt.scales)
    up = jnp.asarray(rng.standard_normal((16, 128)) * 0.05, jnp.bfloat16)

    def run(impl="fused", xx=x):
        return dispatch.mxfp4_linear_fp8(
            xx, w8, s_w, smooth=smooth, down=down, up=up, backend="pallas", out_dtype=jnp.float32, act_quant_impl=impl
        )

    y_fused, y_xla = np.asarray(run()), np.asarray(run("xla"))
    assert calls == [(70, 256)]
    assert np.linalg.norm(y_fused - y_xla) <= 1e-2 * np.linalg.norm(y_xla)  # x_lr differs by bf16 rounding only
    run(xx=x[:40])  # fewer rows than the threshold: XLA
    assert calls == [(70, 256)]
    with pytest.raises(ValueError, match="act_quant_impl"):
        run("pallas")


def test_e2m1_fast_rounding_equals_table():
    """Rounding on the binade's grid (steps 0.5 / 1 / 2) equals the threshold table, ties included."""
    from wanjax.kernels.mxfp4_act_gpu import _e2m1_round, _e2m1_round_fast

    y = np.concatenate(
        [
            np.linspace(-6, 6, 120001),
            np.arange(-24, 25) * 0.25,
            [1.75, -1.75, 0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 0.2500001, 0.2499999, -0.0],
        ]
    ).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(_e2m1_round_fast(jnp.asarray(y))), np.asarray(_e2m1_round(jnp.asarray(y))))


@pytest.mark.parametrize("rule,off", [("safe_ceil", 0), ("ocp_floor", 1)])
def test_fast_kernel_matches_xla(rule, off):
    """fast=True (1 / smooth multiplied, E2M1 rounding on the grid) against the XLA path: the same e4m3 values and
    scales except where x / smooth lies within an ulp of a block exponent's boundary (rare)."""
    x, smooth, down = _inputs(37, 512, 32, 5)
    x8, s, bad, lr = act_to_fp8_pallas(
        x, smooth, down, 0.9, off, scale_rule=rule, block_rows=16, chunk=128, fast=True, interpret=True
    )
    x8_0, s0, bad0 = act_to_fp8(x, smooth, 0.9, off, scale_rule=rule)
    assert np.mean(_f32(x8) != _f32(x8_0)) <= 1e-3
    assert np.mean(np.asarray(s) != np.asarray(s0)) <= 1e-2
    assert int(bad) == int(bad0)
