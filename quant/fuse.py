"""Fused projections: Linears that read one input quantized once (the recipe option ``fuse_qkv``).

The self-attention q, k and v of a DiT block read the same normed and modulated input. Quantized separately, each
has its own smoothing vector and rotation, so the same input is smoothed, rotated, quantized per token and projected
by a low-rank ``down`` three times. With ``Recipe.fuse_qkv`` the three are calibrated as one group:

* one **joint smoothing vector** ``s = a^alpha / w^(1 - alpha)`` from the shared input's abs-max ``a`` and ``w`` the
  max over the three kernels' input rows (the smoothing of the concatenated kernel ``[K, 3N]``), and one shared
  rotation (its signs drawn for the fused path ``blocks.self_attn.qkv``);
* each part then gets its own low-rank branch, quantizer and refit on its columns (so its codes and scales are
  exactly what a separate QLinear with that smoothing / rotation would hold);
* :func:`fuse_arrays` concatenates the parts' packed arrays into ONE QLinear ``K -> 3N``: codes and scales along
  the output axis, ``down`` along the rank axis ``[K, r_q + r_k + r_v]`` and ``up`` block-diagonal
  ``[r_q + r_k + r_v, 3N]``; one per-bin activation table, searched on the fused layer's output. Equal parts (the
  same N and rank) set ``QLinearConfig.parts``: real mode then runs one GEMM per part after the one activation
  quantization (the zero blocks of ``up`` are not multiplied).

The fused layer computes ``x_r = rotate(x / s)`` and its per-token quantization once; its output columns are those
of the three separate layers (integer products and per-element scales are the same numbers; the low-rank sums
only add exact zeros from the block-diagonal ``up``; see tests/test_fuse_qkv.py). The model runs it through
`wanjax.model.dit.Attention` (a ``qkv`` attribute in place of ``q`` / ``k`` / ``v``) and splits its output.

Pure functions of arrays and configs (no model state); `wanjax.quant.quantize` and `wanjax.quant.stream` call them.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from wanjax.model.names import FUSED_LINEARS, fused_parent
from wanjax.quant.qlinear import QLinearConfig

__all__ = ["FUSED_LINEARS", "float_linear", "fuse_arrays", "layer_units", "split_fused_output"]


def layer_units(paths: Sequence[str], fuse_qkv: bool) -> list[tuple[str, tuple[str, ...]]]:
    """The quantization units of ``paths`` (block Linear paths): ``[(unit path, its parts), ...]`` in the order of
    ``paths``. Without fusion every path is its own unit ``(p, (p,))``; with ``fuse_qkv`` the self-attention q / k / v
    become the one unit ``("blocks.self_attn.qkv", (q, k, v))`` at the place of q. ``ValueError`` when ``fuse_qkv``
    is asked for and only some of q / k / v are in ``paths`` (the three share one input quantization)."""
    paths = tuple(paths)
    if not fuse_qkv:
        return [(p, (p,)) for p in paths]
    out, seen = [], set()
    for p in paths:
        parent = fused_parent(p)
        if parent is None:
            out.append((p, (p,)))
            continue
        parts = FUSED_LINEARS[parent]
        missing = [q for q in parts if q not in paths]
        if missing:
            raise ValueError(
                f"fuse_qkv: {parent!r} fuses {list(parts)} (one shared input quantization); the layers to quantize "
                f"hold {[q for q in parts if q in paths]} but not {missing}: quantize all three or none"
            )
        if parent not in seen:
            seen.add(parent)
            out.append((parent, parts))
    return out


def _same(name: str, path: str, vals: list) -> None:
    """All of ``vals`` (arrays or None) present alike and equal; else ``ValueError`` naming ``name``."""
    if all(v is None for v in vals):
        return
    if any(v is None for v in vals):
        raise ValueError(
            f"fuse_arrays {path!r}: {name} is present in some parts and not in others "
            f"({[v is not None for v in vals]}); the parts must share one input transform"
        )
    ref = np.asarray(vals[0])
    for i, v in enumerate(vals[1:], 1):
        v = np.asarray(v)
        if v.shape != ref.shape or not np.array_equal(v, ref):
            raise ValueError(
                f"fuse_arrays {path!r}: part {i} has another {name} than part 0; fused parts must share their "
                "smoothing, rotation and activation tables (quantize them with the recipe option fuse_qkv)"
            )


def _block_diag_up(ups: list) -> jnp.ndarray:
    """``[..., sum r, sum N]`` with ``ups[i] [..., r_i, N_i]`` on the diagonal and exact zeros elsewhere."""
    lead = ups[0].shape[:-2]
    r_tot = sum(u.shape[-2] for u in ups)
    n_tot = sum(u.shape[-1] for u in ups)
    out = jnp.zeros((*lead, r_tot, n_tot), ups[0].dtype)
    r0 = n0 = 0
    for u in ups:
        r, n = u.shape[-2:]
        out = out.at[..., r0 : r0 + r, n0 : n0 + n].set(u)
        r0, n0 = r0 + r, n0 + n
    return out


def fuse_arrays(configs: Sequence[QLinearConfig], arrays: Sequence[dict], path: str = "") -> tuple[QLinearConfig, dict]:
    """One QLinear from parts that share their input transform: ``(config, arrays)`` of a ``K -> sum N_i`` layer.

    ``configs[i]`` / ``arrays[i]``: the parts' QLinear configs and arrays (optionally with one leading layer axis
    L, the same for all), quantized with one smoothing vector, rotation and activation table (the recipe option
    ``fuse_qkv``). Codes, scales, bias and kernel-ready weights are concatenated along the output axis, the low-rank
    ``down`` along the rank axis and ``up`` placed block-diagonally, so output columns ``[N_0 + ... + N_{i-1},
    ... + N_i)`` of the fused layer are part ``i``'s. Pure; ``ValueError`` naming ``path`` when the parts differ in
    input width, formats, bins, smoothing, rotation or tables, when only some have a bias or a low-rank branch, or
    for NVFP4 weights with different per-tensor scales (one scale cannot serve both).
    """
    if len(configs) != len(arrays) or len(configs) < 2:
        raise ValueError(f"fuse_arrays {path!r}: needs >= 2 parts with a config and arrays each, got {len(configs)}")
    c0 = configs[0]
    for i, c in enumerate(configs[1:], 1):
        if dataclasses.replace(c, out_features=c0.out_features) != c0:
            raise ValueError(
                f"fuse_arrays {path!r}: part {i}'s config {c} differs from part 0's {c0} in more than out_features "
                "(fused parts need one input width K, formats, activation mode and bins)"
            )
    for name in ("smooth", "rot_signs", "act_clip", "act_exp_offset", "act_scale", "wtensor_scale"):
        _same(name, path, [a.get(name) for a in arrays])
    for name in ("bias", "down", "kweight"):
        present = [a.get(name) is not None for a in arrays]
        if any(present) and not all(present):
            raise ValueError(f"fuse_arrays {path!r}: {name} is present in parts {present}; all parts or none")
    n_tot = sum(c.out_features for c in configs)

    def cat(name, axis):
        vals = [a.get(name) for a in arrays]
        return None if vals[0] is None else jnp.concatenate([jnp.asarray(v) for v in vals], axis=axis)

    out = {
        "qweight": cat("qweight", -2),
        "wscale": cat("wscale", -2),
        "wtensor_scale": arrays[0].get("wtensor_scale"),
        "smooth": arrays[0].get("smooth"),
        "rot_signs": arrays[0].get("rot_signs"),
        "down": cat("down", -1),
        "up": None if arrays[0].get("up") is None else _block_diag_up([jnp.asarray(a["up"]) for a in arrays]),
        "bias": cat("bias", -1),
        "act_clip": arrays[0].get("act_clip"),
        "act_exp_offset": arrays[0].get("act_exp_offset"),
        "act_scale": arrays[0].get("act_scale"),
        "wunit": cat("wunit", -1),
    }
    if any(a.get("kweight") is not None for a in arrays):
        out["kweight"], out["kscale"] = cat("kweight", -2), cat("kscale", -1)
    even = len({c.out_features for c in configs}) == 1 and len({_rank(a) for a in arrays}) == 1
    return dataclasses.replace(c0, out_features=n_tot, parts=len(configs) if even else 1), out


def _rank(a: dict) -> int:
    down = a.get("down")
    return 0 if down is None else int(np.shape(down)[-1])


def float_linear(model, path: str):
    """``(kernel [..., K, N], bias [..., N] or None, input path)`` of the float layer that the QLinear at ``path``
    replaces in ``model`` (an unquantized WanDiT): the Linear itself, or for a fused path (`FUSED_LINEARS`) its parts'
    kernels and biases concatenated along N, with the path of its first part (whose captured input statistics the
    fused layer reads)."""
    from wanjax.quant.apply import get_submodule

    parts = FUSED_LINEARS.get(path, (path,))
    lins = [get_submodule(model, p) for p in parts]
    kern = jnp.concatenate([jnp.asarray(lin.kernel[...]) for lin in lins], axis=-1)
    biases = [lin.bias for lin in lins]
    bias = None if any(b is None for b in biases) else jnp.concatenate([jnp.asarray(b[...]) for b in biases], axis=-1)
    return kern, bias, parts[0]


def split_fused_output(y, sizes: Sequence[int]) -> list:
    """The parts' outputs of a fused layer's ``y [..., sum sizes]`` (columns in part order)."""
    if y.shape[-1] != sum(sizes):
        raise ValueError(f"split_fused_output: last dim {y.shape[-1]} != sum of part sizes {sum(sizes)}")
    idx = np.cumsum(sizes)[:-1].tolist()
    return jnp.split(y, idx, axis=-1)
