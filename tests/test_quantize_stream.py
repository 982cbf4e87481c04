"""Streamed quantization (`wanjax.quant.stream`) on the shipped mini model (bf16; a recipe of the default's kind,
cheaper to run: smoothing, a randomized low-rank branch, RTN, one clip per layer, statistics pooled over both experts,
so every block group needs both experts' statistics).

Checks: the streamed artifact equals the one `calibrate` + `quantize` + `save_artifact` write from the same
calibration, tensor for tensor (bitwise); a run interrupted by Ctrl-C after some units, then stopped by its deadline
in the middle of a capture unit (accumulators saved after a whole sample), then resumed gives the same artifact, also
with the pipeline's ``expert_placement="swap"`` (one expert on the device, as at full size); at most one block
group's statistics are on disk at any time; nothing is published before the end; a finished work dir used with
another recipe is refused; the budgets.
"""

import glob
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.quant import stream
from wanjax.quant.calibrate import CalibrationMismatchError, CalibSample, calibrate

MINI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "mini")
pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(MINI, "high_noise_model")), reason="models/mini not present"
)


def _recipe():
    from wanjax.quant.recipes import INT_CLIPS, ClipSearch, LowRank, Recipe, RTN, Smooth, get_recipe

    d = get_recipe("default")
    return Recipe(
        "stream-test",
        d.weight,
        d.act,
        (Smooth(0.5), LowRank(8, method="randomized"), RTN(), ClipSearch(INT_CLIPS[-3:], (0,), per_bin=False)),
        calibration="shared",
    )


RECIPE = _recipe()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from wanjax.data.procedural import make_clips
    from wanjax.generation_config import GenerationConfig
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.video_io import to_uint8

    pipe = WanI2VPipeline.from_pretrained(MINI, dtype=jnp.bfloat16)
    videos, captions = make_clips(2, split="train", seed=7, num_frames=5, size=64)[:2]
    frames = to_uint8(videos[:, 0])
    gen = GenerationConfig(num_frames=5, max_area=64 * 64, steps=8)  # 3 high + 5 low steps: the seed bins fit
    samples = []  # encoded once (the VAE and the text encoder are not what is tested)
    for i in range(2):
        y, _ = pipe.prepare_condition(frames[i], gen.num_frames, gen.max_area)
        ctx = pipe.encode_text([captions[i], "blurry"])
        samples.append(CalibSample(y=y, context=ctx, seed=i))
    # 3 block groups of the 6 blocks; one captured step per bin (the budgets' steps_per_bin)
    cfg = stream.calib_config(RECIPE, gen, reservoir=48, blocks_per_group=2, steps_per_bin=1)
    return pipe, samples, cfg, tmp_path_factory.mktemp("stream")


def _tensors(qdir):
    from safetensors.numpy import load_file

    return {
        f"{os.path.basename(f)}:{k}": v
        for f in sorted(glob.glob(os.path.join(qdir, "*.safetensors")))
        for k, v in load_file(f).items()
    }


def _same_artifact(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb) and len(ta) > 100
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        np.testing.assert_array_equal(ta[k], tb[k], err_msg=k)
    ma, mb = (json.load(open(os.path.join(d, "manifest.json"))) for d in (a, b))
    for key in ("recipe", "bins", "report"):
        assert ma[key] == mb[key], key
    for e in ("high", "low"):
        for key in ("layers", "tensors", "config", "sha256"):
            assert ma["experts"][e][key] == mb["experts"][e][key], (e, key)


@pytest.fixture(scope="module")
def reference(setup):
    """calibrate() (stream mode, the same settings) + quantize() + save_artifact(), as before streaming."""
    from wanjax.quant.artifact import save_artifact
    from wanjax.quant.quantize import CalibrationSource, quantize
    from wanjax.quant.recipes import recipe_to_dict

    pipe, samples, cfg, tmp = setup
    stats = calibrate(pipe, samples, cfg, work_dir=tmp / "ref.calib", progress=False)
    q, reports = quantize(pipe, RECIPE, CalibrationSource(stats), mode="fake", progress=False)
    out = tmp / "ref"
    save_artifact(
        out,
        q,
        recipe=recipe_to_dict(RECIPE),
        bins=stats.bins.to_dict(),
        report={"mean_sqnr_db_per_bin": stream.sqnr_summary(reports)},
        source=pipe,
    )
    return out


