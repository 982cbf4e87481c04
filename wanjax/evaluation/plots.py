"""Plots of the evaluation report (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import os

import numpy as np

__all__ = ["activation_range_plot", "sqnr_heatmap"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _finish(plt, fig, ax, title: str, path: str) -> str:
    """Title ``ax``, lay ``fig`` out and save it at ``path`` (110 dpi; its folder is created), then close it."""
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sqnr_heatmap(sqnr: dict[str, np.ndarray], bin_names, title: str, path: str) -> str:
    """Heat map of layer SQNR (dB): rows ``path[block]`` (``sqnr = {path: [L, B]}``), columns the bins.

    Writes ``path`` (PNG) and returns it. Each cell is annotated when the map is small enough to read."""
    plt = _plt()
    labels, rows = [], []
    for p in sorted(sqnr):
        for l, r in enumerate(np.asarray(sqnr[p])):
            labels.append(f"{p[len('blocks.') :] if p.startswith('blocks.') else p}[{l}]")
            rows.append(r)
    m = np.asarray(rows, np.float64)
    h = max(2.5, 0.18 * len(labels) + 1.2)
    fig, ax = plt.subplots(figsize=(1.1 * m.shape[1] + 3.0, h))
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_xticks(range(m.shape[1]), list(bin_names), rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=6)
    if m.size <= 400:
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=5, color="w")
    fig.colorbar(im, ax=ax, label="SQNR (dB)")
    return _finish(plt, fig, ax, title, path)


def activation_range_plot(ranges: dict[str, dict], title: str, path: str) -> str:
    """Input range over timesteps per layer (`wanjax.evaluation.sqnr.activation_ranges` output): solid = largest
    channel abs-max, dashed = median channel abs-max, log scale, timesteps decreasing left to right."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for i, (name, r) in enumerate(sorted(ranges.items())):
        c = f"C{i % 10}"
        ax.plot(r["t"], r["max"], "-o", color=c, ms=3, label=f"{name} max")
        ax.plot(r["t"], r["median"], "--", color=c, label=f"{name} median")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("channel abs-max of the layer input")
    ax.set_yscale("log")
    ax.invert_xaxis()
    ax.legend(fontsize=6, ncol=2)
    return _finish(plt, fig, ax, title, path)
