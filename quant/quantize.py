"""Top level: run a recipe over the block Linears of each expert -> quantized experts.

    qexperts = quantize({"high": high, "low": low}, "default", stats)      # or quantize(pipe, ...)

For every expert, every path of ``BLOCK_LINEARS`` and every block index ``l``:

1. ``params = {"kernel": W_l [K, N] f32, "bias": b_l}``; the weight transforms of the recipe (smooth, rotate,
   low-rank), its quantizer (GPTQ / RTN) and its refit transforms (low-rank refit) turn it into
   ``{kernel, qweight, smooth?, rot_signs?, down?, up?, bias}``;
2. :func:`pack_layer` turns that into the QLinear arrays (packed codes, native scales, bin tables at clip 1);
3. the table transforms (clip search) fill the per-bin tables from the bin's sampled rows;
4. the layer SQNR per bin is recorded in the report.

The per-block layers are stacked back to ``[L, ...]`` and put into the model with
``wanjax.quant.apply.quantize_model``. Statistics come through :class:`StatsSource` (``layer(expert, path, index)
-> LayerInputs``); :class:`CalibrationSource` adapts ``wanjax.quant.calibrate.CalibStats``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Mapping, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.numerics import formats
from wanjax.quant.apply import BLOCK_LINEARS, get_submodule, quantize_model
from wanjax.quant.bins import EXPERTS
from wanjax.quant.qlinear import QLinear, QLinearConfig
from wanjax.quant.fuse import fuse_arrays, layer_units
from wanjax.quant.recipes import LayerContext, Recipe, Rotate, Smooth, get_recipe, layer_input, rotation_block
from wanjax.quant.search import layer_sqnr, search_tables, static_base_scale

__all__ = [
    "sqnr_csv",
    "CalibrationSource",
    "LayerInputs",
    "SharedExpertSource",
    "StatsSource",
    "pack_layer",
    "quantize",
    "quantize_expert",
    "quantize_fused_layer",
    "quantize_layer",
    "quantize_unit",
]


@dataclasses.dataclass
class LayerInputs:
    """Calibration statistics of one layer (one expert, one block index) over its B bins.

    Attributes:
      absmax: ``[B, K]`` per-bin channel abs-max of the raw input.
      rows: ``[B, n, K]`` sampled raw input rows per bin (same n for every bin).
      hessian: ``[K, K]`` sum ``X^T X`` of the raw inputs over all bins, or None.
    """

    absmax: np.ndarray
    rows: np.ndarray
    hessian: np.ndarray | None = None

    def __post_init__(self):
        a, r = np.asarray(self.absmax), np.asarray(self.rows)
        if a.ndim != 2 or r.ndim != 3 or r.shape[0] != a.shape[0] or r.shape[2] != a.shape[1] or r.shape[1] == 0:
            raise ValueError(f"LayerInputs: expected absmax [B, K] and rows [B, n>0, K], got {a.shape} and {r.shape}")


class StatsSource(Protocol):
    """Anything that returns the statistics of one layer: ``layer(expert, path, index) -> LayerInputs``."""

    def layer(self, expert: str, path: str, index: int) -> LayerInputs: ...


class CalibrationSource:
    """Adapts ``wanjax.quant.calibrate.CalibStats`` (or anything with ``get(expert, block, layer, bin_name) ->
    wanjax.quant.stats.LayerStats`` and a ``bins`` attribute, a ``TimestepBins``) to :class:`StatsSource`.

    Per layer it stacks the bins of the expert (in ``bins.expert_bins(expert)`` order): abs-max ``[B, K]``, the
    sampled rows ``[B, n, K]`` (n = the smallest filled reservoir) and the Hessian summed over the bins (or the
    per-expert one, bin ``"all"``, of a ``hessian_per_bin=False`` calibration). The Hessian
    is used by ``GPTQ(hessian="raw")`` only and must then be of the plain layer inputs (no ``hessian_transform``).
    """

    def __init__(self, calib, bins=None):
        self.calib = calib
        self.bins = bins if bins is not None else calib.bins

    def layer(self, expert: str, path: str, index: int) -> LayerInputs:
        layer = path[len("blocks.") :] if path.startswith("blocks.") else path
        names = self.bins.expert_bins(expert)
        sts = [self.calib.get(expert, index, layer, b) for b in names]
        if any(s.samples is None or s.num_samples == 0 for s in sts):
            raise ValueError(
                f"CalibrationSource: {expert} {path}[{index}]: every bin needs sampled rows (calibrate with "
                "reservoir > 0) for the clip search; a bin has none"
            )
        n = min(s.num_samples for s in sts)
        rows = np.stack([np.asarray(s.samples[:n], np.float32) for s in sts])
        absmax = np.stack([np.asarray(s.absmax, np.float32) for s in sts])
        hs = [s.hessian for s in sts]
        if all(h is not None for h in hs):
            hessian = np.sum([np.asarray(h, np.float32) for h in hs], axis=0)
        else:  # calibrated with hessian_per_bin=False: one per-expert Hessian under the bin name "all"
            try:
                hessian = self.calib.get(expert, index, layer, "all").hessian
            except KeyError:
                hessian = None
            hessian = None if hessian is None else np.asarray(hessian, np.float32)
        return LayerInputs(absmax=absmax, rows=rows, hessian=hessian)


class SharedExpertSource:
    """One calibration for both experts (a recipe's ``calibration="shared"``): per bin ``j`` both experts get the
    pooled statistics of the high- and low-noise expert's bin ``j`` (abs-max max, every second row of each, Hessians
    summed), so the row count stays that of one expert. Both experts need the same number of bins."""

    def __init__(self, source):
        self.source = source

    def layer(self, expert: str, path: str, index: int) -> LayerInputs:
        a, b = (self.source.layer(e, path, index) for e in EXPERTS)
        if a.rows.shape[0] != b.rows.shape[0]:
            raise ValueError(
                f"SharedExpertSource: {path}[{index}]: high has {a.rows.shape[0]} bins, low "
                f"{b.rows.shape[0]}; pooling needs the same count (calibrate both experts with as many bins)"
            )
        n = min(a.rows.shape[1], b.rows.shape[1])
        rows = np.concatenate([a.rows[:, :n:2], b.rows[:, 1:n:2]], axis=1)
        hessian = None if a.hessian is None or b.hessian is None else a.hessian + b.hessian
        return LayerInputs(absmax=np.maximum(a.absmax, b.absmax), rows=rows, hessian=hessian)


def layer_config(recipe: Recipe, k: int, n: int, nbins: int) -> QLinearConfig:
    """The QLinearConfig a recipe gives a ``K -> N`` layer with ``nbins`` bins."""
    w, a = recipe.weight, recipe.act
    return QLinearConfig(
        in_features=k,
        out_features=n,
        w_fmt=w.fmt,
        w_group=w.group(k),
        w_scale_levels=w.scale_levels,
        **QLinearConfig.act_fields(a),
        act_mode=recipe.act_mode,
        nbins=nbins,
        rot_block=rotation_block(recipe),
    )


def pack_layer(params: dict, config: QLinearConfig, ctx: LayerContext, param_dtype) -> dict:
    """Quantized params of one layer -> QLinear arrays (packed codes, tables at clip 1 / offset 0).

    In static mode the table starts at ``act_scale = max|x_in| / qmax`` per bin (``x_in`` as the matmul sees it).
    """
    qt: formats.QuantizedTensor = params["qweight"]
    if config.packed:
        qt = qt.pack()
    nb = config.nbins
    arrays = {
        "qweight": qt.codes,
        "wscale": qt.scales,
        "wtensor_scale": qt.tensor_scale,
        "smooth": params.get("smooth"),
        "rot_signs": params.get("rot_signs"),
        "down": params.get("down"),
        "up": params.get("up"),
        "bias": None if params.get("bias") is None else jnp.asarray(params["bias"]).astype(param_dtype),
        "act_clip": jnp.ones((nb,), jnp.float32),
        "act_exp_offset": jnp.zeros((nb,), jnp.int32),
        "act_scale": None,
        "wunit": params.get("qunit"),  # two-level group scales: the row units (None otherwise)
    }
    if config.act_mode == "static":
        arrays["act_scale"] = static_base_scale(config, _xin_absmax(params, ctx))
    return arrays


def _xin_absmax(params, ctx):
    """``[B, K]`` abs-max of the matmul input per bin: exact from the abs-max without rotation, from rows with it."""
    if "rot_signs" in params:
        return jnp.max(jnp.abs(layer_input(params, ctx.rows, rotation_block(ctx.recipe))), axis=1)
    a = jnp.asarray(ctx.absmax, jnp.float32)
    return a / params["smooth"] if "smooth" in params else a


def quantize_layer(
    recipe: Recipe,
    kernel,
    bias,
    inputs: LayerInputs,
    *,
    path: str = "",
    index: int = 0,
    expert: str = "",
    param_dtype=jnp.bfloat16,
    timings: dict | None = None,
) -> tuple[QLinearConfig, dict, dict]:
    """Runs ``recipe`` on one layer (kernel ``[K, N]``, bias ``[N]`` or None) with its statistics.

    Returns ``(config, arrays, info)``: the QLinear config and arrays (no leading L) and ``info = {"sqnr_db": [B],
    "search": search info or None}``. With a ``timings`` dict, each step (every transform by class name, ``pack``,
    ``sqnr``) is run to completion and its wall seconds are added under its name (a profile; slower, as it
    synchronises after every step).
    """
    recipe = get_recipe(recipe).for_path(path)
    w = jnp.asarray(kernel, jnp.float32)
    k, n = w.shape
    nb = int(np.shape(inputs.absmax)[0])
    ctx = LayerContext(
        path=path,
        index=index,
        expert=expert,
        absmax=jnp.asarray(inputs.absmax, jnp.float32),
        rows=jnp.asarray(inputs.rows, jnp.float32),
        hessian=None if inputs.hessian is None else jnp.asarray(inputs.hessian, jnp.float32),
        recipe=recipe,
    )
    params = {"kernel": w} if bias is None else {"kernel": w, "bias": jnp.asarray(bias)}
    step = functools.partial(_timed, timings)
    for t in recipe.stage("weight"):
        params = step(type(t).__name__, t, params, ctx)
    residual = params["kernel"]  # what the quantizer is given (the refit transforms need it)
    for t in recipe.stage("quantizer"):
        params = step(type(t).__name__, t, params, ctx)
    for t in recipe.stage("refit"):
        params = step(type(t).__name__, t, params, ctx, residual)
    config = layer_config(recipe, k, n, nb)
    arrays = step("pack", pack_layer, params, config, ctx, param_dtype)
    return _tables_and_sqnr(recipe, config, arrays, params, ctx, w, bias, step)


def _tables_and_sqnr(recipe: Recipe, config, arrays, params, ctx: LayerContext, w, bias, step):
    """The table transforms (clip search against the float layer ``w`` / ``bias``) and the layer SQNR per bin of a
    packed layer; ``params``: its transformed params (the static-mode base scale reads their smoothing/rotation)."""
    ref_bias = None if bias is None else jnp.asarray(bias, jnp.float32)
    search_info = None
    for t in recipe.stage("table"):
        if config.a_fmt is None or not t.applies_to(ctx.path):
            continue
        base = None
        if config.act_mode == "static":
            base = static_base_scale(config, _xin_absmax(params, ctx))
        arrays, search_info = step(
            type(t).__name__,
            search_tables,
            config,
            arrays,
            ctx.rows,
            w,
            ref_bias,
            t.clips,
            t.exp_offsets,
            per_bin=t.per_bin,
            base=base,
        )
    sqnr = step("sqnr", layer_sqnr, config, arrays, ctx.rows, w, ref_bias)
    return config, arrays, {"sqnr_db": sqnr, "search": search_info}


#: the weight transforms a fused group runs once on its concatenated kernel (the shared input transform)
_JOINT = (Smooth, Rotate)


def quantize_fused_layer(
    recipe: Recipe,
    kernels,
    biases,
    inputs: LayerInputs,
    *,
    path: str,
    parts: tuple,
    index: int = 0,
    expert: str = "",
    param_dtype=jnp.bfloat16,
    timings: dict | None = None,
) -> tuple[QLinearConfig, dict, dict]:
    """Runs ``recipe`` on a group of Linears that read one input (``parts``, e.g. the self-attention q / k / v) as
    ONE quantized layer ``path`` (the recipe option ``fuse_qkv``, `wanjax.quant.fuse`).

    ``kernels[i] [K, N_i]`` / ``biases[i]`` (all None or all given): the parts' float weights; ``inputs``: the
    statistics of their shared input. The recipe's :class:`Smooth` and :class:`Rotate` run once on the concatenated
    kernel ``[K, sum N_i]`` (one joint smoothing vector from the input's abs-max and the max over the parts'
    weights; one rotation, its signs drawn for ``path``); the other weight transforms, the quantizer and the refit
    run per part on its columns (its path in the context); the packed parts are fused by
    `wanjax.quant.fuse.fuse_arrays` (down along the rank, up block-diagonal), and the table transforms and the SQNR
    run on the fused layer against the concatenated float layer. Returns ``(config, arrays, info)`` as
    :func:`quantize_layer` (``out_features = sum N_i``). ``ValueError`` when the parts' input widths differ, only
    some have a bias, or a per-part transform precedes a joint one in the recipe.
    """
    recipe = get_recipe(recipe)
    specs = {p: recipe.for_path(p).weight for p in (path, *parts)}
    if len(set(specs.values())) != 1:
        raise ValueError(
            f"quantize_fused_layer {path!r}: recipe {recipe.name!r}'s weight_overrides give the fused layer and its "
            f"parts different weight formats {specs}; a fused layer has one"
        )
    recipe = recipe.for_path(path)
    ws = [jnp.asarray(kk, jnp.float32) for kk in kernels]
    if len(ws) != len(parts) or len(biases) != len(parts):
        raise ValueError(f"quantize_fused_layer {path!r}: {len(parts)} parts, {len(ws)} kernels, {len(biases)} biases")
    shapes = [tuple(w.shape) for w in ws]
    if any(len(sh) != 2 for sh in shapes) or len({sh[0] for sh in shapes}) != 1:
        raise ValueError(
            f"quantize_fused_layer {path!r}: the fused parts {list(parts)} must be 2-D kernels [K, N_i] of one input "
            f"width K; got shapes {dict(zip(parts, shapes))}"
        )
    if len({b is None for b in biases}) != 1:
        raise ValueError(
            f"quantize_fused_layer {path!r}: all parts or none must have a bias; got "
            f"{ {p: b is not None for p, b in zip(parts, biases)} }"
        )
    weight = recipe.stage("weight")
    first_rest = next((i for i, t in enumerate(weight) if not isinstance(t, _JOINT)), len(weight))
    if any(isinstance(t, _JOINT) for t in weight[first_rest:]):
        raise ValueError(
            f"quantize_fused_layer {path!r}: recipe {recipe.name!r} runs {[type(t).__name__ for t in weight]}; a "
            "fused group needs its Smooth / Rotate (joint, on the concatenated kernel) before the per-part transforms"
        )
    k = shapes[0][0]
    ns = [sh[1] for sh in shapes]
    nb = int(np.shape(inputs.absmax)[0])
    ctx = LayerContext(
        path=path,
        index=index,
        expert=expert,
        absmax=jnp.asarray(inputs.absmax, jnp.float32),
        rows=jnp.asarray(inputs.rows, jnp.float32),
        hessian=None if inputs.hessian is None else jnp.asarray(inputs.hessian, jnp.float32),
        recipe=recipe,
    )
    step = functools.partial(_timed, timings)
    w_cat = jnp.concatenate(ws, axis=1)
    joint = {"kernel": w_cat}
    for t in weight[:first_rest]:
        joint = step(type(t).__name__, t, joint, ctx)
    shared = {key: v for key, v in joint.items() if key != "kernel"}
    cols = np.cumsum([0, *ns])
    configs, packed = [], []
    for i, part in enumerate(parts):
        pctx = dataclasses.replace(ctx, path=part)
        params = {**shared, "kernel": joint["kernel"][:, cols[i] : cols[i + 1]]}
        if biases[i] is not None:
            params["bias"] = jnp.asarray(biases[i])
        for t in weight[first_rest:]:
            params = step(type(t).__name__, t, params, pctx)
        residual = params["kernel"]
        for t in recipe.stage("quantizer"):
            params = step(type(t).__name__, t, params, pctx)
        for t in recipe.stage("refit"):
            params = step(type(t).__name__, t, params, pctx, residual)
        configs.append(layer_config(recipe, k, ns[i], nb))
        packed.append(step("pack", pack_layer, params, configs[-1], pctx, param_dtype))
    config, arrays = step("fuse", fuse_arrays, configs, packed, path)
    bias = None if biases[0] is None else jnp.concatenate([jnp.asarray(b) for b in biases])
    return _tables_and_sqnr(recipe, config, arrays, shared, ctx, w_cat, bias, step)


def quantize_unit(recipe: Recipe, model: nnx.Module, unit: tuple, stats, *, index: int, expert: str, **kw):
    """One quantization unit ``(path, parts)`` (`wanjax.quant.fuse.layer_units`) of block ``index`` of ``model``
    (a float WanDiT): :func:`quantize_layer` for a single Linear, :func:`quantize_fused_layer` for a fused group
    (the statistics of its first part: the parts read one input). Returns ``(config, arrays, info)``."""
    path, parts = unit
    lins = [get_submodule(model, p) for p in parts]
    kerns = [lin.kernel[...][index] for lin in lins]
    biases = [None if lin.bias is None else lin.bias[...][index] for lin in lins]
    kw.setdefault("param_dtype", kerns[0].dtype)
    if parts == (path,):
        return quantize_layer(
            recipe, kerns[0], biases[0], stats.layer(expert, path, index), path=path, index=index, expert=expert, **kw
        )
    return quantize_fused_layer(
        recipe,
        kerns,
        biases,
        stats.layer(expert, parts[0], index),
        path=path,
        parts=parts,
        index=index,
        expert=expert,
        **kw,
    )


def _timed(timings: dict | None, name: str, fn, *args, **kw):
    """``fn(*args, **kw)``; with a ``timings`` dict, run to completion and add its wall seconds under ``name``."""
    if timings is None:
        return fn(*args, **kw)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args, **kw))
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0
    return out


def _stack(arrays_list: list[dict]) -> dict:
    out = {}
    for name in arrays_list[0]:
        vals = [a[name] for a in arrays_list]
        out[name] = None if vals[0] is None else jnp.stack([jnp.asarray(v) for v in vals])
    return out


def quantize_expert(
    model: nnx.Module,
    recipe,
    stats: StatsSource,
    *,
    expert: str = "high",
    paths=BLOCK_LINEARS,
    mode: str = "fake",
    progress: bool = True,
) -> tuple[nnx.Module, dict]:
    """Quantizes the block Linears ``paths`` of one expert; returns ``(quantized model, report)``.

    ``report = {"expert", "recipe", "sqnr_db": {path: [L, B]}}``. The input model is not modified. ``stats`` is used
    as given: the recipe's ``calibration="shared"`` pooling is applied by :func:`quantize`, which sees both experts.
    """
    recipe = get_recipe(recipe)
    nl = model.cfg.num_layers
    units = layer_units(paths, recipe.fuse_qkv)
    bar = _bar(len(units) * nl, f"quantize {expert} ({recipe.name})", progress)
    qlayers, sqnr = {}, {}
    for unit in units:
        path = unit[0]
        lin = get_submodule(model, unit[1][0])
        per_layer, s = [], []
        config = None
        for l in range(nl):
            cfg_l, arrays, info = quantize_unit(recipe, model, unit, stats, index=l, expert=expert)
            if config is not None and cfg_l != config:
                raise ValueError(f"quantize_expert: {path}: block {l} got config {cfg_l}, block 0 {config}")
            config = cfg_l
            per_layer.append(arrays)
            s.append(info["sqnr_db"])
            if bar is not None:
                bar.set_postfix_str(f"{path}[{l}] sqnr {np.mean(info['sqnr_db']):.1f} dB")
                bar.update(1)
        qlayers[path] = QLinear(config, dtype=lin.dtype, mode="fake", path=path, **_stack(per_layer))
        sqnr[path] = np.stack(s)
    if bar is not None:
        bar.close()
    return quantize_model(model, qlayers, mode=mode), {"expert": expert, "recipe": recipe.name, "sqnr_db": sqnr}


def quantize(
    pipe_or_experts,
    recipe,
    stats: StatsSource,
    *,
    experts=("high", "low"),
    mode: str = "fake",
    paths=None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Quantizes each expert with ``recipe`` (a name of ``RECIPES`` or a Recipe).

    Args:
      pipe_or_experts: a `WanI2VPipeline` (its ``high``/``low`` experts) or ``{expert name: WanDiT}``.
      stats: a :class:`StatsSource` (statistics per expert / layer / block / bin); with the recipe's
        ``calibration="shared"`` both experts are quantized from the two experts' pooled statistics
        (:class:`SharedExpertSource`).
      experts: which experts to quantize (pipeline input).
      mode: ``"fake"`` or ``"real"`` for the returned models.
      paths: the layers to quantize (default ``BLOCK_LINEARS``, all ten of every block).

    Returns:
      ``({name: quantized WanDiT}, {name: report})``.
    """
    recipe = get_recipe(recipe)
    if recipe.calibration == "shared":
        stats = SharedExpertSource(stats)
    if isinstance(pipe_or_experts, Mapping):
        models = dict(pipe_or_experts)
    else:
        pipe = pipe_or_experts
        split = {"high": pipe._params_high, "low": pipe._params_low}
        models = {e: nnx.merge(pipe.graphdef, split[e]) for e in experts}
    out, reports = {}, {}
    for name, model in models.items():
        out[name], reports[name] = quantize_expert(
            model,
            recipe,
            stats,
            expert=name,
            mode=mode,
            progress=progress,
            paths=BLOCK_LINEARS if paths is None else tuple(paths),
        )
    return out, reports


def sqnr_csv(reports: Mapping, bin_names: Mapping | None = None) -> str:
    """The layer SQNR of ``quantize``'s reports as CSV: ``expert,layer,block,bin,sqnr_db`` (one row per layer, block
    and bin; ``bin_names``: ``{expert: names}``, else bin indices)."""
    lines = ["expert,layer,block,bin,sqnr_db"]
    for e, r in reports.items():
        for path, s in r["sqnr_db"].items():
            s = np.asarray(s)
            for l in range(s.shape[0]):
                for b in range(s.shape[1]):
                    name = bin_names[e][b] if bin_names else b
                    lines.append(f"{e},{path},{l},{name},{s[l, b]:.3f}")
    return "\n".join(lines) + "\n"


def _bar(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer")
