"""`wanjax` end to end on the shipped mini model, through `wanjax.cli.main`: calibrate -> quantize (streamed) ->
generate with the artifact, two calibration samples in the default bf16, an interrupted run resumed, recomputed units
equal to the first run's, a refused retry, the work dir removed by default, and the compilation cache in use."""

import glob
import json
import os

import numpy as np
import pytest

from wanjax.cli import main

MINI = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models", "mini")
SETTINGS = ["--frames", "5", "--size", "64", "--steps", "8"]  # 8 steps: the fewest the seed's 3+3 bins fit


def _images(tmp_path):
    from PIL import Image

    from wanjax.data.procedural import make_clips
    from wanjax.video_io import to_uint8

    videos, captions = make_clips(2, split="train", seed=7, num_frames=5, size=64)[:2]
    lines = []
    for i, frame in enumerate(to_uint8(videos[:, 0])):
        Image.fromarray(frame).save(tmp_path / f"img{i}.png")
        lines.append(json.dumps({"image": f"img{i}.png", "prompt": captions[i], "seed": i}))
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "calib.jsonl"


def _tensors(qdir):
    from safetensors.numpy import load_file

    return {
        f"{os.path.basename(f)}:{k}": v
        for f in sorted(glob.glob(os.path.join(qdir, "*.safetensors")))
        for k, v in load_file(f).items()
    }


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(os.path.join(MINI, "high_noise_model")), reason="models/mini not present")
def test_cli_quantize_resume_and_generate_on_the_mini_model(tmp_path, monkeypatch, capsys):
    import jax

    import wanjax.quant.stream as qs
    from wanjax.video_io import count_mp4_frames

    monkeypatch.setenv("WANJAX_CACHE_DIR", str(tmp_path / "jaxcache"))
    monkeypatch.delenv("WANJAX_COMPILE_CACHE", raising=False)
    calib = _images(tmp_path)
    q, work = tmp_path / "q", tmp_path / "q.calib"
    base = ["quantize", "--model", MINI, "--calib", str(calib), "--out", str(q), "--recipe", "rtn", *SETTINGS]
    try:
        # 1. interrupted (Ctrl-C) after the first statistics unit: exit 130, no artifact, the work dir kept
        real = qs.quantize_streamed

        def interrupted(*a, **kw):
            def on_unit(kind, unit, seconds):
                if kind == "capture":
                    raise KeyboardInterrupt

            return real(*a, **kw, on_unit=on_unit)

        monkeypatch.setattr(qs, "quantize_streamed", interrupted)
        assert main(base) == 130
        err = capsys.readouterr().err
        assert f"calibration progress kept in {work}" in err and "interrupted" in err and "Traceback" not in err
        assert not q.exists() and len(glob.glob(str(work / "traj" / "*.npz"))) == 2
        assert len(glob.glob(str(work / "stats" / "*.npz"))) == 1
        monkeypatch.setattr(qs, "quantize_streamed", real)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jaxcache")

        # 2. the same command resumes (two samples: the text encoder stays for the second prompt; bf16 contexts)
        assert main(base + ["--keep-calib"]) == 0
        out = capsys.readouterr().out
        assert "resuming the earlier run" in out and f"kept the calibration work dir {work}" in out
        assert (q / "manifest.json").is_file() and work.is_dir()
        assert os.listdir(tmp_path / "jaxcache")  # the compilation cache was written

        # 3. units deleted from the work dir are recomputed identically: same statistics, same artifact (--keep-calib
        # kept the statistics and the quantized units; without the quantized units the statistics are needed again)
        units = sorted(glob.glob(str(work / "stats" / "*.npz")))
        assert len(units) > 2 and glob.glob(str(work / "quant" / "units" / "*.npz"))
        before = {u: dict(np.load(u)) for u in units[::2]}
        for u in [*before, *glob.glob(str(work / "quant" / "units" / "*.npz"))]:
            os.remove(u)
        q2 = tmp_path / "q2"
        assert (
            main(
                [
                    "quantize",
                    "--model",
                    MINI,
                    "--calib",
                    str(calib),
                    "--work-dir",
                    str(work),
                    "--out",
                    str(q2),
                    "--recipe",
                    "rtn",
                    "--keep-calib",
                    *SETTINGS,
                ]
            )
            == 0
        )
        for u, arrays in before.items():
            again = np.load(u)
            assert sorted(again.files) == sorted(arrays)
            for k, v in arrays.items():
                np.testing.assert_array_equal(again[k], v, err_msg=f"{u}:{k}")
        t1, t2 = _tensors(q), _tensors(q2)
        assert sorted(t1) == sorted(t2) and len(t1) > 10
        for k in t1:
            np.testing.assert_array_equal(t1[k], t2[k], err_msg=k)
        assert work.is_dir()  # an explicit --work-dir is kept
        capsys.readouterr()

        # 4. a retry into the same --out: one line, exit 2, nothing loaded
        assert main(base) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"wanjax quantize: error: --out {q} exists (pass --overwrite to replace it)"

        # 5. --overwrite: reuses the finished work dir, then removes the default one
        assert main(base + ["--overwrite"]) == 0
        out = capsys.readouterr().out
        assert f"removed the calibration work dir {work}" in out and not work.exists()

        # 6. generate with the artifact (quant mode auto -> fake on the CPU, said so)
        video = tmp_path / "v.mp4"
        assert (
            main(
                [
                    "generate",
                    "--model",
                    MINI,
                    "--image",
                    str(tmp_path / "img0.png"),
                    "--prompt",
                    "a red ring",
                    "--quant",
                    str(q),
                    "--out",
                    str(video),
                    "--no-progress",
                    *SETTINGS,
                ]
            )
            == 0
        )
        out = capsys.readouterr().out
        assert "quant mode fake" in out and f"wrote {video}: 5 frames 64x64" in out
        assert "settings (flags over" in out and "5 frames, size 64x64, 8 steps" in out
        assert count_mp4_frames(video) == 5
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        from jax.experimental.compilation_cache import compilation_cache

        compilation_cache.reset_cache()
