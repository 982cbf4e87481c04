"""Scale groups along the last axis K: the reshape and the abs-max every block/group quantizer starts from."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["F32_TINY", "group_amax", "split_groups"]

#: Smallest normal float32, 2**-126: scales below it are replaced (they would flush to zero on XLA CPU/GPU).
F32_TINY = float(jnp.finfo(jnp.float32).tiny)


def split_groups(x: jax.Array, n_groups: int, group_size: int) -> jax.Array:
    """``x [..., K]`` as float32 ``[..., n_groups, group_size]``."""
    return jnp.asarray(x, jnp.float32).reshape(*x.shape[:-1], n_groups, group_size)


def group_amax(xg: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(abs-max over the last axis ignoring non-finite values, whether the group holds a non-finite value)."""
    finite = jnp.isfinite(xg)
    amax = jnp.max(jnp.where(finite, jnp.abs(xg), 0.0), axis=-1)
    return amax, ~jnp.all(finite, axis=-1)
