"""Activation drift over the denoising trajectory, per expert and per layer input, and how far the experts differ.

    python -m wanjax.evaluation.drift --model models/mini --json bench/results/drift_mini_current.json \
        --figures docs/figures/drift --tag current

What the seed method (``../shared/reference/seed_method_w4a4_wan22.md``) is built for is a model whose layer inputs
change over the timesteps and between its two experts. This module measures that on any pipeline:

1. **capture** (`capture_drift`): the calibration capture of `wanjax.quant.calibrate` (``mode="online"``, the
   pipeline's own denoise loop through its ``velocity_fn`` hook, no second sampler) with ONE bin per sampling step
   (`wanjax.evaluation.sqnr.step_bins`), no Hessian and no reservoir: per (expert, layer input, step) the
   per-input-channel abs-max ``a[s, k]`` over all tokens of all samples (conditional rows by default, as the seed
   calibrates; ``cfg_mode="both"`` also captures the unconditional rows of a guided trajectory);
2. **statistics** (`drift_statistics`, pure numpy on ``{expert: {name: a [S, K]}}``), per input and expert:

   * ``absmax[s] = max_k a[s, k]`` and ``median[s] = median_k a[s, k]``; ``range_ratio = max_s absmax / min_s
     absmax`` (what a single clip per expert wastes at the quietest step), ``pooled_over_step_mean`` (the mean of
     ``max_s absmax / absmax[s]``: the mean factor), ``channel_range_median`` / ``channel_range_p90``
     (per-channel ``max_s a / min_s a``: drift of the channels a smoothing vector is fitted to);
   * outliers: ``max_over_median[s]``, ``n_outliers[s] = #{k : a[s, k] > factor * median[s]}`` (factor 10), and
     the top-k channel set (k = ``topk``, 8 by default): its Jaccard index with the previous step
     (``topk_jaccard_prev``) and with the expert's first step (``topk_jaccard_first``);
   * between experts: ``absmax_ratio`` (high / low, each over its own steps), ``channel_rel_l2`` (relative L2 of the
     two experts' pooled per-channel abs-max vectors), ``topk_jaccard`` of their pooled top-k sets, and the jump at
     the boundary (last high step -> first low step: ``boundary_jump`` of the abs-max and ``boundary_channel_rel``
     of the channel vector, next to the median step-to-step change inside each expert, ``step_rel_change_median``);
3. **weights** (`weight_distance`): per block linear, the relative Frobenius distance of the two experts' kernels,
   ``||W_high - W_low|| / ((||W_high|| + ||W_low||) / 2)`` (0: the same weights; ~1.41: unrelated weights of equal
   norm);
4. `drift_plots` writes PNGs (matplotlib), `main` a JSON report.

Layer inputs are named as in calibration (`wanjax.quant.stats.stat_name`): ``blocks.{i}.self_attn.qkv`` (q, k, v
share one input), ``blocks.{i}.self_attn.o``, ``blocks.{i}.cross_attn.q``, ``blocks.{i}.cross_attn.o``,
``blocks.{i}.ffn.fc1``, ``blocks.{i}.ffn.fc2`` and ``context.cross_attn.kv`` (the embedded text context, the same
array in every block).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from typing import Sequence

import numpy as np

__all__ = [
    "capture_drift",
    "drift_statistics",
    "weight_distance",
    "drift_plots",
    "absmax_table",
    "run_drift",
    "main",
]

EXPERTS = ("high", "low")


# ------------------------------------------------------------------------------------------------- capture
def capture_drift(pipe, samples, gen, work_dir: str, cfg_mode: str = "cond", progress: bool = False):
    """Per-step calibration capture (abs-max only) of ``samples`` (`wanjax.quant.calibrate.CalibSample` list) with
    generation settings ``gen``; returns the `CalibStats` reader and the step bins."""
    from wanjax.evaluation.sqnr import step_bins
    from wanjax.quant.calibrate import CalibConfig, calibrate
    from wanjax.sampling import flow_schedule

    bins = step_bins(flow_schedule(gen.steps, shift=gen.shift), gen.boundary)
    cfg = CalibConfig(gen=gen, bins=bins, hessian=False, reservoir=0, cfg_mode=cfg_mode)
    stats = calibrate(pipe, samples, cfg, work_dir=work_dir, mode="online", progress=progress)
    return stats, bins


def absmax_table(calib) -> tuple[dict, dict]:
    """``({expert: {name: a [S, K] float64}}, {expert: [S] timesteps})`` from a per-step `CalibStats`."""
    bins = calib.bins
    names = sorted({n for _, n, _ in calib.keys()})
    table, ts = {}, {}
    for e in EXPERTS:
        bn = bins.expert_bins(e)
        if not bn:
            continue
        ts[e] = [int(bins.t_max[bins.names.index(b)]) for b in bn]
        table[e] = {n: np.stack([np.asarray(calib.stats(e, n, b).absmax, np.float64) for b in bn]) for n in names}
    return table, ts


# ------------------------------------------------------------------------------------------------ statistics
def _topk(a: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` largest entries of each row (ties: lower index first), as sorted arrays."""
    k = min(k, a.shape[-1])
    order = np.argsort(-a, axis=-1, kind="stable")[..., :k]
    return np.sort(order, axis=-1)


