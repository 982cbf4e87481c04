"""Two-level integer group scales for INT4: every group scale an integer multiple of one unit per row.

A row ``x [K]`` (a weight's output channel, an activation's token) in groups of ``g`` along K gets one float32 unit
``u`` and, per group, an integer multiplier ``m`` in ``[1, L]`` (``L`` = ``levels``). The group scale is ``m * u``
and the element code ``q`` an INT4 code in [-7, 7], so the element's value is ``q * m * u``: an ordinary
group-scaled INT4 tensor with scale ``s = m * u``.

What makes the format useful: the **carried** int8 value ``c = q * m`` lies in ``[-7 L, 7 L]``, so for
``L <= 18`` (``7 * 18 = 126``) it fits int8, and ``sum_k c_x[k] * c_w[k]`` is an exact int32 sum. A group-scaled
product is then ``u_x * u_w * sum_k c_x c_w``: the per-channel int8 GEMM, with per-row scales ``u``, computes the
group-scaled result exactly (no per-group rescaling of partial sums).

Scale rule (per row; ``clip`` multiplies the unit, as it multiplies the scale of the other int formats)::

    u = f32(amax_row * clip) * f32(1 / (7 L))               (0 / subnormal -> 1.0, as the int formats)
    m = clamp(ceil(amax_group / (7 u)), 1, L)                (the smallest multiple keeping the group's amax)
    q = clamp(round_half_even(x * f32(1 / f32(m * u))), -7, 7)

``ceil`` keeps every group's abs-max inside its scale: nothing saturates beyond what the row clip asks for (a group
whose ratio lands within rounding above an integer gets the next multiple, one level coarser, never clipped). With
``clip <= 1`` the group holding the row's abs-max gets ``m = L``; smaller groups get finer scales, in steps of ``u``.

Non-finite input (policy ``nonfinite="nan"``): a row holding a NaN / Inf gets the unit NaN (its codes 0, its
multipliers 1), so its whole row dequantizes to NaN; the per-group int formats poison only the group. A row poisons
every output it feeds in a matmul either way, and a row unit is all the per-channel GEMM can poison.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.numerics.checks import check_finite, check_positive, group_count
from wanjax.numerics.groups import F32_TINY, group_amax, split_groups
from wanjax.numerics.tensor import QuantizedTensor

__all__ = [
    "MAX_SCALE_LEVELS",
    "TwoLevelInt4",
    "carried_from_scales",
    "check_scale_levels",
    "quantize_int4_two_level",
    "two_level_qdq",
]

#: INT4 codes (|q| <= 7) times a multiplier up to this stay int8: 7 * 18 = 126 <= 127.
MAX_SCALE_LEVELS = 18
_QMAX = 7


def check_scale_levels(fn: str, levels) -> int:
    """Validates a number of scale levels ``L`` (a Python int in ``[1, MAX_SCALE_LEVELS]``) and returns it;
    raises ``ValueError`` naming ``fn``, the expected range and the value."""
    if isinstance(levels, bool) or not isinstance(levels, (int, np.integer)):
        raise ValueError(f"{fn}: scale levels must be an int in [1, {MAX_SCALE_LEVELS}], got {levels!r}")
    if not 1 <= int(levels) <= MAX_SCALE_LEVELS:
        raise ValueError(
            f"{fn}: scale levels must lie in [1, {MAX_SCALE_LEVELS}] (7 * L must fit int8: 7 * {MAX_SCALE_LEVELS} = "
            f"{7 * MAX_SCALE_LEVELS} <= 127), got {levels}"
        )
    return int(levels)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TwoLevelInt4:
    """An INT4 tensor with two-level integer group scales (see the module docstring).

    Fields (arrays are pytree leaves; ``group_size`` and ``levels`` static):

    ``codes``        int8 ``[..., K]`` in [-7, 7]
    ``multipliers``  uint8 ``[..., K // group_size]`` in ``[1, levels]``
    ``unit``         float32 ``[..., 1]``: the row unit ``u`` (NaN for a row with non-finite input)
    ``group_size``   elements per multiplier along K
    ``levels``       the largest multiplier ``L``
    """

    codes: jax.Array
    multipliers: jax.Array
    unit: jax.Array
    group_size: int = dataclasses.field(default=128, metadata=dict(static=True))
    levels: int = dataclasses.field(default=MAX_SCALE_LEVELS, metadata=dict(static=True))

    @property
    def scales(self) -> jax.Array:
        """The group scales ``f32(m * u)``, ``[..., K // group_size]`` (what an ordinary group-scaled INT4 holds)."""
        return self.multipliers.astype(jnp.float32) * self.unit

    def carried(self) -> jax.Array:
        """The carried int8 values ``c = q * m`` ``[..., K]`` in ``[-7 L, 7 L]``: the per-channel int8 GEMM's operand
        (with per-row scale :attr:`unit`)."""
        m = jnp.repeat(self.multipliers.astype(jnp.int32), self.group_size, axis=-1)
        return (self.codes.astype(jnp.int32) * m).astype(jnp.int8)

    def as_quantized_tensor(self) -> QuantizedTensor:
        """The same values as an ordinary group-scaled ``QuantizedTensor(fmt="int4")`` with scales :attr:`scales`."""
        return QuantizedTensor(codes=self.codes, scales=self.scales, fmt="int4", group_size=self.group_size)

    def dequantize(self, dtype=jnp.float32) -> jax.Array:
        """Float values ``q * f32(m * u)`` (those of :meth:`as_quantized_tensor`), cast to ``dtype``."""
        return self.as_quantized_tensor().dequantize(dtype)


def quantize_int4_two_level(
    x: jax.Array,
    group_size: int,
    levels: int = MAX_SCALE_LEVELS,
    clip: jax.Array | float = 1.0,
    nonfinite: str = "raise",
) -> TwoLevelInt4:
    """INT4 with two-level integer group scales of ``x [..., K]`` along its last axis.

    Args:
      x: float array ``[..., K]``.
      group_size: elements per group along K (a divisor of K, e.g. 64 or 128).
      levels: the largest multiplier ``L`` in ``[1, MAX_SCALE_LEVELS]`` (18 by default: carried values up to 126).
      clip: clip ratio(s) > 0 multiplying the row unit; scalar or broadcastable to ``x.shape[:-1] + (1,)``; may be
        traced.
      nonfinite: ``"raise"`` or ``"nan"`` (as the other formats; see ``wanjax.numerics.checks``).

    Returns:
      :class:`TwoLevelInt4` (codes, multipliers, unit).
    """
    fn = "quantize_int4_two_level"
    x = jnp.asarray(x)
    if group_size is None:
        raise ValueError(f"{fn}: group_size must be a divisor of K (the groups the multipliers scale), got None")
    _, g = group_count(fn, x.shape, group_size)
    levels = check_scale_levels(fn, levels)
    check_positive(fn, "clip", clip)
    check_finite(fn, x, nonfinite)
    codes, mult, unit = _two_level_core(x, clip, group_size=g, levels=levels)
    return TwoLevelInt4(codes=codes, multipliers=mult, unit=unit, group_size=g, levels=levels)


def _recip32(v: float) -> np.float32:
    return np.float32(1.0) / np.float32(v)


@functools.partial(jax.jit, static_argnames=("group_size", "levels"))
def _two_level_core(x, clip, group_size, levels):
    xg = split_groups(x, x.shape[-1] // group_size, group_size)  # [..., G, g]
    gmax, gbad = group_amax(xg)  # [..., G]
    bad = jnp.any(gbad, axis=-1, keepdims=True)  # [..., 1]
    unit = jnp.max(gmax, axis=-1, keepdims=True) * jnp.asarray(clip, jnp.float32) * _recip32(_QMAX * levels)
    unit = jnp.where(unit < F32_TINY, jnp.float32(1.0), unit)  # zero rows: unit 1 (a NaN clip stays NaN)
    unit = jnp.where(bad, jnp.float32(jnp.nan), unit)
    ratio = gmax / (unit * jnp.float32(_QMAX))
    m = jnp.clip(jnp.ceil(ratio), 1.0, float(levels))
    m = jnp.where(jnp.isfinite(m), m, 1.0)
    s = m * unit
    q = jnp.clip(jnp.round(xg * (1.0 / s)[..., None]), -_QMAX, _QMAX)
    q = jnp.where(bad[..., None], 0.0, q).astype(jnp.int8)
    return q.reshape(x.shape), m.astype(jnp.uint8), unit


def two_level_qdq(x, group_size: int, levels: int, clip=1.0, nonfinite: str = "nan") -> jax.Array:
    """Fake quantization ``dequantize(quantize_int4_two_level(x, ...))`` in ``x``'s float dtype."""
    x = jnp.asarray(x)
    return quantize_int4_two_level(x, group_size, levels, clip, nonfinite).dequantize(x.dtype)


def carried_from_scales(codes: jax.Array, scales: jax.Array, unit: jax.Array, group_size: int) -> jax.Array:
    """The carried int8 values ``q * m`` from INT4 ``codes [..., K]`` (unpacked), the group scales ``scales =
    f32(m * u)`` ``[..., K // g]`` and the row unit ``unit`` ``[..., 1]`` or ``[...]``.

    ``m = round(scales / unit)`` recovers the integer exactly: ``f32(m * u) / u`` is within ``m * 2**-22`` of ``m``
    for ``m <= 18``. Rows whose unit is not finite (poisoned rows) get carried zeros; their unit keeps them NaN in the
    GEMM's epilogue.
    """
    unit = jnp.asarray(unit, jnp.float32)
    if unit.ndim == jnp.ndim(scales) - 1:
        unit = unit[..., None]
    m = jnp.round(jnp.asarray(scales, jnp.float32) / unit)
    m = jnp.where(jnp.isfinite(m), m, 0.0).astype(jnp.int32)
    m = jnp.repeat(m, group_size, axis=-1)
    return (codes.astype(jnp.int32) * m).astype(jnp.int8)
