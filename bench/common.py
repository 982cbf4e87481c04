"""Shared helpers for benchmarks: device facts and memory, result files, the output check metric.

Timers live in `bench.timing`; the package layout of an uninstalled checkout in `bench.layout`.
"""

from __future__ import annotations

import functools
import os
import subprocess

import jax

from wanjax.io.atomic import write_json_atomic
from wanjax.metrics import relative_l2

#: the kernel benchmarks' output check: relative L2 (float64, reference norm floored at 1e-30), ``inf`` when the
#: output has a NaN or Inf
rel_err = functools.partial(relative_l2, floor=1e-30, nonfinite="inf")


def device_facts() -> dict:
    d = jax.devices()[0]
    return {
        "device": getattr(d, "device_kind", str(d)),
        "platform": d.platform,
        "jax": jax.__version__,
        "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
        "git_commit": _git_commit(),
    }


def _git_commit() -> str | None:
    try:
        return subprocess.check_output(
            ["git", "rev-parse", "--short", "HEAD"], text=True, stderr=subprocess.DEVNULL
        ).strip()
    except Exception:
        return os.environ.get("WANJAX_COMMIT")


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def memory() -> dict:
    """``bytes_in_use`` / ``peak_bytes_in_use`` of device 0 (None on CPU)."""
    s = jax.devices()[0].memory_stats() or {}
    return {"bytes_in_use": s.get("bytes_in_use"), "peak_bytes_in_use": s.get("peak_bytes_in_use")}


def state_bytes(tree) -> int:
    """Bytes of all array leaves of ``tree``."""
    return int(sum(a.nbytes for a in jax.tree.leaves(tree)))


def write_result(name: str, payload: dict, out_dirs=("bench/results",)) -> None:
    """Write ``<dir>/<name>.json`` atomically for each dir (also $OUT when set, so it comes back from the GPU
    machine); numpy values are converted (`wanjax.io.jsonio.json_default`)."""
    dirs = list(out_dirs)
    if os.environ.get("OUT"):
        dirs.append(os.environ["OUT"])
    for d in dirs:
        write_json_atomic(os.path.join(d, f"{name}.json"), payload, indent=2)


def no_gpu(name: str, note: str = "nothing to time") -> bool:
    """True, after printing ``bench.<name>: no GPU; <note>``, where jax has no GPU backend (the GPU-only benchmarks
    stop there)."""
    if jax.default_backend() != "gpu":
        print(f"bench.{name}: no GPU; {note}")
        return True
    return False


def bench_log(name: str):
    """A progress logger: prints ``[bench.<name>] msg`` and flushes."""

    def log(msg):
        print(f"[bench.{name}] {msg}", flush=True)

    return log


def shape_sweep(ms: str, shapes: str, log):
    """The ``(M, K, N)`` of a sweep over ``ms`` (``"M1,M2"``) and ``shapes`` (``"KxN,..."``), each logged as it
    starts."""
    for m in (int(v) for v in ms.split(",")):
        for shape in shapes.split(","):
            k, n = (int(v) for v in shape.split("x"))
            log(f"M={m} K={k} N={n}")
            yield m, k, n
