"""Low-rank refit after the quantizer (wanjax.quant.refit, recipes.LowRankRefit)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from wanjax.quant.lowrank import lowrank
from wanjax.quant.quantize import LayerInputs, quantize_layer
from wanjax.quant.recipes import GPTQ, LowRankRefit, Recipe, get_recipe, recipe_from_dict, recipe_to_dict
from wanjax.quant.refit import refit_lowrank
from wanjax.quant.rtn import ActQuantSpec, WeightQuantSpec, fake_quant_act, rtn

A_INT4 = ActQuantSpec("int4")


def _layer(seed, k=96, n=80, rows=400, rank=8):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w += (rng.standard_normal((k, 4)) @ rng.standard_normal((4, n)) * 0.1).astype(np.float32)
    scale = np.exp(rng.standard_normal(k))  # drawn before the rows: the same channel scales for any row count
    x = (rng.standard_normal((rows, k)) * scale).astype(np.float32)
    x[:, 5] *= 20.0
    p = lowrank({"kernel": jnp.asarray(w)}, rank, jnp.float32)
    residual = p["kernel"]
    q = rtn(p, WeightQuantSpec("int4"))
    return jnp.asarray(w), jnp.asarray(x), residual, q


def _out_err(params, w, x, with_act):
    xq = fake_quant_act(x, A_INT4) if with_act else x
    xb = x.astype(jnp.bfloat16).astype(jnp.float32)  # the branch sees bf16 inputs
    y = xq @ params["kernel"] + xb @ (params["down"] @ params["up"])
    return float(jnp.sum((x @ w - y) ** 2) / jnp.sum((x @ w) ** 2))


@pytest.mark.parametrize("target,with_act", [("weight", False), ("output", True)])
def test_refit_lowers_the_layer_error_it_targets(target, with_act):
    w, x, residual, q = _layer(0)
    out, info = refit_lowrank(q, residual, x, A_INT4 if with_act else None, target=target)
    assert info["kept"] and info["after"] < info["before"]
    before, after = _out_err(q, w, x, with_act), _out_err(out, w, x, with_act)
    np.testing.assert_allclose([before, after], [info["before"], info["after"]], rtol=1e-3)
    assert after < 0.9 * before, (before, after)
    assert out["down"].shape == q["down"].shape and out["up"].shape == q["up"].shape
    np.testing.assert_array_equal(np.asarray(out["kernel"]), np.asarray(q["kernel"]))  # codes untouched
    assert out["qweight"] is q["qweight"]


@pytest.mark.parametrize("target,with_act", [("weight", False), ("weight", True), ("output", True)])
def test_refit_generalizes_to_fresh_rows_from_the_same_distribution(target, with_act):
    w, x, residual, q = _layer(1, rows=600)
    out, _ = refit_lowrank(q, residual, x, A_INT4 if with_act else None, target=target)
    _, x2, _, _ = _layer(1, rows=1600)
    x2 = x2[600:]  # same channel scales (same seed), rows not seen by the refit
    assert _out_err(out, w, x2, with_act) < _out_err(q, w, x2, with_act)


def test_refit_without_quantization_error_changes_nothing_that_matters():
    """No quantization error (the 'quantized' residual is the residual): the old branch is already optimal up to the
    bf16 rounding of the branch's input, and the refit stays as good."""
    w, x, residual, q = _layer(2)
    exact = {**q, "kernel": residual}
    _, info = refit_lowrank(exact, residual, x, None, target="weight")
    assert info["before"] < 1e-5 and info["after"] < 1e-5, info


def test_refit_errors():
    w, x, residual, q = _layer(3)
    with pytest.raises(ValueError, match="no low-rank branch"):
        refit_lowrank({"kernel": q["kernel"]}, residual, x, None)
    with pytest.raises(ValueError, match="target must be"):
        refit_lowrank(q, residual, x, None, target="both")
    with pytest.raises(ValueError, match="percdamp must be > 0"):
        refit_lowrank(q, residual, x, None, percdamp=0.0)
    with pytest.raises(ValueError, match=r"expected rows \[n, K=96\]"):
        refit_lowrank(q, residual, x[:, :10], None)
    with pytest.raises(ValueError, match="target must be"):
        LowRankRefit(target="x")


def test_recipe_with_refit_round_trips_orders_and_raises_layer_sqnr():
    d = get_recipe("default")
    ts = list(d.transforms)
    i = next(j for j, t in enumerate(ts) if isinstance(t, GPTQ)) + 1
    r = dataclasses.replace(d, name="refit", transforms=tuple(ts[:i] + [LowRankRefit()] + ts[i:]))
    assert recipe_from_dict(recipe_to_dict(r)) == r
    with pytest.raises(ValueError, match="order must be"):
        Recipe("bad", d.weight, d.act, (LowRankRefit(), GPTQ()))
    rng = np.random.default_rng(4)
    k, n = 128, 64
    rows = (rng.standard_normal((3, 128, k)) * np.exp(rng.standard_normal(k))).astype(np.float32)
    inp = LayerInputs(absmax=np.abs(rows).max(1), rows=rows)
    kern = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    _, _, base = quantize_layer(d, kern, None, inp)
    _, arrays, ref = quantize_layer(r, kern, None, inp)
    assert np.mean(ref["sqnr_db"]) > np.mean(base["sqnr_db"])  # on the calibration rows
    assert arrays["down"].dtype == jnp.bfloat16
