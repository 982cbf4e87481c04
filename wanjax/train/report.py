"""Figures for the mini model card: loss curves and sample frame strips (matplotlib / imageio, imported lazily)."""

from __future__ import annotations

import json
import os

import numpy as np


def loss_curves_png(log_path: str, out_png: str) -> str:
    """Plot the VAE loss and the base/high/low flow-matching losses recorded in a run's ``log.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(log_path) as f:
        log = json.load(f)
    curves = log["curves"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    if curves.get("vae"):
        c = np.asarray(curves["vae"])
        axes[0].plot(c[:, 0], c[:, 1], label="total (L1 + L2 + KL + colour terms)")
        axes[0].plot(c[:, 0], c[:, 2], label="L1", alpha=0.7)
        axes[0].set_yscale("log")
        axes[0].set_xlabel("VAE step")
        axes[0].set_title("mini VAE")
        axes[0].legend()
    offset = 0
    for name, colour in (("base", "C0"), ("high", "C3"), ("low", "C2")):
        if not curves.get(name):
            continue
        c = np.asarray(curves[name])
        x = c[:, 0] + (offset if name != "base" else 0)
        k = max(1, len(c) // 40)
        y = np.convolve(c[:, 1], np.ones(k) / k, mode="valid")
        axes[1].plot(x[k - 1 :], y, colour, label=f"{name} (t in {'all' if name == 'base' else name + ' band'})")
        if name == "base":
            offset = int(c[-1, 0]) + 1
    axes[1].set_xlabel("DiT step (experts continue from the base)")
    axes[1].set_ylabel("velocity MSE (smoothed)")
    axes[1].set_title("mini DiT flow matching")
    axes[1].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=90)
    plt.close(fig)
    return out_png


def strip_png(rows: list[np.ndarray], out_png: str, every: int = 4) -> str:
    """Rows of uint8 videos [F, H, W, 3] -> one PNG with frames ``0, every, 2 every, ...`` side by side."""
    import imageio.v2 as imageio

    tiles = []
    for v in rows:
        v = np.asarray(v)
        sep = np.full((v.shape[1], 2, 3), 255, np.uint8)
        tiles.append(np.concatenate([x for f in v[::every] for x in (f, sep)][:-1], axis=1))
    width = max(t.shape[1] for t in tiles)
    tiles = [np.pad(t, ((0, 2), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    img = np.concatenate(tiles, axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    imageio.imwrite(out_png, img)
    return out_png
