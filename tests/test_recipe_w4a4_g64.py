"""The named recipe ``w4a4_g64`` (two-level INT4 group-64 weights and activations, rank-64 branch): its formats are
those of the eval ablation ``g64l`` it grew from, it survives the artifact's dict, and a tiny DiT quantized with it
runs in real mode (the per-channel integer GEMM on carried codes, here its reference) as in fake mode."""

import numpy as np
from test_recipes import CFG1, SynthStats

from helpers import fake_and_real, tiny_dit
from wanjax.evaluation.variants import ablation_variants
from wanjax.numerics.two_level import MAX_SCALE_LEVELS
from wanjax.quant.apply import qlinears
from wanjax.quant.quantize import quantize
from wanjax.quant.recipes import LowRank, get_recipe, recipe_from_dict, recipe_to_dict


def test_formats_and_dict_round_trip():
    r = get_recipe("w4a4_g64")
    (abl,) = ablation_variants(["g64l"])
    assert (r.weight, r.act) == (abl.recipe.weight, abl.recipe.act)
    assert r.weight.group_size == r.act.group_size == 64 and r.weight.scale_levels == MAX_SCALE_LEVELS
    assert [t.rank for t in r.transforms if isinstance(t, LowRank)] == [64]
    assert recipe_from_dict(recipe_to_dict(r)) == r
    assert r.attention == get_recipe("default").attention


def test_real_mode_equals_fake_mode(monkeypatch):
    model, x, ctx = tiny_dit(CFG1, 1)
    paths = ("blocks.self_attn.q", "blocks.ffn.fc1", "blocks.ffn.fc2")
    q, _ = quantize({"high": model}, get_recipe("w4a4_g64"), SynthStats(model), progress=False, paths=paths)
    cfgs = {p: ql.config for p, ql in qlinears(q["high"]).items()}
    assert set(cfgs) == set(paths) and all(c.two_level and c.a_scale_levels == MAX_SCALE_LEVELS for c in cfgs.values())
    assert cfgs["blocks.ffn.fc2"].real_mode_problem() is None
    monkeypatch.setenv("WANJAX_KERNELS", "reference")
    y = fake_and_real(q["high"], x, ctx)
    np.testing.assert_allclose(y["real"], y["fake"], atol=0.02 * np.abs(y["fake"]).max())
