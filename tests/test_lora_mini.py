"""The LoRA trained on the mini model (models/mini/loras/reverse_motion, `python -m wanjax.train.lora`): it loads in
the official / Lightning layout, it changes the measured behaviour the way it was trained to (objects move against
their caption), it keeps working on W4A4 experts at the fidelity W4A4 has without it, and removing it gives back the
exact outputs. Held-out clips (captions and shape/colour pairs never trained on) starting at the centre of the
frame, 17 frames of 64x64, 8 steps, guidance 3.5, CPU."""

import json
import os

import jax
import numpy as np
import pytest
from lora_mini_helpers import LORA_DIR, LORA_FILES, quick_w4a4

import wanjax.lora as L
from wanjax.generation_config import GenerationConfig
from wanjax.metrics import psnr
from wanjax.train.evaluate import template_accuracy
from wanjax.train.lora import OPPOSITE, centred_heldout

pytestmark = [
    pytest.mark.skipif(not os.path.isfile(LORA_FILES["high"]), reason="models/mini or its trained LoRA is not present"),
]

N_CLIPS = 8
N_W4A4 = 4
FRAMES, SIZE, STEPS = 17, 64, 8


@pytest.fixture(scope="module")
def pipe():
    from helpers import MINI

    from wanjax.pipeline import WanI2VPipeline

    return WanI2VPipeline.from_pretrained(MINI)


@pytest.fixture(scope="module")
def clips(pipe):
    """Held-out clips starting at the frame's centre (`centred_heldout`: every direction has room), each with its
    condition ``y`` and text context encoded once (shared by every variant)."""
    from wanjax.pipeline import DEFAULT_NEGATIVE_PROMPT

    videos, caps, colours, dirs = centred_heldout(N_CLIPS, 1000, FRAMES, SIZE)
    inputs = []
    for i in range(N_CLIPS):
        y, _ = pipe.prepare_condition(videos[i, 0], FRAMES, SIZE * SIZE)
        inputs.append((y, pipe.encode_text([caps[i], DEFAULT_NEGATIVE_PROMPT])))
    return videos, colours, dirs, inputs


def _run(pipe, clips, n=N_CLIPS, decode=True):
    """Latents and uint8 frames of the first ``n`` clips with the pipeline's current experts (seed 1000 + clip, as
    the evaluation in the LoRA's README); ``decode=False``: the latents only (no frames; the VAE decode is the slow
    part of a run on a CPU)."""
    from wanjax.video_io import to_uint8

    lat, frames = [], []
    for i, (y, ctx) in enumerate(clips[3][:n]):
        gen = GenerationConfig(
            num_frames=FRAMES, max_area=SIZE * SIZE, steps=STEPS, guide_scale=(3.5, 3.5), seed=1000 + i
        )
        x, _ = pipe.denoise(y, ctx, gen, progress=False)
        lat.append(np.asarray(jax.device_get(x)))
        if decode:
            frames.append(to_uint8(np.asarray(pipe.decode(x))))
    return lat, frames


def _with_lora(pipe, clips, n=N_CLIPS):
    for e, f in LORA_FILES.items():
        L.apply_lora(pipe, f, expert=e)
    try:
        return _run(pipe, clips, n)
    finally:
        L.remove_lora(pipe)


@pytest.fixture(scope="module")
def bf16_runs(pipe, clips):
    """The BF16 pipeline's outputs without and with the LoRA (computed once for the tests below)."""
    return {"base": _run(pipe, clips), "lora": _with_lora(pipe, clips)}


def _directions(clips, frames):
    videos, colours, dirs, _ = clips
    n = len(frames)
    acc, got = template_accuracy(frames, videos[:n], colours[:n], dirs[:n])
    return acc, float(np.mean([g == OPPOSITE[d] for g, d in zip(got, dirs[:n])])), got


