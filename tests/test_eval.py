"""`wanjax eval` (wanjax.evaluation): metrics vs references, statistics regrouping, and the fast CI variant of the
driver on a TINY pipeline with planted outlier channels (2 recipes, 1 clip)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from wanjax.config import TINY
from wanjax.metrics import gaussian_window, psnr, relative_l2, sqnr_db, ssim
from wanjax.evaluation.run import EvalSample, check_disjoint, load_samples, run_eval
from wanjax.evaluation.variants import ABLATIONS, ablation_variants, recipe_variants
from wanjax.evaluation.sqnr import RebinnedSource, step_bins
from wanjax.quant.quantize import SharedExpertSource
from wanjax.quant.bins import seed_bins, uniform_bins
from wanjax.quant.stats import LayerStats
from wanjax.sampling import flow_schedule


# ----------------------------------------------------------------------------------------------------- metrics
def _torch_ssim(a, b, peak, win=11, sigma=1.5):
    """Independent reference: depthwise conv2d with the 2-D Gaussian window (valid), Wang et al. formula."""
    x = torch.tensor(np.asarray(a, np.float64)).permute(0, 3, 1, 2)
    y = torch.tensor(np.asarray(b, np.float64)).permute(0, 3, 1, 2)
    c = x.shape[1]
    g = torch.arange(win, dtype=torch.float64) - (win - 1) / 2
    g = torch.exp(-(g**2) / (2 * sigma**2))
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(c, 1, win, win).contiguous()
    f = lambda z: torch.nn.functional.conv2d(z, w, groups=c)  # noqa: E731
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    return float((((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))).mean())


def test_ssim_matches_torch_reference_and_properties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 24, 20, 3), dtype=np.uint8)
    noisy = np.clip(a.astype(np.int32) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    got = ssim(a, noisy)
    assert got == pytest.approx(_torch_ssim(a, noisy, 255.0), rel=1e-10, abs=1e-12)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)
    assert ssim(a, noisy) == pytest.approx(ssim(noisy, a), abs=1e-12)
    worse = np.clip(a.astype(np.int32) + rng.integers(-90, 91, a.shape), 0, 255).astype(np.uint8)
    assert ssim(a, worse) < got < 1.0
    f = rng.uniform(-1, 1, (16, 16, 3))
    assert ssim(f, f * 0.9, data_range=2.0) == pytest.approx(_torch_ssim(f[None], f[None] * 0.9, 2.0), rel=1e-10)
    np.testing.assert_allclose(gaussian_window().sum(), 1.0)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(a[:, :8], a[:, :8])
    with pytest.raises(ValueError, match="data_range is required"):
        ssim(f, f)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(a, a[:2])


def test_psnr_and_relative_l2():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    b = np.clip(a.astype(np.int32) + rng.integers(-5, 6, a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)  # the former train.evaluate.psnr, inline
    assert psnr(a, b) == pytest.approx(10.0 * np.log10(255.0**2 / mse), abs=1e-9)
    assert psnr(a, b, data_range=255.0) == psnr(a, b)
    assert psnr(a, a) == float("inf")
    x = np.zeros((4,)) + 1.0
    assert psnr(x, x + 0.1, data_range=1.0) == pytest.approx(20.0)
    assert relative_l2(np.array([3.0, 4.0]) * 1.1, np.array([3.0, 4.0])) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="all zeros"):
        relative_l2(np.ones(3), np.zeros(3))


def test_relative_l2_options_and_sqnr():
    """The benchmarks' variants of relative L2 (floor, inf for a non-finite output, per-slice) and SQNR in dB."""
    ref = np.array([[3.0, 4.0], [0.0, 1.0]])
    out = ref * np.array([[1.1], [1.5]])
    assert relative_l2(np.ones(3), np.zeros(3), floor=1e-30) == pytest.approx(np.sqrt(3) / 1e-30)
    assert relative_l2(np.array([np.nan, 1.0]), np.ones(2), nonfinite="inf") == float("inf")
    assert np.isnan(relative_l2(np.array([np.nan, 1.0]), np.ones(2)))
    np.testing.assert_allclose(relative_l2(out, ref, axis=1), [0.1, 0.5])
    assert relative_l2(out, ref) == pytest.approx(float(np.linalg.norm(out - ref) / np.linalg.norm(ref)))
    with pytest.raises(ValueError, match="nonfinite"):
        relative_l2(out, ref, nonfinite="zero")
    np.testing.assert_allclose(sqnr_db(np.array([100.0, 1.0]), np.array([1.0, 1.0])), [20.0, 0.0])
    assert sqnr_db(1.0, 0.0) == pytest.approx(3000.0)  # an exact layer: large and finite (floor 1e-300)


