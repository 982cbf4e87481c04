"""Denoising step of one full-size expert: BF16 vs W4A4 (real kernels) vs diffusers BF16, plus the pipeline.

    python -m bench.pipeline [--res 480p[,720p]] [--iters 5] [--quick] [--skip-bf16] [--skip-w4a4]
                             [--skip-artifact] [--skip-diffusers] [--skip-pipeline] [--skip-t5] [--skip-vae]
                             [--pipeline-experts w4a4,bf16] [--pipeline-steps 40] [--pipeline-placement auto]
                             [--pipeline-budget-s S] [--budget-s S]

Everything runs with random weights of the exact full-size shapes (speed and memory do not depend on the values):

* ``bf16``      our expert (``wanjax.config.I2V_A14B``, 14,288,901,184 params) with random bf16 weights made on the
                device, one forward ``x [1, F, H, W, 36]``, ``t [1]``, ``context [1, 512, 4096]``, cuDNN attention.
* ``w4a4``      the same expert with every block Linear (400 layers) replaced by a ``QLinear`` with the structure of
                the ``default`` recipe in ``real`` mode: int4 per-channel packed weights, a smoothing vector, a
                rank-32 bf16 low-rank branch, bias, per-bin activation clip tables (the seed's timestep bins, 3 per
                expert). No calibration: the weights are the bf16 expert's (same keys), folded with a random
                smoothing vector, minus random bf16 low-rank factors, then RTN per output channel, all jitted on
                the device (:func:`build_w4a4_expert`). Same jitted call as ``bf16``; the rel-L2 of its output
                against the bf16 output is reported (large: RTN, no calibration, 40 random layers). Then the
                artifact path: ``save_artifact`` -> ``load_artifact`` -> one forward, compared bit-exactly.
* ``diffusers`` diffusers ``WanTransformer3DModel`` BF16 (modules of ``_keep_in_fp32_modules`` in fp32, as
                ``from_pretrained(torch_dtype=bfloat16)`` loads it), default attention (torch SDPA), random init
                made on the device, eager (``--diffusers-compile`` adds ``torch.compile``).
* ``pipeline``  the 480p I2V pipeline (:mod:`bench.pipeline_phase`) with both W4A4 experts, in stage order:
                UMT5-XXL encode of (prompt, negative) and release -> both experts + VAE -> VAE encode of the
                condition -> ``--pipeline-steps`` guided steps through ``WanI2VPipeline.denoise`` (CFG batch 2; 2
                steps: one per expert; 40: a full generation) -> chunked VAE decode; time of each stage and step
                (warm step time per expert), peak memory so far after each stage, full generation wall time.
                ``--pipeline-experts w4a4,bf16`` adds the phase ``pipeline_bf16``: the same with both BF16 experts
                (``--pipeline-placement auto`` swaps the inactive expert to host memory when the two do not fit).
                The denoise loop stops cleanly at the phase's time budget and extrapolates the rest (labelled).

Each phase runs in its own subprocess (``--phase NAME``), so that its ``peak_bytes_in_use`` is its own and the torch
phase starts after JAX has released the GPU; the default BFC allocator with preallocation is kept
(``peak_bytes_in_use`` counts the bytes the allocator handed out, not the preallocated pool; compile-time
autotuning scratch goes through it too, so XLA's own ``memory_analysis`` of each compiled forward is also reported).
A phase that fails or runs past its time share is reported as such; the others still run. ``--inprocess`` runs all
phases in this process (CPU tests). Results: ``<results-dir>/pipeline_<res>.json`` (and ``$OUT``), and a markdown
table at the end.
"""
from __future__ import annotations

import argparse
import collections
import functools
import glob
import importlib
import importlib.util
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib

import numpy as np

from bench.pipeline_phase import (PIPELINE_PHASES, encode_text_stage, phase_pipeline,  # noqa: F401 (re-exported)
                                  phase_pipeline_bf16, pipeline_summary, pipeline_tables)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: latent (F, H, W) and pixel (frames, height, width) per resolution name
RES = {"480p": ((21, 60, 104), (81, 480, 832)),
       "720p": ((21, 90, 160), (81, 720, 1280)),
       "tiny": ((3, 8, 12), (9, 64, 96))}
PHASES = ("bf16", "w4a4", "diffusers", "pipeline", "pipeline_bf16")
#: share of --budget-s each phase may use at least, if the run has the time (a phase also gets what the phases after
#: it do not need by their shares; the run as a whole never exceeds the budget)
PHASE_SHARE = {"bf16": 0.3, "w4a4": 0.5, "diffusers": 0.3, "pipeline": 0.45, "pipeline_bf16": 0.45}
MEMORY_TARGET_BYTES = 24e9
DIFFUSERS_SITE = "/tmp/wanjax_bench_site"


def log(*a):
    print("[bench.pipeline]", *a, flush=True)


def ensure_package_layout():
    """Make ``wanjax.quant`` / ``wanjax.kernels`` importable from a plain checkout (``PYTHONPATH=.``, no install).

    The installed package maps them to the top-level ``quant/`` and ``kernels/`` folders (pyproject); without an
    install they are registered here from those folders.
    """
    import wanjax

    for sub in ("quant", "kernels"):
        name = f"wanjax.{sub}"
        if name in sys.modules:
            continue
        try:
            if importlib.util.find_spec(name) is not None:
                continue
        except ModuleNotFoundError:
            pass
        folder = os.path.join(ROOT, sub)
        spec = importlib.util.spec_from_file_location(name, os.path.join(folder, "__init__.py"),
                                                      submodule_search_locations=[folder])
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(wanjax, sub, mod)


# ------------------------------------------------------------------------------------------------ random weights
# Random values come from a counter-based integer hash (murmur3's finalizer over the element index), not from
# jax.random: the same values on every device, compiled in a fraction of the time of a threefry sampler per weight
# (tens of seconds on a small CPU), and any leaf or layer can be re-drawn alone from its seed.
_GOLDEN = 0x9E3779B9


def _mix32(h):
    """murmur3 fmix32 on uint32 (wrapping arithmetic); ``h`` a jax or numpy uint32 array."""
    u32 = type(h.dtype.type(0))
    h = h ^ (h >> u32(16))
    h = h * u32(0x85EBCA6B)
    h = h ^ (h >> u32(13))
    h = h * u32(0xC2B2AE35)
    return h ^ (h >> u32(16))


