"""Training-data change for issue 38: sparse, small, high-contrast dots that change every frame ("twinkles").

Why (docs/MODEL_CARD.md, "Experts trained apart"): on the standard procedural clips everything the model has to
produce is predictable from the condition (first frame) and the caption: a flat object moving on a smooth background.
The best velocity is then nearly the same function of ``x_t`` at every noise level, only rescaled, and the experts'
activations barely change over the timesteps (bench/results/drift_mini_current.json). Real video has content that is
*not* predictable from the condition: fine, random detail. For such content the best denoiser depends on the noise
level itself: at high noise it cannot see the detail and predicts its mean (it must ignore that part of ``x_t``), at
low noise it reads the detail straight off ``x_t`` (it must pass it through). That is timestep-dependent content:
the network has to route and scale features differently by timestep, which is what makes a DiT's activation ranges
drift along the trajectory and the two experts, trained on the two sides of the boundary, learn different jobs.

The dots: each 8x8-pixel cell of the scene holds a dot with probability ``density`` *per frame* (a new random set in
every frame, so later frames cannot be copied from the first one), a disc of radius ``radius`` px at a random place in
its cell, white or black (equal odds), soft-edged, under the object, in scene coordinates (they scroll with the
camera pan). Half of the clips have none; the others a density drawn uniformly in ``[0.25, 1] * density``, so the
model can tell from the condition frame whether a clip has them (the held-out evaluation clips have none, and the
model should then not add them). Deterministic: the dots follow from the clip's own parameters. Only training clips
are changed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from wanjax.data import procedural

CELL = 8.0


def _hash(a, b, salt):
    """A deterministic pseudo-random value in [0, 1) per (a, b) (float arrays of integers) and salt."""
    h = jnp.sin(a * 12.9898 + b * 78.233 + salt * 37.719) * 43758.5453
    return h - jnp.floor(h)


def clip_density(p: dict, density: float):
    """[N] per-clip dot density: 0 for half of the clips, else ``U[0.25, 1] * density`` (from the clip's phases)."""
    ph = jnp.asarray(p["bg_phase"])
    on = _hash(ph[:, 0], ph[:, 1], 5.0) < 0.5
    return jnp.where(on, density * (0.25 + 0.75 * _hash(ph[:, 1], ph[:, 0], 6.0)), 0.0)


def sparkle_layer(p: dict, num_frames: int, size: int, radius: float = 1.3, density: float = 0.3):
    """``(value [N, F, H, W, 1] in {0, 1}, coverage [N, F, H, W, 1] in [0, 1])`` of the dots of clips ``p``
    (the arrays of `procedural.array_params`), in the scene coordinates `procedural.render` scrolls the
    background with; a new draw every frame."""
    f = jnp.arange(num_frames, dtype=jnp.float32)[None, :, None, None]
    pix = jnp.arange(size, dtype=jnp.float32) + 0.5
    x = pix[None, None, None, :]
    y = pix[None, None, :, None]
    bx = x - jnp.asarray(p["pan_x"])[:, None, None, None] * f
    by = y - jnp.asarray(p["pan_y"])[:, None, None, None] * f
    salt = jnp.asarray(p["bg_phase"])[:, 0][:, None, None, None] + 11.0 * f  # a new draw every frame
    ci, cj = jnp.floor(bx / CELL), jnp.floor(by / CELL)
    present = _hash(ci, cj, salt) < clip_density(p, density)[:, None, None, None]
    margin = radius + 0.5
    ox = margin + _hash(ci, cj, salt + 1.0) * (CELL - 2 * margin)
    oy = margin + _hash(ci, cj, salt + 2.0) * (CELL - 2 * margin)
    white = _hash(ci, cj, salt + 3.0) < 0.5
    dist = jnp.sqrt((bx - ci * CELL - ox) ** 2 + (by - cj * CELL - oy) ** 2)
    cov = jnp.clip(radius + 0.5 - dist, 0.0, 1.0) * present
    return white.astype(jnp.float32)[..., None], cov[..., None]


def render_with_sparkles(p: dict, num_frames: int, size: int, radius: float = 1.3, density: float = 0.3):
    """`procedural.render` (jax) with the dots drawn over the background and under the object; [-1, 1]."""
    base = procedural.render(p, num_frames, size, xp=jnp)
    if density <= 0:
        return base
    val, cov = sparkle_layer(p, num_frames, size, radius, density)
    cov = cov * (1.0 - object_alpha(p, num_frames, size))  # the object covers the dots
    return base + (val * 2.0 - 1.0 - base) * cov


def object_alpha(p: dict, num_frames: int, size: int):
    """[N, F, H, W, 1] coverage of the object, as `procedural.render` computes it."""
    q = {k: jnp.asarray(p[k]) for k in procedural.ARRAY_KEYS}
    cx, cy, theta, scale = procedural.trajectory(jnp, q, num_frames)
    e = lambda a: a[:, :, None, None]  # noqa: E731
    pix = jnp.arange(size, dtype=jnp.float32) + 0.5
    x = pix[None, None, None, :]
    y = pix[None, None, :, None]
    r = e(q["radius"][:, None] * scale)
    dx, dy = x - e(cx), y - e(cy)
    ct, st = jnp.cos(e(theta)), jnp.sin(e(theta))
    u = (ct * dx + st * dy) / r
    v = (-st * dx + ct * dy) / r
    d = procedural._signed_distance(jnp, q["kind"][:, None, None, None], u, v) * r
    return jnp.clip(0.5 - d, 0.0, 1.0)[..., None]


def excess_kurtosis(x) -> float:
    """Excess kurtosis of all values of ``x`` (numpy), per channel of the last axis, averaged."""
    a = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    a = a - a.mean(0)
    v = (a**2).mean(0)
    return float(np.mean((a**4).mean(0) / np.maximum(v**2, 1e-30) - 3.0))
