"""Argument validation and the non-finite input policy shared by the quantizers in ``wanjax.numerics.formats``.

Non-finite policy (argument ``nonfinite`` of every quantizer):

* ``"raise"`` (default). Eager call on concrete data: ``ValueError`` naming the function, the input shape, how many
  values are non-finite and the index of the first one. Under ``jax.jit`` / any tracing: a ``jax.debug.callback`` is
  inserted that raises the same ``ValueError`` when the compiled function runs; JAX surfaces it as
  ``jax.errors.JaxRuntimeError`` whose message contains the text. This costs one small device-to-host transfer per
  call, so hot loops should use ``"nan"``.
* ``"nan"``. No check. Every scale group that contains an inf/NaN gets a NaN scale (E8M0 code 255 for MX, a NaN
  float8 for NVFP4 block scales, a NaN float32 otherwise) and zero codes, so that group dequantizes to all-NaN and
  other groups are unaffected. Non-finite input never turns into finite garbage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NONFINITE_POLICIES = ("raise", "nan")


def is_traced(x) -> bool:
    """True when ``x`` is an abstract tracer (inside jit/vmap/grad), i.e. its values are not available."""
    return isinstance(x, jax.core.Tracer)


def _nonfinite_message(fn: str, shape, count: int, first) -> str:
    return (
        f"{fn}: input of shape {tuple(shape)} contains {count} non-finite value(s) (inf or NaN), first at index "
        f"{tuple(int(i) for i in first)}; expected all values finite. Pass nonfinite='nan' to get NaN scales for the "
        f"affected groups instead of an error."
    )


def check_finite(fn: str, x: jax.Array, nonfinite: str) -> None:
    """Applies the non-finite policy (see module docstring) to quantizer input ``x``."""
    if nonfinite not in NONFINITE_POLICIES:
        raise ValueError(f"{fn}: nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
    if nonfinite == "nan":
        return
    shape = tuple(x.shape)
    count, first = _nonfinite_stats(x)
    if not is_traced(x):
        count = int(count)  # only two scalars leave the device
        if count > 0:
            idx = np.unravel_index(int(first), shape) if shape else ()
            raise ValueError(_nonfinite_message(fn, shape, count, idx))
        return

    def _callback(count_v, first_v):
        if int(count_v) > 0:
            idx = np.unravel_index(int(first_v), shape) if shape else ()
            raise ValueError(_nonfinite_message(fn, shape, int(count_v), idx))

    jax.debug.callback(_callback, count, first)


@jax.jit
def _nonfinite_stats(x):
    """(number of non-finite values, flat index of the first one) of ``x``."""
    flat_bad = ~jnp.isfinite(jnp.asarray(x, jnp.float32).reshape(-1))
    return jnp.sum(flat_bad, dtype=jnp.int32), jnp.argmax(flat_bad)


def group_count(fn: str, x_shape, group_size: int | None, arg: str = "group_size") -> tuple[int, int]:
    """Returns ``(n_groups, group_size)`` along the last axis; ``group_size=None`` means one group (per channel).

    Raises ``ValueError`` naming the function, the expected divisibility and what was given.
    """
    if len(x_shape) == 0:
        raise ValueError(
            f"{fn}: expected an array with at least 1 dimension (groups run along the last axis), got a scalar"
        )
    k = int(x_shape[-1])
    if k == 0:
        raise ValueError(f"{fn}: last axis of x (shape {tuple(x_shape)}) is empty; expected K >= 1")
    if group_size is None:
        return 1, k
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size <= 0:
        raise ValueError(f"{fn}: {arg} must be a positive int or None, got {group_size!r}")
    if k % int(group_size) != 0:
        raise ValueError(
            f"{fn}: {arg}={group_size} does not divide K={k} (last axis of x with shape {tuple(x_shape)}); "
            f"expected K % {arg} == 0"
        )
    return k // int(group_size), int(group_size)


def check_positive(fn: str, name: str, value) -> None:
    """Raises ``ValueError`` if a concrete ``value`` has any entry <= 0 or non-finite; traced values are not checked."""
    if value is None or is_traced(value):
        return
    arr = np.asarray(jax.device_get(value), dtype=np.float64)
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{fn}: {name} must be finite and > 0, got {arr if arr.size <= 8 else arr.ravel()[:8]}")


def check_choice(fn: str, name: str, value, choices) -> None:
    """Raises ``ValueError`` if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {tuple(choices)}, got {value!r}")