def _jaccard(x, y) -> float:
    sx, sy = set(np.asarray(x).tolist()), set(np.asarray(y).tolist())
    return len(sx & sy) / max(1, len(sx | sy))


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _ratio(x, y) -> float:
    return float(x / y) if y > 0 else float("inf")


def expert_layer_stats(a: np.ndarray, topk: int = 8, factor: float = 10.0) -> dict:
    """Drift statistics of one layer input of one expert from its per-step channel abs-max ``a [S, K]``."""
    a = np.asarray(a, np.float64)
    eps = 1e-12
    absmax = a.max(-1)
    med = np.median(a, -1)
    tk = _topk(a, topk)
    ch_range = (a.max(0) + eps) / (a.min(0) + eps)
    steps_rel = [_rel(a[s], a[s - 1]) for s in range(1, a.shape[0])]
    return {
        "absmax": absmax.tolist(),
        "median": med.tolist(),
        "max_over_median": (absmax / np.maximum(med, eps)).tolist(),
        "n_outliers": (a > factor * med[:, None]).sum(-1).astype(int).tolist(),
        "topk": tk.tolist(),
        "topk_jaccard_prev": [_jaccard(tk[s], tk[s - 1]) for s in range(1, len(tk))],
        "topk_jaccard_first": [_jaccard(tk[s], tk[0]) for s in range(len(tk))],
        "range_ratio": _ratio(absmax.max(), absmax.min()),
        "median_range_ratio": _ratio(med.max(), med.min()),
        "pooled_over_step_mean": float(np.mean(absmax.max() / np.maximum(absmax, eps))),
        "channel_range_median": float(np.median(ch_range)),
        "channel_range_p90": float(np.percentile(ch_range, 90)),
        "step_rel_change_median": float(np.median(steps_rel)) if steps_rel else 0.0,
        "pooled_absmax": float(absmax.max()),
    }


def cross_expert_stats(a_high: np.ndarray, a_low: np.ndarray, topk: int = 8) -> dict:
    """How one layer input differs between the experts (``a_* [S_e, K]``, high-noise steps first in time)."""
    ph, pl = a_high.max(0), a_low.max(0)
    return {
        "absmax_ratio": _ratio(ph.max(), pl.max()),
        "channel_rel_l2": _rel(ph, pl),
        "topk_jaccard": _jaccard(_topk(ph[None], topk)[0], _topk(pl[None], topk)[0]),
        "boundary_jump": _ratio(a_low[0].max(), a_high[-1].max()),
        "boundary_channel_rel": _rel(a_low[0], a_high[-1]),
    }


def _summ(values) -> dict:
    v = np.asarray([x for x in values if np.isfinite(x)], np.float64)
    if v.size == 0:
        return {"median": None, "max": None, "min": None}
    return {"median": float(np.median(v)), "max": float(v.max()), "min": float(v.min())}


