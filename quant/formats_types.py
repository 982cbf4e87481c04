"""compat: ``QuantizedTensor`` moved to ``wanjax.numerics.tensor``; remove when tests/test_sharding.py imports it."""

# compat: remove when tests/test_sharding.py imports wanjax.numerics
from wanjax.numerics.tensor import FORMATS, FOUR_BIT_FORMATS, QuantizedTensor  # noqa: F401

__all__ = ["FORMATS", "FOUR_BIT_FORMATS", "QuantizedTensor"]
