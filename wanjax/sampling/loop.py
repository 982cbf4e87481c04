"""The denoise loop: ``x_{i+1}, state = step(state, i, model_fn(x_i, t_i, i), x_i)`` for i = 0..N-1.

This is the project's one loop: the I2V pipeline calls it with a ``model_fn`` that picks the expert for ``t_i`` and
applies classifier-free guidance, and a ``callback`` that drives the progress bar.
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


def sample(
    model_fn: Callable,
    noise,
    schedule: FlowSchedule,
    solver: str = "unipc",
    unroll: bool = False,
    callback: Callable[[int, int, jax.Array], None] | None = None,
):
    """Integrate from ``noise`` (at ``sigmas[0]``) to ``sigmas[N] = 0``.

    Args:
      model_fn: ``model_fn(x, t, i) -> v``: the flow prediction at sample ``x`` for integer timestep ``t``
        (int32 scalar) at step ``i``; must be traceable when ``unroll`` is False.
      noise: the starting sample (any shape).
      schedule: from `wanjax.sampling.flow_schedule`.
      solver: ``"unipc"`` or ``"euler"``.
      unroll: run a Python loop (``model_fn`` may then be any callable, e.g. one that switches experts on the
        host) instead of ``lax.fori_loop``.
      callback: with ``unroll``, called as ``callback(i, t_i, x_{i+1})`` after each step (progress reporting).

    Returns:
      The final float32 sample.
    """
    init_fn, step_fn = get_solver(solver)
    x = jnp.asarray(noise, jnp.float32)
    state = init_fn(schedule.sigmas, x.shape)
    timesteps = jnp.asarray(schedule.timesteps, jnp.int32)
    if callback is not None and not unroll:
        raise ValueError("sample: callback needs unroll=True (a traced loop cannot call back per step)")
    if unroll:
        step = jax.jit(step_fn)
        host_t = [int(t) for t in schedule.timesteps]
        for i in range(schedule.num_steps):
            x, state = step(state, i, model_fn(x, timesteps[i], i), x)
            if callback is not None:
                callback(i, host_t[i], x)
        return x

    def body(i, carry):
        x, state = carry
        return step_fn(state, i, model_fn(x, timesteps[i], i), x)

    x, _ = jax.lax.fori_loop(0, schedule.num_steps, body, (x, state))
    return x
