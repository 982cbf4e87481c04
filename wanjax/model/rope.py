"""3D rotary position embedding of the Wan DiT.

Each 128-channel head is split into (t, h, w) parts of 44/42/42 channels; each part rotates *interleaved* pairs
``(x[2i], x[2i+1])`` as complex numbers by ``pos * theta^(-2i/d_part)``. The per-axis tables are computed in float64
on the host (as the official code does) over ``max_seq_len`` positions, then cast to fp32 and gathered for the
(f, h, w) token grid inside the graph, so no S-sized constant is embedded in the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=16)
def axis_tables(
    head_dim: int, split: tuple[int, int, int], max_seq_len: int = 1024, theta: float = 10000.0
) -> tuple[np.ndarray, ...]:
    """Per-axis (cos, sin) tables, float64-computed then fp32: 3 pairs of [max_seq_len, d_part/2]."""
    assert sum(split) == head_dim, (split, head_dim)
    pos = np.arange(max_seq_len, dtype=np.float64)
    out = []
    for d in split:
        inv = 1.0 / np.power(theta, np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.outer(pos, inv)
        out += [np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)]
    return tuple(out)


def rope_cos_sin(
    grid: tuple[int, int, int],
    head_dim: int,
    split: tuple[int, int, int],
    max_seq_len: int = 1024,
    theta: float = 10000.0,
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [F*H*W, head_dim/2] (fp32) for tokens ordered f-major, then h, then w."""
    f, h, w = grid
    if max(grid) > max_seq_len:
        raise ValueError(f"RoPE grid {grid} exceeds max positions {max_seq_len}")
    ct, st, ch, sh, cw, sw = (jnp.asarray(a) for a in axis_tables(head_dim, split, max_seq_len, theta))

    def expand(c, s, n, axis):
        shape = [f, h, w, c.shape[-1]]
        idx = [1, 1, 1, c.shape[-1]]
        idx[axis] = n
        return (jnp.broadcast_to(c[:n].reshape(idx), shape), jnp.broadcast_to(s[:n].reshape(idx), shape))

    parts = [expand(ct, st, f, 0), expand(ch, sh, h, 1), expand(cw, sw, w, 2)]
    cos = jnp.concatenate([p[0] for p in parts], axis=-1).reshape(f * h * w, head_dim // 2)
    sin = jnp.concatenate([p[1] for p in parts], axis=-1).reshape(f * h * w, head_dim // 2)
    return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs of ``x`` [B, S, N, D] (fp32 math); returns ``x.dtype``.

    ``cos``/``sin``: [S, D/2].
    """
    b, s, n, d = x.shape
    xf = x.astype(jnp.float32).reshape(b, s, n, d // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    sn = sin[None, :, None, :]
    y = jnp.stack([x0 * c - x1 * sn, x0 * sn + x1 * c], axis=-1)
    return y.reshape(b, s, n, d).astype(x.dtype)