# ----------------------------------------------------------------------------------------- statistics regrouping
class FakeCalib:
    """Per-step statistics with known contents: step i's rows are all (i + 1) * channel index pattern."""

    def __init__(self, bins, k=4, n=6):
        self.bins, self.k, self.n = bins, k, n

    def get(self, expert, block, layer, b):
        if b == "all":
            return LayerStats(absmax=None, hessian=np.eye(self.k) * 7.0, count=np.int32(1), samples=None, seen=0)
        step = self.bins.steps[self.bins.names.index(b)][0]
        rows = np.tile((step + 1.0) * (np.arange(self.k) + 1.0), (self.n, 1)).astype(np.float32)
        rows[:, 0] += 100.0 * (expert == "low")
        return LayerStats(absmax=np.abs(rows).max(0), hessian=None, count=np.int32(self.n), samples=rows, seen=self.n)


def test_rebinned_source_groups_steps_into_bins():
    sched = flow_schedule(12, shift=5.0)
    fine = step_bins(sched)
    assert all(len(s) == 1 for s in fine.steps) and fine.num_bins == 12
    coarse = seed_bins(sched)
    src = RebinnedSource(FakeCalib(fine), coarse)
    li = src.layer("high", "blocks.ffn.fc2", 0)
    hb = coarse.expert_bins("high")
    assert li.rows.shape[0] == len(hb) and li.absmax.shape == (len(hb), 4)
    for j, name in enumerate(hb):
        last = coarse.steps[coarse.names.index(name)][-1]
        np.testing.assert_allclose(li.absmax[j], (last + 1.0) * np.arange(1, 5))
        steps_in = set(np.round(li.rows[j, :, 1] / 2.0 - 1).astype(int))
        assert steps_in <= set(coarse.steps[coarse.names.index(name)])
    np.testing.assert_allclose(li.hessian, np.eye(4) * 7.0)
    one = RebinnedSource(FakeCalib(fine), uniform_bins(sched, 1)).layer("low", "blocks.ffn.fc2", 0)
    assert one.rows.shape[0] == 1 and one.absmax[0, 0] > 100
    shared = SharedExpertSource(src)
    hi, lo = shared.layer("high", "blocks.ffn.fc2", 0), shared.layer("low", "blocks.ffn.fc2", 0)
    np.testing.assert_array_equal(hi.rows, lo.rows)
    assert np.any(hi.rows[..., 0] > 100) and np.any(hi.rows[..., 0] < 100)  # rows of both experts
    with pytest.raises(ValueError, match="lies in"):
        RebinnedSource(FakeCalib(seed_bins(sched)), fine)
    uneven = RebinnedSource(FakeCalib(fine), uniform_bins(sched, {"high": 1, "low": 2}))
    with pytest.raises(ValueError, match="high has 1 bins, low 2; pooling needs the same count"):
        SharedExpertSource(uneven).layer("high", "blocks.ffn.fc2", 0)


