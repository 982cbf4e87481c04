"""Streamed quantization of a recipe that reads the captured Hessian (``GPTQ(hessian="raw")``, as ``quarot``), on a
tiny random pipeline (fp32, 2 blocks in 2 groups): the per-expert Hessian is summed over the bins in one capture pass,
so a run stopped by its deadline between bins must carry it in the saved partial state; the result equals
`calibrate` + `quantize` + `save_artifact`, and so does a run stopped and resumed twice."""

import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wanjax.config import TINY
from wanjax.model.dit import WanDiT
from wanjax.pipeline import GenerationConfig, WanI2VPipeline
from wanjax.quant import stream
from wanjax.quant.calibrate import CalibSample, calibrate


def _recipe():
    from wanjax.quant.recipes import GPTQ, Recipe, Smooth, get_recipe

    d = get_recipe("default")
    return Recipe("hessian-test", d.weight, d.act, (Smooth(0.5), GPTQ(hessian="raw")))


RECIPE = _recipe()


@pytest.fixture(scope="module")
def setup():
    high = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(1))
    low = WanDiT(TINY, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    pipe = WanI2VPipeline(high, low, vae=None)
    samples = []
    for seed in (0, 1):
        r = np.random.default_rng(seed)
        y = jnp.asarray(r.standard_normal((1, 2, 4, 4, 20)), jnp.float32)
        ctx = jnp.asarray(r.standard_normal((2, 5, TINY.text_dim)), jnp.float32)
        samples.append(CalibSample(y=y, context=ctx, seed=seed))
    gen = GenerationConfig(steps=8, shift=5.0, guide_scale=(2.0, 4.0))
    cfg = stream.calib_config(RECIPE, gen, reservoir=16, blocks_per_group=1)
    assert cfg.hessian and not cfg.hessian_per_bin
    return pipe, samples, cfg


def _tensors(qdir):
    from safetensors.numpy import load_file

    return {
        os.path.basename(f) + k: v
        for f in glob.glob(os.path.join(qdir, "*.safetensors"))
        for k, v in load_file(f).items()
    }


def test_captured_hessian_streamed_stopped_resumed_equals_reference(setup, tmp_path, monkeypatch):
    from wanjax.quant.artifact import save_artifact
    from wanjax.quant.quantize import CalibrationSource, quantize
    from wanjax.quant.recipes import recipe_to_dict

    pipe, samples, cfg = setup
    stats = calibrate(pipe, samples, cfg, work_dir=tmp_path / "ref.calib", progress=False)
    q, reports = quantize(pipe, RECIPE, CalibrationSource(stats), progress=False)
    save_artifact(tmp_path / "ref", q, recipe=recipe_to_dict(RECIPE), bins=stats.bins.to_dict())

    # stopped at the deadline once between the first expert's bins 1 and 2 (the summed Hessian in the partial state)
    # and once in the middle of a bin, then resumed
    real, calls = stream._Clock.check, []

    def check(self, key, scale=1.0):
        if key.startswith("capture_step:"):
            calls.append(key)
            if len(calls) in (3, 7):
                raise stream._Stop(key)
        return real(self, key, scale)

    monkeypatch.setattr(stream._Clock, "check", check)
    kw = dict(work_dir=tmp_path / "s.calib", cfg=cfg, progress=False)
    for _ in range(2):
        res = stream.quantize_streamed(pipe, samples, RECIPE, tmp_path / "s", **kw)
        assert not res.done and res.stopped == "deadline"
        assert glob.glob(str(tmp_path / "s.calib" / "quant" / "partial" / "*.npz"))
    monkeypatch.setattr(stream._Clock, "check", real)
    res = stream.quantize_streamed(pipe, samples, RECIPE, tmp_path / "s", **kw)
    assert res.done
    a, b = _tensors(tmp_path / "ref"), _tensors(tmp_path / "s")
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for e in ("high", "low"):
        for p, s in reports[e]["sqnr_db"].items():
            np.testing.assert_array_equal(np.asarray(s), res.reports[e]["sqnr_db"][p], err_msg=f"{e} {p}")