def hash_uniform(seed, shape: tuple, xp=None):
    """float32 values uniform on [-1, 1) of ``shape`` from a uint32 ``seed`` (an int or a traced scalar).

    ``xp``: ``jax.numpy`` (default; traceable) or ``numpy`` (host), which give identical bits.
    """
    if xp is None:
        import jax.numpy as xp
    n = math.prod(shape)
    if n >= 2 ** 32:
        raise ValueError(f"hash_uniform: {n} elements do not fit a uint32 counter")
    with np.errstate(over="ignore"):
        i = xp.arange(n, dtype=xp.uint32).reshape(shape)
        h = _mix32(i * xp.uint32(_GOLDEN) + _mix32(xp.asarray(seed, xp.uint32)))
        return (h >> xp.uint32(8)).astype(xp.float32) * xp.float32(2.0 / 2 ** 24) - xp.float32(1.0)


def hash_normalish(seed, shape: tuple, xp=None):
    """Zero-mean, unit-variance float32 noise (uniform on +-sqrt(3)): enough for random weights and inputs."""
    u = hash_uniform(seed, shape, xp)
    return u * type(u.dtype.type(0))(math.sqrt(3.0))


def leaf_seed(base_seed: int, path: str) -> int:
    """The uint32 seed of the parameter at dotted ``path`` (stable across models that share the path)."""
    return (zlib.crc32(path.encode()) ^ ((base_seed + 1) * _GOLDEN)) & 0xFFFFFFFF


def _layer_seed(seed, layer):
    import jax.numpy as jnp

    return jnp.asarray(seed, jnp.uint32) ^ (jnp.asarray(layer, jnp.uint32) * jnp.uint32(0x632BE5AB) + jnp.uint32(1))


def _leaf_kind(path: str, dtype) -> str:
    """How a parameter is drawn, from its name: kernel, embedding, scale, modulation, bias, zeros or other."""
    import jax.numpy as jnp

    name = path.rsplit(".", 1)[-1]
    if not jnp.issubdtype(dtype, jnp.floating):
        return "zeros"
    return name if name in ("kernel", "embedding", "scale", "modulation", "bias") else "other"


#: leaves with fewer elements are drawn on the host (numpy, same bits) and copied: no compilation per leaf
HOST_DRAW_MAX = 1 << 22


def _draw(seed, shape: tuple, dtype, kind: str, xp=None):
    """One random parameter (unit-variance noise x std): kernels std 1/sqrt(fan_in), embeddings 1, norm scales
    1 + 0.1 noise, modulation tables 1/sqrt(dim), biases and the rest 0.02; integer leaves 0."""
    if xp is None:
        import jax.numpy as xp
    if kind == "zeros":
        return xp.zeros(shape, dtype)
    z = hash_normalish(seed, shape, xp)
    if kind == "scale":
        return (xp.float32(1.0) + xp.float32(0.1) * z).astype(dtype)
    std = {"kernel": 1.0 / math.sqrt(shape[-2]) if len(shape) >= 2 else 0.02, "embedding": 1.0,
           "modulation": 1.0 / math.sqrt(shape[-1])}.get(kind, 0.02)
    return (z * xp.float32(std)).astype(dtype)


@functools.lru_cache(maxsize=None)
def _draw_fn(shape: tuple, dtype, kind: str):
    """Jitted ``seed -> array`` of :func:`_draw` (one compilation per shape/dtype/kind, whatever the seed)."""
    import jax

    return jax.jit(lambda seed: _draw(seed, shape, dtype, kind))


def draw_leaf(seed: int, shape: tuple, dtype, kind: str):
    """One random parameter on the device: drawn on the host below ``HOST_DRAW_MAX`` elements, else on the device."""
    import jax.numpy as jnp

    if math.prod(shape) < HOST_DRAW_MAX:
        return jnp.asarray(_draw(np.uint32(seed), shape, dtype, kind, xp=np))
    return _draw_fn(tuple(shape), np.dtype(dtype), kind)(np.uint32(seed))


def layer_kernel(seed, layer, k: int, n: int, dtype):
    """Block ``layer``'s random kernel ``[K, N]`` of one stacked Linear (std 1/sqrt(K)).

    The bf16 expert and the W4A4 builder both draw a layer's kernel this way, so the W4A4 expert quantizes exactly
    the bf16 expert's weights without the stacked bf16 tensor ever being on the device in the W4A4 phases.
    """
    return (hash_normalish(_layer_seed(seed, layer), (k, n)) * (1.0 / math.sqrt(k))).astype(dtype)


@functools.lru_cache(maxsize=None)
def _stacked_kernel_fn(num_layers: int, k: int, n: int, dtype):
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda seed: jax.lax.map(lambda l: layer_kernel(seed, l, k, n, dtype),
                                            jnp.arange(num_layers, dtype=jnp.uint32)))


def _paths(pure: dict) -> list[tuple[tuple, str, object]]:
    """``(key path, dotted name, leaf)`` of every leaf of a nested pure dict."""
    import jax

    out = []
    for kp, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]:
        name = ".".join(str(_key_of(p)) for p in kp)
        out.append((kp, name, leaf))
    return out


def _key_of(p):
    return getattr(p, "key", getattr(p, "idx", p))


def _set_path(pure: dict, kp: tuple, value) -> None:
    node = pure
    for p in kp[:-1]:
        node = node[_key_of(p)]
    node[_key_of(kp[-1])] = value


def fill_random(abstract_module, base_seed: int, overrides=None):
    """A concrete module of ``abstract_module``'s structure (from ``nnx.eval_shape``) with random values made on
    the device.

    ``overrides(dotted_path, abstract_leaf) -> array or None``: a leaf's value when not None (e.g. the stacked
    block kernels, quantized layers); every other leaf is drawn by name (:func:`draw_leaf`) from :func:`leaf_seed`
    of its path, so two models sharing a parameter path (and ``base_seed``) share its value. One leaf at a time:
    the peak is the arrays made so far plus one leaf's temporaries.
    """
    from flax import nnx

    graphdef, state = nnx.split(abstract_module)
    pure = nnx.to_pure_dict(state)
    for kp, name, leaf in _paths(pure):
        value = overrides(name, leaf) if overrides is not None else None
        if value is None:
            value = draw_leaf(leaf_seed(base_seed, name), tuple(leaf.shape), np.dtype(leaf.dtype),
                              _leaf_kind(name, leaf.dtype))
        if tuple(value.shape) != tuple(leaf.shape) or np.dtype(value.dtype) != np.dtype(leaf.dtype):
            raise ValueError(f"fill_random: {name}: made {value.dtype}{list(value.shape)}, the model expects "
                             f"{leaf.dtype}{list(leaf.shape)}")
        _set_path(pure, kp, value)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _block_linear_of(name: str) -> str | None:
    """The ``BLOCK_LINEARS`` path a dotted leaf name belongs to (``blocks.ffn.fc1.kernel`` -> ``blocks.ffn.fc1``)."""
    from wanjax.quant.apply import BLOCK_LINEARS

    head = name.rsplit(".", 1)[0]
    return head if head in BLOCK_LINEARS else None