def test_variants_are_valid_recipes():
    vs = ablation_variants()
    assert [v.name for v in vs] == list(ABLATIONS)
    with pytest.raises(KeyError, match="no_alpha_search"):  # renamed: the default no longer searches alpha
        ablation_variants(["no_alpha_search"])
    assert {v.bins for v in vs} == {"seed", "6"}
    by = {v.name: v.recipe for v in vs}
    assert {n for n, r in by.items() if r.calibration == "per_expert"} == {
        "per_expert_calib",
        "per_bin_clips",
        "per_bin_clips_bins6",
    }
    gptq = lambda name: next(t for t in by[name].transforms if type(t).__name__ == "GPTQ")
    assert gptq("bin_balance").balance_bins and not gptq("rank64").balance_bins
    assert not any(type(t).__name__ == "LowRank" for t in by["no_lowrank"].transforms)
    kinds = lambda name: [type(t).__name__ for t in by[name].transforms]
    assert "GPTQ" in kinds("no_lowrank") and "RTN" not in kinds("no_lowrank")  # the default quantizes by GPTQ
    assert "RTN" in kinds("no_gptq") and "GPTQ" not in kinds("no_gptq")
    clip = lambda name: next(t for t in by[name].transforms if type(t).__name__ == "ClipSearch")
    assert clip("per_bin_clips").per_bin and not clip("rank64").per_bin and not clip("no_gptq").per_bin
    smooth = lambda name: next(t for t in by[name].transforms if type(t).__name__ == "Smooth")
    assert smooth("alpha_search").search and not smooth("rank16").search and smooth("fast").search
    assert "Smooth" not in kinds("no_smoothing") and kinds("no_smoothing")[0] == "Rotate"
    rot = lambda name: [t.block_size for t in by[name].transforms if type(t).__name__ == "Rotate"]
    assert "Rotate" not in kinds("no_rotation") and rot("rank16") == [256] and rot("rotate_max") == [None]
    assert not smooth("no_rotation").search and rot("fast") == [] and by["fast"].name == "fast"
    from wanjax.quant.recipes import get_recipe

    assert rot("rotate_b128") == [128]
    assert kinds("rotate_b64") == [type(t).__name__ for t in get_recipe("default").transforms]
    assert by["per_bin_clips"].name == "binned" and "GPTQ" in kinds("per_bin_clips")
    assert by["mxfp4"].weight.fmt == "mxfp4" and by["static"].act_mode == "static"
    assert (by["w4a8"].weight.fmt, by["w4a8"].act.fmt, by["w8a4"].weight.fmt, by["w8a4"].act.fmt) == (
        "int4",
        "int8",
        "int8",
        "int4",
    )
    assert kinds("w4a8") == kinds("w8a4") == kinds("rotate_b64")  # only the formats change
    gptq = lambda name: next(t for t in by[name].transforms if type(t).__name__ == "GPTQ")
    assert gptq("gptq_act_order").act_order and not gptq("rank64").act_order
    assert gptq("gptq_wclip").weight_clips and not gptq("gptq_act_order").weight_clips
    assert [v.name for v in recipe_variants(["rtn", "w8a8"])] == ["rtn", "w8a8"]
    with pytest.raises(KeyError, match="unknown ablations"):
        ablation_variants(["nope"])


# ----------------------------------------------------------------------------------------------- set files
def test_sample_files_and_disjointness(tmp_path):
    ev = tmp_path / "eval.json"
    ev.write_text(json.dumps([{"clip_seed": 1000}, {"clip_seed": 1001, "seed": 4}]))
    cal = tmp_path / "calib.jsonl"
    cal.write_text(json.dumps({"clip_seed": 5, "split": "train"}) + "\n")
    e = load_samples(str(ev), 5, 32)
    c = load_samples(str(cal), 5, 32)
    assert [s.key for s in e] == ["heldout:1000", "heldout:1001"] and e[1].seed == 4
    assert e[0].image.shape == (32, 32, 3) and e[0].image.dtype == np.uint8
    assert e[0].direction in ("left", "right", "up", "down") and e[0].colour and e[0].prompt
    check_disjoint(e, c)
    with pytest.raises(ValueError, match="share inputs"):
        check_disjoint(e, e[:1])
    with pytest.raises(ValueError, match="share prompts"):
        check_disjoint(e[:1], [EvalSample("x", None, prompt=e[0].prompt, key="x")])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.png"}]))
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        load_samples(str(bad), 5, 32)
    bad.write_text(json.dumps([{"foo": 1}]))
    with pytest.raises(ValueError, match="clip_seed"):
        load_samples(str(bad), 5, 32)


def test_cli_registers_eval():
    from wanjax.cli import build_parser

    a = build_parser().parse_args(
        ["eval", "--model", "m", "--eval-set", "e.json", "--calib-set", "c.json", "--out", "r", "--ablations"]
    )
    assert a.func.__name__ == "cmd_eval" and a.ablations == "all" and "default" in a.recipes
    assert a.frames is None and a.size is None  # resolved from the model's generation_config.json at run time


