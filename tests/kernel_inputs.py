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
