"""The shipped mini model (models/mini): official layout, size, loading, and a held-out generation."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(ROOT, "models", "mini")
# Frame-0 PSNR (dB) of held-out clip 0 generated with 8 steps, guide 3.5, seed 0 on CPU; measured value in
# docs/MODEL_CARD.md, threshold set below it with a margin.
THRESHOLDS = (
    json.load(open(os.path.join(MINI, "test_threshold.json")))
    if os.path.isfile(os.path.join(MINI, "test_threshold.json"))
    else {}
)
FRAME0_PSNR_MIN = THRESHOLDS.get("frame0_psnr_min")

pytestmark = pytest.mark.skipif(
    not os.path.isdir(os.path.join(MINI, "high_noise_model")), reason="models/mini is not shipped in this checkout"
)


def test_official_layout_and_size():
    for p in (
        "high_noise_model/config.json",
        "high_noise_model/diffusion_pytorch_model.safetensors.index.json",
        "low_noise_model/config.json",
        "Wan2.1_VAE.pth",
        "models_t5_umt5-xxl-enc-bf16.pth",
        "google/umt5-xxl/tokenizer.json",
    ):
        assert os.path.isfile(os.path.join(MINI, p)), p
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(MINI) for f in fs)
    assert total <= 40 * 2**20, f"models/mini is {total / 2**20:.1f} MiB (> 40 MiB)"
    cfg = json.load(open(os.path.join(MINI, "high_noise_model", "config.json")))
    assert cfg["in_dim"] == 36 and cfg["out_dim"] == 16 and cfg["dim"] // cfg["num_heads"] == 128


def test_experts_differ_and_share_config():
    from wanjax.io.dit_loader import load_dit

    high = load_dit(os.path.join(MINI, "high_noise_model"))
    low = load_dit(os.path.join(MINI, "low_noise_model"))
    assert high.cfg == low.cfg
    a = np.asarray(high.blocks.ffn.fc1.kernel[...], np.float32)
    b = np.asarray(low.blocks.ffn.fc1.kernel[...], np.float32)
    assert not np.array_equal(a, b)


def test_from_pretrained():
    from wanjax.pipeline import WanI2VPipeline

    pipe = WanI2VPipeline.from_pretrained(MINI)
    assert pipe.vae.cfg.base_dim < 96


@pytest.mark.skipif(FRAME0_PSNR_MIN is None, reason="no measured threshold shipped")
def test_generates_heldout_clip_keeping_the_first_frame():
    from wanjax.pipeline import WanI2VPipeline
    from wanjax.track import motion_direction, template_direction
    from wanjax.train.evaluate import condition_mask, heldout_set, psnr
    from wanjax.train.vae import chroma

    pipe = WanI2VPipeline.from_pretrained(MINI)
    videos, caps, colours, dirs = heldout_set(2, seed=1000)
    out = pipe.generate(
        videos[0, 0],
        caps[0],
        num_frames=17,
        max_area=128 * 128,
        steps=8,
        guide_scale=(3.5, 3.5),
        seed=0,
        progress=False,
    )
    assert out.frames.shape == (17, 128, 128, 3)
    p0 = psnr(out.frames[0], videos[0, 0])
    assert p0 > FRAME0_PSNR_MIN, p0
    # the object moves as captioned, seen by both trackers (the hue one needs the colour to survive the VAE)
    assert motion_direction(out.frames, colours[0])[0] == dirs[0]
    assert template_direction(out.frames, condition_mask(videos[0], colours[0]))[0] == dirs[0]
    # the VAE keeps colour (the earlier mini VAEs decoded grey: chroma ratio 0.02-0.16)
    x = jnp.asarray(videos.astype(np.float32) / 127.5 - 1.0)
    rec = np.asarray(nnx.jit(lambda v, a: v.decode(v.encode(a)))(pipe.vae, x), np.float32)
    ratio = float(np.asarray(chroma(rec)).std() / np.asarray(chroma(np.asarray(x))).std())
    assert ratio > THRESHOLDS["chroma_ratio_min"], ratio
