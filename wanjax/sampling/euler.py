"""Flow-matching Euler sampler: ``x_{i+1} = x_i + (sigma_{i+1} - sigma_i) * v_i``.

Same step as diffusers' ``FlowMatchEulerDiscreteScheduler`` (deterministic, no churn). Interface mirrors
`wanjax.sampling.unipc` so a denoise loop can switch solvers::

    state = euler_init(schedule.sigmas, x.shape)
    x, state = euler_step(state, i, v, x)      # i may be a traced int
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = ["EulerState", "euler_init", "euler_step"]


class EulerState(NamedTuple):
    """Sampler state (a pytree): ``sigmas`` float32 [N + 1], constant over the loop."""

    sigmas: jnp.ndarray


def euler_init(sigmas, sample_shape=None) -> EulerState:
    """State for sampling along ``sigmas`` ([N + 1], decreasing, final value included).

    ``sample_shape`` is accepted for symmetry with `unipc_init` and not needed (Euler keeps no history).
    """
    sig = np.asarray(sigmas, dtype=np.float32)
    if sig.ndim != 1 or sig.shape[0] < 2 or not np.all(np.diff(sig) < 0):
        raise ValueError(
            f"euler_init: sigmas must be 1-D, strictly decreasing, with N + 1 >= 2 entries; got shape {sig.shape}"
        )
    del sample_shape
    return EulerState(sigmas=jnp.asarray(sig))


def euler_step(state: EulerState, step_index, model_output, sample):
    """One Euler step from ``sigmas[step_index]`` to ``sigmas[step_index + 1]``; returns ``(x_next, state)``."""
    if model_output.shape != sample.shape:
        raise ValueError(f"euler_step: model_output {model_output.shape} and sample {sample.shape} differ in shape")
    dt = state.sigmas[step_index + 1] - state.sigmas[step_index]
    x_next = sample.astype(jnp.float32) + dt * model_output.astype(jnp.float32)
    return x_next, state
