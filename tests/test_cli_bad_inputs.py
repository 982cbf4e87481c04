"""Every bad CLI input of docs/bad_inputs.md ("Command line" section): refused with one line
``wanjax <cmd>: error: ...`` and exit status 2, before any model is loaded (loading raises `Loaded`, which
``main`` does not catch), in a few seconds each."""

import json
import os

import pytest
from helpers import MINI, QUICK_CALIB, generate_argv, quantize_argv

from wanjax import cli
from wanjax.cli import main


class Loaded(BaseException):
    """Raised instead of loading a model: a check that should have refused the input came too late."""


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def refuse(*a, **kw):
        raise Loaded("a model would have been loaded")

    monkeypatch.setattr(cli, "_open_pipeline", refuse)
    monkeypatch.setenv("WANJAX_COMPILE_CACHE", "0")


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    p = tmp_path / "img.png"
    Image.new("RGB", (32, 24), (200, 30, 30)).save(p)
    return str(p)


def _err(capsys, argv) -> str:
    """Run ``wanjax argv``: exit 2 and exactly one stderr line of the form ``wanjax <cmd>: error: ...``."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"wanjax {argv[0]}: error: "), lines
    return lines[0]


def _gen(image, out, *extra):
    return generate_argv(image, "--out", str(out), *extra)


# ------------------------------------------------------------------------------------------------ generate
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--frames", "6"], "--frames 6: frames must be 4n+1 (1, 5, ..., 81), got 6; nearest valid: 5 or 9"),
        (["--size", "big"], "--size 'big': expected 480p, 720p, WxH (e.g. 832x480) or N (NxN)"),
        (["--size", "8"], "area 64 is too small"),
        (["--guidance", "nan"], "--guidance (low-noise expert): expected a finite number >= 0, got nan"),
        (["--guidance", "3,inf"], "--guidance (high-noise expert): expected a finite number >= 0, got inf"),
        (["--guidance-high", "-1"], "--guidance (high-noise expert): expected a finite number >= 0, got -1.0"),
        (["--guidance", "1,2,3"], "--guidance expects 'G' or 'LOW,HIGH'"),
        (["--guide", "x"], "--guidance expects 'G' or 'LOW,HIGH'"),
        (["--fps", "0"], "--fps: expected a positive integer, got 0"),
        (["--fps", "-5"], "--fps: expected a positive integer, got -5"),
        (["--steps", "0"], "--steps: expected a positive integer, got 0"),
        (["--shift", "inf"], "--shift: expected a finite number > 0, got inf"),
        (["--int8-weights"], "--int8-weights needs --quant DIR and --quant-mode real"),
        (["--force"], "--force applies to --quant"),
    ],
)
def test_generate_bad_settings(capsys, tmp_path, image, extra, message):
    assert message in _err(capsys, _gen(image, tmp_path / "o.mp4", *extra))


def test_generate_bad_inputs(capsys, tmp_path, image):
    out = tmp_path / "o.mp4"
    assert "--image /nope.png: no such file" in _err(capsys, _gen("/nope.png", out))
    assert f"--image {tmp_path}: expected an image file, got a directory" in _err(capsys, _gen(str(tmp_path), out))
    txt = tmp_path / "notes.png"
    txt.write_text("not an image")
    assert f"--image {txt}: cannot read image" in _err(capsys, _gen(str(txt), out))
    argv = _gen(image, out)
    argv[2] = str(tmp_path / "nomodel")
    assert f"--model {tmp_path / 'nomodel'}: no such directory" in _err(capsys, argv)
    assert "not a quantized-model directory (no manifest.json)" in _err(
        capsys, _gen(image, out, "--quant", str(tmp_path))
    )
    assert "--mesh '3,1,1,1'" in _err(capsys, _gen(image, out, "--mesh", "3,1,1,1"))


def test_generate_bad_outputs(capsys, tmp_path, image):
    assert "expected a file name ending in .mp4 or .gif, got '.avi'" in _err(capsys, _gen(image, tmp_path / "o.avi"))
    assert "expected a file name ending in .mp4 or .gif, got no extension" in _err(capsys, _gen(image, tmp_path / "o"))
    d = tmp_path / "d.mp4"
    d.mkdir()
    assert f"--out {d}: is a directory" in _err(capsys, _gen(image, d))
    f = tmp_path / "f.mp4"
    f.write_bytes(b"old")
    assert f"--out {f} exists (pass --overwrite to replace it)" in _err(capsys, _gen(image, f))
    assert f.read_bytes() == b"old"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert f"{blocker} is a file, not a directory" in _err(capsys, _gen(image, blocker / "sub" / "o.mp4"))
    # never onto or into an input, even with --overwrite
    msg = _err(capsys, _gen(image, os.path.join(MINI, "o.mp4"), "--overwrite"))
    assert "is inside the input" in msg and "refusing to write there" in msg
    gif = tmp_path / "in.gif"
    from PIL import Image

    Image.new("RGB", (32, 24)).save(gif)
    assert "is the input" in _err(capsys, _gen(str(gif), gif, "--overwrite"))
    assert os.path.getsize(gif) > 0
    # --png-dir: not a file, not an earlier non-empty dir without --overwrite
    assert "--png-dir" in _err(capsys, _gen(image, tmp_path / "o.mp4", "--png-dir", str(blocker)))
    frames = tmp_path / "frames"
    frames.mkdir()
    (frames / "frame_00000.png").write_bytes(b"x")
    assert f"--png-dir {frames} exists (pass --overwrite" in _err(
        capsys, _gen(image, tmp_path / "o.mp4", "--png-dir", str(frames))
    )


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only dirs")
def test_generate_read_only_directory(capsys, tmp_path, image):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert f"directory {ro} is not writable" in _err(capsys, _gen(image, ro / "o.mp4"))
    finally:
        ro.chmod(0o700)


def test_generate_bad_artifact_and_int8_weights_in_fake_mode(capsys, tmp_path, image, monkeypatch):
    import wanjax.quant.artifact as art

    q = tmp_path / "q"
    q.mkdir()
    (q / "manifest.json").write_text(json.dumps({"format": "something else"}))
    msg = _err(capsys, _gen(image, tmp_path / "o.mp4", "--quant", str(q)))
    assert f"--quant {q}: " in msg and "artifact format 'something else'" in msg
    monkeypatch.setattr(art, "read_manifest", lambda qdir: {"experts": {}})
    monkeypatch.setattr(
        cli,
        "resolve_quant_mode",
        lambda mode, manifest=None, mesh=None: (
            ("fake", "no low-bit kernels for cpu: simulated W4A4") if mode == "auto" else (mode, "asked")
        ),
    )
    msg = _err(capsys, _gen(image, tmp_path / "o.mp4", "--quant", str(q), "--int8-weights"))
    assert msg.endswith(
        "--int8-weights needs --quant DIR and --quant-mode real (auto chose fake: no low-bit kernels "
        "for cpu: simulated W4A4)"
    )
    assert "--int8-weights needs" in _err(
        capsys, _gen(image, tmp_path / "o.mp4", "--quant", str(q), "--int8-weights", "--quant-mode", "fake")
    )


def test_generate_bad_generation_config(capsys, tmp_path, image):
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"num_frames": 6}))
    argv = _gen(image, tmp_path / "o.mp4")
    argv[2] = str(model)
    msg = _err(capsys, argv)
    assert "generation_config.json" in msg and "num_frames: expected 4n+1" in msg and "got 6" in msg
    (model / "generation_config.json").write_text(json.dumps({"frames": 5}))
    assert "unknown key 'frames'" in _err(capsys, argv)
    (model / "generation_config.json").write_text("{")
    assert "generation_config.json: not a readable JSON file" in _err(capsys, argv)


def test_generate_valid_arguments_reach_the_model_with_the_resolved_settings(capsys, tmp_path, image):
    with pytest.raises(Loaded):
        main(_gen(image, tmp_path / "o.gif", "--size", "64", "--guidance-low", "2"))
    out = capsys.readouterr().out
    # models/mini/generation_config.json: 17 frames, 20 steps; the flags: 64x64 (bare N = NxN), low guidance 2
    assert "17 frames, size 64x64, 20 steps (unipc, shift 5), guidance low 2 / high 3.5" in out
    assert "generation_config.json" in out


# ------------------------------------------------------------------------------------------------ quantize
def _calib(tmp_path, image, lines=None):
    p = tmp_path / "calib.jsonl"
    p.write_text("\n".join(json.dumps(d) for d in (lines or [{"image": image, "prompt": "a", "seed": 1}])) + "\n")
    return str(p)


def _q(*extra):
    return quantize_argv(*extra)


def test_quantize_bad_inputs(capsys, tmp_path, image):
    q = str(tmp_path / "q")
    calib = _calib(tmp_path, image)
    assert "exactly one of --calib" in _err(capsys, _q("--out", q))
    assert "unknown recipe 'nope'" in _err(capsys, _q("--out", q, "--calib", calib, "--recipe", "nope"))
    assert "--calib /nope.jsonl: no such file" in _err(capsys, _q("--out", q, "--calib", "/nope.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    assert f"{bad}:1: not a JSON object" in _err(capsys, _q("--out", q, "--calib", str(bad)))
    bad.write_text('{"image": "a.png"}\n')
    assert f"{bad}:1: each line needs 'image' and 'prompt'" in _err(capsys, _q("--out", q, "--calib", str(bad)))
    bad.write_text('{"image": "missing.png", "prompt": "p"}\n')
    assert f"{bad}:1: image {tmp_path / 'missing.png'}: no such file" in _err(
        capsys, _q("--out", q, "--calib", str(bad))
    )
    bad.write_text("\n")
    assert "no calibration samples" in _err(capsys, _q("--out", q, "--calib", str(bad)))
    msg = _err(capsys, _q("--out", q, "--calib", calib, "--steps", "4"))
    assert msg.startswith("wanjax quantize: error: --steps 4: ") and "holds no step" in msg
    assert "--frames 6" in _err(capsys, _q("--out", q, "--calib", calib, "--frames", "6"))
    assert f"--stats {tmp_path}: not a calibration directory" in _err(
        capsys, _q("--out", "/tmp/q", "--stats", str(tmp_path))
    )


def test_quantize_bad_outputs(capsys, tmp_path, image):
    calib = _calib(tmp_path, image)
    q = tmp_path / "q"
    q.mkdir()
    (q / "manifest.json").write_text("{}")
    assert f"--out {q} exists (pass --overwrite to replace it)" in _err(capsys, _q("--out", str(q), "--calib", calib))
    # never the model, the statistics, the calibration file or the work dir, even with --overwrite
    msg = _err(capsys, _q("--out", MINI, "--calib", calib, "--overwrite"))
    assert f"--out {MINI} is the input {MINI}" in msg
    msg = _err(capsys, _q("--out", os.path.dirname(MINI), "--calib", calib, "--overwrite"))
    assert "contains the input" in msg
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / "manifest.json").write_text(json.dumps({"format": "wanjax.calibration/1"}))
    assert "is inside the input" in _err(capsys, _q("--out", str(stats / "q"), "--stats", str(stats), "--overwrite"))
    assert "--work-dir" in _err(
        capsys, _q("--out", str(tmp_path / "q2"), "--calib", calib, "--work-dir", os.path.join(MINI, "calib"))
    )
    (tmp_path / "c").mkdir()
    inner = os.path.join(tmp_path, "c", "calib.jsonl")
    os.replace(calib, inner)
    assert "--work-dir" in _err(
        capsys, _q("--out", str(tmp_path / "q3"), "--calib", inner, "--work-dir", str(tmp_path / "c"))
    )
    calib = _calib(tmp_path, image)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    msg = _err(capsys, _q("--out", str(tmp_path / "q4"), "--calib", calib, "--work-dir", str(foreign)))
    assert "is not a calibration work dir" in msg and (foreign / "thesis.tex").exists()


def test_quantize_valid_arguments_reach_the_model(capsys, tmp_path, image):
    with pytest.raises(Loaded):
        main(_q("--out", str(tmp_path / "q"), "--calib", _calib(tmp_path, image), *QUICK_CALIB))
    assert "5 frames, size 64x64, 8 steps" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ eval
def _eval_sets(tmp_path):
    ev, ca = tmp_path / "eval.json", tmp_path / "calib.json"
    ev.write_text(json.dumps([{"clip_seed": 1000}]))
    ca.write_text(json.dumps([{"clip_seed": 5, "split": "train"}]))
    return str(ev), str(ca)


def _ev(tmp_path, *extra):
    ev, ca = _eval_sets(tmp_path)
    return [
        "eval",
        "--model",
        MINI,
        "--eval-set",
        ev,
        "--calib-set",
        ca,
        "--out",
        str(tmp_path / "r"),
        "--recipes",
        "rtn",
        "--frames",
        "5",
        "--size",
        "32",
        *extra,
    ]


def test_eval_bad_inputs(capsys, tmp_path):
    assert "--recipes: unknown ['nope']" in _err(capsys, _ev(tmp_path, "--recipes", "rtn,nope"))
    assert "--ablations: expected 'all' or a comma list" in _err(capsys, _ev(tmp_path, "--ablations", "nope"))
    # the bins-vs-steps check that used to fail after the calibration (~3 minutes in) now comes first
    msg = _err(capsys, _ev(tmp_path, "--steps", "5"))
    assert "--steps: 5 steps (shift 5, boundary 0.9) cannot hold the timestep bins of ['rtn']" in msg
    argv = _ev(tmp_path)
    argv[argv.index("--eval-set") + 1] = str(tmp_path / "none.json")
    assert "--eval-set" in _err(capsys, argv) and "no such file" in _err(capsys, argv)
    ev, ca = _eval_sets(tmp_path)
    argv = _ev(tmp_path)
    argv[argv.index("--calib-set") + 1] = ev
    assert "share inputs" in _err(capsys, argv)
    assert "--size 'tiny'" in _err(capsys, _ev(tmp_path, "--size", "tiny"))
    (tmp_path / "r").write_text("x")
    assert "exists and is a file" in _err(capsys, _ev(tmp_path))
    os.remove(tmp_path / "r")
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "mine.txt").write_text("x")
    assert "exists (pass --overwrite" in _err(capsys, _ev(tmp_path))
    argv = _ev(tmp_path, "--overwrite")
    argv[argv.index("--out") + 1] = MINI
    assert "is the input" in _err(capsys, argv)


def test_eval_size_is_an_area_and_resumes_a_report_dir(capsys, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "results.json").write_text("{}")  # an earlier report: resumed, not refused
    with pytest.raises(Loaded):
        main(_ev(tmp_path, "--steps", "8"))
    assert "5 frames, size 32x32, 8 steps" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------ convert
def test_convert_bad_inputs(capsys, tmp_path):
    src = tmp_path / "expert"
    src.mkdir()
    assert f"{tmp_path / 'absent'}: no such checkpoint" in _err(
        capsys, ["convert", str(tmp_path / "absent"), str(tmp_path / "d")]
    )
    assert "is the input" in _err(capsys, ["convert", str(src), str(src), "--overwrite"])
    assert "contains the input" in _err(capsys, ["convert", str(src), str(tmp_path), "--overwrite"])
    assert "is inside the input" in _err(capsys, ["convert", str(src), str(src / "cache")])
    assert src.is_dir()


# ------------------------------------------------------------------------------------------------ main
def test_errors_are_one_line_tracebacks_only_with_debug(capsys, tmp_path, monkeypatch, image):
    from wanjax.io.errors import CheckpointError

    def broken(*a, **kw):
        raise CheckpointError(
            "/m/high_noise_model/x.safetensors: key 'head.modulation': expected shape (1, 2, 3),\ngot (1, 2)"
        )

    monkeypatch.setattr(cli, "_open_pipeline", broken)
    argv = _gen(image, tmp_path / "o.mp4")
    msg = _err(capsys, argv)
    assert msg == (
        "wanjax generate: error: CheckpointError: /m/high_noise_model/x.safetensors: key 'head.modulation': "
        "expected shape (1, 2, 3), got (1, 2)"
    )
    assert main(["--debug"] + argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == msg
    assert main(argv + ["--debug"]) == 2 and "Traceback" in capsys.readouterr().err

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_open_pipeline", interrupted)
    assert main(argv) == 130
    assert capsys.readouterr().err.strip() == "wanjax generate: interrupted"


def test_version_help_and_recipe_list(capsys):
    import wanjax
    from wanjax.quant.recipes import RECIPES

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"wanjax {wanjax.__version__}"
    assert main(["quantize", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("one of: auto, " + ", ".join(RECIPES)) in text
    assert main(["generate", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "default: from the model's generation_config.json, else 81" in text and "--guide " not in text
    assert main(["generate"]) == 2  # argparse: missing required arguments
    assert "the following arguments are required" in capsys.readouterr().err


def test_compile_cache_on_by_default_and_opt_out(capsys, tmp_path, monkeypatch, image):
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    monkeypatch.delenv("WANJAX_COMPILE_CACHE")
    monkeypatch.setenv("WANJAX_CACHE_DIR", str(tmp_path / "cache"))
    argv = _gen(image, tmp_path / "o.mp4")
    before = jax.config.jax_compilation_cache_dir
    assert before is None
    try:
        with pytest.raises(Loaded):
            main(argv + ["--no-compile-cache"])
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.setenv("WANJAX_COMPILE_CACHE", "0")
        with pytest.raises(Loaded):
            main(argv)
        assert jax.config.jax_compilation_cache_dir is None
        monkeypatch.delenv("WANJAX_COMPILE_CACHE")
        with pytest.raises(Loaded):
            main(argv)
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
        assert jax.config.jax_persistent_cache_min_compile_time_secs <= 0.1
        assert jax.config.jax_persistent_cache_min_entry_size_bytes == -1
        monkeypatch.delenv("WANJAX_CACHE_DIR")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        assert cli.default_cache_dir() == str(tmp_path / "xdg" / "wanjax" / "jax_compile")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        compilation_cache.reset_cache()
