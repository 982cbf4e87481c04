"""What `wanjax quantize` / `generate` / `eval` hand to the library: ``--restart`` -> ``quantize_streamed(restart=
True)``, the calibration budget, a mismatching work dir -> one line naming ``--restart`` and the kept work dir,
``--force`` -> ``attach_artifact(force=True)``, ``--quant-mode`` -> ``attach_artifact(mode=...)`` and the chosen
mode printed, text encoder kept for calibration and released for generation; eval's up-front bins-vs-steps check.
Stand-ins only: seconds."""

import json
import os

import pytest
from helpers import QUICK_CALIB, generate_argv, quantize_argv

from wanjax import cli
from wanjax.cli import main


class Stop(BaseException):
    """Ends a run once the call under test has been recorded."""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setenv("WANJAX_COMPILE_CACHE", "0")
    Image.new("RGB", (32, 32), (10, 200, 10)).save(tmp_path / "img.png")
    (tmp_path / "calib.jsonl").write_text(json.dumps({"image": "img.png", "prompt": "a", "seed": 3}) + "\n")
    opened = []
    monkeypatch.setattr(cli, "_open_pipeline", lambda args, **kw: opened.append(kw) or object())
    return tmp_path, opened


def _quantize(tmp_path, *extra):
    return quantize_argv("--calib", str(tmp_path / "calib.jsonl"), "--out", str(tmp_path / "q"), *QUICK_CALIB, *extra)


def test_quantize_restart_keeps_the_text_encoder_and_reports_the_work_dir(setup, monkeypatch, capsys):
    import wanjax.quant.calibrate as qc
    import wanjax.quant.stream as qs

    tmp_path, opened = setup
    calls = []

    def fake_streamed(pipe, samples, recipe, out, *, work_dir, cfg, restart=False, **kw):
        calls.append((samples, cfg, work_dir, dict(kw, restart=restart)))
        os.makedirs(work_dir, exist_ok=True)
        raise Stop

    monkeypatch.setattr(qs, "quantize_streamed", fake_streamed)
    with pytest.raises(Stop):
        main(_quantize(tmp_path, "--restart"))
    samples, cfg, work_dir, kw = calls[-1]
    assert opened == [{"release_text_encoder": False}]  # two prompts or more: the encoder stays
    assert kw.get("restart") is True and work_dir == f"{tmp_path / 'q'}.calib"
    assert samples[0].image == str(tmp_path / "img.png") and samples[0].seed == 3  # relative to the jsonl file
    assert (cfg.gen.num_frames, cfg.gen.max_area, cfg.gen.steps) == (5, "64x64", 8)
    assert cfg.steps_per_bin == 0 and not cfg.hessian  # the seed budget; the default recipe needs no Hessian
    assert f"calibration progress kept in {work_dir}" in capsys.readouterr().err

    # --calib-budget fast: its steps per bin; --calib-samples over the budget's sample count
    with pytest.raises(Stop):
        main(_quantize(tmp_path, "--calib-budget", "fast", "--calib-samples", "1"))
    samples, cfg, _, _ = calls[-1]
    assert cfg.steps_per_bin == 2 and len(samples) == 1
    assert main(_quantize(tmp_path, "--calib-steps-per-bin", "-1")) == 2
    assert "--calib-steps-per-bin: expected 0 (every step) or more, got -1" in capsys.readouterr().err

    def mismatch(pipe, samples, recipe, out, *, work_dir, **kw):
        raise qc.CalibrationMismatchError(f"{work_dir}: holds a calibration of other samples (sample 0's image)")

    monkeypatch.setattr(qs, "quantize_streamed", mismatch)
    assert main(_quantize(tmp_path)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("wanjax quantize: error: ") and "other samples" in err[-1]
    assert err[-1].endswith("(pass --restart to discard it and calibrate again)")
    assert any("calibration progress kept in" in e for e in err)


class _Pipe:
    def __init__(self):
        import jax.numpy as jnp
        import numpy as np

        self.jnp, self.np = jnp, np

    def encode_text(self, prompts):
        return self.jnp.zeros((2, 4, 8))

    def prepare_condition(self, image, num_frames, max_area):
        return self.jnp.zeros((1, (num_frames - 1) // 4 + 1, 2, 2, 20)), (16, 16)

    def denoise(self, y, context, gen, progress=True, cache=None):
        return self.jnp.zeros(y.shape[:-1] + (16,)), []

    def decode(self, latents):
        return self.jnp.zeros(((latents.shape[1] - 1) * 4 + 1, 16, 16, 3))


@pytest.mark.parametrize("mode", ["auto", "fake"])
def test_generate_quant_mode_and_force_reach_attach_artifact(setup, monkeypatch, capsys, mode):
    import wanjax.quant.artifact as art

    tmp_path, opened = setup
    monkeypatch.setattr(cli, "_open_pipeline", lambda args, **kw: opened.append(kw) or _Pipe())
    q = tmp_path / "q"
    q.mkdir()
    (q / "manifest.json").write_text("{}")
    monkeypatch.setattr(art, "read_manifest", lambda qdir: {"experts": {}, "recipe": {"name": "default"}})
    seen = {}

    def attach(pipe, qdir, mode="auto", *, int8_weights=False, force=False, prepare_kernels=True):
        seen.update(qdir=qdir, mode=mode, force=force)
        return {"recipe": {"name": "default"}}

    monkeypatch.setattr(art, "attach_artifact", attach)
    argv = generate_argv(
        tmp_path / "img.png",
        "--frames",
        "5",
        "--out",
        str(tmp_path / "v.mp4"),
        "--quant",
        str(q),
        "--force",
        "--quant-mode",
        mode,
    )
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert seen == {"qdir": str(q), "mode": mode, "force": True}
    assert opened == [{"release_text_encoder": True, "mesh": None}]  # one prompt: the encoder may go
    want = (
        "quant mode fake: no low-bit kernels for cpu: simulated W4A4"
        if mode == "auto"
        else "quant mode fake: fake mode requested"
    )
    assert want in out and "recipe default, fake mode" in out


def test_eval_checks_bins_against_steps_up_front():
    from wanjax.evaluation.run import check_settings
    from wanjax.evaluation.variants import plan_variants
    from wanjax.generation_config import GenerationConfig

    variants = plan_variants(["rtn"], ["per_bin_clips_bins6"])
    assert [v.name for v in variants] == ["rtn", "default", "per_bin_clips_bins6"]
    check_settings(GenerationConfig(steps=8), variants)
    with pytest.raises(
        ValueError,
        match=r"5 steps \(shift 5, boundary 0.9\) cannot hold the timestep bins of "
        r"\['rtn', 'default'\]",
    ):
        check_settings(GenerationConfig(steps=5), variants)
    with pytest.raises(KeyError, match="unknown ablations"):
        plan_variants(["rtn"], ["nope"])
