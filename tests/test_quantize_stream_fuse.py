"""Streamed quantization with the recipe option ``fuse_qkv`` on the shipped mini model: the streamed artifact holds
one fused ``self_attn.qkv`` layer per expert and equals, tensor for tensor, what `quantize` + `save_artifact` write
from the same (kept) statistics; it loads."""

import dataclasses
import os

import jax.numpy as jnp
import pytest

from test_quantize_stream import MINI, RECIPE, _same_artifact

from wanjax.quant import stream

pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(MINI, "high_noise_model")), reason="models/mini not present"
)

FUSED = dataclasses.replace(RECIPE, name="stream-test-fuse", fuse_qkv=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """test_quantize_stream's setting, smaller: one calibration sample, 2 block groups of 3 blocks."""
    from wanjax.data.procedural import make_clips
    from wanjax.generation_config import GenerationConfig
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.calibrate import CalibSample
    from wanjax.video_io import to_uint8

    pipe = WanI2VPipeline.from_pretrained(MINI, dtype=jnp.bfloat16)
    videos, captions = make_clips(1, split="train", seed=7, num_frames=5, size=64)[:2]
    gen = GenerationConfig(num_frames=5, max_area=64 * 64, steps=8)  # 3 high + 5 low steps: the seed bins fit
    y, _ = pipe.prepare_condition(to_uint8(videos[:, 0])[0], gen.num_frames, gen.max_area)
    samples = [CalibSample(y=y, context=pipe.encode_text([captions[0], "blurry"]), seed=0)]
    cfg = stream.calib_config(FUSED, gen, reservoir=48, blocks_per_group=3, steps_per_bin=1)
    return pipe, samples, cfg, tmp_path_factory.mktemp("stream_fuse")


def test_streamed_fused_equals_quantize_save(setup):
    from wanjax.quant import calibrate as qc
    from wanjax.quant.apply import qlinears
    from wanjax.quant.artifact import load_artifact, save_artifact
    from wanjax.quant.quantize import CalibrationSource, quantize
    from wanjax.quant.recipes import recipe_to_dict

    pipe, samples, cfg, tmp = setup
    work, out = tmp / "fuse.calib", tmp / "fuse"
    res = stream.quantize_streamed(pipe, samples, FUSED, out, work_dir=work, cfg=cfg, keep_calib=True, progress=False)
    assert res.done
    kinds = [u["kind"] for u in res.units]
    assert kinds.count("quantize") == 2 * 2 * 8  # experts x block groups x (q/k/v fused + 7 other layers)
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
    assert m.blocks.self_attn.qkv.out_features == 3 * m.cfg.dim  # (running a loaded fused model: test_fuse_qkv)
