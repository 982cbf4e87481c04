"""Helpers of the LoRA tests on the shipped mini model (tests/test_lora_mini.py, tests/test_lora_cli.py): W4A4 experts
made quickly, once per test process."""

import functools
import os
import tempfile

from helpers import MINI

#: the trained LoRA shipped with the mini model (`python -m wanjax.train.lora`, its README)
LORA_DIR = os.path.join(MINI, "loras", "reverse_motion")
LORA_FILES = {
    "high": os.path.join(LORA_DIR, "high_noise_model.safetensors"),
    "low": os.path.join(LORA_DIR, "low_noise_model.safetensors"),
}


def quick_recipe():
    """W4A4 with every transform a LoRA must be folded through, without the slow searches: smoothing (alpha 0.5),
    block Hadamard rotation, a rank-16 low-rank branch, RTN (INT4 per-channel weights, per-token activations)."""
    from wanjax.quant.recipes import LowRank, Recipe, Rotate, RTN, Smooth
    from wanjax.quant.rtn import ActQuantSpec, WeightQuantSpec

    return Recipe(
        "lora-quick",
        WeightQuantSpec("int4"),
        ActQuantSpec("int4"),
        (Smooth(0.5), Rotate(0, 256), LowRank(16), RTN()),
    )


@functools.lru_cache(maxsize=1)
def quick_w4a4():
    """``(experts {"high", "low"} -> W4A4 WanDiT (fake mode), recipe, bins, fingerprint of the BF16 model)`` of the
    mini model: one held-out-free
    training clip calibrated at 5 frames of 64x64, 8 steps (the fewest the seed's 3 + 3 bins fit), then
    `quick_recipe`. Cached for the test process."""
    from wanjax.data.procedural import make_clips
    from wanjax.generation_config import GenerationConfig
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.quant.artifact import model_fingerprint
    from wanjax.quant.calibrate import CalibConfig, CalibSample, calibrate
    from wanjax.quant.quantize import CalibrationSource, quantize
    from wanjax.video_io import to_uint8

    pipe = WanI2VPipeline.from_pretrained(MINI)
    videos, caps = make_clips(1, "train", 11, num_frames=5, size=64, directional_only=True)[:2]
    gen = GenerationConfig(num_frames=5, max_area=64 * 64, steps=8, guide_scale=(3.5, 3.5))
    work = tempfile.mkdtemp(prefix="wanjax-lora-calib-")
    stats = calibrate(
        pipe,
        [CalibSample(image=to_uint8(videos[0])[0], prompt=caps[0], seed=0)],
        CalibConfig(gen=gen),
        work_dir=work,
        mode="online",
        progress=False,
    )
    recipe = quick_recipe()
    q, _ = quantize(pipe, recipe, CalibrationSource(stats), mode="fake", progress=False)
    return q, recipe, stats.bins, model_fingerprint(pipe)
