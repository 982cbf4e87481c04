"""Model surgery: put :class:`~wanjax.quant.qlinear.QLinear` layers into a `WanDiT` in place of its block Linears.

Only the 10 Linears of the scanned blocks are replaced (``BLOCK_LINEARS``, owned by `wanjax.model.names`:
self-attention q/k/v/o, cross-attention q/k/v/o, FFN fc1/fc2, each stacked over the L blocks, i.e. 400 layers of a
40-block expert). Everything else (patch, text and time embeddings, time projection, modulation, norms, head,
attention core) stays as it is, as the seed.

The timestep bin is a traced integer given at call time::

    with active_bin(bin_index):          # inside the jitted function; bin_index is an argument
        v = qmodel(x, t, context)

so changing bin or expert (same tree structure) never recompiles. :func:`attach_to_pipeline` wires this into a
`wanjax.pipeline.WanI2VPipeline` (the bin is looked up from the traced timestep with
``wanjax.quant.bins.TimestepBins.local_lookup``).
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax.numpy as jnp
from flax import nnx

from wanjax.model.layers import Linear
from wanjax.model.names import BLOCK_LINEARS  # re-exported: the paths of the layers quantize_model replaces
from wanjax.model.names import FUSED_LINEARS
from wanjax.quant.qlinear import MODES, QLinear, active_bin, current_bin
from wanjax.sampling.guidance import guided_velocity

__all__ = [
    "BLOCK_LINEARS",
    "active_bin",
    "attach_to_pipeline",
    "current_bin",
    "get_submodule",
    "prepare_kernel_weights",
    "qlinears",
    "quantize_model",
    "set_mode",
]


def get_submodule(model: nnx.Module, path: str):
    """The sub-module at dotted attribute ``path`` (``"blocks.ffn.fc1"``); ``KeyError`` naming the missing part."""
    node = model
    for i, part in enumerate(path.split(".")):
        if not hasattr(node, part):
            raise KeyError(f"model has no module {'.'.join(path.split('.')[: i + 1])!r} (looking up {path!r})")
        node = getattr(node, part)
    return node


def _set_submodule(model, path: str, value) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(model, parent) if parent else model, name, value)


def _copy(module: nnx.Module) -> nnx.Module:
    """A new module graph sharing the (immutable) arrays of ``module``."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, state)


def qlinears(model: nnx.Module) -> dict[str, QLinear]:
    """All QLinear layers of ``model`` by their ``path``."""
    return {m.path: m for _, m in nnx.iter_modules(model) if isinstance(m, QLinear)}


