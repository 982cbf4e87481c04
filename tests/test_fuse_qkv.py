"""The recipe option ``fuse_qkv``: one activation quantization shared by the self-attention q / k / v, run as ONE
fused QLinear (`wanjax.quant.fuse`).

Why the fused layer equals the three separate layers (same smoothing, rotation and activation table): every output
column is the same computation. The activation quantization (smooth, rotate, per-token scale, codes) is one function
of the input row, identical for all three; the W4A4 product is an exact integer dot product per (row, column) times
per-row and per-column scales; the low-rank branch computes ``x_r @ [down_q | down_k | down_v]`` (the same columns)
and then ``x_lr @ blockdiag(up_q, up_k, up_v)``, which adds exact zeros to each part's own terms. So the results agree
exactly up to the summation order a backend picks for the float parts: asserted bit-identical where the tests find
it so on the CPU (real mode through the references, fake mode in bf16), and to float32 rounding in fake float32
mode, where XLA's CPU dot sums a ``[K, 3N]`` product in another order than a ``[K, N]`` one.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import tiny_dit

from wanjax.config import TINY
from wanjax.numerics import formats
from wanjax.quant.apply import active_bin, get_submodule, qlinears, quantize_model, set_mode
from wanjax.quant.artifact import load_artifact, save_artifact
from wanjax.quant.fuse import fuse_arrays, layer_units, split_fused_output
from wanjax.quant.qlinear import QLinear, QLinearConfig, qlinear_apply
from wanjax.quant.quantize import LayerInputs, quantize, quantize_fused_layer, quantize_layer
from wanjax.quant.recipes import (
    GPTQ,
    RTN,
    ClipSearch,
    LowRank,
    Recipe,
    Rotate,
    Smooth,
    get_recipe,
    recipe_from_dict,
    recipe_to_dict,
)
from wanjax.quant.rtn import ActQuantSpec, WeightQuantSpec
from wanjax.quant.smooth import smoothing_scales

QKV = ("blocks.self_attn.q", "blocks.self_attn.k", "blocks.self_attn.v")
FUSED = "blocks.self_attn.qkv"
CFG1 = TINY.replace(num_layers=1)


def shared_parts(k=128, ns=(64, 64, 64), ranks=(4, 8, 6), nbins=2, rot=True, a_fmt="int4", seed=0):
    """Three int4 layers (configs, arrays) that share smoothing, rotation signs and activation clips, each with its
    own codes, scales, bias and low-rank branch (ranks differ so the block-diagonal up is visible)."""
    rng = np.random.default_rng(seed)
    smooth = rng.uniform(0.5, 2.0, k).astype(np.float32)
    signs = np.where(rng.random(k) < 0.5, -1.0, 1.0).astype(np.float32) if rot else None
    clip = np.array([1.0, 0.8][:nbins], np.float32)
    configs, arrays = [], []
    for n, r in zip(ns, ranks):
        qt = formats.quantize_int4(jnp.asarray(rng.standard_normal((n, k)), jnp.float32)).pack()
        configs.append(QLinearConfig(k, n, "int4", None, a_fmt, None, nbins=nbins, rot_block=64 if rot else None))
        arrays.append(
            dict(
                qweight=qt.codes,
                wscale=qt.scales,
                wtensor_scale=None,
                bias=rng.standard_normal(n).astype(np.float32),
                smooth=smooth,
                rot_signs=signs,
                down=jnp.asarray(rng.standard_normal((k, r)) * 0.1, jnp.bfloat16),
                up=jnp.asarray(rng.standard_normal((r, n)) * 0.1, jnp.bfloat16),
                act_clip=clip,
                act_exp_offset=np.zeros(nbins, np.int32),
                act_scale=None,
            )
        )
    return configs, arrays


def apply(c, a, x, b, mode, dtype):
    return np.asarray(
        qlinear_apply(c, a, jnp.asarray(x), a["act_clip"][b], 0, None, dtype=dtype, mode=mode).astype(jnp.float32)
    )


@pytest.mark.parametrize(
    "mode,dtype,a_fmt",
    [
        ("fake", jnp.bfloat16, "int4"),
        ("real", jnp.bfloat16, "int4"),
        ("fake", jnp.float32, "int8"),
        ("real", jnp.float32, "int8"),
    ],
)
def test_fused_equals_three_separate_layers(mode, dtype, a_fmt, monkeypatch):
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    configs, arrays = shared_parts(a_fmt=a_fmt)
    cf, af = fuse_arrays(configs, arrays, FUSED)
    assert (cf.in_features, cf.out_features) == (128, 192) and af["down"].shape == (128, 18)
    assert af["up"].shape == (18, 192)
    x = np.random.default_rng(1).standard_normal((2, 9, 128)).astype(np.float32) * 3
    for b in (0, 1):
        fused = apply(cf, af, x, b, mode, dtype)
        sep = np.concatenate([apply(c, a, x, b, mode, dtype) for c, a in zip(configs, arrays)], axis=-1)
        assert fused.shape == sep.shape == (2, 9, 192)
        if mode == "fake" and dtype == jnp.float32:
            # fake fp32: XLA's CPU dot may sum a [K, 192] and a [K, 64] product in another order (float32 rounding,
            # seen at ~2^-22 of the output scale; any fusion error is >= 2^-8, the weights' and up's own scale)
            np.testing.assert_allclose(fused, sep, rtol=0, atol=2**-18 * np.abs(sep).max())
        else:
            np.testing.assert_array_equal(fused, sep)  # exact: see the module docstring
        for part, want in zip(split_fused_output(jnp.asarray(fused), [64, 64, 64]), np.split(fused, 3, axis=-1)):
            np.testing.assert_array_equal(np.asarray(part), want)


def test_fused_real_matches_fake_through_the_references(monkeypatch):
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    cf, af = fuse_arrays(*shared_parts())
    x = np.random.default_rng(3).standard_normal((3, 11, 128)).astype(np.float32)
    for b in (0, 1):
        fake = apply(cf, af, x, b, "fake", jnp.bfloat16)
        real = apply(cf, af, x, b, "real", jnp.bfloat16)
        scale = np.abs(fake).max()
        np.testing.assert_allclose(real, fake, atol=2**-7 * scale, rtol=2**-7)  # as test_qlinear's per-layer bound
        # a mis-fused layer (the k part's up rows moved to the q columns) would be far off
        bad = dict(af, up=jnp.roll(af["up"], 64, axis=-1))
        assert np.abs(apply(cf, bad, x, b, "real", jnp.bfloat16) - fake).max() > 2**-5 * scale


@pytest.mark.parametrize("backend", ["reference", "xla"])
def test_equal_parts_run_one_gemm_per_part_with_the_same_numbers(backend, monkeypatch):
    """Equal parts (same N and rank, as q / k / v) set ``parts=3``: real mode quantizes once and runs three GEMMs on
    the rank slices, bitwise the single GEMM over the block-diagonal ``up`` (whose extra terms are exact zeros) and
    the three separate layers."""
    monkeypatch.setenv("WANJAX_KERNELS", backend)
    configs, arrays = shared_parts(ranks=(16, 16, 16))
    cf, af = fuse_arrays(configs, arrays, FUSED)
    assert cf.parts == 3 and fuse_arrays(*shared_parts())[0].parts == 1  # unequal ranks: one GEMM
    one = dataclasses.replace(cf, parts=1)
    x = np.random.default_rng(4).standard_normal((2, 7, 128)).astype(np.float32) * 2
    for b in (0, 1):
        split = apply(cf, af, x, b, "real", jnp.bfloat16)
        np.testing.assert_array_equal(split, apply(one, af, x, b, "real", jnp.bfloat16))
        sep = np.concatenate([apply(c, a, x, b, "real", jnp.bfloat16) for c, a in zip(configs, arrays)], axis=-1)
        np.testing.assert_array_equal(split, sep)
    # a mis-fused up (the parts' blocks moved) changes the split path too: it reads only the diagonal blocks
    bad = dict(af, up=jnp.roll(af["up"], 64, axis=-1))
    assert np.abs(apply(cf, bad, x, 0, "real", jnp.bfloat16) - split).max() > 0
    with pytest.raises(ValueError, match="parts must be >= 1 and divide out_features=192"):
        dataclasses.replace(cf, parts=5)


def planted_group(k=128, n=64, seed=5):
    """Three float kernels [K, N] (different ranges, one with planted large input rows) and one shared input."""
    rng = np.random.default_rng(seed)
    ws = [(rng.standard_normal((k, n)) * g / np.sqrt(k)).astype(np.float32) for g in (1.0, 0.5, 2.0)]
    ws[2][rng.choice(k, 4, replace=False)] *= 8.0
    rows = rng.standard_normal((2, 48, k)).astype(np.float32)
    rows[:, :, rng.choice(k, 3, replace=False)] *= 30.0
    inp = LayerInputs(absmax=np.abs(rows).max(1), rows=rows, hessian=None)
    biases = [rng.standard_normal(n).astype(np.float32) for _ in ws]
    return ws, biases, inp


#: the default's transforms with RTN instead of GPTQ and a 2-clip grid (the fused path is the same, the test faster)
QUICK = Recipe(
    "quick",
    WeightQuantSpec("int4"),
    ActQuantSpec("int4"),
    (Smooth(0.5), Rotate(0, 64), LowRank(32, method="randomized"), RTN(), ClipSearch((0.8, 1.0), (0,), per_bin=False)),
    calibration="shared",
    fuse_qkv=True,
)


def test_joint_smoothing_and_per_part_quantization():
    ws, biases, inp = planted_group()
    r = QUICK
    cf, af, info = quantize_fused_layer(r, ws, biases, inp, path=FUSED, parts=QKV)
    assert (cf.in_features, cf.out_features) == (128, 192) and info["sqnr_db"].shape == (2,)
    # one smoothing vector from the shared input's abs-max and the max over the three weights
    a = np.abs(inp.rows).max(axis=(0, 1))
    wmax = np.max([np.abs(w).max(axis=1) for w in ws], axis=0)
    want = smoothing_scales(jnp.asarray(a), jnp.asarray(wmax[:, None]), 0.5)
    np.testing.assert_allclose(np.asarray(af["smooth"]), np.asarray(want), rtol=1e-6)
    assert af["rot_signs"].shape == (128,) and af["act_clip"].shape == (2,)
    assert af["down"].shape == (128, 96) and af["up"].shape == (96, 192)
    up = np.asarray(af["up"].astype(jnp.float32))
    assert not up[:32, 64:].any() and not up[32:64, :64].any() and not up[32:64, 128:].any()  # block-diagonal


def test_without_joint_transforms_the_parts_are_the_separate_layers():
    """A recipe with no smoothing / rotation: the fused group's codes, scales and branches are exactly the three
    separately quantized layers' (GPTQ and the low-rank branch run per part; the one table is searched jointly)."""
    ws, biases, inp = planted_group()
    r = Recipe(
        "plain", WeightQuantSpec("int4"), ActQuantSpec("int4"), (LowRank(8), GPTQ(), ClipSearch((0.8, 1.0), (0,)))
    )
    _, af, _ = quantize_fused_layer(dataclasses.replace(r, fuse_qkv=True), ws, biases, inp, path=FUSED, parts=QKV)
    seps = [quantize_layer(r, w, b, inp, path=p)[1] for w, b, p in zip(ws, biases, QKV)]
    for name, axis in (("qweight", 0), ("wscale", 0), ("bias", 0), ("down", 1)):
        np.testing.assert_array_equal(np.asarray(af[name]), np.concatenate([np.asarray(s[name]) for s in seps], axis))
    for i, s in enumerate(seps):
        np.testing.assert_array_equal(
            np.asarray(af["up"][8 * i : 8 * i + 8, 64 * i : 64 * i + 64]), np.asarray(s["up"])
        )


