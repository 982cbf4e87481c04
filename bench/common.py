"""Shared helpers for benchmarks: timing, device facts, result files."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import time

import jax
import numpy as np


def device_facts() -> dict:
    d = jax.devices()[0]
    return {"device": getattr(d, "device_kind", str(d)), "platform": d.platform, "jax": jax.__version__,
            "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
            "git_commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return os.environ.get("WANJAX_COMMIT")


def block(x):
    return jax.block_until_ready(x)


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> dict:
    """Median / min / all wall times (seconds) of ``fn(*args)`` after warm-up, blocking on the result."""
    for _ in range(warmup):
        block(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn(*args))
        ts.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "iters": iters, "all_s": ts}


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def write_result(name: str, payload: dict, out_dirs=("bench/results",)) -> None:
    """Write ``<dir>/<name>.json`` for each dir (also $OUT when set, so it comes back from the GPU machine)."""
    dirs = list(out_dirs)
    if os.environ.get("OUT"):
        dirs.append(os.environ["OUT"])
    for d in dirs:
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, f".{name}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=_np_default)
        os.replace(tmp, os.path.join(d, f"{name}.json"))


def _np_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))
