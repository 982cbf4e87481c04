"""``report.md`` from the results of `wanjax.evaluation.run.run_eval`: tables, targets, plots."""

from __future__ import annotations

import os

import numpy as np

from wanjax.evaluation.variants import ADDITIONS, REMOVALS

__all__ = ["targets", "write_report"]

_MB = 1024.0**2


def _by_name(results: dict) -> dict:
    return {v["name"]: v for v in results["variants"]}


def targets(results: dict) -> list[dict]:
    """The issue's targets that these results can decide: ``{"target", "measured", "met"}`` each."""
    v = _by_name(results)
    out = []
    if "default" in v and "smoothquant" in v:
        d = v["default"]["psnr"] - v["smoothquant"]["psnr"]
        out.append(
            {
                "target": "default within 1.0 dB PSNR of W8A8 SmoothQuant",
                "measured": f"default {v['default']['psnr']:.2f} dB, smoothquant {v['smoothquant']['psnr']:.2f} dB "
                f"({d:+.2f} dB)",
                "met": d >= -1.0,
            }
        )
    if "default" in v and "svdquant" in v:
        d = v["default"]["psnr"] - v["svdquant"]["psnr"]
        out.append({"target": "default >= 1.5 dB PSNR above svdquant", "measured": f"{d:+.2f} dB", "met": d >= 1.5})
    for ab, comp in REMOVALS.items():
        if "default" in v and ab in v:
            d = v["default"]["psnr"] - v[ab]["psnr"]
            out.append(
                {"target": f"removing the {comp} costs >= 0.3 dB", "measured": f"{d:+.2f} dB ({ab})", "met": d >= 0.3}
            )
    for ab, comp in ADDITIONS.items():
        if "default" in v and ab in v:
            d = v[ab]["psnr"] - v["default"]["psnr"]
            out.append(
                {
                    "target": f"dropped from the default: adding back {comp} gains < 0.3 dB",
                    "measured": f"{d:+.2f} dB ({ab})",
                    "met": d < 0.3,
                }
            )
    if "default" in v:
        b, d = results["bf16"], v["default"]
        for k, name in (("frame0_psnr", "frame-0 PSNR vs condition"), ("direction_ok", "motion-direction accuracy")):
            if k in b and k in d:
                if b[k] == 0:
                    out.append(
                        {
                            "target": f"default {name} within 2 % of BF16",
                            "measured": f"BF16 {b[k]:.3f}, default {d[k]:.3f}: not decidable (BF16 scores 0)",
                            "met": None,
                        }
                    )
                    continue
                rel = (d[k] - b[k]) / abs(b[k])
                out.append(
                    {
                        "target": f"default {name} within 2 % of BF16",
                        "measured": f"BF16 {b[k]:.3f}, default {d[k]:.3f} ({100 * rel:+.1f} %)",
                        "met": abs(rel) <= 0.02 or d[k] >= b[k],
                    }
                )
    return out


def _row(v: dict, bf16: dict) -> str:
    acc = f"{v['direction_ok']:.2f}" if "direction_ok" in v else "-"
    return (
        f"| {v['name']} | {v['psnr']:.2f} | {v['ssim']:.4f} | {v['latent_rel_l2']:.4f} | {v['sqnr_eval_mean']:.1f}"
        f" / {v['sqnr_eval_min']:.1f} | {v['sqnr_calib_mean']:.1f} | {v['frame0_psnr']:.2f} | {acc} | "
        f"{v['weight_bytes'] / _MB:.2f} ({v['block_linear_bytes'] / _MB:.2f}) | {v['quantize_s']:.1f} | "
        f"{v['denoise_s']:.2f} |"
    )


_HEAD = (
    "| variant | PSNR vs BF16 (dB) | SSIM vs BF16 | latent rel-L2 | layer SQNR eval mean / min (dB) | "
    "layer SQNR calib mean (dB) | frame-0 PSNR vs cond (dB) | direction acc | weights MB (block linears) | "
    "quantize s | denoise s/clip |\n|---|---|---|---|---|---|---|---|---|---|---|"
)


