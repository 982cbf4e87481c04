"""Quantization quality, measured side by side (``wanjax eval``).

* PSNR, SSIM, relative L2: `wanjax.metrics` (re-exported here).
* `sqnr`: statistics regrouped per timestep bin (`RebinnedSource`), per-layer SQNR of a
  quantized expert on captured inputs, activation ranges over timesteps.
* `plots`: SQNR heat maps (layer x bin per expert) and activation-range plots (matplotlib, PNG).
* `report`: ``report.md`` with tables and the plots.
* `run`: the driver (eval/calibration sets, recipes, ablations) behind ``wanjax eval``.
"""

from wanjax.metrics import psnr, relative_l2, ssim

__all__ = ["psnr", "relative_l2", "ssim"]
