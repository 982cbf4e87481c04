"""W4A8 real mode: INT4 weights (per channel, or in groups of 128 along K) with INT8 per-token activations run on the
integer kernels (codes in [-127, 127]); real mode equals fake mode through the references, and the dispatcher's
act quant gives INT8 codes. Refused where the kernels cannot hold them exactly (TPU7x's FP8 MXU)."""

import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.kernels import dispatch, reference
from wanjax.numerics import formats
from wanjax.quant.qlinear import QLinear, QLinearConfig, active_bin
from wanjax.quant.recipes import get_recipe


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("w_group", [None, 128])
def test_w4a8_real_equals_fake(backend, w_group, monkeypatch):
    monkeypatch.setenv("WANJAX_KERNELS", backend)
    rng = np.random.default_rng(5)
    k, n, r = 256, 64, 16
    qt = formats.quantize_int4(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), group_size=w_group).pack()
    cfg = QLinearConfig(k, n, "int4", w_group or k, "int8", None, nbins=2)
    assert cfg.real_mode_problem() is None
    a = dict(
        qweight=qt.codes,
        wscale=qt.scales,
        bias=rng.standard_normal(n).astype(np.float32),
        smooth=rng.uniform(0.5, 2.0, k).astype(np.float32),
        down=jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.bfloat16),
        up=jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.bfloat16),
        act_clip=np.array([1.0, 0.8], np.float32),
    )
    x = jnp.asarray(rng.standard_normal((3, 5, k)), jnp.float32)
    outs = {}
    for mode in ("fake", "real"):
        layer = QLinear(cfg, dtype=jnp.bfloat16, mode=mode, path="t", **a)
        with active_bin(1):
            outs[mode] = np.asarray(layer(x).astype(jnp.float32))
    scale = np.abs(outs["fake"]).max()
    np.testing.assert_allclose(outs["real"], outs["fake"], atol=2**-7 * scale, rtol=2**-7)
    # and it is not the W4A4 result: the INT8 activations are finer
    cfg4 = QLinearConfig(k, n, "int4", w_group or k, "int4", None, nbins=2)
    with active_bin(1):
        y4 = np.asarray(QLinear(cfg4, dtype=jnp.bfloat16, mode="real", path="t", **a)(x).astype(jnp.float32))
    assert np.abs(y4 - outs["real"]).max() > 10 * np.abs(outs["real"] - outs["fake"]).max()


def test_act_quant_int8_codes_match_the_reference():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((64, 128)) * 3, jnp.float32)
    sm = jnp.asarray(rng.uniform(0.5, 2, 128), jnp.float32)
    q, s, _ = dispatch.act_quant(x, sm, None, 0.9, backend="xla", qmax=127)
    qr, sr = reference.quantize_act_int4(x, sm, 0.9, None, 127)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(qr))
    np.testing.assert_allclose(np.asarray(s), np.asarray(sr), rtol=1e-7)
    assert int(np.abs(np.asarray(q)).max()) > 7  # INT8 codes, not INT4


def test_real_mode_problems_name_the_supported_activations():
    msg = QLinearConfig(128, 64, "int4", 128, "int8", 32).real_mode_problem()
    assert "int4 (W4A4) or int8 (W4A8) per token" in msg
    assert QLinearConfig(128, 64, "int4", 128, "nvfp4", None).real_mode_problem() is not None


def test_fp8_only_tpu_refuses_int8_activations(monkeypatch):
    monkeypatch.setattr(dispatch, "_platform", lambda: "tpu")
    monkeypatch.setattr(dispatch, "_tpu_fp8_only", lambda kind=None: True)
    q = jnp.zeros((4, 128), jnp.int8)
    w = jnp.zeros((64, 64), jnp.uint8)
    with pytest.raises(ValueError, match="not exact in the FP8 MXU"):
        dispatch.w4a4_matmul(q, jnp.ones(4), w, jnp.ones(64), backend="xla", a_qmax=127)