@pytest.fixture(scope="module")
def fused_tiny():
    model, x, ctx = tiny_dit(CFG1, 1)
    rng = np.random.default_rng(0)

    class Stats:  # one shared input for q / k / v (as the calibration captures it), planted outliers
        def layer(self, expert, path, index):
            k = get_submodule(model, path).in_features
            rows = rng.standard_normal((3, 32, k)).astype(np.float32)
            rows[:, :, :2] *= 20
            return LayerInputs(absmax=np.abs(rows).max(1), rows=rows)

    q, rep = quantize({"high": model}, QUICK, Stats(), progress=False, paths=QKV)
    return model, q["high"], rep["high"], x, ctx


@jax.jit
def _run(st, b, x, ctx, *, g):
    with active_bin(b):
        return nnx.merge(g, st)(x, jnp.array([800.0]), ctx)


_run = jax.jit(_run.__wrapped__, static_argnames="g")  # one compilation per module graph (the loaded one reuses it)


def forward(m, x, ctx, b=1):
    g, st = nnx.split(m)
    return np.asarray(_run(st, jnp.int32(b), x, ctx, g=g))


def test_model_runs_one_fused_layer_fake_and_real(fused_tiny, monkeypatch):
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    model, qm, rep, x, ctx = fused_tiny
    assert list(qlinears(qm)) == [FUSED] and list(rep["sqnr_db"]) == [FUSED]
    attn = qm.blocks.self_attn
    assert not hasattr(attn, "q") and not hasattr(attn, "k") and not hasattr(attn, "v")
    assert (attn.qkv.in_features, attn.qkv.out_features) == (64, 192) and attn.qkv.qweight.shape == (1, 192, 32)
    y_ref, y_f = forward(model, x, ctx), forward(qm, x, ctx)
    y_r = forward(set_mode(qm, "real"), x, ctx)
    rel = np.linalg.norm(y_f - y_ref) / np.linalg.norm(y_ref)
    assert 0 < rel < 0.2, rel
    np.testing.assert_allclose(y_r, y_f, rtol=1e-3, atol=1e-3 * np.abs(y_f).max())  # fp32 model, as test_qlinear


