"""compat: the number formats moved to ``wanjax.numerics.formats`` (the bottom layer); this module re-exports them.

Remove when quant/calibrate.py, tests/test_artifact.py, tests/test_calibrate.py, tests/test_sharding.py,
bench/pipeline.py and the docs (formats.md, QUANTIZATION.md) import wanjax.numerics.formats.
"""

# compat: remove when quant/calibrate.py imports wanjax.numerics
from wanjax.numerics.formats import *  # noqa: F401,F403
from wanjax.numerics.formats import __all__  # noqa: F401
