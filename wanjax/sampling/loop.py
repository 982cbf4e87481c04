"""A generic denoise loop over any solver of this package (for tests, demos and simple pipelines).

The I2V pipeline writes its own loop (expert switch, CFG, progress bar); this one is the minimal reference:
``x_{i+1}, state = step(state, i, model_fn(x_i, t_i, i), x_i)`` for i = 0..N-1.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from wanjax.sampling.euler import euler_init, euler_step
from wanjax.sampling.schedule import FlowSchedule
from wanjax.sampling.unipc import unipc_init, unipc_step

__all__ = ["SOLVERS", "get_solver", "sample"]

SOLVERS = {
    "unipc": (unipc_init, unipc_step),
    "euler": (euler_init, euler_step),
}


def get_solver(name: str):
    """``(init_fn, step_fn)`` for ``"unipc"`` (official default) or ``"euler"``."""
    try:
        return SOLVERS[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; expected one of {sorted(SOLVERS)}") from None


def sample(model_fn: Callable, noise, schedule: FlowSchedule, solver: str = "unipc", unroll: bool = False):
    """Integrate from ``noise`` (at ``sigmas[0]``) to ``sigmas[N] = 0``.

    Args:
      model_fn: ``model_fn(x, t, i) -> v``: the flow prediction at sample ``x`` for integer timestep ``t``
        (int32 scalar) at step ``i``; must be traceable when ``unroll`` is False.
      noise: the starting sample (any shape).
      schedule: from `wanjax.sampling.flow_schedule`.
      solver: ``"unipc"`` or ``"euler"``.
      unroll: run a Python loop (``model_fn`` may then be any callable) instead of ``lax.fori_loop``.

    Returns:
      The final float32 sample.
    """
    init_fn, step_fn = get_solver(solver)
    x = jnp.asarray(noise, jnp.float32)
    state = init_fn(schedule.sigmas, x.shape)
    timesteps = jnp.asarray(schedule.timesteps, jnp.int32)
    if unroll:
        step = jax.jit(step_fn)
        for i in range(schedule.num_steps):
            x, state = step(state, i, model_fn(x, timesteps[i], i), x)
        return x

    def body(i, carry):
        x, state = carry
        return step_fn(state, i, model_fn(x, timesteps[i], i), x)

    x, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (x, state))
    return x