def test_artifact_round_trip(fused_tiny, tmp_path):
    _, qm, _, x, ctx = fused_tiny
    save_artifact(tmp_path / "q", {"high": qm}, recipe=recipe_to_dict(QUICK))
    loaded, manifest = load_artifact(tmp_path / "q")
    assert recipe_from_dict(manifest["recipe"]).fuse_qkv is True
    lq = loaded["high"]
    assert list(qlinears(lq)) == [FUSED] and not hasattr(lq.blocks.self_attn, "q")
    for (pa, a), (pb, b) in zip(
        jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(qm)))[0],
        jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(lq)))[0],
    ):
        assert pa == pb and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(forward(lq, x, ctx), forward(qm, x, ctx))


def test_recipe_option_round_trip_and_default_dict():
    r = dataclasses.replace(get_recipe("w4a8"), fuse_qkv=True)
    d = recipe_to_dict(r)
    assert d["fuse_qkv"] is True and recipe_from_dict(d) == r
    assert "fuse_qkv" not in recipe_to_dict(get_recipe("default"))  # dicts of unfused recipes are unchanged
    assert recipe_from_dict(recipe_to_dict(get_recipe("default"))).fuse_qkv is False
    with pytest.raises(ValueError, match="fuse_qkv must be True or False"):
        dataclasses.replace(get_recipe("default"), fuse_qkv="yes")


