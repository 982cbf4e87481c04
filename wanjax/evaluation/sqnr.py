"""Per-layer SQNR per (expert, timestep bin) and activation ranges over timesteps, from captured layer inputs.

Inputs are captured with `wanjax.quant.calibrate.calibrate` (the `Linear` interceptor, no model edits) using ONE
bin per sampling step (`step_bins`). `RebinnedSource` regroups those per-step statistics into any coarser
`TimestepBins` over the same schedule, so one capture serves every bin layout (the 1/3/6-bins ablation) and every
recipe. `layer_sqnr_table` runs each quantized layer (its QLinear arrays, fake mode, fp32 operands) and the
unquantized layer on the same captured rows: ``SQNR = 10 log10(sum ||y_ref||^2 / sum ||y_q - y_ref||^2)`` per
(layer, block, bin), each bin with its own table entries (`wanjax.quant.search.layer_sqnr`).
"""

from __future__ import annotations

import numpy as np

from wanjax.quant.apply import qlinears
from wanjax.quant.bins import EXPERTS, TimestepBins, uniform_bins
from wanjax.quant.fuse import float_linear
from wanjax.quant.quantize import LayerInputs
from wanjax.quant.search import layer_sqnr

__all__ = ["RebinnedSource", "activation_ranges", "layer_sqnr_table", "step_bins"]


def step_bins(schedule, boundary: float = 0.900) -> TimestepBins:
    """One bin per sampling step of ``schedule`` (each expert's steps, in order)."""
    ts = np.asarray(schedule.timesteps)
    n_high = int(np.sum(ts >= boundary * schedule.num_train_timesteps))
    counts = {"high": max(n_high, 1), "low": max(len(ts) - n_high, 1)}
    bins = uniform_bins(schedule, counts, boundary)
    if any(len(s) != 1 for s in bins.steps):
        raise ValueError(f"step_bins: expected one step per bin, got {bins.steps}")
    return bins


def _layer_name(path: str) -> str:
    return path[len("blocks.") :] if path.startswith("blocks.") else path


class RebinnedSource:
    """A `wanjax.quant.quantize.StatsSource` over a fine-binned calibration, regrouped into ``bins``.

    Args:
      calib: a `wanjax.quant.calibrate.CalibStats` (or anything with ``bins`` and ``get(expert, block, layer,
        bin)``) whose bins each lie inside one bin of ``bins`` (e.g. `step_bins` of the same schedule).
      bins: the target `TimestepBins`.

    Per coarse bin: abs-max = max over its fine bins, rows = the fine bins' sampled rows concatenated, then thinned
    (evenly spaced) to the smallest coarse-bin row count, so every bin has the same ``n``; the Hessian is the sum
    of the fine bins' (or the per-expert ``"all"`` one of a ``hessian_per_bin=False`` capture; None if absent).
    """

    def __init__(self, calib, bins: TimestepBins):
        self.calib, self.bins = calib, bins
        fine = calib.bins
        self.members: dict[str, list[list[str]]] = {}
        for e in EXPERTS:
            coarse = bins.expert_bins(e)
            groups: list[list[str]] = [[] for _ in coarse]
            for fname in fine.expert_bins(e):
                fsteps = set(fine.steps[fine.names.index(fname)])
                hit = [j for j, c in enumerate(coarse) if fsteps <= set(bins.steps[bins.names.index(c)])]
                if len(hit) != 1:
                    raise ValueError(
                        f"RebinnedSource: fine bin {fname!r} (steps {sorted(fsteps)}) lies in "
                        f"{len(hit)} of the target bins {coarse} of expert {e!r} (steps "
                        f"{[bins.steps[bins.names.index(c)] for c in coarse]}); expected exactly one"
                    )
                groups[hit[0]].append(fname)
            empty = [c for c, g in zip(coarse, groups) if not g]
            if empty:
                raise ValueError(f"RebinnedSource: target bins {empty} of expert {e!r} have no captured step")
            self.members[e] = groups
        self._cache: dict = {}

    def layer(self, expert: str, path: str, index: int) -> LayerInputs:
        key = (expert, path, index)
        if key in self._cache:
            return self._cache[key]
        layer = _layer_name(path)
        absmax, rows, hess = [], [], []
        for group in self.members[expert]:
            sts = [self.calib.get(expert, index, layer, f) for f in group]
            absmax.append(np.max([np.asarray(s.absmax, np.float32) for s in sts], axis=0))
            if any(s.samples is None or s.num_samples == 0 for s in sts):
                raise ValueError(
                    f"RebinnedSource: {expert} {path}[{index}]: a captured step has no sampled rows "
                    "(capture with reservoir > 0)"
                )
            rows.append(np.concatenate([np.asarray(s.samples[: s.num_samples], np.float32) for s in sts]))
            hess += [s.hessian for s in sts]
        n = min(len(r) for r in rows)
        rows = np.stack([r[np.linspace(0, len(r) - 1, n).round().astype(int)] for r in rows])
        if hess and all(h is not None for h in hess):
            hessian = np.sum([np.asarray(h, np.float32) for h in hess], axis=0)
        else:
            try:
                h = self.calib.get(expert, index, layer, "all").hessian
            except KeyError:
                h = None
            hessian = None if h is None else np.asarray(h, np.float32)
        out = LayerInputs(absmax=np.stack(absmax), rows=rows, hessian=hessian)
        self._cache[key] = out
        return out


def layer_sqnr_table(qmodel, ref_model, source, expert: str) -> dict[str, np.ndarray]:
    """SQNR in dB ``{path: [L, B]}`` of every QLinear of ``qmodel`` against the same layer of ``ref_model``
    (unquantized `WanDiT`) on the rows ``source.layer(expert, path, l)`` (B bins: the layer's table bins)."""
    out = {}
    for path, q in sorted(qlinears(qmodel).items()):
        arrays = q.arrays()
        kern, bias, in_path = float_linear(ref_model, path)  # a fused q/k/v: the parts' kernels side by side
        kern = np.asarray(kern, np.float32)
        bias = None if bias is None else np.asarray(bias, np.float32)
        per_layer = []
        for l in range(kern.shape[0]):
            inp = source.layer(expert, in_path, l)
            if inp.rows.shape[0] != q.config.nbins:
                raise ValueError(
                    f"layer_sqnr_table: {expert} {path}[{l}]: the layer has {q.config.nbins} bins, the "
                    f"captured inputs {inp.rows.shape[0]}"
                )
            a_l = {k: (None if v is None else v[l]) for k, v in arrays.items()}
            per_layer.append(layer_sqnr(q.config, a_l, inp.rows, kern[l], None if bias is None else bias[l]))
        out[path] = np.stack(per_layer)
    return out


def activation_ranges(calib, expert: str, layers) -> dict[str, dict]:
    """Per captured bin (one per step with `step_bins`) of ``expert``: the input range of each ``(block, layer)``.

    Returns ``{"blocks.{i}.{layer}": {"t": [S] timesteps, "max": [S] max_k |x_k|, "median": [S] median_k
    max|x_k|}}``: the largest channel (outliers) and the typical channel, over timesteps.
    """
    names = calib.bins.expert_bins(expert)
    ts = [calib.bins.t_max[calib.bins.names.index(b)] for b in names]
    out = {}
    for block, layer in layers:
        a = np.stack([np.asarray(calib.get(expert, block, layer, b).absmax, np.float64) for b in names])
        out[f"blocks.{block}.{layer}"] = {"t": np.asarray(ts), "max": a.max(-1), "median": np.median(a, -1)}
    return out
