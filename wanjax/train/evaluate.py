"""Held-out evaluation of an I2V pipeline on procedural clips: first-frame PSNR and motion-direction accuracy.

For each held-out clip with a directional motion (left/right/up/down; captions and seeds disjoint from training),
the pipeline generates a video from the clip's first frame and caption; we measure the PSNR of generated frame 0
against the condition frame and whether a tracker (`wanjax.track`) sees the object move in the captioned
direction: ``direction_accuracy`` by the template tracker (the object's brightness pattern, started from its mask in
the condition frame; works on grey output too) and ``direction_accuracy_hue`` by the hue tracker.
"""

from __future__ import annotations

import time

import numpy as np

from wanjax.data import procedural
from wanjax.metrics import psnr
from wanjax.track import motion_direction, object_mask, template_direction
from wanjax.video_io import to_uint8


def heldout_set(n: int, seed: int = 1000, num_frames: int = procedural.NUM_FRAMES, size: int = procedural.SIZE):
    """``n`` held-out directional clips: (uint8 videos [n, F, H, W, 3], captions, colours, directions)."""
    clips, caps, params = procedural.make_clips(n, "heldout", seed, num_frames, size, directional_only=True)
    dirs = [m.split()[1] for m in params["motion_name"]]
    return to_uint8_batch(clips), caps, list(params["colour_name"]), dirs


def condition_mask(video: np.ndarray, colour: str) -> np.ndarray:
    """The object's pixels [H, W] in the condition (first) frame of a held-out clip, found by its colour."""
    return object_mask(video[:1], colour)[0]


def template_accuracy(videos, truth, colours, directions) -> tuple[float, list[str]]:
    """Direction accuracy of `wanjax.track.template_direction` on ``videos``, each started from the object's mask
    in the matching ``truth`` clip's first frame (so it needs no colour in ``videos``)."""
    got = [template_direction(v, condition_mask(t, c))[0] for v, t, c in zip(videos, truth, colours)]
    return float(np.mean([g == d for g, d in zip(got, directions)])), got


def to_uint8_batch(clips) -> np.ndarray:
    return np.stack([to_uint8(c) for c in clips])


def evaluate(
    pipe,
    n: int = 16,
    seed: int = 1000,
    steps: int = 20,
    guide=(3.5, 3.5),
    num_frames: int | None = None,
    size: int | None = None,
    keep: int = 4,
    shift: float = 5.0,
    max_seconds: float | None = None,
) -> dict:
    """Generate ``n`` held-out clips with ``pipe`` and return the metrics (+ the first ``keep`` videos).

    ``max_seconds``: stop early (after at least 2 clips) once generation took this long; ``n`` in the result is
    the number actually generated."""
    num_frames = num_frames or procedural.NUM_FRAMES
    size = size or procedural.SIZE
    videos, caps, colours, dirs = heldout_set(n, seed, num_frames, size)
    psnrs, got, got_hue, kept = [], [], [], []
    t0 = time.perf_counter()
    for i in range(n):
        out = pipe.generate(
            videos[i, 0],
            caps[i],
            num_frames=num_frames,
            max_area=size * size,
            steps=steps,
            guide_scale=tuple(guide),
            seed=seed + i,
            shift=shift,
            progress=False,
        )
        psnrs.append(psnr(out.frames[0], videos[i, 0], data_range=255.0))
        got.append(template_direction(out.frames, condition_mask(videos[i], colours[i]))[0])
        got_hue.append(motion_direction(out.frames, colours[i])[0])
        if i < keep:
            kept.append(out.frames)
        if max_seconds is not None and i >= 1 and time.perf_counter() - t0 > max_seconds:
            break
    n = len(psnrs)
    dirs, caps = dirs[:n], caps[:n]
    acc = float(np.mean([g == d for g, d in zip(got, dirs)]))
    acc_hue = float(np.mean([g == d for g, d in zip(got_hue, dirs)]))
    return {
        "n": n,
        "seed": seed,
        "steps": steps,
        "guide": list(guide),
        "shift": shift,
        "psnr_frame0_mean": float(np.mean(psnrs)),
        "psnr_frame0_min": float(np.min(psnrs)),
        "psnr_frame0": psnrs,
        "direction_accuracy": acc,
        "directions": dirs,
        "tracked": got,
        "captions": caps,
        "direction_accuracy_hue": acc_hue,
        "tracked_hue": got_hue,
        "seconds": time.perf_counter() - t0,
        "videos": np.stack(kept) if kept else None,
        "truth": videos[:keep],
    }


def vae_check(vae, n: int = 16, seed: int = 1000, batch: int = 4) -> dict:
    """How much of a held-out clip survives the VAE round trip ``decode(encode(x))`` — what the task metric needs.

    On ``n`` held-out directional clips: PSNR of the reconstruction, ``chroma_ratio`` (std of the reconstruction's
    chroma over the input's: 0 for grey output, 1 for faithful colour), and the tracker's direction accuracy on the
    reconstructions against the planted directions (``tracker_on_truth`` is the same on the inputs: the ceiling),
    by hue (``tracker_*``) and by the colour-free template tracker (``template_*``).
    Returns a dict (plain floats/lists) and the first reconstruction under ``"example"`` ([2, F, H, W, 3] uint8:
    input, reconstruction)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.track import direction_accuracy
    from wanjax.train.vae import chroma

    videos, _, colours, dirs = heldout_set(n, seed)
    roundtrip = nnx.jit(lambda v, a: v.decode(v.encode(a)))
    x = videos.astype(np.float32) / 127.5 - 1.0
    rec = np.concatenate(
        [
            np.asarray(jax.device_get(roundtrip(vae, jnp.asarray(x[i : i + batch]))), np.float32)
            for i in range(0, n, batch)
        ]
    )
    r8 = to_uint8_batch(rec)
    c_in, c_out = np.asarray(chroma(x)), np.asarray(chroma(rec))
    acc, got = direction_accuracy(r8, colours, dirs)
    acc_truth, _ = direction_accuracy(videos, colours, dirs)
    tacc, tgot = template_accuracy(r8, videos, colours, dirs)
    tacc_truth, _ = template_accuracy(videos, videos, colours, dirs)
    return {
        "n": n,
        "psnr": psnr(r8, videos, data_range=255.0),
        "chroma_ratio": float(c_out.std() / max(c_in.std(), 1e-6)),
        "tracker_on_recon": acc,
        "tracker_on_truth": acc_truth,
        "tracked": got,
        "directions": dirs,
        "template_on_recon": tacc,
        "template_on_truth": tacc_truth,
        "template_tracked": tgot,
        "example": np.stack([videos[0], r8[0]]),
    }
