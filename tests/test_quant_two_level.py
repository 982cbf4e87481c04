"""Two-level integer group scales in ``wanjax.quant``: the specs, RTN / GPTQ (static groups, the weight clip search),
a recipe through ``quantize_layer``, QLinear real mode on the per-channel int8 GEMM (equal to fake mode and to the
group-scaled math), the prepared int8 weights and the artifact round trip."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.numerics.two_level import quantize_int4_two_level
from wanjax.quant.gptq import gptq, gptq_quantize_kernel
from wanjax.quant.qlinear import QLinear, QLinearConfig, active_bin, carried_weights
from wanjax.quant.quantize import LayerInputs, quantize_layer
from wanjax.quant.recipes import GPTQ, ClipSearch, LowRank, Recipe, Rotate, Smooth, recipe_from_dict, recipe_to_dict
from wanjax.quant.rtn import ActQuantSpec, WeightQuantSpec, rtn

L = 18
W2 = WeightQuantSpec("int4", group_size=32, scale_levels=L)


def _kernel(rng, k=128, n=48):
    """A ``[K, N]`` kernel whose input channels have group-wise ranges over two decades."""
    scale = np.repeat(10 ** rng.uniform(-2, 0, (k // 32, n)), 32, axis=0)
    return jnp.asarray(rng.standard_normal((k, n)) * scale, jnp.float32)


def test_specs_check_the_levels():
    with pytest.raises(ValueError, match="needs fmt='int4' with a group_size"):
        WeightQuantSpec("int4", scale_levels=L)
    with pytest.raises(ValueError, match="needs fmt='int4' with a group_size"):
        WeightQuantSpec("int8", group_size=32, scale_levels=L)
    with pytest.raises(ValueError, match=r"lie in \[1, 18\]"):
        ActQuantSpec("int4", group_size=32, scale_levels=19)
    with pytest.raises(ValueError, match="a_scale_levels needs dynamic int4 activations with an a_group"):
        QLinearConfig(64, 32, a_fmt="int4", a_group=None, a_scale_levels=L)
    with pytest.raises(ValueError, match="w_scale_levels needs w_fmt='int4'"):
        QLinearConfig(64, 32, w_fmt="int8", w_group=32, w_scale_levels=L)


def test_rtn_is_the_numerics_quantizer():
    w = _kernel(np.random.default_rng(0))
    out = rtn({"kernel": w}, W2)
    t = quantize_int4_two_level(w.T, 32, L)
    np.testing.assert_array_equal(np.asarray(out["qweight"].codes), np.asarray(t.codes))
    np.testing.assert_array_equal(np.asarray(out["qweight"].scales), np.asarray(t.scales))
    np.testing.assert_array_equal(np.asarray(out["qunit"]), np.asarray(t.unit[:, 0]))
    np.testing.assert_array_equal(np.asarray(out["kernel"]), np.asarray(t.dequantize().T))
    assert "qunit" not in rtn({"kernel": w}, WeightQuantSpec("int4", group_size=32))


def _hessian(rng, k, n_rows=512):
    """``(X^T X, X)`` of correlated inputs (what GPTQ's error feedback exploits)."""
    x = rng.standard_normal((n_rows, k)) @ (np.eye(k) + 0.9 * rng.standard_normal((k, k)) / np.sqrt(k))
    return jnp.asarray(x.T @ x, jnp.float32), x


def test_gptq_keeps_two_level_scales_and_beats_rtn():
    rng = np.random.default_rng(1)
    w = _kernel(rng)
    h, x = _hessian(rng, w.shape[0])
    out = gptq({"kernel": w}, h, W2)
    r = rtn({"kernel": w}, W2)
    np.testing.assert_array_equal(np.asarray(out["qweight"].scales), np.asarray(r["qweight"].scales))  # static
    np.testing.assert_array_equal(np.asarray(out["qunit"]), np.asarray(r["qunit"]))
    ratio = np.asarray(out["qweight"].scales) / np.asarray(out["qunit"])[:, None]
    np.testing.assert_allclose(ratio, np.round(ratio), atol=1e-5)
    assert 1 <= np.round(ratio).min() and np.round(ratio).max() <= L

    def err(kq):
        return float(np.sum((x @ (np.asarray(kq) - np.asarray(w))) ** 2))

    assert err(out["kernel"]) < 0.8 * err(r["kernel"])


def test_gptq_weight_clip_search_scales_the_unit():
    rng = np.random.default_rng(2)
    w = _kernel(rng)
    h, _ = _hessian(rng, w.shape[0])
    clips = (1.0, 0.9, 0.8, 0.7)
    _, _, info = gptq_quantize_kernel(w, h, W2, weight_clips=clips)
    base = quantize_int4_two_level(w.T, 32, L).unit[:, 0]
    factors = np.asarray(info["unit"]) / np.asarray(base)
    picked = [min(clips, key=lambda c: abs(c - f)) for f in factors]
    np.testing.assert_allclose(factors, picked, rtol=1e-6)
    assert len(set(picked)) > 1  # the search picks per channel
    with pytest.raises(ValueError, match="need static_groups=True"):
        gptq_quantize_kernel(w, h, W2, static_groups=False)


def _arrays(rng, cfg, w_nk, r=8):
    k, n = cfg.in_features, cfg.out_features
    a = dict(
        bias=rng.standard_normal(n).astype(np.float32),
        smooth=rng.uniform(0.5, 2.0, k).astype(np.float32),
        down=jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.bfloat16),
        up=jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.bfloat16),
        act_clip=np.array([1.0, 0.8], np.float32),
    )
    if cfg.w_scale_levels is not None:
        t = quantize_int4_two_level(w_nk, cfg.w_group, cfg.w_scale_levels)
        qt = t.as_quantized_tensor().pack()
        a.update(qweight=qt.codes, wscale=qt.scales, wunit=t.unit[:, 0])
    else:
        from wanjax.numerics import formats

        qt = formats.quantize_int4(w_nk).pack()
        a.update(qweight=qt.codes, wscale=qt.scales)
    return a


