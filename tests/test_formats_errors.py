"""Error behaviour: non-finite input (eager, jit, 'nan' policy) and bad arguments, with clear messages."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.numerics import formats as F

CASES = [
    ("int4", {"group_size": 32}),
    ("int8", {}),
    ("fp8_e4m3", {}),
    ("fp8_e4m3", {"granularity": "tensor"}),
    ("mxfp4", {}),
    ("mxfp4", {"scale_rule": "safe_ceil"}),
    ("nvfp4", {}),
]


def _x_with(bad_value):
    x = np.random.RandomState(0).randn(2, 64).astype(np.float32)
    x[1, 40] = bad_value
    return jnp.asarray(x)


@pytest.mark.parametrize("fmt,kw", CASES)
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_eager_nonfinite_raises_value_error(fmt, kw, bad):
    with pytest.raises(
        ValueError, match=r"input of shape \(2, 64\) contains 1 non-finite value.*first at index \(1, 40\)"
    ):
        F.quantize(_x_with(bad), fmt, **kw)


@pytest.mark.parametrize("fmt,kw", CASES)
def test_jit_nonfinite_raises_at_run_time(fmt, kw):
    f = jax.jit(lambda x: F.quantize(x, fmt, **kw))
    ok = f(_x_with(1.0))  # same compiled function, finite input: no error
    jax.block_until_ready(ok)
    with pytest.raises(Exception, match=r"non-finite value.*first at index \(1, 40\)"):
        jax.block_until_ready(f(_x_with(np.nan)))


@pytest.mark.parametrize("fmt,kw", CASES)
@pytest.mark.parametrize("jit", [False, True])
def test_nan_policy_poisons_exactly_the_affected_group(fmt, kw, jit):
    clean = _x_with(0.5)
    bad = _x_with(np.inf)
    quant = lambda x: F.quantize(x, fmt, nonfinite="nan", **kw)
    quant = jax.jit(quant) if jit else quant
    qc, qb = F.quantize(clean, fmt, **kw), quant(bad)
    d = np.asarray(F.dequantize(qb))
    g = qb.group_size
    if g == 0:  # per-tensor: everything is poisoned
        assert np.all(np.isnan(d)) and np.isnan(float(qb.scales))
        return
    lo = (40 // g) * g
    affected = np.zeros(d.shape, bool)
    affected[1, lo : lo + g] = True
    assert np.all(np.isnan(d[affected]))
    if fmt != "nvfp4":  # nvfp4's tensor scale depends on the finite values, so other groups may change
        np.testing.assert_array_equal(d[~affected], np.asarray(F.dequantize(qc))[~affected])
    else:
        assert np.all(np.isfinite(d[~affected]))
    sc = np.asarray(qb.scales)
    if fmt == "mxfp4":
        assert sc[1, 40 // g] == F.E8M0_NAN_CODE and np.sum(sc == F.E8M0_NAN_CODE) == 1
    else:
        assert np.isnan(sc.astype(np.float32)[1, 40 // g]) and np.sum(np.isnan(sc.astype(np.float32))) == 1


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x: F.quantize_int4(x, group_size=48), r"quantize_int4: group_size=48 does not divide K=64 .*\(2, 64\)"),
        (lambda x: F.quantize_int4(x[:, :60], group_size=32), r"group_size=32 does not divide K=60"),
        (lambda x: F.quantize_int8(x, group_size=0), r"group_size must be a positive int or None, got 0"),
        (lambda x: F.quantize_int4(x, group_size=True), r"group_size must be a positive int or None, got True"),
        (lambda x: F.quantize_mxfp4(x[:, :48]), r"quantize_mxfp4: block_size=32 does not divide K=48"),
        (lambda x: F.quantize_nvfp4(x[:, :40]), r"quantize_nvfp4: block_size=16 does not divide K=40"),
        (lambda x: F.quantize_mxfp4(x, scale_rule="ceil"), r"scale_rule must be one of \('ocp_floor', 'safe_ceil'\)"),
        (lambda x: F.quantize_int4(x, nonfinite="ignore"), r"nonfinite must be one of \('raise', 'nan'\)"),
        (lambda x: F.quantize_int4(x, clip=0.0), r"clip must be finite and > 0"),
        (lambda x: F.quantize_mxfp4(x, clip=-1.0), r"clip must be finite and > 0"),
        (lambda x: F.quantize_nvfp4(x, tensor_scale=0.0), r"tensor_scale must be finite and > 0"),
        (lambda x: F.quantize_nvfp4(x, tensor_scale=jnp.ones(2)), r"tensor_scale must be a scalar"),
        (lambda x: F.quantize_fp8(x, granularity="group"), r"granularity must be one of \('tensor', 'channel'\)"),
        (lambda x: F.quantize_int(x, 3), r"bits must be one of \(4, 8\), got 3"),
        (lambda x: F.quantize(x, "int2"), r"fmt must be one of"),
        (lambda x: F.quantize_int4(x[0, 0]), r"at least 1 dimension"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(jnp.ones((2, 64)))


def test_dequantize_rejects_non_quantized_tensor():
    with pytest.raises(TypeError, match="expected a QuantizedTensor, got ndarray"):
        F.dequantize(np.ones(3))
