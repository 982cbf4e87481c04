"""Step cache (wanjax.sampling.cache): the skip rule, the calibration file, and cached generation on TINY (fp32)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.model.dit import WanDiT
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.sampling.cache import (
    CacheCalibration,
    CacheCalibrationError,
    CacheConfig,
    StepCache,
    fit_tea,
    plan_skips,
    plan_tea,
)

GEN = GenerationConfig(num_frames=5, max_area=32 * 48, steps=8, shift=5.0, guide_scale=(2.0, 4.0))
EXPERTS = ["high"] * 3 + ["low"] * 9
FLAT = {"cond": [1.0] * 12, "uncond": [1.0] * 12}  # ratio 1: every step may be skipped as far as the error goes


# ------------------------------------------------------------------------------------------------------ the rule
def runs_of(skip, value=True):
    best = cur = 0
    for s in skip:
        cur = cur + 1 if s == value else 0
        best = max(best, cur)
    return best


def test_threshold_zero_skips_nothing():
    skip, scale = plan_skips(FLAT, EXPERTS, CacheConfig(threshold=0.0))
    assert not any(skip) and scale == [1.0] * 12


@pytest.mark.parametrize("k", [1, 2, 3])
def test_skip_cap_and_warmup_and_switch(k):
    for warmup in (1, 2):
        skip, _ = plan_skips(FLAT, EXPERTS, CacheConfig(threshold=1.0, max_skips=k, warmup=warmup))
        assert runs_of(skip) == k  # never more than k in a row, and the cap is reached with ratio 1
        assert not any(skip[:warmup])  # first steps of the high-noise expert
        assert not any(skip[3 : 3 + warmup])  # the switch resets: first steps of the low-noise expert computed
        assert skip[warmup] and skip[3 + warmup]


def test_error_accumulates_and_both_branches_must_pass():
    r = {"cond": [1.0] + [0.9] * 11, "uncond": [1.0] * 12}
    experts = ["low"] * 12
    # cond: skip 1 costs |1-0.9| = 0.1, a second in a row 0.1 + 0.19 = 0.29
    skip, scale = plan_skips(r, experts, CacheConfig(threshold=0.15, max_skips=5, warmup=1))
    assert skip[:5] == [False, True, False, True, False]  # one skip each time, then the error forces a compute
    assert scale[1] == pytest.approx((0.9 + 1.0) / 2)
    skip2, _ = plan_skips(r, experts, CacheConfig(threshold=0.3, max_skips=5, warmup=1))
    assert skip2[:4] == [False, True, True, False]
    # the uncond branch alone would skip everything (ratio 1): the joint decision follows the worse branch
    assert plan_skips({"cond": r["uncond"], "uncond": r["cond"]}, experts, CacheConfig(0.15, 5, 1))[0] == skip


def test_tea_plan_cap_warmup_and_fit():
    cal = make_cal(12, experts=EXPERTS)
    cal.tea = {
        "coefficients": [1.0, 0.0],  # output change = input change
        "rel_input": {b: [0.01] * 12 for b in ("cond", "uncond")},
        "rel_output": {b: [0.01] * 12 for b in ("cond", "uncond")},
    }
    skip = plan_tea(cal, CacheConfig(threshold=1.0, rule="tea", max_skips=2, warmup=2))
    assert runs_of(skip) == 2 and not any(skip[:2]) and not any(skip[3:5])
    assert not any(plan_tea(cal, CacheConfig(threshold=0.0, rule="tea")))
    assert (
        plan_tea(cal, CacheConfig(threshold=0.015, rule="tea", max_skips=5, warmup=1))
        == [False] + [True, False] + [False] + [True, False] * 4
    )  # 0.01 < 0.015 but 0.02 is not
    x = np.linspace(0.01, 0.2, 12)
    rin = [{b: list(x) for b in ("cond", "uncond")}]
    rout = [{b: list(3 * x**2 + 0.5 * x) for b in ("cond", "uncond")}]
    np.testing.assert_allclose(fit_tea(rin, rout, ["low"] * 12, degree=2), [3.0, 0.5, 0.0], atol=1e-8)


def test_config_validation():
    for bad in (dict(rule="x"), dict(threshold=-1), dict(threshold=float("nan")), dict(max_skips=-1), dict(warmup=0)):
        with pytest.raises(ValueError, match="cache"):
            CacheConfig(**bad).validate()
    with pytest.raises(ValueError, match="needs a calibration"):
        StepCache(CacheConfig(threshold=0.1))


# ------------------------------------------------------------------------------------------------------ the file
def make_cal(steps=4, **kw):
    d = dict(
        steps=steps,
        shift=5.0,
        boundary=0.9,
        timesteps=list(range(999, 999 - steps, -1)),
        experts=["high"] + ["low"] * (steps - 1),
        ratios={"cond": [1.0] * steps, "uncond": [0.98] * steps},
    )
    d.update(kw)
    return CacheCalibration(**d)


def test_calibration_round_trip_and_merge(tmp_path):
    a, b = make_cal(4), make_cal(6, precision="w4a4:default")
    file = a.save(tmp_path)
    assert file == str(tmp_path / "cache_calibration.json")
    b.save(tmp_path)
    a2 = dataclass_replace(a, ratios={"cond": [0.5] * 4, "uncond": [0.5] * 4})
    a2.save(tmp_path / "cache_calibration.json")  # same setting: replaces, the other stays
    all_ = CacheCalibration.load_all(tmp_path)
    assert [c.steps for c in all_] == [6, 4]
    assert CacheCalibration.load(tmp_path, steps=4) == a2
    assert CacheCalibration.load(file, steps=6, shift=5.0, boundary=0.9, solver="unipc") == b
    with pytest.raises(CacheCalibrationError, match=r"no calibration for steps=8 .*the file has: steps=6"):
        CacheCalibration.load(tmp_path, steps=8)


def dataclass_replace(c, **kw):
    import dataclasses

    return dataclasses.replace(c, **kw)


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(format="other"), r"'format': expected 'wanjax-step-cache'"),
        (lambda d: d.update(version=9), r"'version': expected 1"),
        (lambda d: d["calibrations"][0].pop("ratios"), r"calibrations\[0\]: 'ratios': missing"),
        (lambda d: d["calibrations"][0]["ratios"]["cond"].pop(), r"'ratios.cond': expected a list of 4 values"),
        (lambda d: d["calibrations"][0]["ratios"]["uncond"].__setitem__(1, -1), r"'ratios.uncond': element 1"),
        (lambda d: d["calibrations"][0]["experts"].__setitem__(0, "mid"), r"'experts': element 0"),
        (lambda d: d["calibrations"][0].update(steps=0), r"'steps': expected a positive integer"),
        (lambda d: d["calibrations"][0].update(extra=1), r"'extra': unknown key"),
        (lambda d: d["calibrations"][0]["ratios"].pop("uncond"), r"'ratios': expected an object with keys"),
        (lambda d: d["calibrations"][0].update(tea={"coefficients": []}), r"'tea.coefficients': expected a non-empty"),
    ],
)
def test_bad_calibration_file_names_file_and_key(tmp_path, edit, match):
    file = make_cal().save(tmp_path)
    d = json.loads(open(file).read())
    edit(d)
    with open(file, "w") as f:
        json.dump(d, f)
    with pytest.raises(CacheCalibrationError, match=match) as e:
        CacheCalibration.load(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_and_unreadable_file(tmp_path):
    with pytest.raises(CacheCalibrationError, match="no step-cache calibration there"):
        CacheCalibration.load(tmp_path)
    (tmp_path / "cache_calibration.json").write_text("{not json")
    with pytest.raises(CacheCalibrationError, match="cache_calibration.json: not readable JSON"):
        CacheCalibration.load(tmp_path)


def test_calibration_for_other_schedule_is_refused():
    cal = make_cal(4)
    cache = StepCache(CacheConfig(threshold=0.1), cal)
    with pytest.raises(CacheCalibrationError, match="calibrated for steps=4"):
        cache.begin([999, 900, 500], ["high", "low", "low"])


# ------------------------------------------------------------------------------------------------ in the pipeline
@pytest.fixture(scope="module")
def parts():
    from wanjax.model.vae import VAEConfig, init_vae

    high = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    low = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    vae = init_vae(
        VAEConfig(
            base_dim=8, z_dim=16, dim_mult=(1, 2, 2, 2), num_res_blocks=1, temporal_downsample=(False, True, True)
        ),
        seed=3,
    )
    image = np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    ctx = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, TINY.text_dim)).astype(np.float32))
    pipe = WanI2VPipeline(high, low, vae)
    ref = pipe.generate(image, context=ctx, gen=GEN, progress=False, output_type="latent")
    return pipe, image, ctx, ref


def test_cache_off_and_threshold_zero_are_bit_identical(parts):
    pipe, image, ctx, ref = parts
    assert ref.cache is None
    # the uncached path is the plain guided velocity (what the pipeline did before the cache existed)
    from wanjax.sampling.guidance import guided_velocity

    y, _ = pipe.prepare_condition(image, GEN.num_frames, GEN.max_area)
    plain = jax.jit(lambda p, *a: guided_velocity(pipe.graphdef, p, *a))  # as WanI2VPipeline._jit_velocity
    lat, _ = pipe.denoise(y, ctx, GEN, progress=False, velocity_fn=lambda e, *a: plain(*a))
    np.testing.assert_array_equal(np.asarray(lat), ref.latents)
    cache = StepCache(CacheConfig(threshold=0.0))
    out = pipe.generate(image, context=ctx, gen=GEN, progress=False, output_type="latent", cache=cache)
    np.testing.assert_array_equal(out.latents, ref.latents)
    assert (cache.computed, cache.skipped, cache.schedule) == (8, 0, "C" * 8)


def test_calibrate_then_skip(parts, tmp_path, capsys):
    pipe, image, ctx, ref = parts
    cal = pipe.calibrate_cache([(image, ctx, 0)], GEN)
    assert cal.steps == 8 and cal.experts == ref.experts and cal.timesteps == list(ref.timesteps)
    first_low = ref.experts.index("low")
    assert cal.ratios["cond"][0] == cal.ratios["cond"][first_low] == 1.0  # no ratio across the switch
    assert all(np.isfinite(cal.ratios[b]).all() for b in ("cond", "uncond"))
    cal.save(tmp_path)
    cfg = CacheConfig(threshold=10.0, max_skips=2, warmup=1)  # skip all the rule allows
    cache = StepCache(cfg, CacheCalibration.load(tmp_path, steps=8))
    out = pipe.generate(image, context=ctx, gen=GEN, output_type="latent", cache=cache)
    assert "forwards computed" in capsys.readouterr().err
    want, _ = plan_skips(cal.ratios, ref.experts, cfg)
    assert cache.schedule == "".join("S" if s else "C" for s in want)
    assert cache.skipped == sum(want) >= 3 and cache.computed + cache.skipped == 8
    assert cache.schedule[first_low] == "C"
    assert np.isfinite(out.latents).all() and not np.array_equal(out.latents, ref.latents)
    rel = np.linalg.norm(out.latents - ref.latents) / np.linalg.norm(ref.latents)
    assert rel < 0.5, rel
    # TeaCache: decided per step from the measured modulated input; same caps
    assert cal.tea and len(cal.tea["coefficients"]) >= 2
    tea = StepCache(CacheConfig(threshold=1e6, rule="tea", max_skips=2, warmup=1), cal)
    out3 = pipe.generate(image, context=ctx, gen=GEN, progress=False, output_type="latent", cache=tea)
    assert tea.schedule == cache.schedule  # nothing but the caps stops it at this threshold
    np.testing.assert_array_equal(out3.latents, out.latents)
    # a path works as cache= (default CacheConfig)
    out2 = pipe.generate(image, context=ctx, gen=GEN, progress=False, output_type="latent", cache=str(tmp_path))
    assert out2.cache.computed + out2.cache.skipped == 8


def test_cache_refuses_unsplittable_velocity(parts):
    pipe, image, ctx, _ = parts
    from wanjax.sampling.guidance import guided_velocity

    pipe2 = WanI2VPipeline(*(nnx.merge(pipe.graphdef, p) for p in (pipe._params_high, pipe._params_low)), pipe.vae)
    pipe2.replace_experts(
        nnx.merge(pipe.graphdef, pipe._params_high),
        nnx.merge(pipe.graphdef, pipe._params_low),
        velocity=lambda *a, **k: guided_velocity(*a, **k),
    )
    with pytest.raises(ValueError, match="custom velocity"):
        pipe2.generate(image, context=ctx, gen=GEN, progress=False, cache=StepCache(CacheConfig(threshold=0.0)))


@pytest.mark.slow
def test_quantized_experts_and_mesh(parts):
    """Fake-mode quantized experts (binned velocity) run cached with the bins active; the same cached run on a mesh of
    8 host devices (data 2, context 4) gives the single-device result."""
    from test_qlinear_mxfp4_real import seed_qlayers, tiny_model

    from wanjax.quant.apply import attach_to_pipeline, quantize_model
    from wanjax.quant.bins import seed_bins
    from wanjax.sampling import flow_schedule
    from wanjax.sharding import make_mesh

    _, image, ctx, _ = parts
    bins = seed_bins(flow_schedule(GEN.steps, shift=GEN.shift))
    model = tiny_model(jnp.float32)
    qm = quantize_model(model, seed_qlayers(model, nbins=len(bins.expert_bins("high"))), mode="fake")
    lat, cal = {}, None
    for name, mesh in (("single", None), ("mesh", make_mesh(2, 1, 4, 1))):
        pipe = WanI2VPipeline(model, model, parts[0].vae, mesh=mesh)
        attach_to_pipeline(pipe, qm, qm, bins)
        if mesh is None:  # the split forward under the bins = the binned velocity
            plain = pipe.generate(image, context=ctx, gen=GEN, progress=False, output_type="latent")
            zero = pipe.generate(
                image, context=ctx, gen=GEN, progress=False, output_type="latent", cache=StepCache(CacheConfig(0.0))
            )
            assert np.max(np.abs(zero.latents - plain.latents)) / np.max(np.abs(plain.latents)) <= 1e-5
        cal = cal or pipe.calibrate_cache([(image, ctx, 0)], GEN)
        cache = StepCache(CacheConfig(threshold=10.0, max_skips=2, warmup=1), cal)
        lat[name] = pipe.generate(image, context=ctx, gen=GEN, progress=False, output_type="latent", cache=cache)
        assert cache.skipped >= 3
    a, b = lat["single"].latents, lat["mesh"].latents
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) <= 1e-4