CONFIGS = {
    "w2l_a8": dict(w_group=64, w_scale_levels=L, a_fmt="int8"),
    "w2l_a2l": dict(w_group=64, w_scale_levels=L, a_fmt="int4", a_group=64, a_scale_levels=L),
    "w_pc_a2l": dict(w_group=None, a_fmt="int4", a_group=64, a_scale_levels=L),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("rot", [False, True])
def test_real_mode_equals_fake_mode(name, rot, monkeypatch):
    rng = np.random.default_rng(3)
    k, n = 256, 64
    cfg = QLinearConfig(k, n, nbins=2, **CONFIGS[name])
    assert cfg.real_mode_problem() is None
    a = _arrays(rng, cfg, jnp.asarray(rng.standard_normal((n, k)), jnp.float32))
    if rot:
        a["rot_signs"] = np.where(rng.random(k) < 0.5, -1.0, 1.0).astype(np.float32)
    x = jnp.asarray(rng.standard_normal((3, 5, k)), jnp.float32)
    outs = {}
    for mode, backend in (("fake", None), ("real", "reference"), ("real", "xla")):
        if backend:
            monkeypatch.setenv("WANJAX_KERNELS", backend)
        with active_bin(1):
            outs[mode, backend] = np.asarray(QLinear(cfg, mode=mode, path="t", **a)(x).astype(jnp.float32))
    np.testing.assert_array_equal(outs["real", "xla"], outs["real", "reference"])
    fake = outs["fake", None]
    np.testing.assert_allclose(outs["real", "reference"], fake, atol=2**-7 * np.abs(fake).max(), rtol=2**-7)


def test_real_mode_is_the_group_scaled_product(monkeypatch):
    """float32 compute, no branch, no bias: real mode's integer GEMM is the float64 product of the dequantized
    two-level operands to float32 rounding (the group scales cost no accuracy on the per-channel GEMM)."""
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    rng = np.random.default_rng(4)
    k, n, g = 256, 32, 64
    cfg = QLinearConfig(k, n, "int4", g, "int4", g, w_scale_levels=L, a_scale_levels=L)
    w = jnp.asarray(rng.standard_normal((n, k)) * np.repeat(10 ** rng.uniform(-2, 0, (n, k // g)), g, 1), jnp.float32)
    t = quantize_int4_two_level(w, g, L)
    qt = t.as_quantized_tensor().pack()
    layer = QLinear(
        cfg,
        qweight=qt.codes,
        wscale=qt.scales,
        wunit=t.unit[:, 0],
        act_clip=np.array([0.9], np.float32),
        dtype=jnp.float32,
        mode="real",
    )
    x = jnp.asarray(rng.standard_normal((7, k)) * np.repeat(10 ** rng.uniform(-2, 0, (7, k // g)), g, 1), jnp.float32)
    y = np.asarray(layer(x), np.float64)
    xq = np.asarray(quantize_int4_two_level(x, g, L, clip=0.9).dequantize(), np.float64)
    want = xq @ np.asarray(t.dequantize(), np.float64).T
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_prepared_int8_weights_are_the_carried_codes(monkeypatch):
    from flax import nnx

    from wanjax.quant.apply import prepare_kernel_weights

    monkeypatch.setenv("WANJAX_KERNELS", "xla")
    rng = np.random.default_rng(5)
    cfg = QLinearConfig(128, 64, "int4", 32, "int8", w_scale_levels=L, nbins=2)
    w = jnp.asarray(rng.standard_normal((64, 128)), jnp.float32)
    layer = QLinear(cfg, mode="real", path="blocks.t", **_arrays(rng, cfg, w))

    class Holder(nnx.Module):
        def __init__(self, q):
            self.q = q

    prepared = prepare_kernel_weights(Holder(layer), int4=True).q
    t = quantize_int4_two_level(w, 32, L)
    np.testing.assert_array_equal(np.asarray(prepared.kweight[...]), np.asarray(t.carried()))
    np.testing.assert_array_equal(np.asarray(prepared.kscale[...]), np.asarray(t.unit[:, 0]))
    kw, ks = carried_weights(cfg, layer.arrays())
    np.testing.assert_array_equal(np.asarray(kw), np.asarray(t.carried()))
    x = jnp.asarray(rng.standard_normal((9, 128)), jnp.float32)
    with active_bin(0):
        np.testing.assert_array_equal(np.asarray(prepared(x)), np.asarray(layer(x)))


def test_qlinear_needs_wunit_with_levels():
    rng = np.random.default_rng(6)
    cfg = QLinearConfig(64, 32, "int4", 32, "int8", w_scale_levels=L)
    a = _arrays(rng, cfg, jnp.asarray(rng.standard_normal((32, 64)), jnp.float32))
    a.pop("wunit")
    with pytest.raises(ValueError, match=r"wunit \[N\] \(two-level row units\) is required iff w_scale_levels"):
        QLinear(cfg, path="t", **{**a, "act_clip": np.ones(1, np.float32)})


def test_recipe_dicts_round_trip_and_old_dicts_unchanged():
    r = Recipe(
        "t",
        W2,
        ActQuantSpec("int4", group_size=32, scale_levels=12),
        (Smooth(0.5), LowRank(4), GPTQ(weight_clips=(1.0, 0.9)), ClipSearch((0.9, 1.0), (0,), per_bin=False)),
    )
    assert recipe_from_dict(recipe_to_dict(r)) == r
    plain = dataclasses.replace(r, weight=WeightQuantSpec("int4"), act=ActQuantSpec("int4"))
    d = recipe_to_dict(plain)
    assert "scale_levels" not in d["weight"] and "scale_levels" not in d["act"]
    assert recipe_from_dict(d) == plain


def test_quantize_layer_with_a_two_level_recipe(monkeypatch):
    rng = np.random.default_rng(7)
    k, n, nb = 128, 64, 2
    recipe = Recipe(
        "t2l",
        WeightQuantSpec("int4", group_size=64, scale_levels=L),
        ActQuantSpec("int4", group_size=64, scale_levels=L),
        (Smooth(0.5), Rotate(0, 64), LowRank(4), GPTQ(weight_clips=(1.0, 0.9)), ClipSearch((0.8, 1.0), (0,))),
    )
    rows = rng.standard_normal((nb, 64, k)).astype(np.float32) * rng.uniform(0.1, 4, k).astype(np.float32)
    inputs = LayerInputs(absmax=np.abs(rows).max(1), rows=rows)
    w = jnp.asarray(rng.standard_normal((k, n)) * 0.1, jnp.float32)
    cfg, arrays, info = quantize_layer(recipe, w, None, inputs, path="blocks.ffn.fc1")
    assert cfg.w_scale_levels == L and cfg.a_scale_levels == L and cfg.w_group == 64
    assert arrays["wunit"].shape == (n,) and cfg.real_mode_problem() is None
    assert np.all(np.asarray(info["sqnr_db"]) > 10)
    monkeypatch.setenv("WANJAX_KERNELS", "xla")
    x = jnp.asarray(rows[0, :16], jnp.float32)
    outs = {}
    for mode in ("fake", "real"):
        with active_bin(0):
            outs[mode] = np.asarray(QLinear(cfg, mode=mode, path="p", **arrays)(x).astype(jnp.float32))
    np.testing.assert_allclose(outs["real"], outs["fake"], atol=2**-7 * np.abs(outs["fake"]).max(), rtol=2**-7)


def test_artifact_round_trip_keeps_the_units(tmp_path):
    from flax import nnx

    from wanjax.config import TINY
    from wanjax.model.dit import WanDiT
    from wanjax.quant.apply import BLOCK_LINEARS, get_submodule, qlinears, quantize_model
    from wanjax.quant.artifact import load_artifact, save_artifact

    model = WanDiT(TINY, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    layers = {}
    for path in BLOCK_LINEARS:
        lin = get_submodule(model, path)
        kern = jnp.swapaxes(jnp.asarray(lin.kernel[...], jnp.float32), 1, 2)  # [L, N, K]
        nl, n, k = kern.shape
        t = quantize_int4_two_level(kern, 16, L)
        qt = t.as_quantized_tensor().pack()
        cfg = QLinearConfig(k, n, "int4", 16, "int4", 16, w_scale_levels=L, a_scale_levels=L)
        layers[path] = QLinear(
            cfg,
            qweight=qt.codes,
            wscale=qt.scales,
            wunit=t.unit[..., 0],
            bias=lin.bias[...],
            act_clip=jnp.ones((nl, 1)),
            path=path,
        )
    qmodel = quantize_model(model, layers)
    loaded, _ = load_artifact(save_artifact(tmp_path / "q", {"high": qmodel}))
    a = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(qmodel)))[0]
    b = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(loaded["high"])))[0]
    assert [p for p, _ in a] == [p for p, _ in b] and any("wunit" in str(p) for p, _ in a)
    for (p, x), (_, y) in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=str(p))
    assert {p: q.config for p, q in qlinears(loaded["high"]).items()} == {
        p: q.config for p, q in qlinears(qmodel).items()
    }


def test_eval_ablations_of_two_level_scales():
    from wanjax.evaluation.variants import ABLATIONS, ablation_variants
    from wanjax.quant.quantize import layer_config
    from wanjax.quant.recipes import get_recipe

    names = ["w4a8_wclip_g128l", "w4a8_wclip_g64l", "w4a8_g128l", "w4a8_g64l", "g128l", "g64l", "int4_g128"]
    assert set(names) <= set(ABLATIONS)
    by = {v.name: v.recipe for v in ablation_variants(names)}
    w8, d = get_recipe("w4a8"), get_recipe("default")
    for name, g in (("w4a8_wclip_g128l", 128), ("w4a8_wclip_g64l", 64)):
        r = by[name]
        assert r.weight == WeightQuantSpec("int4", group_size=g, scale_levels=L) and r.act == w8.act
        assert r.transforms == w8.transforms and next(t for t in r.transforms if isinstance(t, GPTQ)).weight_clips
        assert layer_config(r, 256, 64, 1).real_mode_problem() is None
    for name, g in (("g128l", 128), ("g64l", 64)):
        r = by[name]
        assert r.weight == WeightQuantSpec("int4", group_size=g, scale_levels=L)
        assert r.act == ActQuantSpec("int4", group_size=g, scale_levels=L)
        assert [type(t) for t in r.transforms] == [type(t) for t in d.transforms]
        c = layer_config(r, 256, 64, 1)
        assert (c.w_scale_levels, c.a_scale_levels, c.a_group) == (L, L, g) and c.real_mode_problem() is None
    assert by["int4_g128"].weight.scale_levels is None and by["int4_g128"].act.group_size == 128
    f32_pair = {v.name: v.recipe for v in ablation_variants(["w4a8_g128"])}["w4a8_g128"]
    assert by["w4a8_g128l"] == dataclasses.replace(
        f32_pair, name="w4a8-g128l", weight=dataclasses.replace(f32_pair.weight, scale_levels=L)
    )