def test_w4a8_and_g128_recipes():
    assert get_recipe("w4a8").act.fmt == "int8" and get_recipe("w4a8").weight.fmt == "int4"
    assert get_recipe("g128").weight.group_size == 128 and get_recipe("g128").act.fmt == "int4"


def test_auto_recipe_by_hardware(monkeypatch):
    from wanjax.kernels import dispatch as d
    from wanjax.quant.recipes import auto_recipe

    monkeypatch.setattr(d, "_is_hopper", lambda: True)
    name, why = auto_recipe()
    assert name == "w4a8_mixed" and "--recipe w4a8" in why  # INT8 self-attention weights: no GEMM time on Hopper
    monkeypatch.setattr(d, "_is_hopper", lambda: False)
    name, why = auto_recipe()
    assert name == "default" and "Hopper" in why


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("a_fmt", ["int8", "int4"])
def test_int8_weights_real_equals_fake(backend, a_fmt, monkeypatch):
    """INT8 per-channel weights (a mixed-precision recipe's 8-bit layers, ``Recipe.weight_overrides``) run on the
    same integer GEMM with their int8 [N, K] codes: real mode equals fake mode through the references."""
    monkeypatch.setenv("WANJAX_KERNELS", backend)
    rng = np.random.default_rng(9)
    k, n, r = 256, 64, 16
    qt = formats.quantize_int8(jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
    assert qt.codes.dtype == jnp.int8 and int(np.abs(np.asarray(qt.codes)).max()) > 7
    cfg = QLinearConfig(k, n, "int8", k, a_fmt, None, nbins=1)
    assert cfg.real_mode_problem() is None
    a = dict(
        qweight=qt.codes,
        wscale=qt.scales,
        smooth=rng.uniform(0.5, 2.0, k).astype(np.float32),
        down=jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.bfloat16),
        up=jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.bfloat16),
        act_clip=np.array([0.9], np.float32),
    )
    x = jnp.asarray(rng.standard_normal((4, k)), jnp.float32)
    outs = {m: np.asarray(QLinear(cfg, dtype=jnp.bfloat16, mode=m, path="t", **a)(x).astype(jnp.float32)) for m in
            ("fake", "real")}  # fmt: skip
    scale = np.abs(outs["fake"]).max()
    np.testing.assert_allclose(outs["real"], outs["fake"], atol=2**-7 * scale, rtol=2**-7)
    # the same layer's weights rounded to INT4 give a clearly different output: the 8-bit codes are used as such
    w4 = formats.quantize_int4(qt.dequantize(), group_size=None).pack()
    cfg4 = QLinearConfig(k, n, "int4", k, a_fmt, None, nbins=1)
    y4 = np.asarray(QLinear(cfg4, dtype=jnp.bfloat16, mode="real", path="t", **{**a, "qweight": w4.codes,
                                                                              "wscale": w4.scales})(x).astype(jnp.float32))  # fmt: skip
    assert np.abs(y4 - outs["real"]).max() > 10 * np.abs(outs["real"] - outs["fake"]).max()


def test_fp8_only_tpu_refuses_int8_weights(monkeypatch):
    monkeypatch.setattr(dispatch, "_platform", lambda: "tpu")
    monkeypatch.setattr(dispatch, "_tpu_fp8_only", lambda kind=None: True)
    q = jnp.zeros((4, 128), jnp.int8)
    with pytest.raises(ValueError, match="weight codes up to 127 .* not exact in the FP8 MXU"):
        dispatch.w4a4_matmul(q, jnp.ones(4), jnp.zeros((64, 128), jnp.int8), jnp.ones(64), backend="xla", w_qmax=127)
    with pytest.raises(ValueError, match="need int8 \\[N, K\\] weights"):
        dispatch.w4a4_matmul(q, jnp.ones(4), jnp.zeros((64, 64), jnp.uint8), jnp.ones(64), backend="reference",
                             w_qmax=127)  # fmt: skip
