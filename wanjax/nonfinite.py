"""Non-finite (NaN / Inf) detection for generation: weights at load, the latent at every step, and, on failure, the
first layer that produced the non-finite value.

The hot path costs one jitted ``all(isfinite(x))`` of the latent per denoise step and one scalar transfer (the step
callback already synchronises for the progress bar); nothing is checked per layer until a step has failed. Then
`locate_nonfinite` re-runs that step's forward stage by stage (embeddings, each block, the head, the guidance) and,
inside the first failing block, every linear layer, to name e.g. ``blocks.3.ffn.fc1``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.io.finite import nonfinite_leaves

__all__ = ["NonFiniteError", "all_finite", "nonfinite_param_names", "check_finite_params", "locate_nonfinite"]

F32 = jnp.float32


class NonFiniteError(RuntimeError):
    """A NaN or Inf appeared during generation.

    Attributes (``None`` where unknown): ``stage`` ("denoise", "vae_decode", ...), ``expert`` ("high" / "low"),
    ``step`` (0-based denoise step index), ``t`` (its integer timestep), ``layer`` (the first layer or stage whose
    output was non-finite in a re-run of that step, e.g. ``"blocks.3.ffn.fc1"``).
    """

    def __init__(
        self,
        message: str,
        *,
        stage: str | None = None,
        expert: str | None = None,
        step: int | None = None,
        t: int | None = None,
        layer: str | None = None,
    ):
        super().__init__(message)
        self.stage, self.expert, self.step, self.t, self.layer = stage, expert, step, t, layer


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def all_finite(x) -> bool:
    """``True`` if every element of ``x`` is finite (one jitted reduction, one scalar transfer)."""
    return bool(_all_finite(x))


def _dotted(path: str) -> str:
    parts = [p for p in path.split("/") if p != "value"]
    return ".".join(parts)


def nonfinite_param_names(params) -> list[str]:
    """Dotted names of the parameters of a model state holding a NaN/Inf, with the block index for stacked (scanned)
    blocks: ``["blocks.3.ffn.fc1.kernel"]``. ``[]`` if all are finite (one jitted check, then per-layer detail only
    for the bad leaves)."""
    bad = nonfinite_leaves(params)
    if not bad:
        return []
    leaves = {
        "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    out = []
    for path in bad:
        name = _dotted(path)
        leaf = leaves.get(path)
        if name.startswith("blocks.") and leaf is not None and getattr(leaf, "ndim", 0) >= 1:
            flags = np.asarray(jax.device_get(jnp.any(~jnp.isfinite(leaf.reshape(leaf.shape[0], -1)), axis=1)))
            out += [f"blocks.{i}.{name[len('blocks.') :]}" for i in np.flatnonzero(flags)]
        else:
            out.append(name)
    return out


def check_finite_params(params, what: str) -> None:
    """Raise `wanjax.io.errors.CheckpointError` naming ``what`` (e.g. "low-noise expert (low_noise_model)") and
    every parameter holding a NaN/Inf."""
    bad = nonfinite_param_names(params)
    if bad:
        from wanjax.io.errors import CheckpointError

        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise CheckpointError(
            f"{what}: non-finite weights (NaN/Inf) in {shown}; the checkpoint is corrupt or was "
            "saved after a diverged update",
            problems=[f"{what}: {b}" for b in bad],
        )


def _block_detail(block, i: int, h, e0, ctx_e, rope, block_params) -> tuple[str, str]:
    """``(layer, detail)``: the first linear layer of block ``i`` whose output is non-finite (eager re-run under the
    interceptor), or ``blocks.<i>`` with where in the block it happened, and the block's non-finite parameters."""
    from wanjax.model.layers import Linear, linear_interceptor

    calls: list[tuple[str, bool, bool]] = []

    def record(mod, x):
        y = Linear.apply_default(mod, x)
        path = getattr(mod, "path", "") or "linear"
        name = f"blocks.{i}.{path[len('blocks.') :]}" if path.startswith("blocks.") else path
        calls.append((name, all_finite(x), all_finite(y)))
        return y

    with linear_interceptor(record):
        block(h, e0, ctx_e, rope)
    bad_params = nonfinite_param_names(block_params)
    bad_params = [f"blocks.{i}.{p}" for p in bad_params]
    pnote = f"non-finite parameters: {', '.join(bad_params[:4])}" if bad_params else ""
    prev = None
    for name, in_ok, out_ok in calls:
        if not out_ok:
            if in_ok:
                return name, pnote
            where = f"between {prev} and {name}" if prev else f"before {name}"
            return f"blocks.{i}", "; ".join(x for x in (f"{where}: modulation, norm or attention", pnote) if x)
        prev = name
    return f"blocks.{i}", "; ".join(x for x in ("after its linear layers: modulation, norm or residual", pnote) if x)