def test_streamed_equals_calibrate_quantize_save(setup, reference):
    pipe, samples, cfg, tmp = setup
    work, out = tmp / "a.calib", tmp / "a"
    groups_on_disk = []

    def on_unit(kind, unit, seconds):
        assert seconds >= 0 and (kind == "publish") == out.exists()  # nothing is published before the end
        names = [os.path.basename(p) for p in glob.glob(str(work / "stats" / "*.npz"))]
        groups_on_disk.append({n.split(".")[1] for n in names if ".blocks" in n})

    res = stream.quantize_streamed(pipe, samples, RECIPE, out, work_dir=work, cfg=cfg, progress=False, on_unit=on_unit)
    assert res.done and res.out == str(out) and res.stopped is None
    kinds = [u["kind"] for u in res.units]
    assert kinds.count("trajectory") == 2 and kinds.count("quantize") == 2 * 3 * 10 and kinds[-1] == "publish"
    assert max(len(g) for g in groups_on_disk) == 1  # at most one block group's statistics at a time
    assert not glob.glob(str(work / "stats" / "*.npz")) and not glob.glob(str(work / "quant" / "units" / "*"))
    _same_artifact(out, reference)
    # the same call again on the finished work dir: refused without overwrite (the artifact exists)
    with pytest.raises(FileExistsError):
        stream.quantize_streamed(pipe, samples, RECIPE, out, work_dir=work, cfg=cfg, progress=False)
    with pytest.raises(CalibrationMismatchError, match="another recipe"):
        stream.quantize_streamed(pipe, samples, "fast", tmp / "a2", work_dir=work, cfg=cfg, progress=False)


def test_interrupted_stopped_and_resumed_equals_uninterrupted(setup, reference, monkeypatch):
    from wanjax.pipeline import WanI2VPipeline

    pipe, samples, cfg, tmp = setup
    # the pipeline as on one 80 GB GPU at full size: one expert on the device, the other in host memory
    swap = WanI2VPipeline(
        nnx.merge(pipe.graphdef, pipe._params_high),
        nnx.merge(pipe.graphdef, pipe._params_low),
        pipe.vae,
        pipe.text_encoder,
        pipe.tokenizer,
        expert_placement="swap",
    )
    work, out = tmp / "b.calib", tmp / "b"
    kw = dict(work_dir=work, cfg=cfg, progress=False)

    # 1. the deadline has passed: nothing runs, everything is left
    res = stream.quantize_streamed(swap, samples, RECIPE, out, deadline=0.0, **kw)
    assert not res.done and res.stopped == "deadline" and res.units == []
    assert res.remaining["trajectory"] == 2 and res.remaining["quantize"] == 60

    # 2. Ctrl-C after 20 units (2 trajectories, 6 capture units, 12 of the first group's 20 quantized units)
    seen = []

    def interrupt(kind, unit, seconds):
        seen.append(kind)
        if len(seen) == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        stream.quantize_streamed(swap, samples, RECIPE, out, on_unit=interrupt, **kw)
    assert not out.exists() and seen.count("quantize") == 12
    assert len(glob.glob(str(work / "quant" / "units" / "*.npz"))) == 12

    # 3. stopped by the deadline after the first sample of the second block group's first capture unit
    real_check = stream._Clock.check
    calls = []

    def check(self, key, scale=1.0):
        if key.startswith("capture_step:2"):
            calls.append(key)
            if len(calls) == 2:
                raise stream._Stop(key)
        return real_check(self, key, scale)

    monkeypatch.setattr(stream._Clock, "check", check)
    res = stream.quantize_streamed(swap, samples, RECIPE, out, **kw)
    monkeypatch.setattr(stream._Clock, "check", real_check)
    assert not res.done and res.stopped == "deadline" and not out.exists()
    kinds = [u["kind"] for u in res.units]
    assert kinds.count("quantize") == 8 and kinds.count("capture") == 0  # the rest of the first group
    partial = [os.path.basename(p) for p in glob.glob(str(work / "quant" / "partial" / "*.npz"))]
    assert partial in (["high.blocks002-003.npz"], ["low.blocks002-003.npz"])  # after sample 1 of 2

    # 4. resumed to the end: the same artifact as the uninterrupted run
    res = stream.quantize_streamed(swap, samples, RECIPE, out, **kw)
    assert res.done and not glob.glob(str(work / "quant" / "partial" / "*.npz"))
    assert "trajectory" not in [u["kind"] for u in res.units]
    _same_artifact(out, reference)
    assert not [p for p in os.listdir(tmp) if p.startswith(".")]  # no temporary dirs left beside the artifacts


def test_budgets_and_calib_config():
    seed, fast = stream.BUDGETS["seed"], stream.BUDGETS["fast"]
    assert seed.select(range(12)) == list(range(12)) and fast.select(range(12)) == [0, 1, 2, 3]
    assert stream.calib_config("default", budget="fast").steps_per_bin == 2
    c = stream.calib_config("default")
    assert not c.hessian and c.steps_per_bin == 0 and c.reservoir == 2048  # default builds its Hessian from rows
    assert stream.calib_config("quarot").hessian  # GPTQ(hessian="raw") reads the captured one
    with pytest.raises(KeyError, match="unknown calibration budget"):
        stream.calib_config("default", budget="slow")
    with pytest.raises(ValueError, match="samples and steps_per_bin"):
        stream.CalibBudget("bad", samples=-1)
