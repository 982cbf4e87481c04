"""Recipe.weight_overrides: per-layer-path weight formats (mixed precision), through quantize_layer, quantize,
the fused q/k/v group and the artifact's recipe check."""

import dataclasses

import numpy as np
import pytest
from test_recipes import CFG1, SynthStats, inputs_from_rows, planted_rows

from helpers import fake_and_real, tiny_dit
from wanjax.quant.apply import qlinears
from wanjax.quant.artifact import ArtifactError, load_artifact, save_artifact
from wanjax.quant.quantize import quantize, quantize_fused_layer, quantize_layer
from wanjax.quant.recipes import GPTQ, ClipSearch, Recipe, get_recipe, recipe_from_dict, recipe_to_dict
from wanjax.quant.rtn import ActQuantSpec, WeightQuantSpec

W8 = WeightQuantSpec("int8")


def _mixed(base="w4a8", pattern=r"ffn\.fc2"):
    return dataclasses.replace(get_recipe(base), name=f"{base}_w8", weight_overrides=((pattern, W8),))


def test_for_path_round_trip_and_validation():
    r = _mixed()
    assert r.for_path("blocks.ffn.fc2").weight == W8 and r.for_path("blocks.ffn.fc2").weight_overrides == ()
    assert r.for_path("blocks.ffn.fc1") is r and r.for_path("blocks.self_attn.q").weight.fmt == "int4"
    first = dataclasses.replace(r, weight_overrides=((r"ffn", W8), (r"fc2", WeightQuantSpec("int4", group_size=64))))
    assert first.for_path("blocks.ffn.fc2").weight == W8  # the first match wins
    assert recipe_from_dict(recipe_to_dict(r)) == r
    assert "weight_overrides" not in recipe_to_dict(get_recipe("w4a8"))  # dicts written before the field: unchanged
    with pytest.raises(ValueError, match="weight_overrides must be"):
        dataclasses.replace(r, weight_overrides=(("ffn", "int8"),))
    with pytest.raises(ValueError, match="regex '\\(' is invalid"):
        dataclasses.replace(r, weight_overrides=(("(", W8),))


def test_quantize_layer_takes_the_override_for_its_path():
    """The matching layer is quantized exactly as the recipe with that weight format; other paths are untouched."""
    rng = np.random.default_rng(3)
    k, n = 128, 64
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    inp = inputs_from_rows(planted_rows(k, 5))
    r = _mixed()
    cfg8, a8, i8 = quantize_layer(r, w, None, inp, path="blocks.ffn.fc2")
    ref = dataclasses.replace(get_recipe("w4a8"), weight=W8)
    cfg8_ref, a8_ref, _ = quantize_layer(ref, w, None, inp, path="blocks.ffn.fc2")  # rotation signs: drawn per path
    assert cfg8.w_fmt == "int8" and cfg8 == cfg8_ref
    np.testing.assert_array_equal(np.asarray(a8["qweight"]), np.asarray(a8_ref["qweight"]))
    cfg4, a4, i4 = quantize_layer(r, w, None, inp, path="blocks.ffn.fc1")
    assert cfg4.w_fmt == "int4" and cfg4 == quantize_layer(get_recipe("w4a8"), w, None, inp, path="blocks.ffn.fc1")[0]
    assert np.mean(i8["sqnr_db"]) > np.mean(i4["sqnr_db"]) + 3  # 8-bit weights: a clearly better layer


def test_quantize_marks_only_the_matching_layers_and_the_artifact_checks_them(tmp_path, monkeypatch):
    model, x, ctx = tiny_dit(CFG1, 1)
    r = _mixed(base="rtn", pattern=r"ffn\.fc2|cross_attn\.o")
    paths = ("blocks.ffn.fc1", "blocks.ffn.fc2", "blocks.cross_attn.o", "blocks.self_attn.o")
    q, _ = quantize({"high": model}, r, SynthStats(model), progress=False, paths=paths)
    fmts = {p: ql.config.w_fmt for p, ql in qlinears(q["high"]).items()}
    assert fmts == {"blocks.ffn.fc1": "int4", "blocks.ffn.fc2": "int8", "blocks.cross_attn.o": "int8",
                    "blocks.self_attn.o": "int4"}  # fmt: skip
    # the mixed model runs in real mode (integer kernels, here their references) as in fake mode
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    y = fake_and_real(q["high"], x, ctx)
    np.testing.assert_allclose(y["real"], y["fake"], atol=0.02 * np.abs(y["fake"]).max())
    qdir = save_artifact(tmp_path / "q", q, recipe=recipe_to_dict(r))
    loaded, manifest = load_artifact(qdir)
    assert {p: ql.config.w_fmt for p, ql in qlinears(loaded["high"]).items()} == fmts
    assert recipe_from_dict(manifest["recipe"]) == r
    # the same layers saved with the recipe without the override: the int8 layers do not match it
    bad = recipe_to_dict(dataclasses.replace(r, weight_overrides=()))
    with pytest.raises(ArtifactError, match="w_fmt='int8'"):
        save_artifact(tmp_path / "q2", q, recipe=bad)


def test_fused_group_needs_one_weight_format():
    rng = np.random.default_rng(0)
    k, n = 64, 32
    ws = [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32) for _ in range(3)]
    inp = inputs_from_rows(planted_rows(k, 2))
    base = Recipe("p", WeightQuantSpec("int4"), ActQuantSpec("int8"), (GPTQ(), ClipSearch((1.0,), (0,))), fuse_qkv=True)
    parts = ("blocks.self_attn.q", "blocks.self_attn.k", "blocks.self_attn.v")
    whole = dataclasses.replace(base, weight_overrides=((r"self_attn", W8),))
    cfg, _, _ = quantize_fused_layer(whole, ws, [None] * 3, inp, path="blocks.self_attn.qkv", parts=parts)
    assert cfg.w_fmt == "int8" and cfg.out_features == 3 * n
    split = dataclasses.replace(base, weight_overrides=((r"self_attn\.k", W8),))
    with pytest.raises(ValueError, match="different weight formats"):
        quantize_fused_layer(split, ws, [None] * 3, inp, path="blocks.self_attn.qkv", parts=parts)
