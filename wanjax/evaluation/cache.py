"""Step-cache fidelity: how far a cached run lands from the uncached run of the same precision (issue 37).

One owner for the measurement that ``wanjax eval --cache`` (`wanjax.evaluation.run.run_eval`) and the mini-model
benchmark (``bench/cache_fidelity.py``) both report: per video `compare_to_uncached` (PSNR / SSIM of the decoded
uint8 frames vs the uncached frames, peak 255, and the forwards the `StepCache` computed and skipped), over a set
of videos `summarize` (means, minima, the forward count and its speed-up). Task metrics (motion direction, frame-0
PSNR) stay with their callers, which know the samples.

`CacheEval` is what ``run_eval(cache=...)`` takes: the `CacheConfig` to run, and where each precision's calibration
comes from (a file, or calibrated on the calibration set with that precision's experts).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from wanjax.metrics import psnr, ssim
from wanjax.sampling.cache import CacheConfig

__all__ = ["CacheEval", "compare_to_uncached", "summarize"]


@dataclasses.dataclass(frozen=True)
class CacheEval:
    """Settings of an evaluation with the step cache.

    Attributes:
      config: the cache's rule, threshold, skip cap and warmup (`wanjax.sampling.cache.CacheConfig`).
      calibration: a ``cache_calibration.json`` (or a directory holding one) used for every precision; None (default)
        calibrates each precision (BF16 and every quantized variant) with its own experts on the first ``samples``
        samples of the calibration set (`wanjax.quant.step_cache.calibrate_step_cache`: one uncached run each).
      samples: calibration-set samples per precision when ``calibration`` is None (at least 1).
    """

    config: CacheConfig = CacheConfig()
    calibration: str | None = None
    samples: int = 2

    def validate(self) -> "CacheEval":
        self.config.validate()
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"cache samples: expected a positive integer, got {self.samples!r}")
        return self


def compare_to_uncached(frames, ref_frames, cache) -> dict:
    """A cached video vs the uncached one of the same precision (both uint8 [F, H, W, 3], same noise): ``psnr``,
    ``ssim`` (peak 255; PSNR ``inf`` when identical), and from the `StepCache` that ran it ``computed``,
    ``skipped`` and ``schedule`` (``"CCS..."``: computed / skipped per step)."""
    return {
        "psnr": float(psnr(frames, ref_frames, data_range=255.0)),
        "ssim": float(ssim(frames, ref_frames, data_range=255.0)),
        "computed": int(cache.computed),
        "skipped": int(cache.skipped),
        "schedule": cache.schedule,
    }


def summarize(rows: Sequence[dict], steps: int) -> dict:
    """Rows of `compare_to_uncached` (one per video) summed up: mean and range of the forwards computed, the mean
    skipped, the speed-up in forwards (``steps / mean computed``), the schedule (one string when every video had
    the same, else the sorted distinct ones), PSNR and SSIM mean and minimum."""
    if not rows:
        raise ValueError("summarize: no rows")
    computed = [r["computed"] for r in rows]
    schedules = sorted({r["schedule"] for r in rows})
    return {
        "computed": float(np.mean(computed)),
        "computed_range": [int(min(computed)), int(max(computed))],
        "skipped": steps - float(np.mean(computed)),
        "speedup_forwards": steps / float(np.mean(computed)),
        "schedule": schedules[0] if len(schedules) == 1 else schedules,
        "psnr_mean": float(np.mean([r["psnr"] for r in rows])),
        "psnr_min": float(np.min([r["psnr"] for r in rows])),
        "ssim_mean": float(np.mean([r["ssim"] for r in rows])),
        "ssim_min": float(np.min([r["ssim"] for r in rows])),
    }