def drift_statistics(table: dict, ts: dict, topk: int = 8, factor: float = 10.0) -> dict:
    """All statistics (module docstring) from ``table = {expert: {name: a [S, K]}}`` and ``ts = {expert: [S]}``.

    Returns ``{"timesteps", "layers": {name: {"K", "high", "low", "experts"}}, "summary"}``; ``summary`` gives,
    per expert and statistic, the median / max / min over layer inputs (the text context input excluded from the
    timestep statistics: it does not depend on the timestep)."""
    experts = [e for e in EXPERTS if e in table]
    names = sorted(set().union(*[table[e].keys() for e in experts]))
    layers = {}
    for n in names:
        row = {"K": int(table[experts[0]][n].shape[-1])}
        for e in experts:
            row[e] = expert_layer_stats(table[e][n], topk, factor)
        if len(experts) == 2:
            row["experts"] = cross_expert_stats(table["high"][n], table["low"][n], topk)
        if len(experts) == 2:
            full = np.concatenate([table["high"][n], table["low"][n]]).max(-1)
            row["trajectory_range_ratio"] = _ratio(full.max(), full.min())
        layers[n] = row
    timed = [n for n in names if not n.startswith("context.")]
    summary: dict = {}
    keys = (
        "range_ratio",
        "median_range_ratio",
        "pooled_over_step_mean",
        "channel_range_median",
        "channel_range_p90",
        "step_rel_change_median",
    )
    for e in experts:
        s = {k: _summ([layers[n][e][k] for n in timed]) for k in keys}
        s["max_over_median"] = _summ([v for n in timed for v in layers[n][e]["max_over_median"]])
        s["n_outliers"] = _summ([v for n in timed for v in layers[n][e]["n_outliers"]])
        s["topk_jaccard_first_min"] = _summ([min(layers[n][e]["topk_jaccard_first"]) for n in timed])
        s["topk_jaccard_prev"] = _summ([v for n in timed for v in layers[n][e]["topk_jaccard_prev"]])
        summary[e] = s
    if len(experts) == 2:
        summary["experts"] = {
            "absmax_ratio": _summ([layers[n]["experts"]["absmax_ratio"] for n in timed]),
            "abs_log2_absmax_ratio": _summ([abs(math.log2(layers[n]["experts"]["absmax_ratio"])) for n in timed]),
            "channel_rel_l2": _summ([layers[n]["experts"]["channel_rel_l2"] for n in timed]),
            "topk_jaccard": _summ([layers[n]["experts"]["topk_jaccard"] for n in timed]),
            "boundary_jump": _summ([layers[n]["experts"]["boundary_jump"] for n in timed]),
            "boundary_channel_rel": _summ([layers[n]["experts"]["boundary_channel_rel"] for n in timed]),
            "trajectory_range_ratio": _summ([layers[n]["trajectory_range_ratio"] for n in timed]),
        }
    return {"timesteps": {e: list(map(int, ts[e])) for e in experts}, "layers": layers, "summary": summary}


def weight_distance(high, low) -> dict:
    """Per block linear ``"blocks.{i}.{layer}"``: ``||W_h - W_l||_F / mean(||W_h||_F, ||W_l||_F)`` of the kernels,
    and ``"all_params"``: the same over every parameter of the model. ``high``/``low``: `WanDiT` modules or their
    ``nnx.State`` of parameters."""
    from flax import nnx

    from wanjax.model.names import BLOCK_LINEARS

    def flat(m):
        st = nnx.state(m, nnx.Param) if isinstance(m, nnx.Module) else m
        return {
            tuple(k): np.asarray(v.get_value() if hasattr(v, "get_value") else v, np.float64)
            for k, v in nnx.to_flat_state(st)
        }

    fh, fl = flat(high), flat(low)
    if fh.keys() != fl.keys():
        raise ValueError("weight_distance: the experts have different parameter trees")
    out = {}
    for path in BLOCK_LINEARS:
        key = tuple(path.split(".")) + ("kernel",)
        wh, wl = fh[key], fl[key]
        for i in range(wh.shape[0]):
            d = np.linalg.norm(wh[i] - wl[i])
            out[f"blocks.{i}.{path[len('blocks.') :]}"] = float(
                d / max(0.5 * (np.linalg.norm(wh[i]) + np.linalg.norm(wl[i])), 1e-30)
            )
    dh = sum(float(np.sum((fh[k] - fl[k]) ** 2)) for k in fh)
    nh = math.sqrt(sum(float(np.sum(v**2)) for v in fh.values()))
    nl = math.sqrt(sum(float(np.sum(v**2)) for v in fl.values()))
    out["all_params"] = math.sqrt(dh) / max(0.5 * (nh + nl), 1e-30)
    return out


# ------------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _short(n: str) -> str:
    if n.startswith("blocks."):
        _, i, rest = n.split(".", 2)
        return f"{i}.{rest}"
    return n