# ----------------------------------------------------------------------------------- the fast CI variant
def _plant_outliers(model, gain=40.0, channels=(1, 5, 9)):
    """Function-preserving outliers: v's output channels x gain, o's input rows / gain (attention is linear in v),
    in self- and cross-attention: the o layers then see a few channels ``gain`` times larger than the rest."""
    ch = np.asarray(channels)
    for attn in (model.blocks.self_attn, model.blocks.cross_attn):
        s = np.ones(model.cfg.dim, np.float32)
        s[ch] = gain
        attn.v.kernel[...] = attn.v.kernel[...] * s
        attn.v.bias[...] = attn.v.bias[...] * s
        attn.o.kernel[...] = attn.o.kernel[...] / s[:, None]
    return model


def test_eval_end_to_end_tiny_planted_outliers(tmp_path):
    from wanjax.model.dit import WanDiT
    from wanjax.model.vae import VAEConfig, init_vae
    from wanjax.pipeline import GenerationConfig, WanI2VPipeline

    cfg = TINY.replace(num_layers=1)
    experts = [WanDiT(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(i)) for i in (1, 2)]
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 4, 4, cfg.in_dim)), jnp.float32)
    c = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, cfg.text_dim)), jnp.float32)
    before = experts[0](x, jnp.array([950.0]), c)
    high, low = (_plant_outliers(m) for m in experts)
    np.testing.assert_allclose(np.asarray(high(x, jnp.array([950.0]), c)), np.asarray(before), rtol=2e-4, atol=2e-5)
    vae = init_vae(
        VAEConfig(
            base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_downsample=(False, True, True)
        ),
        seed=3,
    )
    pipe = WanI2VPipeline(high, low, vae)

    def sample(name, seed):
        r = np.random.default_rng(seed)
        return EvalSample(
            name,
            r.integers(0, 256, (32, 32, 3), dtype=np.uint8),
            prompt=name,
            seed=seed,
            context=jnp.asarray(r.standard_normal((2, 5, cfg.text_dim)), jnp.float32),
            key=name,
        )

    gen = GenerationConfig(num_frames=5, max_area=32 * 32, steps=8, shift=5.0, guide_scale=(2.0, 4.0))
    out = tmp_path / "report"
    res = run_eval(
        pipe,
        [sample("eval0", 0)],
        [sample("calib0", 1)],
        gen,
        str(out),
        recipes=["rtn", "svdquant"],
        log=lambda s: None,
    )
    text = (out / "report.md").read_text()
    assert "| rtn |" in text and "| svdquant |" in text and "disjoint" in text
    saved = json.loads((out / "results.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["rtn", "svdquant"]
    for p in [q for v in saved["variants"] for q in v["plots"]] + list(saved["act_range_plots"].values()):
        assert (out / p).stat().st_size > 1000 and f"]({p})" in text
    v = {r["name"]: r for r in res["variants"]}
    for r in v.values():
        for k in ("psnr", "ssim", "latent_rel_l2", "sqnr_eval_mean", "sqnr_calib_mean", "frame0_psnr", "denoise_s"):
            assert np.isfinite(r[k]), (r["name"], k, r[k])
        assert 0 < r["ssim"] < 1 and 0 < r["latent_rel_l2"] < 1
        sq = np.asarray(r["sqnr_eval"]["high"]["blocks.self_attn.o"])
        assert sq.shape == (1, 3) and np.all(np.isfinite(sq))
        assert r["weight_bytes"] < res["bf16"]["weight_bytes"]
    assert v["svdquant"]["psnr"] >= v["rtn"]["psnr"]
    assert v["svdquant"]["sqnr_eval_mean"] > v["rtn"]["sqnr_eval_mean"]
    # the planted outliers are where plain RTN hurts most; smoothing + low-rank fix them
    o_rtn = np.mean(v["rtn"]["sqnr_eval"]["high"]["blocks.self_attn.o"])
    o_svd = np.mean(v["svdquant"]["sqnr_eval"]["high"]["blocks.self_attn.o"])
    assert o_svd > o_rtn + 3, (o_rtn, o_svd)
    assert os.path.exists(out / "plots" / "act_range_high.png")
