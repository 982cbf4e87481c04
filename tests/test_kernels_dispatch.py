"""kernels/act_quant_gpu.py and kernels/dispatch.py on CPU."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from wanjax.kernels import dispatch, xla_paths
from wanjax.kernels import reference as ref
from wanjax.kernels.act_quant_gpu import act_quant_fused


def _layer(seed, m, k, n, r):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.2, 5, (m, 1)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((n, k)) * 0.05, jnp.float32)
    wp, sw = ref.quantize_weight_int4(w)
    smooth = jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32)
    down = jnp.asarray(rng.standard_normal((k, r)) * 0.05, jnp.bfloat16) if r else None
    up = jnp.asarray(rng.standard_normal((r, n)) * 0.05, jnp.bfloat16) if r else None
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    return x, wp, sw, smooth, down, up, bias


@pytest.mark.parametrize("r", [0, 16, 32])
def test_act_quant_fused_matches_reference(r):
    x, _, _, smooth, down, _, _ = _layer(r, 45, 384, 64, r)
    q, s, lr = act_quant_fused(x, smooth, down, jnp.float32(0.9), None)
    q0, s0, lr0 = ref.act_quant(x, smooth, down, 0.9)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q0))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))
    if r:
        np.testing.assert_array_equal(np.asarray(lr, np.float32), np.asarray(lr0, np.float32))
        _, _, lr_f = act_quant_fused(x, smooth, down, 0.9, None, fold_smooth=True)
        rel = np.linalg.norm(np.asarray(lr_f, np.float64) - np.asarray(lr0, np.float64)) / np.linalg.norm(
            np.asarray(lr0, np.float64)
        )
        assert rel <= 1e-2
    else:
        assert lr is None


def test_act_quant_fused_static_scale_and_errors():
    x, _, _, smooth, down, _, _ = _layer(1, 8, 128, 64, 16)
    q, s, _ = act_quant_fused(x, smooth, down, 1.0, jnp.float32(0.5))
    np.testing.assert_array_equal(np.asarray(s), np.full(8, 0.5, np.float32))
    with pytest.raises(ValueError, match="smooth must be"):
        act_quant_fused(x, smooth[:5], down, 1.0, None)
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        act_quant_fused(x[None], smooth, down, 1.0, None)


@pytest.mark.parametrize("backend", ["reference", "xla"])
@pytest.mark.parametrize("r", [0, 16])
def test_w4a4_linear_backends_agree(backend, r):
    x, wp, sw, smooth, down, up, bias = _layer(5 + r, 37, 256, 96, r)
    x3 = x.reshape(1, 37, 256)
    y = dispatch.w4a4_linear(
        x3, wp, sw, smooth=smooth, down=down, up=up, bias=bias, clip=0.95, out_dtype=jnp.float32, backend=backend
    )
    assert y.shape == (1, 37, 96)
    exp = ref.w4a4_linear(x, wp, sw, smooth, down, up, bias, 0.95, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y[0]), np.asarray(exp), rtol=1e-5, atol=1e-5)


def test_select_backend(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.select_backend() == "xla"  # CPU: no Hopper GPU
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.select_backend() == "reference"
    assert dispatch.select_backend("pallas") == "pallas"
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="WANJAX_KERNELS"):
        dispatch.select_backend()


def test_pallas_backend_on_cpu_lowers_for_cuda(monkeypatch):
    """The 'pallas' path of the dispatcher (act quant + unpack + Mosaic GEMM) lowers for CUDA from a CPU machine."""
    monkeypatch.setenv(dispatch.ENV_VAR, "pallas")
    m, k, n, r = 4096, 5120, 5120, 32
    S = jax.ShapeDtypeStruct
    args = (
        S((m, k), jnp.bfloat16),
        S((n, k // 2), jnp.uint8),
        S((n,), jnp.float32),
        S((k,), jnp.float32),
        S((k, r), jnp.bfloat16),
        S((r, n), jnp.bfloat16),
        S((n,), jnp.float32),
    )
    f = lambda x, wp, sw, sm, dn, u, b: dispatch.w4a4_linear(x, wp, sw, smooth=sm, down=dn, up=u, bias=b)
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "wgmma" in text


def test_unsupported_shape_falls_back_to_xla():
    x, wp, sw, smooth, down, up, bias = _layer(3, 16, 192, 40, 0)  # N=40: not a multiple of 256
    assert not dispatch.pallas_supports(40, 192)
    y = dispatch.w4a4_linear(x, wp, sw, smooth=smooth, bias=bias, out_dtype=jnp.float32, backend="pallas")
    exp = ref.w4a4_linear(x, wp, sw, smooth, bias=bias, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(y), np.asarray(exp), rtol=1e-5, atol=1e-5)


def test_bad_weight_shape():
    x, wp, sw, *_ = _layer(4, 8, 128, 64, 0)
    with pytest.raises(ValueError, match="w_packed must be"):
        dispatch.w4a4_linear(x, wp[:, :10], sw)  # noqa


@pytest.mark.parametrize("m,k,static", [(13, 5120, None), (3, 13824, None), (9, 384, 0.3)])
def test_quantize_rows_pallas_interpret(m, k, static):
    """Single-pass Pallas (Triton) quantizer in the interpreter: same codes as the reference, scales to an ulp."""
    from wanjax.kernels.act_quant_gpu import quantize_rows_pallas

    rng = np.random.default_rng(m * k)
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 5, (m, 1)), jnp.bfloat16)
    smooth = jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32)
    q, s = quantize_rows_pallas(x, smooth, 0.9, static, interpret=True)
    q0, s0 = ref.quantize_act_int4(x, smooth, 0.9, static)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q0))
    np.testing.assert_allclose(np.asarray(s), np.asarray(s0), rtol=3e-7)


def test_quantize_rows_pallas_round_half_even():
    from wanjax.kernels.act_quant_gpu import quantize_rows_pallas

    vals = [0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 7.0, 6.5, -6.5, 9.0, -9.0, 0.0, 1.0, 4.5, -3.5]
    q, s = quantize_rows_pallas(jnp.asarray([vals], jnp.float32), static_scale=1.0, interpret=True)
    assert np.asarray(q)[0].tolist() == [0, 2, 2, 0, -2, -2, 3, 7, 6, -6, 7, -7, 0, 1, 4, -4]
    assert np.asarray(s).tolist() == [1.0]


def test_act_quant_impl_pallas_interpret_path(monkeypatch):
    """act_quant_impl='pallas' routes to the single-pass quantizer (run here through its interpreter)."""
    from wanjax.kernels import act_quant_gpu

    x, _, _, smooth, down, _, _ = _layer(8, 6, 256, 64, 16)
    calls = []
    orig = act_quant_gpu.quantize_rows_pallas

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **{**kw, "interpret": True})

    monkeypatch.setattr(act_quant_gpu, "quantize_rows_pallas", spy)
    q, s, lr = dispatch.act_quant(x, smooth, down, 0.9, backend="pallas", act_quant_impl="pallas")
    assert calls
    q0, s0, lr0 = ref.act_quant(x, smooth, down, 0.9)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q0))
    with pytest.raises(ValueError, match="act_quant_impl"):
        dispatch.act_quant(x, smooth, down, backend="pallas", act_quant_impl="cuda")


def test_int8_weights_accepted():
    x, wp, sw, smooth, down, up, bias = _layer(11, 20, 256, 64, 16)
    w8 = ref.unpack_int4(wp)
    for be in ("reference", "xla"):
        y8 = dispatch.w4a4_linear(
            x, w8, sw, smooth=smooth, down=down, up=up, bias=bias, out_dtype=jnp.float32, backend=be
        )
        y4 = dispatch.w4a4_linear(
            x, wp, sw, smooth=smooth, down=down, up=up, bias=bias, out_dtype=jnp.float32, backend=be
        )
        np.testing.assert_array_equal(np.asarray(y8), np.asarray(y4))
    with pytest.raises(ValueError, match="packed uint8"):
        dispatch.w4a4_matmul(jnp.zeros((4, 256), jnp.int8), jnp.ones(4), w8.astype(jnp.int32), sw)


@pytest.mark.parametrize(
    "m,wdtype,expect", [(4096, jnp.uint8, "int4"), (32760, jnp.uint8, "int8"), (4096, jnp.int8, "int8")]
)
def test_pallas_weight_variant_choice(monkeypatch, m, wdtype, expect):
    from wanjax.kernels import w4a4_gpu

    seen = {}

    def fake(q_x, s_x, w, s_w, x_lr=None, up=None, bias=None, **kw):
        seen["weights"] = kw["weights"]
        return jnp.zeros((q_x.shape[0], w.shape[0]), kw["out_dtype"])

    monkeypatch.setattr(w4a4_gpu, "w4a4_matmul_gpu_any_m", fake)
    k, n = 256, 256
    w = jnp.zeros((n, k // 2), jnp.uint8) if wdtype == jnp.uint8 else jnp.zeros((n, k), jnp.int8)
    dispatch.w4a4_matmul(jnp.zeros((m, k), jnp.int8), jnp.ones(m), w, jnp.ones(n), backend="pallas")
    assert seen["weights"] == expect


def test_pallas_on_tpu_routes_to_tpu_kernel(monkeypatch):
    from wanjax.kernels import w4a4_tpu

    seen = {}
    orig = w4a4_tpu.w4a4_matmul_tpu

    def spy(*a, **kw):
        seen["mode"] = kw["mode"]
        return orig(*a, **{**kw, "interpret": True})

    monkeypatch.setattr(w4a4_tpu, "w4a4_matmul_tpu", spy)
    monkeypatch.setattr(dispatch, "_platform", lambda: "tpu")
    x, wp, sw, smooth, down, up, bias = _layer(12, 24, 256, 128, 16)
    y = dispatch.w4a4_linear(
        x, wp, sw, smooth=smooth, down=down, up=up, bias=bias, out_dtype=jnp.float32, backend="pallas"
    )
    assert seen["mode"] == "int4"
    exp = ref.w4a4_linear(x, wp, sw, smooth, down, up, bias, out_dtype=jnp.float32)
    rel = np.linalg.norm(np.asarray(y) - np.asarray(exp)) / np.linalg.norm(np.asarray(exp))
    assert rel <= 1e-2  # x_lr via the folded smoothing (bf16 rounding)


def test_tpu_generation_and_mode():
    gen = dispatch.tpu_generation
    assert [
        gen(k) for k in ("TPU v4", "TPU v5 lite", "TPU v5p", "TPU v6e", "TPU7x", "tpu v7", "cpu", "NVIDIA H100")
    ] == [4, 5, 5, 6, 7, 7, None, None]
    assert dispatch.tpu_mode(jnp.int8, "TPU v5 lite") == "int8" and dispatch.tpu_mode(jnp.uint8, "TPU v6e") == "int4"
    assert dispatch.tpu_mode(jnp.uint8, "TPU7x") == dispatch.tpu_mode(jnp.int8, "TPU7x") == "fp8"


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_tpu7x_runs_w4a4_on_fp8_with_the_same_numbers(monkeypatch, backend):
    """On a TPU without integer MXU modes (TPU7x) both backends take the e4m3 x e4m3 -> f32 product of the int4 values
    (Pallas: the TPU kernel's "fp8" mode, here in the interpreter); the accumulation is exact, so the output equals
    the int8 path's."""
    from wanjax.kernels import w4a4_tpu

    seen = {}
    orig = w4a4_tpu.w4a4_matmul_tpu

    def spy(*a, **kw):
        seen["mode"], seen["w"] = kw["mode"], a[2].dtype
        return orig(*a, **{**kw, "interpret": True})

    x, wp, sw, smooth, down, up, bias = _layer(13, 40, 256, 128, 16)
    monkeypatch.setattr(w4a4_tpu, "w4a4_matmul_tpu", spy)
    monkeypatch.setattr(dispatch, "_platform", lambda: "tpu")
    monkeypatch.setattr(dispatch, "tpu_generation", lambda kind=None: 6)  # v6e: the integer path
    exp = dispatch.w4a4_linear(
        x, wp, sw, smooth=smooth, down=down, up=up, bias=bias, out_dtype=jnp.float32, backend=backend
    )
    assert seen.pop("mode", "int4") == "int4"
    seen.clear()
    monkeypatch.setattr(dispatch, "tpu_generation", lambda kind=None: 7)
    dots = []
    real_dot = xla_paths.lax.dot_general
    monkeypatch.setattr(
        xla_paths.lax, "dot_general", lambda a, b, *r, **k: dots.append((a.dtype, b.dtype)) or real_dot(a, b, *r, **k)
    )
    y = dispatch.w4a4_linear(
        x, wp, sw, smooth=smooth, down=down, up=up, bias=bias, out_dtype=jnp.float32, backend=backend
    )
    if backend == "pallas":
        assert seen == {"mode": "fp8", "w": jnp.int8}
    else:
        assert (jnp.float8_e4m3fn, jnp.float8_e4m3fn) in dots and seen == {}
    np.testing.assert_array_equal(np.asarray(y), np.asarray(exp))


@pytest.mark.parametrize("backend", ["reference", "xla", "pallas"])
@pytest.mark.parametrize("block", [None, 64])
def test_rotated_input_equals_quantizing_the_rotated_input(backend, block):
    """``rot_signs``: act quant and the linear of x equal those of ``rotate_activations_mxu(x / smooth)`` (the run-time
    rotation) with no smoothing (on CPU every backend takes the XLA rotation pass; the GPU kernel's in-kernel rotation
    is tested in tests/test_kernels_act_quant_fused.py)."""
    from wanjax.numerics.hadamard import random_signs, rotate_activations_mxu

    x, wp, sw, smooth, down, up, bias = _layer(5, 45, 256, 64, 16)
    signs = random_signs(jax.random.key(1), 256)
    xr = rotate_activations_mxu(ref.smooth_act(x, smooth), signs, block)
    got = dispatch.act_quant(x, smooth, down, 0.9, rot_signs=signs, rot_block=block, backend=backend)
    want = dispatch.act_quant(xr, None, down, 0.9, backend=backend)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
    y = dispatch.w4a4_linear(
        x,
        wp,
        sw,
        smooth=smooth,
        down=down,
        up=up,
        bias=bias,
        rot_signs=signs,
        rot_block=block,
        out_dtype=jnp.float32,
        backend=backend,
    )
    y0 = dispatch.w4a4_linear(xr, wp, sw, down=down, up=up, bias=bias, out_dtype=jnp.float32, backend=backend)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
    with pytest.raises(ValueError, match="must be a power of two"):
        dispatch.act_quant(x, smooth, down, rot_signs=signs, rot_block=96, backend=backend)


def test_tpu7x_runs_prepared_mxfp4_on_the_fp8_kernel(monkeypatch):
    """``mxfp4_linear_fp8`` with the "pallas" backend on a TPU7x hands the e4m3 rows and row scales to the TPU kernel's
    "fp8" mode (interpreter here): the same output as the "xla" backend's exact bf16 products."""
    from wanjax.kernels import w4a4_tpu
    from wanjax.kernels.mxfp4_gpu import prepare_weights
    from wanjax.numerics import formats

    seen = {}
    orig = w4a4_tpu.w4a4_matmul_tpu

    def spy(*a, **kw):
        seen["mode"], seen["dtypes"] = kw["mode"], (a[0].dtype, a[2].dtype)
        return orig(*a, **{**kw, "interpret": True})

    rng = np.random.default_rng(3)
    m, k, n, r = 40, 256, 128, 16
    qt = formats.quantize_mxfp4(jnp.asarray(rng.standard_normal((n, k)), jnp.float32), scale_rule="ocp_floor").pack()
    w8, s8, _ = prepare_weights(qt.codes, qt.scales)
    x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    kw = dict(
        smooth=jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32),
        down=jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.bfloat16),
        up=jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.bfloat16),
        bias=jnp.asarray(rng.standard_normal(n), jnp.float32),
        clip=0.9,
        out_dtype=jnp.float32,
    )
    exp = dispatch.mxfp4_linear_fp8(x, w8, s8, backend="xla", **kw)
    monkeypatch.setattr(w4a4_tpu, "w4a4_matmul_tpu", spy)
    monkeypatch.setattr(dispatch, "_platform", lambda: "tpu")
    monkeypatch.setattr(dispatch, "tpu_generation", lambda kind=None: 7)
    y = dispatch.mxfp4_linear_fp8(x, w8, s8, backend="pallas", **kw)
    assert seen == {"mode": "fp8", "dtypes": (jnp.float8_e4m3fn, jnp.float8_e4m3fn)}
    np.testing.assert_allclose(np.asarray(y), np.asarray(exp), rtol=1e-5, atol=1e-5 * float(jnp.abs(exp).max()))