def test_the_shipped_lora_files():
    from helpers import MINI

    from wanjax.config import config_from_json

    cfg = config_from_json(os.path.join(MINI, "high_noise_model", "config.json"))
    for e, path in LORA_FILES.items():
        lw = L.read_lora(path, cfg)
        assert lw.format == "official (diffusion_model.; lora_down/lora_up, alpha)", lw.format
        assert sorted(lw.modules) == sorted(f"blocks.{i}.cross_attn.{m}" for i in range(cfg.num_layers) for m in "kv")
        assert set(lw.ranks.values()) == {4} and not lw.diffs
        assert os.path.getsize(path) < 200 * 1024
    log = json.load(open(os.path.join(LORA_DIR, "training_log.json")))
    for e in LORA_FILES:
        held = log["experts"][e]["heldout_loss"]
        assert log["experts"][e]["loss_lora"] < log["experts"][e]["loss_base"]  # it fits the reversed captions
        assert held["lora"]["task_captions"] < held["base"]["own_captions"] < held["lora"]["own_captions"]
    assert os.path.isfile(os.path.join(LORA_DIR, "README.md"))


def test_the_trained_lora_reverses_the_motion_and_removes_exactly(pipe, clips, bf16_runs):
    (lat0, frames0), (_, frames1) = bf16_runs["base"], bf16_runs["lora"]
    acc0, rev0, got0 = _directions(clips, frames0)
    acc1, rev1, got1 = _directions(clips, frames1)
    print(f"captioned direction {acc0:.3f} -> {acc1:.3f}; reversed {rev0:.3f} -> {rev1:.3f}; {got0} -> {got1}")
    # measured (8 clips): captioned 0.875 -> 0.125, reversed 0 -> 0.875
    assert acc0 >= 0.75 and rev0 <= 0.125  # the base model follows the caption
    assert rev1 >= 0.75 and acc1 <= 0.25  # with the LoRA the object moves the other way
    lat2, _ = _run(pipe, clips, n=1, decode=False)  # the LoRA was removed (bf16_runs): exactly the outputs before
    np.testing.assert_array_equal(lat2[0], lat0[0])


def test_w4a4_plus_lora_keeps_w4a4_fidelity(pipe, clips, bf16_runs):
    """On the first `N_W4A4` clips (the W4A4 runs are the slow part on a CPU)."""
    from wanjax.quant.apply import attach_to_pipeline

    n = N_W4A4
    q, _, bins, _ = quick_w4a4()
    attach_to_pipeline(pipe, q["high"], q["low"], bins)
    lat_q, fq = _run(pipe, clips, n)
    _, fq_lora = _with_lora(pipe, clips, n)
    lat_q2, _ = _run(pipe, clips, 1, decode=False)
    np.testing.assert_array_equal(lat_q2[0], lat_q[0])  # removed from the W4A4 experts: exactly W4A4 again
    bf, bf_lora = bf16_runs["base"][1][:n], bf16_runs["lora"][1][:n]
    base = psnr(np.stack(fq), np.stack(bf), data_range=255.0)
    with_lora = psnr(np.stack(fq_lora), np.stack(bf_lora), data_range=255.0)
    effect = psnr(np.stack(bf_lora), np.stack(bf), data_range=255.0)
    _, rev, got = _directions(clips, fq_lora)
    print(
        f"PSNR W4A4 vs BF16 {base:.2f} dB; W4A4+LoRA vs BF16+LoRA {with_lora:.2f} dB; BF16+LoRA vs BF16 "
        f"{effect:.2f} dB; W4A4+LoRA reversed {rev:.3f} {got}"
    )
    # measured (4 clips): 30.92 / 30.43 / 20.04 dB, reversed 0.75; on 8 clips 30.86 / 30.73 / 20.52 dB, 0.75
    assert with_lora >= base - 1.0  # the LoRA on the W4A4 experts keeps W4A4's fidelity
    assert effect < base - 6.0  # and its change is far above the quantization error
    assert rev >= 0.5  # W4A4 + LoRA moves the objects the other way too