def test_layer_units():
    from wanjax.model.names import BLOCK_LINEARS

    assert layer_units(BLOCK_LINEARS, False) == [(p, (p,)) for p in BLOCK_LINEARS]
    units = layer_units(BLOCK_LINEARS, True)
    assert units[0] == (FUSED, QKV) and [u[0] for u in units[1:]] == list(BLOCK_LINEARS[3:])
    with pytest.raises(ValueError, match="quantize all three or none"):
        layer_units(("blocks.self_attn.q", "blocks.self_attn.k", "blocks.ffn.fc1"), True)


def test_bad_inputs_have_clear_errors():
    ws, biases, inp = planted_group()
    r = dataclasses.replace(get_recipe("default"), fuse_qkv=True)
    # parts of different input widths (e.g. a cross-attention k / v group, or a mis-shaped checkpoint)
    with pytest.raises(ValueError, match="one input width K"):
        quantize_fused_layer(r, [ws[0], ws[1][:64], ws[2]], biases, inp, path=FUSED, parts=QKV)
    with pytest.raises(ValueError, match="all parts or none must have a bias"):
        quantize_fused_layer(r, ws, [biases[0], None, biases[2]], inp, path=FUSED, parts=QKV)
    # arrays of separately calibrated layers (own smoothing) cannot be fused
    configs, arrays = shared_parts()
    arrays[1] = dict(arrays[1], smooth=arrays[1]["smooth"] * 2)
    with pytest.raises(ValueError, match="another smooth than part 0"):
        fuse_arrays(configs, arrays, FUSED)
    configs, arrays = shared_parts()
    configs[2] = QLinearConfig(64, 64, nbins=2, rot_block=64)
    with pytest.raises(ValueError, match="one input width K"):
        fuse_arrays(configs, arrays, FUSED)
    # a fused layer of the wrong width for the model
    model = nnx.eval_shape(lambda: tiny_dit(CFG1, 0)[0])
    configs, arrays = shared_parts(k=64, ns=(64, 64, 32), ranks=(2, 2, 2), nbins=1, rot=False)
    cf, af = fuse_arrays(configs, arrays, FUSED)
    af = {n: None if v is None else jnp.asarray(v)[None] for n, v in af.items()}
    with pytest.raises(ValueError, match=r"fused 'blocks.self_attn.qkv'.*N=160"):
        quantize_model(model, {FUSED: QLinear(cf, path=FUSED, **af)})


def test_lora_on_a_fused_model_is_refused_by_name(fused_tiny):
    from wanjax import lora as L

    _, qm, _, _, _ = fused_tiny
    rng = np.random.default_rng(0)
    sd = {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": rng.standard_normal((4, 64)).astype(np.float32),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": rng.standard_normal((64, 4)).astype(np.float32),
    }
    lw = L.parse_lora(sd, CFG1)
    with pytest.raises(L.LoraError, match="part of the fused 'blocks.self_attn.qkv'.*fuse_qkv"):
        L.lora_model(qm, [(lw, 1.0)])


def test_sharding_rule_of_the_fused_layer():
    from wanjax.parallel.rules import param_logical_axes

    # N = [q | k | v] stays whole (not split over the heads axis), K as the parts' (embed)
    assert param_logical_axes("blocks.self_attn.qkv.qweight", (40, 15360, 2560)) == ("layers", None, "embed")
    assert param_logical_axes("blocks.self_attn.qkv.down", (40, 5120, 96)) == ("layers", "embed", None)
    assert param_logical_axes("blocks.self_attn.q.qweight", (40, 5120, 2560)) == ("layers", "heads", "embed")
