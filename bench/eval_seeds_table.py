"""The spread of `wanjax eval` results over calibration draws: reads several ``results.json`` files (one per
``--calib-seed``, e.g. from ``bench/eval_seeds.sh``), prints each variant's PSNR per seed, its mean and standard
deviation over the seeds, and each variant's paired difference to a reference variant (same seed) with its spread.

    python -m bench.eval_seeds_table out/seeds/s*.json [--ref default] [--json bench/results/eval_seeds.json]

Runs of one evaluation set and reservoir size only (the script checks); runs of the same seed are merged (a variant
measured in both must agree); a variant missing at a seed is left blank there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def load_runs(paths: list[str]) -> list[dict]:
    """``[{"seed", "sources": [{path, platform, jax}], "psnr": {variant: dB}}]`` sorted by seed, runs of one seed merged (a variant measured
    twice must agree to 0.01 dB); raises ValueError on mixed evaluation sets or calibration settings."""
    by_seed: dict[int, dict] = {}
    sets, reservoirs = set(), set()
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        if "calib" not in r:
            raise ValueError(f"{p}: no 'calib' entry (written by a wanjax eval older than --calib-seed)")
        sets.add(tuple(r["eval_set"]))
        reservoirs.add(r["calib"]["reservoir"])
        run = by_seed.setdefault(r["calib"]["seed"], {"seed": r["calib"]["seed"], "sources": [], "psnr": {}})
        run["sources"].append({"path": p, "platform": r.get("platform"), "jax": r.get("jax")})
        for v in r["variants"]:
            old = run["psnr"].setdefault(v["name"], v["psnr"])
            if abs(old - v["psnr"]) > 0.01:
                raise ValueError(
                    f"{p}: {v['name']} at seed {run['seed']} measured {v['psnr']:.2f} dB, another "
                    f"run of that seed {old:.2f} dB"
                )
    if len(sets) > 1 or len(reservoirs) > 1:
        raise ValueError(
            f"the runs use {len(sets)} evaluation sets and reservoirs {sorted(reservoirs)}; compare "
            "runs of one set and one reservoir size"
        )
    return [by_seed[s] for s in sorted(by_seed)]


def summarize(runs: list[dict], ref: str) -> dict:
    """Per variant: PSNR per run, mean / sd over runs, and the paired difference to ``ref`` (mean / sd / min / max
    over the runs that have both)."""
    names = list(dict.fromkeys(n for r in runs for n in r["psnr"]))
    out = {}
    for n in names:
        vals = [r["psnr"].get(n) for r in runs]
        got = np.array([v for v in vals if v is not None])
        diff = np.array([r["psnr"][n] - r["psnr"][ref] for r in runs if n in r["psnr"] and ref in r["psnr"]])
        out[n] = {
            "psnr": vals,
            "mean": float(got.mean()),
            "sd": float(got.std(ddof=1)) if got.size > 1 else None,
            "diff_ref": {
                "n": int(diff.size),
                "mean": float(diff.mean()) if diff.size else None,
                "sd": float(diff.std(ddof=1)) if diff.size > 1 else None,
                "min": float(diff.min()) if diff.size else None,
                "max": float(diff.max()) if diff.size else None,
            },
        }
    return out


def markdown(runs: list[dict], summary: dict, ref: str) -> str:
    def f(x, d=2):
        return "-" if x is None else f"{x:+.{d}f}" if d < 0 else f"{x:.{d}f}"

    head = (
        "| variant | "
        + " | ".join(f"seed {r['seed']}" for r in runs)
        + f" | mean | sd | vs {ref} (mean, sd, min..max) |"
    )
    lines = [head, "|" + "---|" * (len(runs) + 4)]
    for n, s in summary.items():
        d = s["diff_ref"]
        rng = "-" if d["min"] is None else f"{d['min']:+.2f}..{d['max']:+.2f}"
        vs = "-" if n == ref or d["mean"] is None else f"{d['mean']:+.2f}, {f(d['sd'])}, {rng}"
        lines.append(f"| {n} | " + " | ".join(f(v) for v in s["psnr"]) + f" | {f(s['mean'])} | {f(s['sd'])} | {vs} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.json files of wanjax eval runs (one per calibration seed)")
    p.add_argument("--ref", default="default", help="variant the paired differences are taken against")
    p.add_argument("--json", help="also write the summary here (atomically)")
    a = p.parse_args(argv)
    try:
        runs = load_runs(a.results)
    except (OSError, ValueError, KeyError) as e:
        print(f"eval_seeds_table: {e}", file=sys.stderr)
        return 2
    summary = summarize(runs, a.ref)
    print(markdown(runs, summary, a.ref))
    if a.json:
        from bench.common import write_result

        doc = {"ref": a.ref, "runs": [{k: r[k] for k in ("seed", "sources")} for r in runs], "variants": summary}
        name = os.path.basename(a.json)
        write_result(name[:-5] if name.endswith(".json") else name, doc, (os.path.dirname(a.json) or ".",))
    return 0


if __name__ == "__main__":
    sys.exit(main())
