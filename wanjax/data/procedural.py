"""Deterministic procedural videos with captions: the training data of the shipped mini model.

A clip is one textured shape (square, circle, triangle, star, diamond, ring) of a saturated colour moving over a
muted textured background, with an optional camera pan (the background scrolls). Its caption names object, colour
and motion: ``"a red square moves left"``, ``"a blue ring rotates as the camera pans up"``.

* `sample_params(n, split, seed)` draws the per-clip parameters (numpy, one ``default_rng((seed, split, i))`` per
  clip, so clip ``i`` never depends on ``n`` or on other clips).
* `render(params, ...)` draws the clips, vectorised over the batch; ``xp`` is ``numpy`` or ``jax.numpy`` (the
  latter can run jitted on an accelerator). Output: float32 ``[N, F, H, W, 3]`` in [-1, 1].
* `make_clips(n, split, seed)` = both, plus the captions.

Held-out split: the (kind, colour) pairs of `HELDOUT_PAIRS` appear only in ``split="heldout"`` and never in
``split="train"``, so held-out captions are disjoint from training captions; the split also enters the seed
sequence, so the clips are disjoint as well.
"""

from __future__ import annotations

import colorsys
from typing import Any

import numpy as np

KINDS = ("square", "circle", "triangle", "star", "diamond", "ring")
#: Saturated colours (RGB in [0, 1]); the tracker segments the object by hue.
COLOURS = {
    "red": (0.90, 0.10, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "yellow": (0.92, 0.85, 0.08),
    "green": (0.10, 0.80, 0.15),
    "cyan": (0.05, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.95),
    "purple": (0.55, 0.12, 0.90),
    "pink": (0.95, 0.20, 0.65),
}
COLOUR_NAMES = tuple(COLOURS)
DIRECTIONS = ("left", "right", "up", "down")
MOTIONS = ("moves left", "moves right", "moves up", "moves down", "bounces", "rotates", "grows", "shrinks")
#: Unit screen displacement (dx, dy) of the directional motions (y grows downwards).
DIRECTION_VECTORS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
#: (kind, colour) pairs reserved for the held-out split.
HELDOUT_PAIRS = (
    ("square", "purple"),
    ("circle", "orange"),
    ("triangle", "cyan"),
    ("star", "green"),
    ("diamond", "pink"),
    ("ring", "yellow"),
)
SPLITS = {"train": 0, "heldout": 1}

NUM_FRAMES = 17
SIZE = 128
FPS = 16
PAN_PROB = 0.3
DIRECTIONAL_PROB = 0.6


def colour_hue(name: str) -> float:
    """Hue in [0, 1) of a colour of `COLOURS`."""
    return colorsys.rgb_to_hsv(*COLOURS[name])[0]


def split_pairs(split: str) -> list[tuple[str, str]]:
    """The (kind, colour) pairs a split draws from."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    held = set(HELDOUT_PAIRS)
    allp = [(k, c) for k in KINDS for c in COLOUR_NAMES]
    return [p for p in allp if (p in held) == (split == "heldout")]


def caption_of(kind: str, colour: str, motion: str, pan: str | None = None) -> str:
    """``"a red square moves left"`` (+ ``" as the camera pans up"``)."""
    cap = f"a {colour} {kind} {motion}"
    return cap if pan is None else f"{cap} as the camera pans {pan}"


def all_captions(split: str) -> list[str]:
    """Every caption a split can produce (the vocabulary of the mini tokenizer comes from these)."""
    return [caption_of(k, c, m, p) for k, c in split_pairs(split) for m in MOTIONS for p in (None,) + DIRECTIONS]


def vocabulary() -> list[str]:
    """Sorted words of all captions of both splits."""
    words = set()
    for s in SPLITS:
        for cap in all_captions(s):
            words.update(cap.split())
    return sorted(words)


#: The numeric per-clip arrays of `sample_params` (what `render` reads).
ARRAY_KEYS = (
    "kind",
    "colour_rgb",
    "motion",
    "cx",
    "cy",
    "vx",
    "vy",
    "radius",
    "theta0",
    "omega",
    "scale0",
    "scale1",
    "bounce_amp",
    "bounce_n",
    "tex_freq",
    "tex_angle",
    "tex_phase",
    "bg_a",
    "bg_b",
    "bg_freq",
    "bg_phase",
    "bg_type",
    "pan_x",
    "pan_y",
)


def sample_params(
    n: int,
    split: str = "train",
    seed: int = 0,
    num_frames: int = NUM_FRAMES,
    size: int = SIZE,
    directional_only: bool = False,
) -> dict[str, Any]:
    """Per-clip parameters of ``n`` clips: a dict of numpy arrays ``[n]`` (or ``[n, k]``) plus ``captions`` and
    the names ``kind_name``/``colour_name``/``motion_name``/``pan_name`` (lists). ``directional_only`` draws only left/right/up/down motions
    (the evaluation set of the motion-direction metric)."""
    pairs = split_pairs(split)
    sid = SPLITS[split]
    cols: dict[str, list] = {k: [] for k in ARRAY_KEYS}
    names = {"kind_name": [], "colour_name": [], "motion_name": [], "pan_name": [], "captions": []}
    span = max(num_frames - 1, 1)
    for i in range(n):
        r = np.random.default_rng((int(seed), sid, i))
        kind, colour = pairs[r.integers(len(pairs))]
        if directional_only or r.random() < DIRECTIONAL_PROB:
            motion = MOTIONS[r.integers(4)]
        else:
            motion = MOTIONS[4 + r.integers(4)]
        radius = r.uniform(0.11, 0.16) * size
        vx = vy = 0.0
        margin = radius * 1.1
        cx, cy = r.uniform(margin, size - margin, 2)
        bounce_amp, bounce_n = 0.0, 1.0
        if motion.startswith("moves"):
            d = motion.split()[1]
            dist = r.uniform(0.30, 0.42) * size
            ux, uy = DIRECTION_VECTORS[d]
            # start so that the whole path stays inside the frame
            lo, hi = margin, size - margin
            cx = r.uniform(lo - min(ux, 0) * dist, hi - max(ux, 0) * dist) if ux else r.uniform(lo, hi)
            cy = r.uniform(lo - min(uy, 0) * dist, hi - max(uy, 0) * dist) if uy else r.uniform(lo, hi)
            vx, vy = ux * dist / span, uy * dist / span
        elif motion == "bounces":
            bounce_amp = r.uniform(0.25, 0.35) * size
            cy = r.uniform(margin + bounce_amp, size - margin)
            bounce_n = float(r.integers(1, 3))
        omega = 0.0
        if motion == "rotates":
            omega = r.choice([-1.0, 1.0]) * r.uniform(0.5, 1.0) * np.pi / span * 2.0
        s0, s1 = 1.0, 1.0
        if motion == "grows":
            s0, s1 = r.uniform(0.55, 0.7), r.uniform(1.3, 1.5)
        elif motion == "shrinks":
            s0, s1 = r.uniform(1.3, 1.5), r.uniform(0.55, 0.7)
        if motion in ("grows", "shrinks"):  # keep the largest size inside the frame
            m2 = radius * max(s0, s1) * 1.1
            cx, cy = r.uniform(m2, size - m2, 2) if m2 < size / 2 else (size / 2, size / 2)
        pan = None
        px = py = 0.0
        if r.random() < PAN_PROB:
            pan = DIRECTIONS[r.integers(4)]
            speed = r.uniform(0.8, 1.6)
            ux, uy = DIRECTION_VECTORS[pan]
            # the camera moving left makes the scene scroll right
            px, py = -ux * speed, -uy * speed
        # muted background colours: low saturation, mid value
        bg = []
        for _ in range(2):
            h, s, v = r.random(), r.uniform(0.0, 0.18), r.uniform(0.25, 0.7)
            bg.append(colorsys.hsv_to_rgb(h, s, v))
        vals = dict(
            kind=KINDS.index(kind),
            colour_rgb=COLOURS[colour],
            motion=MOTIONS.index(motion),
            cx=cx,
            cy=cy,
            vx=vx,
            vy=vy,
            radius=radius,
            theta0=r.uniform(0, 2 * np.pi),
            omega=omega,
            scale0=s0,
            scale1=s1,
            bounce_amp=bounce_amp,
            bounce_n=bounce_n,
            tex_freq=r.uniform(2.0, 5.0),
            tex_angle=r.uniform(0, np.pi),
            tex_phase=r.uniform(0, 2 * np.pi),
            bg_a=bg[0],
            bg_b=bg[1],
            bg_freq=r.uniform(0.04, 0.12, 2),
            bg_phase=r.uniform(0, 2 * np.pi, 2),
            bg_type=r.integers(3),
            pan_x=px,
            pan_y=py,
        )
        for k, v in vals.items():
            cols[k].append(v)
        names["kind_name"].append(kind)
        names["colour_name"].append(colour)
        names["motion_name"].append(motion)
        names["pan_name"].append(pan)
        names["captions"].append(caption_of(kind, colour, motion, pan))
    out: dict[str, Any] = {
        k: np.asarray(v, np.int32 if k in ("kind", "motion", "bg_type") else np.float32) for k, v in cols.items()
    }
    out.update(names)
    out["num_frames"], out["size"] = int(num_frames), int(size)
    return out


def array_params(params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Only the numeric arrays of `sample_params` (what `render` reads; a pytree for ``jax.jit``)."""
    return {k: params[k] for k in ARRAY_KEYS}


def _signed_distance(xp, kind, u, v):
    """Approximate signed distance (in units of the shape radius) to each of the shapes; picks ``kind``."""
    rho = xp.sqrt(u * u + v * v)
    phi = xp.arctan2(v, u)
    d_square = xp.maximum(xp.abs(u), xp.abs(v)) - 0.85
    d_circle = rho - 1.0
    # equilateral triangle with circumradius 1 (apex up): three half-planes at distance 0.5
    d_tri = xp.maximum(xp.maximum(v, -0.866 * u - 0.5 * v), 0.866 * u - 0.5 * v) - 0.5
    d_tri = d_tri * 1.6
    d_star = rho - (0.62 + 0.38 * xp.cos(5.0 * phi))
    d_diamond = (xp.abs(u) + xp.abs(v)) / 1.1 - 1.0
    d_ring = xp.abs(rho - 0.72) - 0.28
    ds = (d_square, d_circle, d_tri, d_star, d_diamond, d_ring)
    out = ds[0]
    for i in range(1, len(ds)):
        out = xp.where(kind == i, ds[i], out)
    return out


def trajectory(xp, p: dict, num_frames: int):
    """Per-frame centre (x, y), angle and scale, each ``[N, F]``."""
    f = xp.arange(num_frames, dtype=xp.float32)[None, :]
    span = float(max(num_frames - 1, 1))
    tt = f / span
    c = lambda k: p[k][:, None]  # noqa: E731
    cx = c("cx") + c("vx") * f
    cy = c("cy") + c("vy") * f - c("bounce_amp") * xp.abs(xp.sin(np.pi * c("bounce_n") * tt))
    theta = c("theta0") + c("omega") * f
    scale = c("scale0") + (c("scale1") - c("scale0")) * tt
    return cx, cy, theta, scale


def render(params: dict, num_frames: int = NUM_FRAMES, size: int = SIZE, xp=np) -> Any:
    """Draw the clips of ``params`` (from `sample_params`; only the arrays of `array_params` are read).

    Returns float32 ``[N, F, H, W, 3]`` in [-1, 1]; ``xp`` is numpy or ``jax.numpy`` (jit-able with
    ``num_frames``, ``size`` and ``xp`` static).
    """
    p = {k: xp.asarray(params[k]) for k in ARRAY_KEYS}
    cx, cy, theta, scale = trajectory(xp, p, num_frames)  # [N, F]
    e = lambda a: a[:, :, None, None]  # noqa: E731   [N, F] -> [N, F, 1, 1]
    pix = xp.arange(size, dtype=xp.float32) + 0.5
    x = pix[None, None, None, :]
    y = pix[None, None, :, None]
    # background in scene coordinates (scrolls with the pan)
    f = xp.arange(num_frames, dtype=xp.float32)[None, :]
    bx = x - e(p["pan_x"][:, None] * f)
    by = y - e(p["pan_y"][:, None] * f)
    fa, fb = p["bg_freq"][:, 0][:, None, None, None], p["bg_freq"][:, 1][:, None, None, None]
    ph0, ph1 = p["bg_phase"][:, 0][:, None, None, None], p["bg_phase"][:, 1][:, None, None, None]
    blobs = 0.5 + 0.5 * xp.sin(fa * bx + ph0) * xp.sin(fb * by + ph1)
    stripes = 0.5 + 0.5 * xp.sin(fa * bx + fb * by + ph0)
    checker = 0.5 + 0.5 * xp.tanh(4.0 * xp.sin(fa * bx + ph0) * xp.sin(fa * by + ph1))
    bt = p["bg_type"][:, None, None, None]
    pat = xp.where(bt == 0, blobs, xp.where(bt == 1, stripes, checker))[..., None]  # [N, F, H, W, 1]
    bga = p["bg_a"][:, None, None, None, :]
    bgb = p["bg_b"][:, None, None, None, :]
    bg = bga + (bgb - bga) * pat
    # object in its own (rotated, scaled) coordinates
    r = e(p["radius"][:, None] * scale)
    dx, dy = x - e(cx), y - e(cy)
    ct, st = xp.cos(e(theta)), xp.sin(e(theta))
    u = (ct * dx + st * dy) / r
    v = (-st * dx + ct * dy) / r
    d = _signed_distance(xp, p["kind"][:, None, None, None], u, v) * r  # pixels
    alpha = xp.clip(0.5 - d, 0.0, 1.0)[..., None]
    ta = p["tex_angle"][:, None, None, None]
    tex = xp.sin(
        0.5 * p["tex_freq"][:, None, None, None] * (xp.cos(ta) * u + xp.sin(ta) * v) * np.pi
        + p["tex_phase"][:, None, None, None]
    )
    obj = p["colour_rgb"][:, None, None, None, :] * (0.8 + 0.2 * tex[..., None])
    img = bg + (obj - bg) * alpha
    return (img * 2.0 - 1.0).astype(xp.float32)


def make_clips(
    n: int,
    split: str = "train",
    seed: int = 0,
    num_frames: int = NUM_FRAMES,
    size: int = SIZE,
    directional_only: bool = False,
    batch: int = 32,
) -> tuple[np.ndarray, list[str], dict]:
    """``n`` clips (numpy float32 ``[n, F, H, W, 3]`` in [-1, 1]), their captions and parameters."""
    params = sample_params(n, split, seed, num_frames, size, directional_only)
    arr = array_params(params)
    out = np.empty((n, num_frames, size, size, 3), np.float32)
    for s in range(0, n, batch):
        out[s : s + batch] = render({k: v[s : s + batch] for k, v in arr.items()}, num_frames, size)
    return out, list(params["captions"]), params
