"""Measure checkpoint loading: re-convert (safetensors -> WanDiT) vs convert-once-then-load-orbax, and peak host
memory, on a random checkpoint of a given config. Not a test; run::

    JAX_PLATFORMS=cpu python -m wanjax.io.measure --preset medium [--workdir /tmp/wanjax_measure] [--repeats 3]
    python -m wanjax.io.measure --preset full --source-dtype bfloat16 --shards 6 --steps load_safetensors

Each measured step runs in a fresh subprocess, so its peak resident memory (``VmHWM`` minus the resident size
after imports and JAX start-up) is attributable to the step. Wall time and process CPU time (all threads; less
sensitive to a busy host) are both reported. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

PRESETS = {
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, freq_dim=32),
    "medium": dict(dim=1024, ffn_dim=2816, num_heads=8, num_layers=8, text_dim=1024, freq_dim=256),
    # same proportions as I2V_A14B where memory matters (largest stacked leaf ~20% of the expert)
    "large": dict(dim=2048, ffn_dim=5632, num_heads=16, num_layers=8, text_dim=4096, freq_dim=256),
    "full": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096, freq_dim=256),
}
STEPS = ("load_safetensors", "convert", "load_orbax")


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _child(step: str, src: str, dst: str, dtype: str) -> None:
    import jax
    import jax.numpy as jnp

    from wanjax.io import convert, load_dit

    jnp.zeros(1).block_until_ready()  # JAX runtime up before the baseline
    base = _rss_kib("VmRSS")
    c0 = time.process_time()
    t0 = time.perf_counter()
    if step == "convert":
        convert(src, dst, jnp.dtype(dtype))
    else:
        dit = load_dit(src if step == "load_safetensors" else dst, jnp.dtype(dtype))
        jax.block_until_ready(jax.tree.leaves(dit))
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    print(
        json.dumps(
            {
                "seconds": dt,
                "cpu_seconds": cpu,
                "peak_delta_bytes": (_rss_kib("VmHWM") - base) * 1024,
                "device": str(jax.devices()[0]),
            }
        )
    )


def _write_source(cfg, path: str, dtype: str = "float32", shards: int = 1) -> int:
    """Random official-layout checkpoint (values from a shared random pool: fast at full size)."""
    import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
    import numpy as np
    from safetensors.numpy import save_file

    from wanjax.config import official_config_dict
    from wanjax.io.keymap import official_shapes

    os.makedirs(path, exist_ok=True)
    np_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 22, dtype=np.float32) * 0.02).astype(np_dtype)
    shapes = official_shapes(cfg)
    keys = list(shapes)
    total = sum(math.prod(s) for s in shapes.values())
    per_shard, groups, cur, acc = total / shards, [], [], 0
    for k in keys:
        cur.append(k)
        acc += math.prod(shapes[k])
        if acc >= per_shard * (len(groups) + 1) and len(groups) < shards - 1:
            groups.append(cur)
            cur = []
    groups.append(cur)
    stem, weight_map = "diffusion_pytorch_model", {}
    for i, ks in enumerate(groups):
        tensors = {}
        for k in ks:
            n = math.prod(shapes[k])
            a = np.empty(n, np_dtype)
            for o in range(0, n, pool.size):
                m = min(pool.size, n - o)
                s = int(rng.integers(0, pool.size - m + 1))
                a[o : o + m] = pool[s : s + m]
            tensors[k] = a.reshape(shapes[k])
        fname = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors" if len(groups) > 1 else f"{stem}.safetensors"
        save_file(tensors, os.path.join(path, fname))
        weight_map.update({k: fname for k in ks})
        del tensors
    if len(groups) > 1:
        with open(os.path.join(path, f"{stem}.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**official_config_dict(cfg), "text_dim": cfg.text_dim}, f)
    return total


def _run(step, src, dst, dtype) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "wanjax.io.measure", "--child", step, src, dst, dtype], capture_output=True, text=True
    )
    if out.returncode:
        raise RuntimeError(f"step {step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, help="override num_layers of the preset")
    ap.add_argument("--workdir", default="/tmp/wanjax_measure")
    ap.add_argument("--dtype", default="bfloat16", help="dtype to load into")
    ap.add_argument("--source-dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--shards", type=int, default=1)
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(*a.child)
        return
    import numpy as np

    from wanjax.config import WanConfig
    from wanjax.io.dit_params import target_tree

    kw = dict(PRESETS[a.preset], **({"num_layers": a.layers} if a.layers else {}))
    cfg = WanConfig(**kw)
    steps = [s for s in a.steps.split(",") if s]
    shutil.rmtree(a.workdir, ignore_errors=True)
    src, dst = os.path.join(a.workdir, "src"), os.path.join(a.workdir, "cache")
    t0 = time.perf_counter()
    n = _write_source(cfg, src, a.source_dtype, a.shards)
    converted = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in target_tree(cfg, a.dtype).values())
    res = {
        "preset": a.preset,
        "config": kw,
        "params": n,
        "dtype": a.dtype,
        "source_dtype": a.source_dtype,
        "shards": a.shards,
        "source_bytes": n * np.dtype(a.source_dtype).itemsize,
        "converted_bytes": converted,
        "write_seconds": round(time.perf_counter() - t0, 1),
        "runs": {},
    }
    for step in steps:
        runs = []
        for _ in range(a.repeats):
            if step == "convert":
                shutil.rmtree(dst, ignore_errors=True)
            runs.append(_run(step, src, dst, a.dtype))
        peak = max(r["peak_delta_bytes"] for r in runs)
        res["runs"][step] = {
            "median_seconds": round(float(np.median([r["seconds"] for r in runs])), 3),
            "seconds": [round(r["seconds"], 3) for r in runs],
            "median_cpu_seconds": round(float(np.median([r["cpu_seconds"] for r in runs])), 3),
            "max_peak_delta_bytes": peak,
            "peak_over_converted": round(peak / converted, 3),
            "device": runs[0]["device"],
        }
    r = res["runs"]
    if "load_safetensors" in r and "load_orbax" in r:
        res["load_orbax_speedup_vs_reconvert"] = round(
            r["load_safetensors"]["median_seconds"] / r["load_orbax"]["median_seconds"], 2
        )
    print(json.dumps(res, indent=1))
    if not a.keep:
        shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
