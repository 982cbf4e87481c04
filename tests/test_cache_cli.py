"""``wanjax generate --cache``: the calibration is read and validated before any model is loaded."""

import numpy as np
import pytest
from PIL import Image

from wanjax import cli


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    return str(path)


def run(capsys, *argv):
    rc = cli.main(["generate", "--model", "models/mini", "--prompt", "p", *argv])
    return rc, capsys.readouterr().err


def test_cache_without_calibration_is_refused_clearly(tmp_path, image, capsys):
    rc, err = run(capsys, "--image", image, "--out", str(tmp_path / "o.mp4"), "--cache", str(tmp_path))
    assert rc != 0 and "--cache" in err and "cache_calibration.json" in err and "no step-cache calibration" in err


def test_cache_bad_settings_refused(tmp_path, image, capsys):
    from wanjax.sampling.cache import CacheCalibration

    CacheCalibration(
        steps=3,
        shift=5.0,
        boundary=0.9,
        timesteps=[999, 900, 500],
        experts=["high", "low", "low"],
        ratios={"cond": [1.0] * 3, "uncond": [1.0] * 3},
    ).save(tmp_path)
    rc, err = run(capsys, "--image", image, "--out", str(tmp_path / "o.mp4"), "--cache", str(tmp_path))
    assert rc != 0 and "no calibration for steps=20" in err and "the file has: steps=3" in err
    rc, err = run(
        capsys,
        "--image",
        image,
        "--out",
        str(tmp_path / "o.mp4"),
        "--steps",
        "3",
        "--cache",
        str(tmp_path),
        "--cache-max-skips",
        "-1",
    )
    assert rc != 0 and "max_skips" in err


@pytest.mark.slow
def test_generate_with_cache_on_the_mini_model(tmp_path, capsys):
    """Calibrate the mini model's cache for 6 steps, then `wanjax generate --cache DIR` says what it skipped."""
    from wanjax.pipeline import GenerationConfig, WanI2VPipeline

    pipe = WanI2VPipeline.from_pretrained("models/mini")
    gen = GenerationConfig.for_model("models/mini", steps=6, num_frames=5, max_area=64 * 64)
    img = np.full((64, 64, 3), 128, np.uint8)
    img[20:40, 20:40] = (255, 0, 0)
    cal = pipe.calibrate_cache([(img, "a red square moves left", 0)], gen)
    cal.save(tmp_path)
    Image.fromarray(img).save(tmp_path / "in.png")
    out = tmp_path / "o.mp4"
    argv = ["--image", str(tmp_path / "in.png"), "--out", str(out), "--steps", "6", "--frames", "5", "--size", "64x64"]
    rc = cli.main(
        [
            "generate",
            "--model",
            "models/mini",
            "--prompt",
            "a red square moves left",
            *argv,
            "--cache",
            str(tmp_path),
            "--cache-threshold",
            "1",
            "--no-progress",
        ]
    )
    text = capsys.readouterr()
    assert rc == 0 and out.exists(), text.err
    assert "step cache: " in text.out and "forwards computed" in text.out and "S" in text.out.split("step cache")[1]
