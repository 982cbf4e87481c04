"""Putting LoRAs into a `WanDiT` expert, BF16 or W4A4, as a pure function: ``lora_model(model, [(lora, s)]) -> new``.

* A plain ``Linear`` (every layer of a BF16 expert; the non-block layers of a quantized one) gets the LoRAs merged
  into its kernel: ``kernel[K, N] <- round(kernel + sum_i s_i * alpha_i / r_i * down_i^T @ up_i^T)``, summed in
  float32 and rounded once to the kernel's dtype. The model given is not modified, so dropping the result (or
  building again without that LoRA) restores the exact weights.
* A `wanjax.quant.qlinear.QLinear` (the W4A4 block Linears) keeps its quantized weights; the LoRAs become extra rank
  of its 16-bit low-rank branch (`wanjax.quant.qlinear.set_lora`). That branch sees the transformed input
  ``x_r = (x / smooth) Q`` (smoothing divisor ``smooth``, rotation ``Q = diag(d) blockdiag(H_b)``, orthogonal), so
  each LoRA's down matrix is folded with the inverse transform (`fold_down`)::

      down' = Q^T diag(smooth) down^T          so that   x_r @ down' = (x / smooth) Q Q^T diag(smooth) down^T
                                                                     = x @ down^T

  and ``up' = up^T`` with the per-column scale ``s_i * alpha_i / r_i`` (strength changes touch only that vector).
  Several LoRAs on one layer are concatenated along the rank.
* Full deltas (``.diff``, ``.diff_b``, ``diff_m``) are added to the float parameters (scaled by the strength); a full
  weight delta on a quantized layer is refused (it would need re-quantizing: merge it before quantization).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.io.keymap import official_to_wanjax
from wanjax.lora.formats import LoraError, LoraWeights, _check_against
from wanjax.model.layers import Linear
from wanjax.model.names import fused_parent
from wanjax.numerics.hadamard import hadamard_block_size, rotate_activations
from wanjax.quant.qlinear import QLinear, clear_lora, set_lora

__all__ = ["fold_down", "lora_model", "pad_lora_ranks", "lora_ranks", "next_pow2"]

LoraSpec = tuple[LoraWeights, float]


def fold_down(down_t, smooth=None, rot_signs=None, rot_block: int | None = None) -> jax.Array:
    """A LoRA's down matrix, transposed (``down^T [K, r]``), rewritten for a QLinear branch that sees
    ``x_r = rotate(x / smooth)``: returns ``Q^T diag(smooth) down^T`` (float32 [K, r]) so that
    ``x_r @ result == x @ down^T`` in exact arithmetic (``Q = diag(rot_signs) blockdiag(H_b)``, ``b`` =
    ``hadamard_block_size(K, rot_block)``, the rotation `wanjax.quant.rotate` folds into the weights)."""
    m = jnp.asarray(down_t, jnp.float32)
    k = m.shape[0]
    if smooth is not None:
        m = m * jnp.asarray(smooth, jnp.float32)[:, None]
    if rot_signs is not None:
        # rotate_activations(v, d) = v diag(d) H; on the rows of m^T that is (H diag(d) m)^T = (Q^T m)^T
        m = rotate_activations(m.T, rot_signs, hadamard_block_size(k, rot_block)).T
    return m


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def _get(model, path: str):
    node = model
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _copy(module: nnx.Module) -> nnx.Module:
    g, s = nnx.split(module)
    return nnx.merge(g, s)


def _targets(lw: LoraWeights, model) -> tuple[dict, dict]:
    """Group ``lw``'s modules by wanjax module path: ``{path: [(layer or None, LoraModule)]}``, and its deltas by
    parameter: ``{(path, leaf): [(layer, kind, delta)]}``."""
    mods, diffs = {}, {}
    for module, lm in lw.modules.items():
        t = official_to_wanjax(module + ".weight")
        mods.setdefault(".".join(t.path[:-1]), []).append((t.layer, lm))
    for param, d in lw.diffs.items():
        t = official_to_wanjax(param)
        diffs.setdefault((".".join(t.path[:-1]), t.path[-1]), []).append((t.layer, t.kind, d))
    for path in mods:
        parent = fused_parent(path)
        if parent is not None and not hasattr(_get(model, parent.rpartition(".")[0]), path.rpartition(".")[2]):
            raise LoraError(
                f"{lw.source}: {path!r} is part of the fused {parent!r} of this model (a quantization recipe with "
                "fuse_qkv); a LoRA on a fused layer is not supported: quantize without fuse_qkv to apply it"
            )
        node = _get(model, path)
        if not isinstance(node, (Linear, QLinear)):
            raise LoraError(f"{lw.source}: {path!r} is a {type(node).__name__}, not a Linear")
    return mods, diffs


def _merge_linear(lin: Linear, entries: list[tuple[int | None, object, float]]) -> None:
    """kernel += sum strength * scale * down^T up^T, in float32, rounded once."""
    kern = lin.kernel[...]
    acc = jnp.asarray(kern, jnp.float32)
    for layer, lm, strength in entries:
        d = jnp.asarray(lm.down, jnp.float32).T @ jnp.asarray(lm.up, jnp.float32).T * (strength * lm.scale)
        acc = acc + d if layer is None else acc.at[layer].add(d)
    # a new Variable: copies made by split / merge share the Variable objects, so never write into one in place
    lin.kernel = type(lin.kernel)(acc.astype(kern.dtype))


def _add_delta(node, leaf: str, entries: list[tuple[int | None, str, np.ndarray, float]]) -> None:
    var = getattr(node, leaf)
    arr = var[...]
    acc = jnp.asarray(arr, jnp.float32)
    for layer, kind, d, strength in entries:
        d = jnp.asarray(d, jnp.float32) * strength
        if kind == "linear":
            d = d.T
        if layer is None:
            want = acc.shape
        else:
            want = acc.shape[1:]
        if tuple(d.shape) != tuple(want):
            d = d.reshape(want)
        acc = acc + d if layer is None else acc.at[layer].add(d)
    setattr(node, leaf, type(var)(acc.astype(arr.dtype)))  # a new Variable (see _merge_linear)


def _qlinear_lora_arrays(q: QLinear, entries: list[tuple[int | None, object, float]], source: str):
    """(down [L, K, R], up [L, R, N], scale [L, R]) of the LoRAs on stacked QLinear ``q``; each (LoRA, strength) gets
    its own rank columns (its largest rank on this path), zeros on layers it does not touch."""
    lead = tuple(q.act_clip.shape[:-1])
    if len(lead) > 1:
        raise LoraError(f"{source}: QLinear {q.path!r} has leading axes {lead}; expected none or one (L)")
    nl = lead[0] if lead else 1
    k, n = q.in_features, q.out_features
    # one block of rank columns per (LoRA, strength): entries are (layer, module, strength, lora index)
    downs, ups, scales = [], [], []
    for block in _blocks(entries):
        r = max(lm.rank for _, lm, _ in block)
        dn = np.zeros((nl, k, r), np.float32)
        up = np.zeros((nl, r, n), np.float32)
        sc = np.zeros((nl, r), np.float32)
        for layer, lm, strength in block:
            li = 0 if layer is None else layer
            dn[li, :, : lm.rank] = lm.down.T
            up[li, : lm.rank, :] = lm.up.T
            sc[li, : lm.rank] = strength * lm.scale
        downs.append(dn)
        ups.append(up)
        scales.append(sc)
    dn = jnp.asarray(np.concatenate(downs, axis=-1))
    up = np.concatenate(ups, axis=-2)
    sc = np.concatenate(scales, axis=-1)
    a = q.arrays()
    smooth, signs = a.get("smooth"), a.get("rot_signs")
    if smooth is None and signs is None:
        folded = dn
    else:
        s = smooth if smooth is not None else jnp.ones((nl, k) if lead else (k,), jnp.float32)
        if signs is None:
            folded = dn * jnp.reshape(s, (nl, k, 1)).astype(jnp.float32)
        else:
            sg = jnp.reshape(signs, (nl, k))
            folded = jax.vmap(lambda m, s_, d_: fold_down(m, s_, d_, q.config.rot_block))(
                dn, jnp.reshape(s, (nl, k)), sg
            )
    if not lead:
        folded, up, sc = folded[0], up[0], sc[0]
    return folded, up, sc


def _blocks(entries):
    """A path's entries ``(layer, module, strength, lora index)`` grouped by LoRA (in order) as (layer, module,
    strength) lists."""
    out: dict[int, list] = {}
    for layer, lm, strength, i in entries:
        out.setdefault(i, []).append((layer, lm, strength))
    return list(out.values())


def _dtype_of_branch(q: QLinear):
    return q.down.dtype if q.down is not None else jnp.bfloat16


def lora_model(
    model: nnx.Module,
    loras: Sequence[LoraSpec] | LoraSpec,
    *,
    pad_rank: str | int | None = "auto",
) -> nnx.Module:
    """A NEW model: ``model`` (a `WanDiT`, BF16 or with QLinear layers) with the LoRAs ``[(LoraWeights, strength),
    ...]`` applied (merged into plain Linears, as extra low-rank rank on QLinears; module docstring). ``model`` is
    not modified. Every LoRA is checked against ``model.cfg`` first (`LoraError` naming the file and key).

    ``pad_rank``: the QLinear branch's total rank (own + LoRA) is padded with zero columns: ``"pow2"`` to the next
    power of two, an int to a multiple of it, None not at all, ``"auto"`` (default): a multiple of 16 for layers in
    real mode (the GPU GEMM's low-rank epilogue; rank 96 = 32 + a rank-64 LoRA runs as is, padding it to 128 would
    overflow the GEMM's shared memory), None in fake mode.
    """
    if isinstance(loras, tuple) and len(loras) == 2 and isinstance(loras[0], LoraWeights):
        loras = [loras]
    cfg = model.cfg
    new = _copy(model)
    lin_entries: dict[str, list] = {}
    q_entries: dict[str, list] = {}
    delta_entries: dict[tuple[str, str], list] = {}
    for i, (lw, strength) in enumerate(loras):
        if not isinstance(lw, LoraWeights):
            raise TypeError(f"lora_model: expected (LoraWeights, strength) pairs, got {type(lw).__name__}")
        strength = float(strength)
        if not np.isfinite(strength):
            raise ValueError(f"lora_model: {lw.source}: strength must be finite, got {strength}")
        problems = _check_against(lw, cfg, {})
        if problems:
            raise LoraError(f"{lw.source}: {problems[0]}", [f"{lw.source}: {p}" for p in problems])
        mods, diffs = _targets(lw, new)
        for path, items in mods.items():
            node = _get(new, path)
            dest = q_entries if isinstance(node, QLinear) else lin_entries
            dest.setdefault(path, []).extend((layer, lm, strength, i) for layer, lm in items)
        for (path, leaf), items in diffs.items():
            node = _get(new, path)
            if isinstance(node, QLinear) and leaf == "kernel":
                raise LoraError(
                    f"{lw.source}: a full weight delta (.diff) on {path!r}, a quantized layer: it cannot be applied "
                    "without re-quantizing; merge it into the BF16 expert before quantization"
                )
            delta_entries.setdefault((path, leaf), []).extend((layer, kind, d, strength) for layer, kind, d in items)
    for path, entries in lin_entries.items():
        _merge_linear(_get(new, path), [e[:3] for e in entries])
    for (path, leaf), entries in delta_entries.items():
        node = _get(new, path)
        if getattr(node, leaf, None) is None:
            raise LoraError(f"a delta for {path}.{leaf}: the model has no such parameter (no bias?)")
        _add_delta(node, leaf, entries)
    for path, entries in q_entries.items():
        q = _get(new, path)
        down, up, scale = _qlinear_lora_arrays(q, entries, "lora_model")
        mode_pad = pad_rank
        if pad_rank == "auto":  # the GPU GEMM's epilogue takes ranks in multiples of 16 (the act quant pads itself)
            mode_pad = REAL_RANK_MULTIPLE if q.mode == "real" else None
        r0 = 0 if q.down is None else q.down.shape[-1]
        r = down.shape[-1]
        target = _padded(r0 + r, mode_pad) - r0
        dt = _dtype_of_branch(q)
        set_lora(q, *_pad_rank(down.astype(dt), up.astype(dt), scale, target))
    return new


#: the multiple a real-mode QLinear's total low-rank rank is padded to (``kernels.dispatch``: the Mosaic GPU GEMM runs
#: ranks that are multiples of 16 in its epilogue; the fused act quant pads to a power of two inside, exactly)
REAL_RANK_MULTIPLE = 16


def _padded(total: int, pad) -> int:
    if pad is None or total == 0:
        return total
    if pad == "pow2":
        return next_pow2(total)
    if isinstance(pad, int) and pad > 0:
        return -(-total // pad) * pad
    raise ValueError(f"pad_rank: expected 'auto', 'pow2', a positive int or None, got {pad!r}")


def _pad_rank(down, up, scale, r: int):
    cur = down.shape[-1]
    if r == cur:
        return down, up, scale
    pad = r - cur
    down = jnp.concatenate([down, jnp.zeros(down.shape[:-1] + (pad,), down.dtype)], axis=-1)
    up = jnp.concatenate([up, jnp.zeros(up.shape[:-2] + (pad, up.shape[-1]), up.dtype)], axis=-2)
    scale = jnp.concatenate([jnp.asarray(scale, jnp.float32), jnp.zeros(scale.shape[:-1] + (pad,), jnp.float32)], -1)
    return down, up, scale


def lora_ranks(model: nnx.Module) -> dict[str, int]:
    """``{path: R}``: the run-time LoRA rank of every QLinear of ``model`` that has one set."""
    return {
        m.path: int(m.lora_down.shape[-1])
        for _, m in nnx.iter_modules(model)
        if isinstance(m, QLinear) and getattr(m, "lora_down", None) is not None
    }


def pad_lora_ranks(model: nnx.Module, ranks: dict[str, int]) -> nnx.Module:
    """A NEW model whose QLinears at ``ranks``' paths carry a LoRA branch of exactly that rank: zero columns are
    appended (a layer without a LoRA gets an all-zero one). Gives two experts one module structure and one set of
    shapes (so one compiled velocity serves both). Rank 0 everywhere on a path clears it."""
    new = _copy(model)
    for path, r in ranks.items():
        q = _get(new, path)
        if not isinstance(q, QLinear):
            raise ValueError(f"pad_lora_ranks: {path!r} is not a QLinear")
        lead = tuple(q.act_clip.shape[:-1])
        if q.lora_down is None:
            dt = _dtype_of_branch(q)
            down = jnp.zeros(lead + (q.in_features, 0), dt)
            up = jnp.zeros(lead + (0, q.out_features), dt)
            scale = jnp.zeros(lead + (0,), jnp.float32)
        else:
            down, up, scale = q.lora_down[...], q.lora_up[...], q.lora_scale[...]
        if r < down.shape[-1]:
            raise ValueError(f"pad_lora_ranks: {path!r} has LoRA rank {down.shape[-1]} > the requested {r}")
        set_lora(q, *_pad_rank(down, up, scale, r))
    return new


def strip_lora(model: nnx.Module, paths: Iterable[str] | None = None) -> nnx.Module:
    """A NEW model with the run-time LoRAs of its QLinears removed (all, or those at ``paths``)."""
    new = _copy(model)
    for _, m in nnx.iter_modules(new):
        if isinstance(m, QLinear) and (paths is None or m.path in paths):
            clear_lora(m)
    return new
