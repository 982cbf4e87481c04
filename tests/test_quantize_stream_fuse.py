"""Streamed quantization with the recipe option ``fuse_qkv`` on the shipped mini model: the streamed artifact holds
one fused ``self_attn.qkv`` layer per expert and equals, tensor for tensor, what `quantize` + `save_artifact` write
from the same (kept) statistics; it loads and runs."""

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
import pytest

from test_quantize_stream import MINI, RECIPE, _same_artifact, setup  # noqa: F401  (setup: the module fixture)

from wanjax.quant import stream

pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(MINI, "high_noise_model")), reason="models/mini not present"
)

FUSED = dataclasses.replace(RECIPE, name="stream-test-fuse", fuse_qkv=True)


def test_streamed_fused_equals_quantize_save(setup):  # noqa: F811
    from wanjax.quant import calibrate as qc
    from wanjax.quant.apply import active_bin, qlinears
    from wanjax.quant.artifact import load_artifact, save_artifact
    from wanjax.quant.quantize import CalibrationSource, quantize
    from wanjax.quant.recipes import recipe_to_dict

    pipe, samples, cfg, tmp = setup
    work, out = tmp / "fuse.calib", tmp / "fuse"
    res = stream.quantize_streamed(pipe, samples, FUSED, out, work_dir=work, cfg=cfg, keep_calib=True, progress=False)
    assert res.done
    kinds = [u["kind"] for u in res.units]
    assert kinds.count("quantize") == 2 * 3 * 8  # experts x block groups x (q/k/v fused + 7 other layers)
    assert "blocks.self_attn.qkv" in res.reports["high"]["sqnr_db"]
    # the same statistics through quantize() + save_artifact()
    q, reports = quantize(pipe, FUSED, CalibrationSource(qc.CalibStats(str(work)), res.bins), progress=False)
    ref = tmp / "fuse_ref"
    save_artifact(
        ref,
        q,
        recipe=recipe_to_dict(FUSED),
        bins=res.bins.to_dict(),
        report={"mean_sqnr_db_per_bin": stream.sqnr_summary(reports)},
        source=pipe,
    )
    _same_artifact(out, ref)
    experts, manifest = load_artifact(out)
    assert manifest["recipe"]["fuse_qkv"] is True
    m = experts["low"]
    assert "blocks.self_attn.qkv" in qlinears(m) and "blocks.self_attn.q" not in qlinears(m)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 2, 4, 4, m.cfg.in_dim)), jnp.float32)
    ctx = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, m.cfg.text_dim)), jnp.float32)
    with active_bin(0):
        assert np.all(np.isfinite(np.asarray(m(x, jnp.array([500.0]), ctx))))