def _cache_section(results: dict) -> list[str]:
    """``## Step cache`` (``wanjax eval --cache``): each precision cached vs its own uncached run."""
    runs = [(results["bf16"], "bf16")] + [(v, v["name"]) for v in results["variants"]]  # name: an older result
    runs = [(v, name) for v, name in runs if "cache" in v]
    if not runs:
        return []
    cfg = results.get("cache", {}).get("config", {})
    steps = results["gen"]["steps"]
    lines = [
        "",
        "## Step cache",
        "",
        f"Rule {cfg.get('rule', '?')}, threshold {cfg.get('threshold', '?')}, at most {cfg.get('max_skips', '?')} "
        f"skips in a row, warmup {cfg.get('warmup', '?')} steps per expert; calibration: "
        f"{results.get('cache', {}).get('calibration', '?')} (docs/CACHING.md). Every cached run is compared with "
        "the **uncached run of the same precision** (same noise and condition): PSNR / SSIM of the decoded frames, "
        "latent rel-L2 of the final latents. Task metrics: cached (uncached). Denoise: median s/clip, cached / "
        "uncached (the first clip of each includes compilation).",
        "",
        "| precision | forwards computed / steps | fewer forwards | schedule | PSNR vs uncached mean (min) dB | "
        "SSIM mean (min) | latent rel-L2 | frame-0 PSNR (dB) | direction acc | agree w/ uncached | denoise s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v, name in runs:
        c = v["cache"]
        sched = c["schedule"] if isinstance(c["schedule"], str) else " / ".join(c["schedule"])
        acc = f"{c['direction_ok']:.2f} ({v['direction_ok']:.2f})" if "direction_ok" in c else "-"
        agree = f"{c['direction_agree']:.2f}" if "direction_agree" in c else "-"
        lo, hi = c["computed_range"]
        count = f"{c['computed']:g}" + ("" if lo == hi else f" ({lo}-{hi})")
        lines.append(
            f"| {c.get('precision', name)} | {count} / {steps} | {c['speedup_forwards']:.2f}x | `{sched}` | {c['psnr_mean']:.2f} "
            f"({c['psnr_min']:.2f}) | {c['ssim_mean']:.4f} ({c['ssim_min']:.4f}) | {c['latent_rel_l2']:.4f} | "
            f"{c['frame0_psnr']:.2f} ({v['frame0_psnr']:.2f}) | {acc} | {agree} | {c['denoise_s']:.2f} / "
            f"{c['uncached_denoise_s']:.2f} |"
        )
    return lines


def write_report(results: dict, out_dir: str) -> str:
    """Writes ``out_dir/report.md`` and returns its path."""
    b = results["bf16"]
    g = results["gen"]
    lines = [
        "# Quantization quality report (`wanjax eval`)",
        "",
        f"Generation: {g['num_frames']} frames, max area {g['max_area']}, {g['steps']} {g['solver']} steps, "
        f"shift {g['shift']}, guidance {g['guide_scale']}, boundary {g['boundary']}; platform "
        f"{results['platform']}, jax {results['jax']}.",
        "",
        f"Evaluation set ({len(results['eval_set'])}): {', '.join(results['eval_set'])}  ",
        f"Calibration set ({len(results['calib_set'])}): {', '.join(results['calib_set'])}  ",
        *(
            [
                f"Calibration reservoir: {results['calib']['reservoir']} rows per layer input and step, drawn with "
                f"seed {results['calib']['seed']}.  "
            ]
            if "calib" in results
            else []
        ),
        "The two sets are **disjoint**: no shared clip/image and no shared prompt (checked by the driver).",
        "",
        "Every quantized run uses the same noise (per-sample seed) and condition as the BF16 run it is compared "
        "with. PSNR/SSIM: decoded uint8 frames vs the BF16 frames (all frames); latent rel-L2: "
        "||z_q - z_bf16|| / ||z_bf16|| of the final latents. Layer SQNR: each quantized block linear vs its "
        "unquantized weights on inputs captured from the evaluation set's BF16 CFG trajectory (per expert and "
        "bin; 'calib' = on the calibration rows, in-sample). Frame-0 PSNR vs the condition image and "
        "motion-direction accuracy (`wanjax.track`) are the mini model's I2V task metrics. Weights: bytes of "
        "both experts' arrays as stored (4-bit codes packed two per byte); denoise time is the fake-quant "
        "simulation on this machine (median over clips; the first clip includes compilation), not a kernel speed. Per-variant numbers are means over the evaluation clips (PSNR: mean of per-clip PSNR).",
        "",
        *(
            []
            if results.get("complete", True)
            else [
                f"**Partial report**: {len(results['variants'])} of the planned variants ran "
                f"({', '.join(v['name'] for v in results['variants'])}; planned: "
                f"{', '.join(results.get('planned', []))}).",
                "",
            ]
        ),
        "## Recipes",
        "",
        _HEAD,
        f"| bf16 (reference) | inf | 1 | 0 | - | - | {b['frame0_psnr']:.2f} | "
        f"{b['direction_ok'] if 'direction_ok' in b else '-'} | {b['weight_bytes'] / _MB:.2f} "
        f"({b['block_linear_bytes'] / _MB:.2f}) | - | {b['denoise_s']:.2f} |",
    ]
    lines += [_row(v, b) for v in results["variants"] if v["group"] == "recipe"]
    abl = [v for v in results["variants"] if v["group"] == "ablation"]
    if abl:
        from wanjax.quant.recipes import get_recipe

        d = _by_name(results).get("default")
        lines += [
            "",
            "## Ablations of `default`",
            "",
            "Each row changes one thing of the default recipe (" + get_recipe("default").notes + "). Ablations "
            "that ran: " + ", ".join(v["name"] for v in abl) + ".",
            "",
            _HEAD,
        ]
        if d is not None:
            lines.append(_row(d, b).replace(f"| {d['name']} |", "| default (reference) |", 1))
        lines += [_row(v, b) for v in abl]
        lines += ["", "| ablation | what changed | PSNR change vs default (dB) |", "|---|---|---|"]
        for v in abl:
            delta = "-" if d is None else f"{v['psnr'] - d['psnr']:+.2f}"
            lines.append(f"| {v['name']} | {v['what']} | {delta} |")
    lines += _cache_section(results)
    t = targets(results)
    if t:
        lines += ["", "## Targets of the issue", "", "| target | measured | met |", "|---|---|---|"]
        lines += [
            f"| {x['target']} | {x['measured']} | {'n/a' if x['met'] is None else 'yes' if x['met'] else 'NO'} |"
            for x in t
        ]
    rec = [v for v in results["variants"] if v["group"] == "recipe" and v["bins"] == "seed"]
    if rec:
        names = [f"{e}:{n}" for e in ("high", "low") for n in rec[0]["bin_names"][e]]
        lines += [
            "",
            "## Mean layer SQNR per expert and bin (dB, evaluation set)",
            "",
            "| variant | " + " | ".join(names) + " |",
            "|---" * (len(names) + 1) + "|",
        ]
        for v in rec:
            cells = []
            for e in ("high", "low"):
                m = np.mean([np.asarray(a, np.float64) for a in v["sqnr_eval"][e].values()], axis=(0, 1))
                cells += [f"{x:.1f}" for x in m]
            lines.append(f"| {v['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Per-layer SQNR heat maps (evaluation set, per expert x bin)", ""]
    for v in results["variants"]:
        for p in v.get("plots", []):
            lines.append(f"![{v['name']}]({p})")
    lines += [
        "",
        "## Activation ranges over timesteps (evaluation set, BF16)",
        "",
        "Solid: the largest channel abs-max of the layer input (outlier channels); dashed: the median channel. "
        "One point per sampling step.",
        "",
    ]
    for e, p in results["act_range_plots"].items():
        lines.append(f"![{e}]({p})")
    s = results["seconds"]
    lines += [
        "",
        f"Wall time: calibration capture {s['calibrate']:.1f} s, evaluation capture {s['eval_capture']:.1f} s, "
        f"total {s['total']:.1f} s.",
        "",
    ]
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    return path