def locate_nonfinite(graphdef, params, x, y, ctx, t, guide, context: Callable | None = None) -> tuple[str, str] | None:
    """Re-run the guided forward of one expert at ``(x, t)`` stage by stage and name the first stage whose output is
    non-finite: ``(layer, detail)`` with ``layer`` one of ``"input latent"``, ``"image condition (...)"``,
    ``"text context (...)"``, ``"patch_embedding"``, ``"time_embedding"``, ``"time_projection"``,
    ``"text_embedding"``, ``"blocks.<i>.<linear>"`` (e.g. ``"blocks.3.ffn.fc1"``) or ``"blocks.<i>"``, ``"head"``,
    ``"guidance"``, and ``detail`` a short explanation (the non-finite parameters of the block, the guidance scale;
    may be empty); ``None`` if the whole forward is finite.

    Runs `wanjax.sampling.guided_velocity` in stages: the same batching (`wanjax.sampling.guidance.cfg_batch`,
    cond and uncond as 2B) and guidance (`cfg_combine`). ``context`` is an optional context
    manager factory entered around the re-run (e.g. the active timestep bin of quantized experts). Blocks run one at
    a time (jitted, the index traced), the failing block again eagerly with every linear layer checked.
    """
    from wanjax.model.dit import sinusoidal_embedding
    from wanjax.model.rope import rope_cos_sin
    from wanjax.sampling.guidance import cfg_batch, cfg_combine

    model = nnx.merge(graphdef, params)
    x = jnp.asarray(x, F32)
    for name, a in (
        ("input latent", x),
        ("image condition (VAE encoder output)", y),
        ("text context (text encoder output)", ctx),
    ):
        if not all_finite(a):
            return name, ""
    cm = context() if context is not None else contextlib.nullcontext()
    with cm:
        cfg = model.cfg
        b, f, hh, ww, _ = x.shape
        inp2, tb, c = cfg_batch(x, y, ctx, t)
        tokens = model.patch_embedding(model.patchify(inp2)).astype(F32)
        if not all_finite(tokens):
            return "patch_embedding", ""
        temb = model.time_embedding(sinusoidal_embedding(tb, cfg.freq_dim))
        if not all_finite(temb):
            return "time_embedding", ""
        e0 = model.time_projection(jax.nn.silu(temb)).reshape(2 * b, 6, cfg.dim)
        if not all_finite(e0):
            return "time_projection", ""
        ctx_e = model.embed_text(c)
        if not all_finite(ctx_e):
            return "text_embedding", ""
        grid = (f, hh // 2, ww // 2)
        rope = rope_cos_sin(grid, cfg.head_dim, cfg.rope_split, cfg.rope_max_seq_len, cfg.rope_theta)
        bg, bstate = nnx.split(model.blocks)

        @jax.jit
        def run_block(st, i, h, e0, ctx_e, rope):
            blk = nnx.merge(bg, jax.tree.map(lambda a: a[i], st))
            out = blk(h, e0, ctx_e, rope)
            return out, jnp.all(jnp.isfinite(out))

        h = tokens
        for i in range(cfg.num_layers):
            h_next, ok = run_block(bstate, jnp.int32(i), h, e0, ctx_e, rope)
            if not bool(ok):
                st_i = jax.tree.map(lambda a: a[i], bstate)
                return _block_detail(nnx.merge(bg, st_i), i, h, e0, ctx_e, rope, st_i)
            h = h_next
        out = model.head(h, temb)
        if not all_finite(out):
            return "head", ""
        v = model.unpatchify(out, grid).astype(F32)
        guided = cfg_combine(v, guide)
        if not all_finite(guided):
            return "guidance", f"the cond/uncond outputs were finite; guidance scale {float(guide):g}"
    return None