def drift_plots(report: dict, out_dir: str, tag: str) -> list[str]:
    """PNG plots of a `run_drift` report in ``out_dir``: ``{tag}_absmax.png`` (layer input x step heat map of
    log2(abs-max / the trajectory's largest), expert boundary marked), ``{tag}_outliers.png`` (max/median channel,
    number of >10x-median channels and top-k overlap with the expert's first step, per input over the trajectory),
    ``{tag}_experts.png`` (weight distance per linear; activation difference between the experts per input)."""
    plt = _plt()
    os.makedirs(out_dir, exist_ok=True)
    layers = report["layers"]
    ts = report["timesteps"]
    experts = [e for e in EXPERTS if e in ts]
    names = [n for n in sorted(layers, key=_layer_order) if not n.startswith("context.")]
    t_all = [t for e in experts for t in ts[e]]
    n_high = len(ts.get("high", []))
    paths = []

    # 1. heat map
    m = np.array([[v for e in experts for v in layers[n][e]["absmax"]] for n in names])
    m = np.log2(m / m.max(1, keepdims=True))
    fig, ax = plt.subplots(figsize=(0.32 * len(t_all) + 3.5, 0.16 * len(names) + 1.6))
    im = ax.imshow(m, aspect="auto", cmap="magma", vmin=min(-2.0, float(m.min())), vmax=0.0)
    ax.set_xticks(range(len(t_all)), [str(t) for t in t_all], rotation=90, fontsize=6)
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=5)
    if 0 < n_high < len(t_all):
        ax.axvline(n_high - 0.5, color="c", lw=1.5)
    ax.set_xlabel("timestep (high-noise expert | low-noise expert)", fontsize=7)
    fig.colorbar(im, ax=ax, label="log2(abs-max / largest over the trajectory)")
    ax.set_title(f"{tag}: layer-input abs-max over the trajectory", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{tag}_absmax.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 2. outliers
    fig, axs = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(len(t_all))
    for key, ax, ylabel in (
        ("max_over_median", axs[0], "max / median channel abs-max"),
        ("n_outliers", axs[1], "channels > 10x median"),
        ("topk_jaccard_first", axs[2], "top-k overlap with expert's 1st step"),
    ):
        vals = np.array([[v for e in experts for v in layers[n][e][key]] for n in names], np.float64)
        for row in vals:
            ax.plot(x, row, color="0.6", lw=0.6, alpha=0.6)
        ax.plot(x, np.median(vals, 0), color="C3", lw=2, label="median over inputs")
        ax.plot(x, vals.max(0), color="C0", lw=1.5, ls="--", label="max over inputs")
        if 0 < n_high < len(t_all):
            ax.axvline(n_high - 0.5, color="c", lw=1.2)
        ax.set_xticks(x[:: max(1, len(x) // 10)], [str(t_all[i]) for i in x[:: max(1, len(x) // 10)]], fontsize=7)
        ax.set_xlabel("timestep", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        if key == "max_over_median":
            ax.set_yscale("log")
    axs[0].legend(fontsize=6)
    fig.suptitle(f"{tag}: outlier channels over the trajectory (grey: each layer input)", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"{tag}_outliers.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # 3. experts
    if "weights" in report and len(experts) == 2:
        w = {k: v for k, v in report["weights"].items() if k != "all_params"}
        wn = sorted(w, key=_layer_order)
        fig, axs = plt.subplots(1, 2, figsize=(13, 3.8))
        axs[0].bar(range(len(wn)), [w[k] for k in wn], color="C0")
        axs[0].set_xticks(range(len(wn)), [_short(k) for k in wn], rotation=90, fontsize=5)
        axs[0].set_ylabel("||W_high - W_low|| / ||W||", fontsize=8)
        axs[0].set_title(f"weights (all parameters: {report['weights']['all_params']:.3f})", fontsize=8)
        rel = [layers[n]["experts"]["channel_rel_l2"] for n in names]
        lr = [abs(math.log2(layers[n]["experts"]["absmax_ratio"])) for n in names]
        xx = np.arange(len(names))
        axs[1].bar(xx - 0.2, rel, 0.4, label="channel abs-max rel. L2 (pooled per expert)")
        axs[1].bar(xx + 0.2, lr, 0.4, label="|log2 abs-max high / low|")
        axs[1].set_xticks(xx, [_short(n) for n in names], rotation=90, fontsize=5)
        axs[1].legend(fontsize=6)
        axs[1].set_title("layer-input ranges: high-noise vs low-noise expert", fontsize=8)
        fig.suptitle(f"{tag}: how far the two experts are apart", fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, f"{tag}_experts.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


_INPUT_ORDER = (
    "self_attn.qkv",
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.kv",
    "cross_attn.o",
    "ffn.fc1",
    "ffn.fc2",
)


def _layer_order(n: str):
    if not n.startswith("blocks."):
        return (10**9, 0, n)
    _, i, rest = n.split(".", 2)
    return (int(i), _INPUT_ORDER.index(rest) if rest in _INPUT_ORDER else 99, rest)


# ---------------------------------------------------------------------------------------------------- driver
def run_drift(
    pipe,
    samples,
    gen,
    work_dir: str | None = None,
    cfg_mode: str = "cond",
    topk: int = 8,
    factor: float = 10.0,
    progress: bool = False,
) -> dict:
    """Capture + statistics + weight distance on ``pipe`` (a `WanI2VPipeline`) for ``samples``
    (`wanjax.quant.calibrate.CalibSample` list). Returns the report dict (no per-step top-k lists dropped)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="drift_") as tmp:
        calib, _ = capture_drift(pipe, samples, gen, work_dir or tmp, cfg_mode=cfg_mode, progress=progress)
        table, ts = absmax_table(calib)
    t_cap = time.perf_counter() - t0
    rep = drift_statistics(table, ts, topk=topk, factor=factor)
    rep["weights"] = weight_distance(pipe.expert_params("high"), pipe.expert_params("low"))
    w = [v for k, v in rep["weights"].items() if k != "all_params"]
    rep["summary"]["weights"] = {**_summ(w), "all_params": rep["weights"]["all_params"]}
    rep["settings"] = {
        "steps": int(gen.steps),
        "shift": float(gen.shift),
        "boundary": float(gen.boundary),
        "num_frames": int(gen.num_frames),
        "max_area": str(gen.max_area),
        "samples": len(samples),
        "cfg_mode": cfg_mode,
        "topk": int(topk),
        "outlier_factor": float(factor),
        "capture_seconds": t_cap,
    }
    return rep


def _samples_from_set(pipe, path: str, gen, n: int):
    """Calibration samples (conditions and contexts prepared by the pipeline) from an evaluation-set file."""
    from wanjax.evaluation.run import _prepare, load_samples
    from wanjax.quant.calibrate import CalibSample

    m = gen.max_area
    edge = int(m.split("x")[0]) if isinstance(m, str) and "x" in m else int(math.isqrt(_area(m))) // 16 * 16
    ss = load_samples(path, gen.num_frames, edge)[:n]
    out = []
    for s in ss:
        p = _prepare(pipe, s, gen)
        out.append(CalibSample(y=p["y"], context=p["ctx"], seed=s.seed))
    return out, [s.name for s in ss]


def _area(m) -> int:
    from wanjax.conditioning import max_area_from_size

    return max_area_from_size(m)


def compact(report: dict) -> dict:
    """The report without the per-step top-k index lists (the JSON that is committed)."""
    out = json.loads(json.dumps(report))
    for row in out["layers"].values():
        for e in EXPERTS:
            if e in row:
                row[e].pop("topk", None)
    return out


_TABLE_ROWS = (
    ("range_ratio", "abs-max range over the expert's steps (max_t / min_t)", "x"),
    ("pooled_over_step_mean", "pooled abs-max / the step's abs-max, mean over steps", "x"),
    ("median_range_ratio", "median channel's range over the steps", "x"),
    ("channel_range_median", "per-channel range max_t / min_t, median channel", "x"),
    ("channel_range_p90", "per-channel range max_t / min_t, 90th percentile channel", "x"),
    ("max_over_median", "largest / median channel abs-max, per step", ""),
    ("n_outliers", "channels above the outlier factor x median, per step", ""),
    ("topk_jaccard_first_min", "top-k overlap with the expert's first step, lowest", ""),
)


def summary_table(reports: dict) -> str:
    """A markdown table comparing reports (``{label: report dict}``, e.g. read from the JSON files): per expert and
    statistic the median (max; for overlaps the min) over layer inputs, then the between-expert numbers."""
    labels = list(reports)
    cols = [f"{lab}: {e}" for lab in labels for e in EXPERTS]
    lines = ["| statistic | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]

    def cell(st, key, unit):
        v = st.get(key)
        if v is None or v.get("median") is None:
            return "-"
        other = v["min"] if "jaccard" in key else v["max"]
        return f"{v['median']:.3g}{unit} ({other:.3g}{unit})"

    for key, text, unit in _TABLE_ROWS:
        row = [cell(reports[lab]["summary"].get(e, {}), key, unit) for lab in labels for e in EXPERTS]
        lines.append(f"| {text} | " + " | ".join(row) + " |")
    lines += ["", "| between the experts | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for key, text in (
        ("weights", "weight distance per linear, median (max)"),
        ("absmax_ratio", "pooled abs-max high / low, median (min..max)"),
        ("channel_rel_l2", "pooled channel abs-max rel. L2, median (max)"),
        ("boundary_jump", "abs-max jump at the boundary, median (min..max)"),
        ("trajectory_range_ratio", "abs-max range over the whole trajectory, median (max)"),
    ):
        row = []
        for lab in labels:
            s = reports[lab]["summary"]
            v = s.get("weights") if key == "weights" else s.get("experts", {}).get(key)
            if not v or v.get("median") is None:
                row.append("-")
            elif key in ("absmax_ratio", "boundary_jump"):
                row.append(f"{v['median']:.3g} ({v['min']:.3g}..{v['max']:.3g})")
            else:
                extra = f"; all params {v['all_params']:.3g}" if key == "weights" else ""
                row.append(f"{v['median']:.3g} ({v['max']:.3g}{extra})")
        lines.append(f"| {text} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m wanjax.evaluation.drift", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mini")
    ap.add_argument("--calib-set", default=os.path.join(os.path.dirname(__file__), "sets", "calib_mini.json"))
    ap.add_argument("--n", type=int, default=4, help="samples of the set to run (default 4)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    ap.add_argument("--cfg-mode", default="cond", choices=("cond", "both"))
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--outlier-factor", type=float, default=10.0)
    ap.add_argument("--json", default=None, help="report path (JSON; required unless --compare)")
    ap.add_argument("--figures", default=None, help="folder for the PNG plots (none if not given)")
    ap.add_argument("--tag", default="drift", help="file-name prefix of the plots")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument(
        "--compare",
        nargs="+",
        metavar="LABEL=JSON",
        default=None,
        help="no run: print a markdown table comparing these reports (e.g. current=bench/results/drift_mini_current.json)",
    )
    args = ap.parse_args(argv)
    if args.compare:
        reps = {}
        for item in args.compare:
            label, _, path = item.rpartition("=")
            with open(path) as f:
                reps[label or os.path.basename(path)] = json.load(f)
        print(summary_table(reps))
        return reps

    if not args.json:
        ap.error("--json is required (unless --compare)")
    import jax.numpy as jnp

    from wanjax.generation_config import GenerationConfig
    from wanjax.pipeline import WanI2VPipeline

    pipe = WanI2VPipeline.from_pretrained(args.model, dtype=getattr(jnp, args.dtype))
    gen = GenerationConfig.for_model(args.model, steps=args.steps)
    samples, names = _samples_from_set(pipe, args.calib_set, gen, args.n)
    rep = run_drift(pipe, samples, gen, cfg_mode=args.cfg_mode, topk=args.topk, factor=args.outlier_factor)
    rep["model"] = args.model
    rep["settings"]["sample_names"] = names
    rep["settings"]["dtype"] = args.dtype
    if args.figures:
        rep["figures"] = drift_plots(rep, args.figures, args.tag)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(compact(rep), f, indent=1)
    s = rep["summary"]
    for e in EXPERTS:
        if e in s:
            print(
                f"{e}: abs-max range over its steps median {s[e]['range_ratio']['median']:.3f}x (max "
                f"{s[e]['range_ratio']['max']:.3f}x); max/median channel median {s[e]['max_over_median']['median']:.1f} "
                f"(max {s[e]['max_over_median']['max']:.1f}); top-k overlap with 1st step min "
                f"{s[e]['topk_jaccard_first_min']['min']:.2f}"
            )
    if "experts" in s:
        x = s["experts"]
        print(
            f"experts: weight rel. distance median {s['weights']['median']:.3f} (all params "
            f"{s['weights']['all_params']:.3f}); abs-max high/low median {x['absmax_ratio']['median']:.3f} "
            f"(range {x['absmax_ratio']['min']:.3f}..{x['absmax_ratio']['max']:.3f}); channel rel. L2 median "
            f"{x['channel_rel_l2']['median']:.3f}; boundary jump median {x['boundary_jump']['median']:.3f}"
        )
    print(f"wrote {args.json}", flush=True)
    return rep


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
