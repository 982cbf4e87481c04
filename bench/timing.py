"""The benchmarks' timers, one place: wall clock (median of blocking calls), CUPTI device time, torch CUDA events.

* `time_fn`      wall seconds of ``fn(*args)`` after warm-up calls: ``{"median_s", "min_s", "iters", "all_s"}``.
* `wall_ms`      median wall milliseconds over calls cycling through several input sets (fresh inputs each call).
* `cupti_ms`     median device milliseconds of all kernels of one call (CUPTI, ``jax.experimental.mosaic.gpu
                 .profiler.measure``; GPU only), after one warm-up call.
* `cupti_kernels` the per-kernel device times of one call (``measure(aggregate=False)``; GPU only).
* `interleaved`  rounds of one call per variant (order rotated per round): drift hits all variants alike.
* `torch_time`   median wall seconds of a torch callable (CUDA events on a GPU).
* `stopwatch`    seconds since a ``perf_counter`` start (compile / build / load times).

Every JAX timer blocks on the result (``jax.block_until_ready``), so the time is the computation's, not the
dispatch's.
"""

from __future__ import annotations

import statistics
import time

import jax

#: CUPTI / rotated wall-clock iterations of the kernel benchmarks
ITERS = 25


def block(x):
    """``jax.block_until_ready(x)``."""
    return jax.block_until_ready(x)


def stopwatch(t0: float) -> float:
    """Seconds since ``t0 = time.perf_counter()``."""
    return time.perf_counter() - t0


def summary(ts: list[float]) -> dict:
    """``{"median_s", "min_s", "iters", "all_s"}`` of per-call seconds ``ts``."""
    return {"median_s": statistics.median(ts), "min_s": min(ts), "iters": len(ts), "all_s": ts}


def time_fn(fn, *args, warmup: int = 2, iters: int = 10) -> dict:
    """Median / min / all wall times (seconds) of ``fn(*args)`` after ``warmup`` calls, blocking on the result."""
    for _ in range(warmup):
        block(fn(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        block(fn(*args))
        ts.append(time.perf_counter() - t0)
    return summary(ts)


def wall_ms(f, arg_sets, iters: int = ITERS) -> float:
    """Median wall milliseconds of ``f(*arg_sets[i % len(arg_sets)])`` over ``iters`` calls after one warm-up
    call on the first set: rotated inputs, so no call reuses the previous one's operands in cache."""
    block(f(*arg_sets[0]))
    ts = []
    for i in range(iters):
        a = arg_sets[i % len(arg_sets)]
        t = time.perf_counter()
        block(f(*a))
        ts.append((time.perf_counter() - t) * 1e3)
    return float(statistics.median(ts))


def cupti_ms(f, *args, iters: int = ITERS) -> float:
    """Median device milliseconds of all kernels of one call ``f(*args)`` over ``iters`` calls (CUPTI), after one
    warm-up call. GPU only."""
    from jax.experimental.mosaic.gpu import profiler

    block(f(*args))
    _, times = profiler.measure(f, iterations=iters)(*args)
    return float(statistics.median(times))


def cupti_kernels(f, *args):
    """The device time of each kernel of one call ``f(*args)`` (CUPTI, ``measure(aggregate=False)``: a list of
    (kernel name, ms)). GPU only; ``f`` is traced again."""
    from jax.experimental.mosaic.gpu import profiler

    _, per_kernel = profiler.measure(f, aggregate=False)(*args)
    return per_kernel


def interleaved(calls: dict, rounds: int) -> dict[str, list[float]]:
    """``{name: [seconds per round]}``: ``rounds`` rounds, each calling every ``calls[name]()`` once (blocking), the
    order rotated by one per round. The caller makes one warm call of each first."""
    keys = list(calls)
    times = {k: [] for k in keys}
    for r in range(rounds):
        order = keys[r % len(keys) :] + keys[: r % len(keys)]
        for key in order:
            t0 = time.perf_counter()
            block(calls[key]())
            times[key].append(time.perf_counter() - t0)
    return times


def torch_time(fn, iters: int, device) -> dict:
    """Median wall time (CUDA events on a GPU) of ``fn()`` over ``iters`` calls after one warm-up call, whose wall
    time is ``first_call_s``."""
    import torch

    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return {"first_call_s": first, **summary(ts)}
