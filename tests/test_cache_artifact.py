"""The step cache's calibration in a quantized artifact (issue 37): `wanjax quantize` records it with the quantized
experts on the calibration samples and publishes it with the artifact, per-sample progress resumes after an
interrupt, and `wanjax generate --quant DIR --cache` uses it by default."""

import glob
import json
import os

import numpy as np
import pytest

from helpers import MINI, QUICK_CALIB, quantize_argv
from wanjax.cli import main
from wanjax.sampling.cache import CacheCalibration, calibration_from_runs


def _cal(ratios_cond, precision="w4a4:rtn", shift=5.0):
    n = len(ratios_cond)
    experts = ["high"] * (n // 2) + ["low"] * (n - n // 2)
    run = {"cond": list(ratios_cond), "uncond": [r * 0.99 for r in ratios_cond]}
    rel = {b: [0.0] + [0.1 * (i + 1) for i in range(n - 1)] for b in ("cond", "uncond")}
    return calibration_from_runs(
        [run],
        list(range(1000, 1000 - 100 * n, -100)),
        experts,
        steps=n,
        shift=shift,
        boundary=0.9,
        solver="unipc",
        precision=precision,
        rel_input=[rel],
        rel_output=[rel],
    )


def test_precision_label():
    from wanjax.quant.recipes import get_recipe, recipe_to_dict
    from wanjax.quant.step_cache import precision_label

    assert precision_label(recipe_to_dict(get_recipe("rtn"))) == "w4a4:rtn"
    assert precision_label(recipe_to_dict(get_recipe("w8a8"))) == "w8a8:w8a8"
    assert precision_label({"name": "wo", "weight": {"fmt": "int4"}, "act": None}) == "w4a16:wo"


def test_merge_calibrations_averages_runs_and_refuses_other_settings():
    from wanjax.quant.step_cache import merge_calibrations

    a, b = _cal([1.0, 0.9, 1.0, 0.8]), _cal([1.0, 0.7, 1.0, 0.6])
    m = merge_calibrations([a, b])
    assert m.samples == 2 and m.precision == "w4a4:rtn" and m.timesteps == a.timesteps
    np.testing.assert_allclose(m.ratios["cond"], [1.0, 0.8, 1.0, 0.7], atol=1e-6)
    np.testing.assert_allclose(m.std["cond"], [0.0, 0.1, 0.0, 0.1], atol=1e-6)
    assert m.tea["coefficients"]
    with pytest.raises(ValueError, match="different settings"):
        merge_calibrations([a, _cal([1.0, 0.9, 1.0, 0.8], shift=3.0)])
    with pytest.raises(ValueError, match="no calibrations"):
        merge_calibrations([])


def test_calibrate_step_cache_resumes_per_sample(tmp_path, monkeypatch):
    """An interrupt after sample 0 keeps its result; the rerun samples only sample 1. A kept file of another
    precision or of other settings is sampled again."""
    import wanjax.quant.step_cache as sc
    from wanjax.generation_config import GenerationConfig

    gen = GenerationConfig(steps=4, shift=5.0)
    curves = {0: [1.0, 0.9, 1.0, 0.8], 1: [1.0, 0.7, 1.0, 0.6]}
    calls = []

    def fake_record(pipe, sample, gen, *, precision="bf16", progress=False):
        calls.append(sample)
        if sample == 1 and len(calls) == 2:
            raise KeyboardInterrupt
        return _cal(curves[sample], precision=precision)

    monkeypatch.setattr(sc, "record_sample", fake_record)
    logs = []
    with pytest.raises(KeyboardInterrupt):
        sc.calibrate_step_cache(None, [0, 1], gen, precision="w4a4:rtn", resume_dir=tmp_path, log=logs.append)
    assert calls == [0, 1] and sorted(os.listdir(tmp_path)) == ["sample_00000.json"]
    cal = sc.calibrate_step_cache(None, [0, 1], gen, precision="w4a4:rtn", resume_dir=tmp_path, log=logs.append)
    assert calls == [0, 1, 1] and any("reusing" in m for m in logs)
    np.testing.assert_allclose(cal.ratios["cond"], [1.0, 0.8, 1.0, 0.7], atol=1e-6)
    assert cal.samples == 2
    # another precision: recorded again (the key of wanjax quantize's dir already separates them; this is the guard)
    sc.calibrate_step_cache(None, [0], gen, precision="w4a4:default", resume_dir=tmp_path)
    assert calls[-1] == 0 and len(calls) == 4
    # a corrupt kept file: said so and recorded again
    (tmp_path / "sample_00001.json").write_text("{not json")
    sc.calibrate_step_cache(None, [0, 1], gen, precision="w4a4:default", resume_dir=tmp_path, log=logs.append)
    assert calls[-1] == 1 and any("not reused" in m for m in logs)
    with pytest.raises(ValueError, match="no samples"):
        sc.calibrate_step_cache(None, [], gen)


def test_save_artifact_with_cache_publishes_both_or_nothing(tmp_path):
    """The calibration is published with the artifact; a failure while adding it leaves nothing (no temporary dir);
    an existing directory is replaced only with overwrite."""
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.config import TINY
    from wanjax.model.dit import WanDiT
    from wanjax.quant.artifact import read_manifest
    from wanjax.quant.step_cache import save_artifact_with_cache

    m = WanDiT(TINY.replace(num_layers=1), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    cal = _cal([1.0, 0.9, 1.0, 0.8])
    q = save_artifact_with_cache(tmp_path / "q", {"high": m}, cal, report={"note": 1})
    assert read_manifest(q)["report"] == {"note": 1}  # the extra file does not disturb the manifest's checks
    assert sorted(os.listdir(q)) == ["cache_calibration.json", "high.safetensors", "manifest.json"]
    assert CacheCalibration.load(q, steps=4).ratios == cal.ratios
    with pytest.raises(FileExistsError, match="overwrite"):
        save_artifact_with_cache(q, {"high": m}, cal)
    other = _cal([1.0, 0.5, 1.0, 0.5])
    save_artifact_with_cache(q, {"high": m}, other, overwrite=True)
    assert CacheCalibration.load(q, steps=4).ratios == other.ratios

    class Broken:
        def save(self, path):
            cal.save(path)
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_artifact_with_cache(tmp_path / "q2", {"high": m}, Broken())
    assert sorted(os.listdir(tmp_path)) == ["q"]  # neither q2 nor a temporary directory
    with pytest.raises(ValueError, match="artifact directory"):
        save_artifact_with_cache(tmp_path / "q" / "in", {"high": m}, cal, inputs=(str(tmp_path / "q"),))


def test_stored_samples_needs_trajectories(tmp_path):
    from wanjax.quant.step_cache import stored_samples

    with pytest.raises(ValueError, match="not a readable calibration manifest"):
        stored_samples(tmp_path)
    (tmp_path / "manifest.json").write_text(
        json.dumps({"samples": 1, "sample_hashes": [{"seed": 3}], "config": {"gen": {"steps": 8}}})
    )
    with pytest.raises(ValueError, match="no trajectory of calibration sample 0"):
        stored_samples(tmp_path)


class Stop(BaseException):
    """Ends a run at model loading."""


@pytest.fixture
def no_model(monkeypatch):
    import wanjax.cli as cli

    monkeypatch.setenv("WANJAX_COMPILE_CACHE", "0")

    def stop(args, **kw):
        raise Stop

    monkeypatch.setattr(cli, "_open_pipeline", stop)


def test_quantize_cache_flags_are_checked_before_loading(tmp_path, no_model, capsys):
    (tmp_path / "stats").mkdir()
    (tmp_path / "stats" / "manifest.json").write_text(json.dumps({"format": "wanjax.calibration/1"}))
    base = quantize_argv("--stats", str(tmp_path / "stats"), "--out", str(tmp_path / "q"))
    assert main(base + ["--cache-samples", "-1"]) == 2
    assert "--cache-samples: expected 0 (no step-cache calibration) or more, got -1" in capsys.readouterr().err
    # an online-mode calibration (no trajectories): said so, then quantizes without a cache calibration
    with pytest.raises(Stop):
        main(base)
    err = capsys.readouterr().err
    assert "kept no trajectories" in err and "no step-cache calibration is written" in err
    with pytest.raises(Stop):
        main(base + ["--no-cache-calibration"])
    assert "trajectories" not in capsys.readouterr().err
    from wanjax.cli import build_parser

    assert build_parser().parse_args(base[:] + ["--no-cache-calibration"]).cache_samples == 0
    assert build_parser().parse_args(base[:]).cache_samples == 2


def test_generate_quant_cache_without_calibration_says_why(tmp_path, no_model, capsys):
    import jax.numpy as jnp
    from flax import nnx
    from PIL import Image

    from wanjax.config import TINY
    from wanjax.model.dit import WanDiT
    from wanjax.quant.artifact import save_artifact

    m = WanDiT(TINY.replace(num_layers=1), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    q = save_artifact(tmp_path / "q", {"high": m})  # written without a step-cache calibration
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")
    argv = ["generate", "--model", MINI, "--image", str(tmp_path / "in.png"), "--prompt", "p", "--quant", q]
    assert main(argv + ["--out", str(tmp_path / "o.mp4"), "--cache"]) == 2
    err = capsys.readouterr().err
    assert f"--cache: {q} holds no step-cache calibration (cache_calibration.json)" in err
    assert "`wanjax quantize` writes one" in err and "--cache PATH" in err


def test_eval_cache_flags_are_checked_before_loading(tmp_path, no_model, capsys):
    sets = []
    for name, split in (("eval", "heldout"), ("calib", "train")):
        (tmp_path / f"{name}.json").write_text(json.dumps([{"clip_seed": 1, "split": split}]))
        sets += [f"--{name}-set", str(tmp_path / f"{name}.json")]
    base = ["eval", "--model", MINI, "--recipes", "rtn", *sets, "--out", str(tmp_path / "r"), *QUICK_CALIB]
    _cal([1.0, 0.9, 1.0, 0.8]).save(tmp_path)
    assert main(base + ["--cache", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "wanjax eval: error: --cache: " in err and "no calibration for steps=8" in err and "steps=4" in err
    assert main(base + ["--cache", "--cache-samples", "0"]) == 2
    assert "cache samples: expected a positive integer, got 0" in capsys.readouterr().err
    assert main(base + ["--cache", "--cache-threshold", "-1"]) == 2
    assert "threshold" in capsys.readouterr().err
    with pytest.raises(Stop):
        main(base + ["--cache"])


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(MINI, "high_noise_model")), reason="models/mini not present")
def test_quantize_writes_the_cache_calibration_and_generate_uses_it(tmp_path, monkeypatch, capsys):
    """quantize (2 samples, interrupted while calibrating the cache, resumed) -> the artifact holds the calibration
    of its W4A4 experts, equal to one recorded afterwards from the artifact itself -> generate --quant --cache."""
    from PIL import Image

    import wanjax.quant.step_cache as sc
    from wanjax.data.procedural import make_clips
    from wanjax.quant.artifact import attach_artifact, read_manifest
    from wanjax.video_io import to_uint8

    # JAX's persistent compilation cache stays off (conftest: WANJAX_COMPILE_CACHE=0): reading XLA:CPU executables
    # back is the one thing the seventh session's tests added before a worker crashed in CI (tests/conftest.py)
    videos, captions = make_clips(2, split="train", seed=7, num_frames=5, size=64)[:2]
    lines = []
    for i, frame in enumerate(to_uint8(videos[:, 0])):
        Image.fromarray(frame).save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": captions[i], "seed": i}))
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n")
    q, work = tmp_path / "q", tmp_path / "q.calib"
    argv = quantize_argv("--calib", str(tmp_path / "calib.jsonl"), "--out", str(q), "--recipe", "rtn", *QUICK_CALIB)
    # 1. Ctrl-C while the cache's second sample is recorded: no artifact (nor a temporary one), sample 0 kept
    real, calls = sc.record_sample, []

    def interrupted(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sc, "record_sample", interrupted)
    assert main(argv) == 130
    assert "calibration progress kept in" in capsys.readouterr().err
    assert not q.exists() and not glob.glob(str(tmp_path / ".tmp-q-*"))
    kept = glob.glob(str(work / "step_cache" / "*" / "sample_*.json"))
    assert [os.path.basename(k) for k in kept] == ["sample_00000.json"]

    # 2. the same command resumes: sample 0 reused, sample 1 recorded, the artifact written with it
    monkeypatch.setattr(sc, "record_sample", real)
    assert main(argv + ["--keep-calib"]) == 0
    out = capsys.readouterr().out
    assert f"step cache: reusing {kept[0]}" in out and "step cache: sample 2/2 recorded" in out
    assert "calibrated the step cache (w4a4:rtn, 2 runs)" in out
    cal = CacheCalibration.load(q, steps=8)
    assert (cal.precision, cal.samples, cal.experts.count("high")) == ("w4a4:rtn", 2, 3)
    assert read_manifest(q)["report"]["step_cache"] == {
        "file": "cache_calibration.json",
        "precision": "w4a4:rtn",
        "samples": 2,
    }

    # 3. sample 1's ratios, recorded again from the saved artifact as generate --quant runs it (image and prompt
    # encoded again): the same
    from wanjax.pipeline import GenerationConfig, WanI2VPipeline

    pipe = WanI2VPipeline.from_pretrained(MINI)
    gen = GenerationConfig.for_model(MINI, num_frames=5, max_area="64x64", steps=8)
    attach_artifact(pipe, q, mode="fake")
    again = pipe.calibrate_cache([(str(tmp_path / "img1.png"), captions[1], 1)], gen)
    one = CacheCalibration.load(kept[0].replace("sample_00000", "sample_00001"))
    for b in ("cond", "uncond"):
        np.testing.assert_allclose(again.ratios[b], one.ratios[b], atol=2e-4, err_msg=b)
    assert max(cal.std["cond"]) > 0  # the artifact's: two different samples

    # 4. generate --quant q --cache (no path): the artifact's calibration
    video = tmp_path / "v.mp4"
    gen_argv = ["generate", "--model", MINI, "--image", str(tmp_path / "img0.png"), "--prompt", captions[0]]
    gen_argv += ["--quant", str(q), "--out", str(video), "--no-progress", *QUICK_CALIB]
    assert main(gen_argv + ["--cache", "--cache-threshold", "1"]) == 0
    text = capsys.readouterr()
    assert "step cache: " in text.out and "skipped" in text.out and "warning" not in text.err, text.err
    assert video.is_file()
