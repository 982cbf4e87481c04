"""Measure checkpoint loading: re-convert (safetensors -> WanDiT) vs convert-once-then-load-orbax, and peak host
memory, on a random checkpoint of a given config. Not a test; run::

    JAX_PLATFORMS=cpu python -m wanjax.io.measure --preset medium [--workdir /tmp/wanjax_measure] [--repeats 3]

Each measured step runs in a fresh subprocess, so its peak resident memory (``VmHWM`` minus the resident size
after imports and JAX start-up) is attributable to the step. Prints one JSON object.
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
}


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
    jnp.zeros(1).block_until_ready()   # JAX runtime up before the baseline
    base = _rss_kib("VmRSS")
    t0 = time.perf_counter()
    if step == "convert":
        convert(src, dst, jnp.dtype(dtype))
    else:
        dit = load_dit(src if step == "load_safetensors" else dst, jnp.dtype(dtype))
        jax.block_until_ready(jax.tree.leaves(dit))
    dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "peak_delta_bytes": (_rss_kib("VmHWM") - base) * 1024}))


def _write_source(cfg, path: str) -> int:
    import numpy as np
    from safetensors.numpy import save_file

    from wanjax.config import official_config_dict
    from wanjax.io.keymap import official_shapes
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes = official_shapes(cfg)
    tensors = {k: (rng.standard_normal(s, dtype=np.float32) * 0.02) for k, s in shapes.items()}
    save_file(tensors, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**official_config_dict(cfg), "text_dim": cfg.text_dim}, f)
    return sum(math.prod(s) for s in shapes.values())


def _run(step, src, dst, dtype) -> dict:
    out = subprocess.run([sys.executable, "-m", "wanjax.io.measure", "--child", step, src, dst, dtype],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="medium", choices=sorted(PRESETS))
    ap.add_argument("--workdir", default="/tmp/wanjax_measure")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        _child(*a.child)
        return
    import numpy as np

    from wanjax.config import WanConfig
    from wanjax.io.dit_loader import target_tree
    cfg = WanConfig(**PRESETS[a.preset])
    shutil.rmtree(a.workdir, ignore_errors=True)
    src, dst = os.path.join(a.workdir, "src"), os.path.join(a.workdir, "cache")
    n = _write_source(cfg, src)
    converted = sum(math.prod(s.shape) * np.dtype(s.dtype).itemsize for s in target_tree(cfg, a.dtype).values())
    res = {"preset": a.preset, "config": PRESETS[a.preset], "params": n, "dtype": a.dtype,
           "source_bytes_fp32": 4 * n, "converted_bytes": converted, "runs": {}}
    for step in ("load_safetensors", "convert", "load_orbax"):
        runs = []
        for _ in range(a.repeats):
            if step == "convert":
                shutil.rmtree(dst, ignore_errors=True)
            runs.append(_run(step, src, dst, a.dtype))
        res["runs"][step] = {"median_seconds": float(np.median([r["seconds"] for r in runs])),
                             "max_peak_delta_bytes": max(r["peak_delta_bytes"] for r in runs),
                             "peak_over_converted": round(max(r["peak_delta_bytes"] for r in runs) / converted, 3)}
    r = res["runs"]
    res["load_orbax_speedup_vs_reconvert"] = round(r["load_safetensors"]["median_seconds"]
                                                   / r["load_orbax"]["median_seconds"], 2)
    print(json.dumps(res, indent=1))
    shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
