"""Shared random inputs for the W4A4 kernel tests (GPU and TPU kernels take the same operands)."""

import jax.numpy as jnp
import numpy as np


def w4a4_inputs(seed, m, k, n, r):
    """int4-valued activations/weights in int8, per-token/per-channel scales, bias, optional low-rank operands."""
    rng = np.random.default_rng(seed)
    qx = jnp.asarray(rng.integers(-7, 8, (m, k)), jnp.int8)
    qw = jnp.asarray(rng.integers(-8, 8, (n, k)), jnp.int8)
    sx = jnp.asarray(rng.uniform(0.01, 0.1, m), jnp.float32)
    sw = jnp.asarray(rng.uniform(0.01, 0.1, n), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(n), jnp.float32)
    x_lr = jnp.asarray(rng.standard_normal((m, r)), jnp.bfloat16) if r else None
    up = jnp.asarray(rng.standard_normal((r, n)) * 0.3, jnp.bfloat16) if r else None
    return qx, qw, sx, sw, bias, x_lr, up


def act_inputs(m, k, r, seed):
    """bf16 activations [M, K] with per-row magnitudes and an outlier channel, a smoothing vector [K] and an optional
    bf16 low-rank down projection [K, r] (the activation-quantization kernels' operands)."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((m, k)) * rng.uniform(0.1, 5, (m, 1)), jnp.bfloat16)
    x = x.at[:, 3].multiply(30.0)  # an outlier channel
    smooth = jnp.asarray(rng.uniform(0.5, 2, k), jnp.float32)
    down = jnp.asarray(rng.standard_normal((k, r)) * 0.05, jnp.bfloat16) if r else None
    return x, smooth, down


def np_rotate_runtime(x, signs, b, piece=128):
    """numpy model of the run-time rotation (``numerics.hadamard.rotate_activations_mxu``, the fused kernel's numerics):
    ``x * signs`` in blocks of ``b``, the pieces of ``min(b, piece)`` columns mixed by the +-1 Hadamard of their count
    (float64, rounded to float32), rounded to bf16, times the +-1 Hadamard of a piece (float64), ``/ sqrt(b)``."""
    import ml_dtypes

    from wanjax.numerics.hadamard import hadamard_matrix

    h = min(b, piece)
    p = b // h
    xs = np.asarray(x, np.float32) * np.asarray(signs, np.float32)
    lead, k = xs.shape[:-1], xs.shape[-1]
    y = xs.reshape(*lead, k // b, p, h).astype(np.float64)
    y = np.einsum("qp,...ph->...qh", np.sign(hadamard_matrix(p, np.float64)), y).astype(np.float32)
    y = y.astype(ml_dtypes.bfloat16).astype(np.float64) @ np.sign(hadamard_matrix(h, np.float64))
    return (y / np.sqrt(b)).reshape(*lead, k).astype(np.float32)