def random_bf16_expert(cfg, seed: int = 0, dtype=None):
    """Full expert ``WanDiT(cfg)`` with random weights (bf16 storage; fp32 where the model keeps fp32)."""
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.model.dit import WanDiT

    dtype = dtype or jnp.bfloat16
    abstract = nnx.eval_shape(lambda: WanDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))

    def block_kernels(name, leaf):
        if name.endswith(".kernel") and _block_linear_of(name):
            num_layers, k, n = leaf.shape
            return _stacked_kernel_fn(num_layers, k, n, np.dtype(leaf.dtype))(np.uint32(leaf_seed(seed, name)))
        return None

    return fill_random(abstract, seed, block_kernels)


# ------------------------------------------------------------------------------------------------ W4A4 expert
def quantized_skeleton(cfg, *, nbins: int, rank: int = 32, recipe="default", dtype=None, mode: str = "real",
                       rotate: bool = True):
    """The abstract (shape-only, ``nnx.eval_shape``) quantized expert: every ``BLOCK_LINEARS`` layer a stacked
    ``QLinear`` with the recipe's formats (``quant.quantize.layer_config``), a smoothing vector, rotation signs if
    the recipe rotates, a rank-``rank`` bf16 low-rank branch (none if 0), the Linear's bias and ``nbins``-entry
    tables; costs no device memory. ``rotate=False`` leaves the rotation out of a rotating recipe (what it costs)."""
    import jax.numpy as jnp
    from flax import nnx

    from wanjax.model.dit import WanDiT
    from wanjax.quant.apply import BLOCK_LINEARS, get_submodule, quantize_model
    from wanjax.quant.qlinear import QLinear
    from wanjax.quant.quantize import layer_config
    from wanjax.quant.recipes import Rotate, get_recipe

    dtype = dtype or jnp.bfloat16
    rec = get_recipe(recipe)
    rotates = rotate and any(isinstance(t, Rotate) for t in rec.transforms)

    def make():
        model = WanDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        qlayers = {}
        for path in BLOCK_LINEARS:
            lin = get_submodule(model, path)
            num_layers, k, n = lin.kernel.shape
            c = layer_config(rec, k, n, nbins)
            if c.real_mode_problem():
                raise ValueError(f"quantized_skeleton: recipe {rec.name!r} gives {path} a layer the kernels cannot "
                                 f"run: {c.real_mode_problem()}")
            r = min(rank, k, n)
            lowrank = {} if r == 0 else {"down": jnp.zeros((num_layers, k, r), jnp.bfloat16),
                                          "up": jnp.zeros((num_layers, r, n), jnp.bfloat16)}
            qlayers[path] = QLinear(
                c, qweight=jnp.zeros((num_layers, n, k // 2), jnp.uint8),
                wscale=jnp.zeros((num_layers, n, k // c.w_group), jnp.float32),
                smooth=jnp.ones((num_layers, k), jnp.float32),
                rot_signs=jnp.ones((num_layers, k), jnp.float32) if rotates else None,
                bias=None if lin.bias is None else jnp.zeros((num_layers, n), dtype),
                act_clip=jnp.ones((num_layers, nbins), jnp.float32), path=path, **lowrank)
        return quantize_model(model, qlayers, mode=mode)

    return nnx.eval_shape(make)


@functools.lru_cache(maxsize=None)
def _qlinear_builder(num_layers: int, k: int, n: int, rank: int, dtype, rot_block: int = 0):
    """Jitted ``(seed_w, seed_s, seed_r, seed_d, seed_u) -> (qweight, wscale, smooth, rot_signs, down, up)`` of one
    stacked layer, block by block (``lax.map``: one block's temporaries at a time).

    Per block: ``W`` = :func:`layer_kernel` (the bf16 expert's kernel), ``s ~ U(0.5, 2)`` (the layer sees ``x / s``),
    with ``rot_block`` > 0 random signs ``d`` and ``Q = diag(d) blockdiag(H)`` (Hadamard blocks of ``rot_block``;
    the layer sees ``(x / s) Q``; None without), ``down`` std 1/sqrt(K) and ``up`` std 0.1/sqrt(r) in bf16, then
    RTN (int4 per output channel, packed) of ``(Q^T (s * W) - down @ up)^T``: so ``QLinear(x) ~ x @ W`` up to int4
    rounding, with every part of the real layer present (timing does not depend on the values).
    """
    import jax
    import jax.numpy as jnp

    from wanjax.numerics import formats

    from wanjax.numerics.hadamard import apply_hadamard

    def one(seeds, layer):
        s_w, s_s, s_r, s_d, s_u = seeds
        w = layer_kernel(s_w, layer, k, n, dtype).astype(jnp.float32)
        s = 1.25 + 0.75 * hash_uniform(_layer_seed(s_s, layer), (k,))
        w_eff = w * s[:, None]
        signs = None
        if rot_block:  # Q^T (s W) = blockdiag(H) (d * s W): the Hadamard along K of (d * s W)^T, transposed back
            signs = jnp.where(hash_uniform(_layer_seed(s_r, layer), (k,)) < 0, -1.0, 1.0).astype(jnp.float32)
            w_eff = apply_hadamard((w_eff * signs[:, None]).T, rot_block).T
        down = up = None
        if rank:
            down = (hash_normalish(_layer_seed(s_d, layer), (k, rank)) / math.sqrt(k)).astype(jnp.bfloat16)
            up = (hash_normalish(_layer_seed(s_u, layer), (rank, n)) * (0.1 / math.sqrt(rank))).astype(jnp.bfloat16)
            w_eff = w_eff - jnp.dot(down.astype(jnp.float32), up.astype(jnp.float32),
                                    precision=jax.lax.Precision.HIGHEST)
        qt = formats.quantize_int4(w_eff.T, nonfinite="nan").pack()
        return qt.codes, qt.scales, s, signs, down, up

    def build(*seeds):
        return jax.lax.map(lambda l: one(seeds, l), jnp.arange(num_layers, dtype=jnp.uint32))

    return jax.jit(build)


def build_w4a4_expert(cfg, seed: int = 0, *, nbins: int, rank: int = 32, mode: str = "real",
                      rotate: bool = True):
    """A W4A4 expert of ``default``-recipe structure quantized (RTN, no calibration) from the random bf16 expert of
    the same ``seed`` (:func:`random_bf16_expert`), made on the device layer stack by layer stack."""
    import jax
    import jax.numpy as jnp

    from wanjax.quant.apply import get_submodule
    from wanjax.numerics.hadamard import hadamard_block_size

    skeleton = quantized_skeleton(cfg, nbins=nbins, rank=rank, mode=mode, rotate=rotate)
    cache: dict[str, dict] = {}

    def quantized(name, leaf):
        path = _block_linear_of(name)
        field = name.rsplit(".", 1)[-1]
        if path is None or field == "bias":
            return None
        if field == "act_clip":
            return jnp.ones(leaf.shape, jnp.float32)
        if field == "act_exp_offset":
            return jnp.zeros(leaf.shape, jnp.int32)
        if path not in cache:
            num_layers, n, kh = _qweight_shape(skeleton, path)
            r = _rank_of(skeleton, path)
            q = get_submodule(skeleton, path)
            rot = 0 if q.rot_signs is None else hadamard_block_size(2 * kh, q.config.rot_block)
            fn = _qlinear_builder(num_layers, 2 * kh, n, r, np.dtype(jnp.bfloat16), rot)
            out = fn(*(np.uint32(leaf_seed(seed, f"{path}.{p}"))
                       for p in ("kernel", "smooth", "rot_signs", "down", "up")))
            cache[path] = {f: a for f, a in zip(("qweight", "wscale", "smooth", "rot_signs", "down", "up"), out)
                           if a is not None}
        value = cache[path].pop(field)
        if not cache[path]:
            del cache[path]
        return value

    return fill_random(skeleton, seed, quantized)


def _qweight_shape(skeleton, path):
    from wanjax.quant.apply import get_submodule

    return tuple(get_submodule(skeleton, path).qweight.shape)


def _rank_of(skeleton, path) -> int:
    from wanjax.quant.apply import get_submodule

    q = get_submodule(skeleton, path)
    return 0 if q.down is None else int(q.down.shape[-1])


def default_bins():
    """The seed's timestep bins over the official 40-step schedule (3 per expert), as ``wanjax quantize`` uses."""
    from wanjax.quant.bins import seed_bins
    from wanjax.sampling.schedule import flow_schedule

    return seed_bins(flow_schedule(40, shift=5.0))


# ------------------------------------------------------------------------------------------------ measuring
def memory() -> dict:
    """``bytes_in_use`` / ``peak_bytes_in_use`` of device 0 (None on CPU)."""
    import jax

    s = jax.devices()[0].memory_stats() or {}
    return {"bytes_in_use": s.get("bytes_in_use"), "peak_bytes_in_use": s.get("peak_bytes_in_use")}


def state_bytes(tree) -> int:
    import jax

    return int(sum(a.nbytes for a in jax.tree.leaves(tree)))


def make_forward(graphdef):
    """The one jitted forward of both variants: ``(state, x, t, context, bin) -> velocity``."""
    import jax
    from flax import nnx

    from wanjax.quant.qlinear import active_bin

    def fwd(state, x, t, ctx, b):
        with active_bin(b):
            return nnx.merge(graphdef, state)(x, t, ctx)

    return jax.jit(fwd)


def dit_inputs(cfg, latent_fhw, seed: int = 1):
    """Random ``x [1, F, H, W, in_dim]`` f32, ``t [1]``, ``context [1, text_len, text_dim]`` bf16, bin 0."""
    import jax.numpy as jnp

    f, h, w = latent_fhw
    x = random_array(seed, (1, f, h, w, cfg.in_dim), jnp.float32)
    ctx = random_array(seed + 1, (1, cfg.text_len, cfg.text_dim), jnp.bfloat16)
    return x, jnp.array([900.0], jnp.float32), ctx, jnp.int32(0)


def random_array(seed: int, shape: tuple, dtype):
    """Unit-variance random array made on the device (:func:`hash_normalish`)."""
    return _random_array_fn(tuple(shape), np.dtype(dtype))(np.uint32(seed))


@functools.lru_cache(maxsize=None)
def _random_array_fn(shape, dtype):
    import jax

    return jax.jit(lambda seed: hash_normalish(seed, shape).astype(dtype))


def _memory_analysis(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
        return {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                                 "temp_size_in_bytes", "alias_size_in_bytes") if hasattr(m, k)}
    except Exception:  # not every backend reports it
        return None


def time_forward(fwd, state, inputs, iters: int) -> tuple[dict, np.ndarray, object]:
    """Compile (timed) and run ``fwd`` ``1 + iters`` times; returns (record, output as numpy, compiled)."""
    import jax

    from bench.common import time_fn

    t0 = time.perf_counter()
    compiled = fwd.lower(state, *inputs).compile()
    rec = {"compile_s": time.perf_counter() - t0, "memory_analysis": _memory_analysis(compiled)}
    rec.update(time_fn(compiled, state, *inputs, warmup=1, iters=iters))
    out = np.asarray(jax.device_get(compiled(state, *inputs)))
    rec["finite"] = bool(np.isfinite(out).all())
    rec.update(memory())
    return rec, out, compiled


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def get_config(name: str):
    from wanjax.config import I2V_A14B, TINY

    return {"I2V_A14B": I2V_A14B, "TINY": TINY}[name]


def _res_iters(args, res: str) -> int:
    return args.iters_720p if res == "720p" else args.iters


class PhaseRecord(dict):
    """A phase's result dict that rewrites ``<workdir>/<phase>.json`` on every ``save()`` (partial results survive
    a crash or a timeout of the phase)."""

    def __init__(self, workdir: str, phase: str):
        super().__init__(phase=phase)
        self.path = os.path.join(workdir, f"{phase}.json")

    def save(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self, f, indent=1, default=_json_default)
        os.replace(tmp, self.path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer, np.bool_)):
        return o.item()
    return str(o)


def _error(e: BaseException) -> str:
    traceback.print_exc()
    return f"{type(e).__name__}: {str(e)[:1500]}"


# ------------------------------------------------------------------------------------------------ phases
def phase_bf16(args, workdir: str) -> dict:
    """Random bf16 expert; forward at each resolution (compile, median, peak); saves the outputs for rel-L2."""
    import jax
    from flax import nnx

    from bench.common import device_facts
    from wanjax.model import attention as attn_mod

    rec = PhaseRecord(workdir, "bf16")
    rec.update(device_facts())
    cfg = get_config(args.config)
    t0 = time.perf_counter()
    model = random_bf16_expert(cfg, seed=args.seed)
    graphdef, state = nnx.split(model)
    del model
    jax.block_until_ready(state)
    rec.update(init_s=time.perf_counter() - t0, params=int(sum(math.prod(a.shape) for a in jax.tree.leaves(state))),
               weight_bytes=state_bytes(state), after_init=memory(), res={})
    log(f"bf16: {rec['params']:,} params, {rec['weight_bytes'] / 1e9:.2f} GB, init {rec['init_s']:.1f}s")
    rec.save()
    fwd = make_forward(graphdef)
    for res in args.res:
        latent = RES[res][0]
        inputs = dit_inputs(cfg, latent)
        tok = latent[0] * latent[1] * latent[2] // 4
        rec["res"][res] = r = {"latent_fhw": list(latent), "tokens": tok,
                               "attention": attn_mod.default_backend(tok, tok, jax.numpy.bfloat16)}
        try:
            out_rec, out, _ = time_forward(fwd, state, inputs, _res_iters(args, res))
            r.update(out_rec)
            np.save(os.path.join(workdir, f"bf16_{res}.npy"), out)
        except Exception as e:
            r["error"] = _error(e)
        log(f"bf16 {res}:", _brief(r))
        rec.save()
    return rec


def phase_w4a4(args, workdir: str) -> dict:
    """W4A4 expert (RTN of the bf16 expert's weights, default-recipe structure, real mode) built on the device;
    forward at each resolution with the bf16 phase's call; rel-L2 vs the bf16 output; then the artifact round
    trip (save, load, one forward compared bit-exactly)."""
    import jax
    from flax import nnx

    from bench.common import device_facts
    from wanjax.kernels.dispatch import select_backend

    rec = PhaseRecord(workdir, "w4a4")
    rec.update(device_facts())
    cfg = get_config(args.config)
    bins = default_bins()
    nbins = len(bins.expert_bins("high"))
    t0 = time.perf_counter()
    model = build_w4a4_expert(cfg, seed=args.seed, nbins=nbins, rank=args.rank)
    graphdef, state = nnx.split(model)
    jax.block_until_ready(state)
    rec.update(build_s=time.perf_counter() - t0, weight_bytes=state_bytes(state), after_build=memory(),
               kernel_backend=select_backend(), rank=args.rank, nbins_per_expert=nbins, res={},
               weights="random: the bf16 phase's weights (same seed and keys) x random smoothing U(0.5,2), minus "
                       "random bf16 rank-r factors, RTN int4 per output channel; act_clip 1; not calibrated, so "
                       "the rel-L2 vs bf16 measures RTN W4A4 on random layers, not the recipe's quality")
    log(f"w4a4: built in {rec['build_s']:.1f}s, {rec['weight_bytes'] / 1e9:.2f} GB, kernels {rec['kernel_backend']}")
    rec.save()
    fwd = make_forward(graphdef)
    outputs, compiled = {}, {}
    for res in args.res:
        latent = RES[res][0]
        inputs = dit_inputs(cfg, latent)
        rec["res"][res] = r = {"latent_fhw": list(latent), "tokens": latent[0] * latent[1] * latent[2] // 4}
        try:
            out_rec, out, compiled[res] = time_forward(fwd, state, inputs, _res_iters(args, res))
            r.update(out_rec)
            outputs[res] = out
            ref = os.path.join(workdir, f"bf16_{res}.npy")
            if os.path.exists(ref):
                r["rel_l2_vs_bf16"] = rel_l2(out, np.load(ref))
        except Exception as e:
            r["error"] = _error(e)
        log(f"w4a4 {res}:", _brief(r))
        rec.save()
    if not args.skip_artifact:
        res = args.res[0]
        qdir = os.path.join(workdir, "artifact")
        art = rec["artifact"] = {}
        try:
            art.update(artifact_save(model, qdir, bins))
            del model, state  # the loaded expert replaces the in-memory one on the device
            art.update(artifact_load_and_check(qdir, compiled.get(res) or fwd, graphdef, cfg, res, outputs.get(res)))
        except Exception as e:
            art["error"] = _error(e)
        finally:
            shutil.rmtree(qdir, ignore_errors=True)
        log("w4a4 artifact:", art)
        rec.save()
    return rec


def artifact_save(model, qdir: str, bins) -> dict:
    """``save_artifact(qdir, {"high": model})`` with the default recipe's description; time and size on disk."""
    from wanjax.quant.artifact import save_artifact
    from wanjax.quant.recipes import get_recipe, recipe_to_dict

    recipe = recipe_to_dict(get_recipe("default")) | {
        "notes": "bench.pipeline: default-recipe structure with random weights (RTN, random smoothing/low-rank)"}
    t0 = time.perf_counter()
    save_artifact(qdir, {"high": model}, recipe=recipe, bins=bins.to_dict(), report={"bench": "random weights"})
    return {"save_s": time.perf_counter() - t0,
            "bytes_on_disk": sum(os.path.getsize(p) for p in glob.glob(os.path.join(qdir, "*")))}


def artifact_load_and_check(qdir: str, fwd, graphdef, cfg, res: str, ref_out) -> dict:
    """``load_artifact(qdir)`` (timed, device memory after it), then one forward of the loaded expert compared
    with ``ref_out``, the in-memory expert's output (bit-exact expected). ``fwd``: the in-memory expert's compiled
    forward (reused when the loaded expert has the same graph) or its jitted function."""
    import jax
    from flax import nnx

    from wanjax.quant.artifact import load_artifact

    rec = {}
    t0 = time.perf_counter()
    loaded, _ = load_artifact(qdir)
    g_loaded, state = nnx.split(loaded.pop("high"))
    jax.block_until_ready(state)
    rec["load_s"] = time.perf_counter() - t0
    rec["after_load"] = memory()
    rec["same_graph"] = bool(g_loaded == graphdef)
    inputs = dit_inputs(cfg, RES[res][0])
    t0 = time.perf_counter()
    try:
        if not rec["same_graph"]:
            raise TypeError("the loaded expert's graph differs")
        out = fwd(state, *inputs)
        rec["recompiled"] = False
    except (TypeError, ValueError):  # another graph or state structure: a new compilation (its time included)
        out = make_forward(g_loaded)(state, *inputs)
        rec["recompiled"] = True
    out = np.asarray(jax.device_get(out))
    rec["forward_s"] = time.perf_counter() - t0
    rec["finite"] = bool(np.isfinite(out).all())
    if ref_out is not None:
        rec["forward_bit_exact_vs_in_memory"] = bool(np.array_equal(out, ref_out))
        rec["max_abs_diff_vs_in_memory"] = float(np.max(np.abs(out.astype(np.float64) - ref_out)))
        rec["rel_l2_vs_in_memory"] = rel_l2(out, ref_out)
    rec["after_forward"] = memory()
    return rec


# ------------------------------------------------------------------------------------------------ diffusers
def import_diffusers(wheel_dir: str = os.path.join(ROOT, ".whl"), target: str = DIFFUSERS_SITE):
    """``(diffusers module, None)``, installing the carried wheels of ``wheel_dir`` into ``target`` (no index, no
    dependencies) when diffusers is not importable; ``(None, reason)`` when that is not possible."""
    try:
        return importlib.import_module("diffusers"), None
    except ImportError as e:
        first = f"{type(e).__name__}: {e}"
    wheels = sorted(glob.glob(os.path.join(wheel_dir, "*.whl")))
    if not wheels:
        return None, f"diffusers is not importable ({first}) and there is no wheel in {wheel_dir}/"
    log(f"diffusers not importable ({first}); installing {[os.path.basename(w) for w in wheels]} into {target}")
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--upgrade", "--target", target, *wheels], capture_output=True, text=True)
    if proc.returncode:
        return None, f"pip install of {wheel_dir}/*.whl failed: {proc.stderr[-800:]}"
    sys.path.insert(0, target)
    importlib.invalidate_caches()
    try:
        return importlib.import_module("diffusers"), None
    except ImportError as e:
        return None, f"diffusers still not importable after installing the wheels: {e}"


def diffusers_kwargs(cfg) -> dict:
    """``WanTransformer3DModel`` arguments of a wanjax config (the Wan2.2 I2V expert: no image branch)."""
    return dict(patch_size=tuple(cfg.patch_size), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
                in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
                ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=cfg.eps, image_dim=None, added_kv_proj_dim=None,
                rope_max_seq_len=cfg.rope_max_seq_len)


def build_diffusers_model(diffusers, cfg, device):
    """Random-init ``WanTransformer3DModel`` made directly on ``device`` in bf16 (no fp32 copy anywhere); the
    parameters of ``_keep_in_fp32_modules`` are then cast to fp32, as ``from_pretrained(torch_dtype=bf16)`` does."""
    import torch

    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = diffusers.WanTransformer3DModel(**diffusers_kwargs(cfg))
    finally:
        torch.set_default_dtype(prev)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if any(m in name.split(".") for m in keep):
                p.data = p.data.float()
    return model.eval().requires_grad_(False)


def _torch_time(fn, iters: int, device) -> dict:
    """Median wall time (CUDA events on a GPU) of ``fn()`` over ``iters`` calls after one warm-up call."""
    import torch

    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    first = time.perf_counter() - t0
    ts = []
    for _ in range(iters):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return {"first_call_s": first, "median_s": statistics.median(ts), "min_s": min(ts), "iters": iters, "all_s": ts}


def phase_diffusers(args, workdir: str) -> dict:
    """diffusers ``WanTransformer3DModel`` BF16 forward (torch SDPA) at each resolution, same shapes as ours."""
    rec = PhaseRecord(workdir, "diffusers")
    diffusers, why = import_diffusers()
    if diffusers is None:
        rec["skipped"] = why
        log("diffusers: SKIPPED:", why)
        rec.save()
        return rec
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = get_config(args.config)
    rec.update(diffusers=diffusers.__version__, torch=torch.__version__, device=device,
               gpu=torch.cuda.get_device_name(0) if device == "cuda" else None, res={})
    if device == "cuda":
        rec["sdpa_enabled"] = {"flash": torch.backends.cuda.flash_sdp_enabled(),
                               "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                               "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
                               "math": torch.backends.cuda.math_sdp_enabled()}
    t0 = time.perf_counter()
    model = build_diffusers_model(diffusers, cfg, device)
    if device == "cuda":
        torch.cuda.synchronize()
    rec.update(init_s=time.perf_counter() - t0, params=sum(p.numel() for p in model.parameters()),
               weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
               attention_backend=str(getattr(model.blocks[0].attn1.processor, "_attention_backend", None)
                                     or "default (native torch SDPA)"))
    log(f"diffusers {rec['diffusers']}: {rec['params']:,} params, {rec['weight_bytes'] / 1e9:.2f} GB, "
        f"init {rec['init_s']:.1f}s on {device}")
    rec.save()
    variants = [("eager", model)]
    if args.diffusers_compile:
        variants.append(("compiled", torch.compile(model)))
    for res in args.res:
        f, h, w = RES[res][0]
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(1, cfg.in_dim, f, h, w, generator=g, device=device, dtype=torch.bfloat16)
        ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g, device=device, dtype=torch.bfloat16)
        t = torch.tensor([900.0], device=device)
        rec["res"][res] = {}
        for name, m in variants:
            r = rec["res"][res][name] = {"tokens": f * h * w // 4}
            try:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                out = {}

                def fwd(m=m):
                    with torch.inference_mode():
                        out["v"] = m(hidden_states=x, timestep=t, encoder_hidden_states=ctx, return_dict=False)[0]

                r.update(_torch_time(fwd, _res_iters(args, res), device))
                r["finite"] = bool(torch.isfinite(out["v"]).all())
                if device == "cuda":
                    r["peak_bytes"] = int(torch.cuda.max_memory_allocated())
                del out
            except Exception as e:
                r["error"] = _error(e)
            log(f"diffusers {res} {name}:", _brief(r))
            rec.save()
    return rec


# ------------------------------------------------------------------------------------------------ orchestration
PHASE_FNS = {"bf16": phase_bf16, "w4a4": phase_w4a4, "diffusers": phase_diffusers, "pipeline": phase_pipeline,
             "pipeline_bf16": phase_pipeline_bf16}


def _brief(r: dict) -> dict:
    keep = ("compile_s", "median_s", "first_call_s", "peak_bytes_in_use", "peak_bytes", "rel_l2_vs_bf16", "finite",
            "error", "s")
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k in keep}


def stream_child(cmd: list[str], timeout: float) -> tuple[int, bool, float, list[str]]:
    """Run ``cmd`` (a ``python -m bench...`` child) from the repo root with its output streamed through; kill its
    process group after ``timeout`` seconds. Returns (return code, timed out, wall seconds, last 15 log lines)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    tail = collections.deque(maxlen=40)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, start_new_session=True)

    def pump():
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip())

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    reader.join(timeout=10)
    return rc, timed_out, time.perf_counter() - t0, list(tail)[-15:]


def _run_child(phase: str, argv: list[str], workdir: str, timeout: float) -> dict:
    """Run ``python -m bench.pipeline --phase PHASE`` with output streamed through; kill its process group after
    ``timeout`` seconds (the child is told the deadline: ``--deadline``, epoch seconds). Returns the phase's JSON
    (partial if it died) plus rc / timeout / log tail."""
    cmd = [sys.executable, "-m", "bench.pipeline", *argv, "--phase", phase, "--workdir", workdir,
           "--deadline", f"{time.time() + max(timeout, 1.0):.3f}"]
    rc, timed_out, wall_s, tail = stream_child(cmd, timeout)
    path = os.path.join(workdir, f"{phase}.json")
    rec = {}
    if os.path.exists(path):
        with open(path) as f:
            rec = json.load(f)
    rec.update(returncode=rc, timed_out=timed_out, wall_s=wall_s, timeout_s=timeout)
    if rc != 0:
        rec["error"] = rec.get("error") or (f"timed out after {timeout:.0f}s" if timed_out else f"exit code {rc}")
        rec["log_tail"] = tail
    return rec


def _run_inprocess(phase: str, args, workdir: str, timeout: float | None = None) -> dict:
    t0 = time.perf_counter()
    if timeout is not None:   # the phase's deadline (the pipeline phases stop their denoise loop at it)
        args = argparse.Namespace(**{**vars(args), "deadline": time.time() + timeout})
    try:
        rec = dict(PHASE_FNS[phase](args, workdir))
    except Exception as e:
        path = os.path.join(workdir, f"{phase}.json")
        rec = json.load(open(path)) if os.path.exists(path) else {}
        rec["error"] = _error(e)
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def summarize(results: dict) -> dict:
    """Speed-ups per resolution from the phases' medians: ours vs our BF16 and vs diffusers BF16 eager."""
    ph = results["phases"]
    out = {}
    for res in results["res"]:
        def med(phase, *keys):
            r = ph.get(phase, {}).get("res", {}).get(res, {})
            for k in keys:
                r = r.get(k, {}) if isinstance(r, dict) else {}
            return r.get("median_s") if isinstance(r, dict) else None

        b, q, d = med("bf16"), med("w4a4"), med("diffusers", "eager")
        s = {"bf16_median_s": b, "w4a4_median_s": q, "diffusers_eager_median_s": d}
        s["w4a4_speedup_vs_bf16"] = b / q if b and q else None
        s["w4a4_speedup_vs_diffusers"] = d / q if d and q else None
        s["bf16_speedup_vs_diffusers"] = d / b if d and b else None
        if res == "480p":
            s["targets"] = {"w4a4_vs_bf16_ge_1.4": None if s["w4a4_speedup_vs_bf16"] is None
                            else s["w4a4_speedup_vs_bf16"] >= 1.4,
                            "w4a4_vs_diffusers_ge_1.5": None if s["w4a4_speedup_vs_diffusers"] is None
                            else s["w4a4_speedup_vs_diffusers"] >= 1.5}
        out[res] = s
    p = pipeline_summary(ph.get("pipeline", {}))     # the W4A4 pipeline (the keys of earlier result files)
    out["pipeline_peak_bytes"] = p["peak_bytes"]
    out["pipeline_meets_24GB"] = p["meets_24GB"]
    out["pipeline_cfg_step_warm_s"] = p["step_warm_s"]
    out["pipelines"] = {v: pipeline_summary(ph[name]) for v, name in PIPELINE_PHASES.items()
                        if ph.get(name) and "stages" in ph[name]}
    return out


def _fmt(v, spec=".3f", none="-"):
    return none if v is None else format(v, spec)


def table(results: dict) -> str:
    """The markdown table: variant | compile s | median s | x vs our BF16 | x vs diffusers BF16 | peak GB."""
    ph = results["phases"]
    lines = ["| variant | compile s | median s | × vs our BF16 | × vs diffusers BF16 | peak GB |",
             "|---|---|---|---|---|---|"]
    for res in results["res"]:
        s = results["summary"][res]
        b, d = s["bf16_median_s"], s["diffusers_eager_median_s"]
        bf = ph.get("bf16", {}).get("res", {}).get(res, {})
        rows = [(f"ours BF16 ({bf.get('attention', '?')} attention)", bf, "peak_bytes_in_use"),
                ("ours W4A4 real kernels", ph.get("w4a4", {}).get("res", {}).get(res, {}), "peak_bytes_in_use")]
        for name, r in ph.get("diffusers", {}).get("res", {}).get(res, {}).items():
            rows.append((f"diffusers BF16 SDPA {name}", r, "peak_bytes"))
        for name, r, pk in rows:
            if r.get("error") or r.get("median_s") is None:
                why = (r.get("error") or "not run").splitlines()[0][:70]
                lines.append(f"| {res} {name} | - | failed/skipped: {why} | - | - | - |")
                continue
            m = r["median_s"]
            comp = r.get("compile_s", r.get("first_call_s"))
            lines.append(f"| {res} {name} | {_fmt(comp, '.1f')} | {m:.3f} | {_fmt(b / m if b else None, '.2f')} | "
                         f"{_fmt(d / m if d else None, '.2f')} | {_fmt((r.get(pk) or 0) / 1e9 or None, '.1f')} |")
    lines += pipeline_tables(results)
    return "\n".join(lines)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="I2V_A14B", choices=["I2V_A14B", "TINY"])
    ap.add_argument("--res", default="480p", help="comma list of " + ", ".join(RES))
    ap.add_argument("--iters", type=int, default=5, help="timed forwards per variant (after one warm-up)")
    ap.add_argument("--iters-720p", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 iterations, no artifact round trip, no T5")
    for p in ("bf16", "w4a4", "artifact", "diffusers", "pipeline", "t5", "vae"):
        ap.add_argument(f"--skip-{p}", action="store_true")
    ap.add_argument("--diffusers-compile", action="store_true", help="also time torch.compile(diffusers model)")
    ap.add_argument("--cfg-mode", default="batch2", choices=["batch2", "twopass"],
                    help="pipeline phase: CFG as the pipeline does it (batch 2) or cond/uncond one after the other")
    ap.add_argument("--pipeline-experts", default="w4a4",
                    help="pipeline phases to run, in the order given: comma list of " + ", ".join(PIPELINE_PHASES))
    ap.add_argument("--pipeline-steps", type=int, default=2,
                    help="denoise steps (2: one per expert; 40: the official full generation)")
    ap.add_argument("--pipeline-placement", default="auto", choices=["auto", "device", "swap"],
                    help="WanI2VPipeline expert_placement (auto: swap when both experts take > 60%% of the device)")
    ap.add_argument("--pipeline-budget-s", type=float, default=None,
                    help="time budget of each pipeline phase (default: its share of --budget-s); the denoise loop "
                         "stops cleanly before a step that would not fit and extrapolates the rest")
    ap.add_argument("--budget-s", type=float, default=500.0, help="wall-time budget of the whole run")
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "bench", "results"))
    ap.add_argument("--name", default=None, help="result name (default pipeline_<res>)")
    ap.add_argument("--inprocess", action="store_true", help="run all phases in this process (CPU tests)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.res = [r.strip() for r in args.res.split(",") if r.strip()]
    bad = [r for r in args.res if r not in RES]
    if bad:
        ap.error(f"--res: unknown {bad}; expected {list(RES)}")
    experts = [e.strip() for e in args.pipeline_experts.split(",") if e.strip()]
    if not experts or [e for e in experts if e not in PIPELINE_PHASES] or len(set(experts)) != len(experts):
        ap.error(f"--pipeline-experts: {args.pipeline_experts!r}; expected a comma list of {list(PIPELINE_PHASES)}")
    args.pipeline_experts = experts
    if args.pipeline_steps < 1:
        ap.error("--pipeline-steps must be >= 1")
    if args.quick:
        args.iters, args.iters_720p, args.skip_artifact, args.skip_t5 = 2, 1, True, True
    return args


def _skipped(args, phase: str) -> bool:
    return args.skip_pipeline if phase in PIPELINE_PHASES.values() else getattr(args, f"skip_{phase}")


def phase_timeout(phase: str, left: float, budget: float, later: list[str]) -> float:
    """Seconds ``phase`` may run: at least its share of the budget, and what the ``later`` phases do not need by
    their shares; never past the budget (``left`` seconds are left of it)."""
    keep = sum(PHASE_SHARE[p] for p in later) * budget
    return min(left - 5, max(PHASE_SHARE[phase] * budget, left - keep))


def main(argv=None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.phase:  # child: one phase, result in <workdir>/<phase>.json
        ensure_package_layout()
        PHASE_FNS[args.phase](args, args.workdir)
        return None
    ensure_package_layout()
    t_start = time.perf_counter()
    name = args.name or "pipeline_" + "_".join(args.res)
    workdir = tempfile.mkdtemp(prefix="wanjax_bench_pipeline_")
    results = {"name": name, "config": args.config, "res": args.res,
               "tokens": {r: RES[r][0][0] * RES[r][0][1] * RES[r][0][2] // 4 for r in args.res},
               "settings": {k: v for k, v in vars(args).items() if k not in ("phase", "workdir", "deadline")},
               "notes": ["random weights of the exact shapes; speed and memory do not depend on the values",
                         "each phase in its own process: peak_bytes_in_use (JAX BFC allocator, preallocation on) and "
                         "torch.cuda.max_memory_allocated are that phase's own",
                         "W4A4: default-recipe structure (int4 per-channel weights, int4 per-token activations, "
                         "smoothing, rank-r bf16 low-rank, bias, per-bin clip tables), RTN of the bf16 weights, "
                         "no calibration"],
               "phases": {}}
    child_argv = [a for a in argv if a != "--inprocess"]
    order = ["bf16", "w4a4", "diffusers"] + [PIPELINE_PHASES[e] for e in args.pipeline_experts]
    try:
        for n, phase in enumerate(order):
            if _skipped(args, phase):
                results["phases"][phase] = {"skipped": "--skip-" + ("pipeline" if "pipeline" in phase else phase)}
                continue
            left = args.budget_s - (time.perf_counter() - t_start)
            if left < 20:
                results["phases"][phase] = {"skipped": f"time budget spent ({args.budget_s:.0f}s)"}
                continue
            timeout = phase_timeout(phase, left, args.budget_s, [p for p in order[n + 1:] if not _skipped(args, p)])
            log(f"phase {phase} (up to {timeout:.0f}s)")
            rec = (_run_inprocess(phase, args, workdir, timeout) if args.inprocess
                   else _run_child(phase, child_argv, workdir, timeout))
            results["phases"][phase] = rec
            for key in ("device", "platform", "jax", "jaxlib", "git_commit"):
                if key in rec:
                    results.setdefault(key, rec[key])
            results["summary"] = summarize(results)
            results["table"] = table(results)
            results["wall_s"] = time.perf_counter() - t_start
            _write(results, name, args.results_dir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["summary"] = summarize(results)
    results["table"] = table(results)
    results["wall_s"] = time.perf_counter() - t_start
    _write(results, name, args.results_dir)
    print("\n" + results["table"], flush=True)
    log(f"done in {results['wall_s']:.0f}s -> {os.path.join(args.results_dir, name)}.json")
    return results


def _write(results: dict, name: str, results_dir: str) -> None:
    from bench.common import write_result

    write_result(name, json.loads(json.dumps(results, default=_json_default)), out_dirs=(results_dir,))


if __name__ == "__main__":
    sys.modules.setdefault("bench.pipeline", sys.modules[__name__])   # bench.pipeline_phase uses this module
    main()