def quantize_model(model: nnx.Module, qlayers: Mapping[str, QLinear], *, mode: str | None = None) -> nnx.Module:
    """Returns a NEW model where each ``Linear`` at path ``p`` in ``qlayers`` is replaced by ``qlayers[p]``.

    Args:
      model: a `WanDiT` (not modified; the result shares its untouched arrays).
      qlayers: ``{path: QLinear}`` with paths from ``BLOCK_LINEARS`` (or any Linear path); a stacked layer's arrays
        carry the leading L axis of the Linear they replace (kernel ``[L, K, N]`` -> qweight ``[L, N, K/2]``). A
        fused path (``FUSED_LINEARS``: ``"blocks.self_attn.qkv"``) replaces its parts (q, k, v) by one layer.
      mode: set every inserted layer's mode (``"fake"`` / ``"real"``); None keeps theirs.

    The inserted layers take the replaced Linear's compute ``dtype`` and ``path``. Raises ``KeyError`` /
    ``ValueError`` naming the layer for unknown paths, non-Linear targets or shape mismatches.
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize_model: mode must be one of {MODES}, got {mode!r}")
    new = _copy(model)
    for path, q in qlayers.items():
        if path in FUSED_LINEARS:
            _put_fused(new, path, q, mode)
            continue
        old = get_submodule(new, path)
        if not isinstance(old, Linear):
            raise ValueError(f"quantize_model: {path!r} is a {type(old).__name__}, expected a Linear to replace")
        if not isinstance(q, QLinear):
            raise ValueError(f"quantize_model: qlayers[{path!r}] must be a QLinear, got {type(q).__name__}")
        kshape = tuple(old.kernel.shape)
        lead, (k, n) = kshape[:-2], kshape[-2:]
        qlead = tuple(q.act_clip.shape[:-1])
        if (q.in_features, q.out_features) != (k, n) or qlead != lead:
            raise ValueError(
                f"quantize_model: {path!r}: Linear kernel is {kshape} (leading {lead}, K={k}, N={n}); the "
                f"QLinear is K={q.in_features}, N={q.out_features} with leading {qlead}"
            )
        if (old.bias is None) != (q.bias is None):
            raise ValueError(
                f"quantize_model: {path!r}: the Linear {'has' if old.bias is not None else 'has no'} bias, "
                f"the QLinear {'has' if q.bias is not None else 'has none'}"
            )
        q = _copy(q)
        q.dtype = old.dtype
        q.path = path
        if mode is not None:
            _set_mode_one(q, mode)
        _set_submodule(new, path, q)
    return new


def _put_fused(model: nnx.Module, path: str, q: QLinear, mode: str | None) -> None:
    """Puts the fused QLinear ``q`` at ``path`` (`wanjax.model.names.FUSED_LINEARS`, e.g. ``blocks.self_attn.qkv``)
    in place of its parts (e.g. the q / k / v Linears, removed): their input width, concatenated output widths,
    leading axes and biases must match ``q``'s. The parent module then runs the fused layer
    (`wanjax.model.dit.Attention`)."""
    parts = FUSED_LINEARS[path]
    parent_path, _, name = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    olds = [get_submodule(model, p) for p in parts]
    if not isinstance(q, QLinear):
        raise ValueError(f"quantize_model: qlayers[{path!r}] must be a QLinear, got {type(q).__name__}")
    bad = [p for p, o in zip(parts, olds) if not isinstance(o, Linear)]
    if bad:
        raise ValueError(f"quantize_model: fused {path!r} replaces the Linears {list(parts)}; {bad} are not Linears")
    shapes = [tuple(o.kernel.shape) for o in olds]
    lead, k = shapes[0][:-2], shapes[0][-2]
    qlead = tuple(q.act_clip.shape[:-1])
    n = sum(sh[-1] for sh in shapes)
    if any(sh[:-1] != shapes[0][:-1] for sh in shapes) or (q.in_features, q.out_features) != (k, n) or qlead != lead:
        raise ValueError(
            f"quantize_model: fused {path!r}: its parts {list(parts)} have kernels {shapes} (one K and leading axes "
            f"needed, N summed: K={k}, N={n}); the QLinear is K={q.in_features}, N={q.out_features} with leading {qlead}"
        )
    if any((o.bias is None) != (q.bias is None) for o in olds):
        raise ValueError(
            f"quantize_model: fused {path!r}: the parts' biases ({[o.bias is not None for o in olds]}) and the "
            f"QLinear's ({q.bias is not None}) must all be present or all absent"
        )
    q = _copy(q)
    q.dtype = olds[0].dtype
    q.path = path
    if mode is not None:
        _set_mode_one(q, mode)
    for p in parts:
        delattr(parent, p.rpartition(".")[2])
    setattr(parent, name, q)


def _set_mode_one(q: QLinear, mode: str) -> None:
    if mode == "real" and q.config.real_mode_problem():
        raise ValueError(f"set_mode: {q.path!r} cannot run mode='real': {q.config.real_mode_problem()}")
    q.mode = mode


def set_mode(model: nnx.Module, mode: str) -> nnx.Module:
    """A new model whose QLinears all run in ``mode`` (``"fake"``: simulated; ``"real"``: ``wanjax.kernels``).

    The mode is static (part of the graph definition): switching it compiles a new program, switching bins does not.
    """
    if mode not in MODES:
        raise ValueError(f"set_mode: mode must be one of {MODES}, got {mode!r}")
    new = _copy(model)
    for q in qlinears(new).values():
        _set_mode_one(q, mode)
    return new


def prepare_kernel_weights(model: nnx.Module, *, int4: bool = False) -> nnx.Module:
    """A new model whose QLinears also hold their weights as the GPU kernels read them (pure; once, at load time).

    Each layer with MXFP4 weights that real mode runs gets ``kweight`` (float8_e4m3fn [..., N, K]: every row
    re-encoded to e4m3 under one power-of-two scale, ``kernels.mxfp4_gpu.prepare_weights``) and ``kscale`` (f32
    [..., N]). Real mode then calls ``kernels.dispatch.mxfp4_linear_fp8`` and skips the per-call decode and
    re-encoding of the codes, which is faster (docs/BENCHMARKS.md); the numbers are the same. Weight rows the
    re-encoding rounds (a block more than 8 binades below its row's largest) are counted and reported in one warning;
    their outputs are the same as the per-call path's, which rounds them alike.

    ``int4=True`` also gives per-channel INT4 layers ``kweight`` = the codes unpacked to int8 [..., N, K] and
    ``kscale`` = their scales [..., N] (two-level layers: the carried ``q * m`` and the row units ``wunit``): the GEMM then reads int8 weights, skipping the per-call XLA unpacking the
    dispatcher does at M >= ``dispatch.INT8_UNPACK_MIN_M`` and the in-register unpacking below it (per-linear timings:
    docs/BENCHMARKS.md, ``python -m bench.gemm``). Off by default (``wanjax generate --int8-weights`` turns it on).

    The codes stay (fake mode and artifacts use them), so prepared layers take 1 byte a parameter more. Other layers
    are left as they are.
    """
    import warnings

    from wanjax.kernels.mxfp4_gpu import prepare_weights
    from wanjax.kernels.reference import unpack_int4
    from wanjax.numerics.two_level import carried_from_scales
    from wanjax.quant.qlinear import QVar

    new = _copy(model)
    inexact = {}
    for path, q in qlinears(new).items():
        c = q.config
        if c.real_mode_problem():
            continue
        codes, scales = q.qweight[...], q.wscale[...]
        lead = codes.shape[:-2]
        if c.w_fmt == "mxfp4":
            w8, s8, bad = prepare_weights(codes.reshape(-1, codes.shape[-1]), scales.reshape(-1, scales.shape[-1]))
            if int(bad):
                inexact[path] = int(bad)
        elif int4 and c.w_fmt == "int4" and c.w_group == c.in_features and c.w_scale_levels is None:
            w8, s8 = unpack_int4(codes), scales[..., 0].astype(jnp.float32)
        elif int4 and c.w_scale_levels is not None:  # two-level: carried int8 q * m, row units as the scales
            unit = q.wunit[...]
            w8, s8 = carried_from_scales(unpack_int4(codes), scales, unit, c.w_group), unit.astype(jnp.float32)
        else:
            continue
        # nnx.data: the attributes were None (static) until now
        q.kweight = nnx.data(QVar(w8.reshape(*lead, c.out_features, c.in_features)))
        q.kscale = nnx.data(QVar(s8.reshape(*lead, c.out_features)))
    if inexact:
        warnings.warn(
            f"prepare_kernel_weights: the e4m3 re-encoding rounds weight rows (layer: rows) {inexact}; "
            "real mode rounds them alike with or without the prepared weights",
            stacklevel=2,
        )
    return new


def _binned_velocity(bins, graphdef, params, x, y, ctx, t, guide, constrain=None):
    """`wanjax.sampling.guided_velocity` with the timestep bin of ``t`` active (traced: one compilation)."""
    with active_bin(bins.local_lookup(t)):
        return guided_velocity(graphdef, params, x, y, ctx, t, guide, constrain=constrain)


def attach_to_pipeline(pipe, high: nnx.Module, low: nnx.Module, bins) -> None:
    """Makes ``pipe`` (a `WanI2VPipeline`) denoise with the quantized experts ``high`` / ``low``.

    ``bins`` is the `wanjax.quant.bins.TimestepBins` the tables were calibrated with; inside the jitted guided
    velocity the bin of each expert is ``bins.local_lookup(t)`` (traced), so one compilation serves every step of
    both experts. Modifies ``pipe`` in place (its expert parameters, graph definition and jitted velocity; both
    experts are placed on the device, the pipeline's ``expert_placement="swap"`` still moves them at the boundary).
    On a sharded pipeline (``mesh=``) the quantized parameters are sharded by the rule table and the velocity is
    jitted for the mesh (GSPMD partitions the XLA dots of fake mode and of real mode's "xla" kernel backend). The
    Pallas kernels have no partitioning rule yet, so real-mode layers under a mesh with the "pallas" backend on a GPU
    raise ``NotImplementedError`` (set ``WANJAX_KERNELS=xla``, or use fake mode).
    """
    mesh = getattr(pipe, "mesh", None)
    if mesh is not None and any(q.mode == "real" for m in (high, low) for q in qlinears(m).values()):
        from wanjax.kernels import dispatch

        if dispatch.select_backend() == "pallas" and dispatch._platform() == "gpu":
            raise NotImplementedError(
                "attach_to_pipeline: real-mode layers on a mesh with the 'pallas' kernel backend: the Pallas GPU kernels "
                "have no partitioning rule yet; set WANJAX_KERNELS=xla (XLA's int8 dots, partitioned by GSPMD) or use "
                "mode='fake'"
            )
    g_high, p_high = nnx.split(high)
    g_low, p_low = nnx.split(low)
    if g_high != g_low:
        raise ValueError(
            "attach_to_pipeline: the quantized experts must have the same structure (same recipe and "
            "config); their module graphs differ"
        )
    for name, m in (("high", high), ("low", low)):
        for q in qlinears(m).values():
            n_exp = len(bins.expert_bins(name))
            if q.config.nbins != n_exp:
                raise ValueError(
                    f"attach_to_pipeline: {name} expert layer {q.path!r} has {q.config.nbins} bins, the "
                    f"bins give {n_exp} for that expert"
                )
    velocity = functools.partial(_binned_velocity, bins)
    # the step cache (wanjax.sampling.cache) runs its split forward under this, as _binned_velocity runs its forward
    velocity.step_context = lambda t: active_bin(bins.local_lookup(t))
    pipe.replace_experts(high, low, velocity=velocity)
    pipe.quant_bins = bins
