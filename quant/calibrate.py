"""Calibration: run the real sampler on calibration samples and capture, per (expert, layer input, timestep bin),
the statistics of `wanjax.quant.stats` (channel abs-max, Hessian sum ``X^T X`` + row count, a bounded reservoir of
input rows) through `wanjax.model.layers.linear_interceptor` - no edits to model code.

Targets: the 10 block linears of each expert (`wanjax.model.names.BLOCK_LINEARS`: ``self_attn.{q,k,v,o}``,
``cross_attn.{q,k,v,o}``, ``ffn.{fc1,fc2}``).
Inputs shared by several layers are captured once: q/k/v of self-attention read one input
(``blocks.{i}.self_attn.qkv``) and cross-attention k/v read the embedded text context, which is the same array in
every block, so it is captured once per expert (``context.cross_attn.kv``). With a ``hessian_transform`` (e.g.
`mx_act_quant_transform`, the seed's "Hessian from activation-quantized smoothed inputs", where each layer has its
own smoothing vector) every layer gets its own entry (``blocks.{i}.self_attn.q``, ...).

Statistics are those of the matmul operand ``x.astype(layer.dtype)`` (bf16 in production; exact products in the
fp32-accumulated ``X^T X``). Calibration forwards are conditional-only by default, as the seed (``cfg_mode="cond"``: the trajectory is sampled
with the conditional velocity, and only conditional rows are captured); ``cfg_mode="both"`` samples with CFG and
captures the conditional and unconditional rows.

Two paths, same statistics:

* ``mode="stream"`` (default; the full model): (1) for each sample run the pipeline's denoise loop
  (`WanI2VPipeline.denoise`, i.e. `wanjax.sampling.sample`) and record the latent at every step (a few MB each;
  saved per sample); (2) for each expert, each group of ``blocks_per_group`` blocks and each bin of that expert:
  for every recorded step of that bin recompute the group's input with the model's own modules (embeddings, then
  blocks ``0..g0-1``), run the group's blocks under the interceptor and accumulate. Only one (block group, bin)
  set of accumulators is on the device at a time; it is saved to ``work_dir`` (temp file + rename) when done and
  a restarted run skips finished units. Device memory: the captured expert's weights (the other expert is moved
  to host meanwhile, ``offload_idle_expert``), one block forward's activations, and ``blocks_per_group *
  (5 * dim^2 + ffn_dim^2) * 4`` bytes of Hessians (+ ``dim^2 * 4`` for the shared context input, + reservoirs
  ``n * K`` per input; with ``hessian_per_bin=False`` the per-expert Hessians of the group are held while its
  bins run, the same amount). For I2V-A14B (dim 5120, ffn 13824) that is 1.29 GB per block (+ 0.16 GB of bf16
  reservoirs at n = 2048). XLA's memory analysis of one capture step at 480p / 61 frames (24,960 tokens, compiled
  on CPU) gives 30.2 GB of arguments (the expert) and 4.2 GB of temporaries, so ``blocks_per_group=10`` needs
  ~30.2 + 14.5 + 4.2 + 0.5 (hidden state) ~ 50 GB and 20 needs ~64 GB: one 80 GB GPU. Disk (Hessians stored as
  upper triangles): ~0.65 GB per block and Hessian bin, i.e. ~77 GB per expert with 3 per-bin Hessians, ~26 GB
  with ``hessian_per_bin=False``, plus ~19 GB of reservoirs at n = 2048 (bf16). Compute: group ``[g0, g1)``
  costs ``g1 / L`` forwards per recorded step (its prefix is recomputed), i.e. ``(G + 1) / 2`` forwards per step
  over ``G`` groups (2.5 at G = 4), plus one forward per step for the trajectory.
* ``mode="online"``: capture during the sampler run itself, every layer and bin in memory at once (small models,
  and the reference the streamed path is tested against).

The result is a `CalibStats` (lazy reader over ``work_dir``)::

    pipe = WanI2VPipeline.from_pretrained("Wan2.2-I2V-A14B")
    samples = [CalibSample(image=path, prompt=text, seed=i) for i, (path, text) in enumerate(calib_rows)]
    stats = calibrate(pipe, samples, CalibConfig(gen=GenerationConfig(num_frames=61), blocks_per_group=10),
                      work_dir="calib/")                      # re-run the same call to resume
    st = stats.get("high", 3, "ffn.fc2", "high_mid")          # LayerStats: absmax, hessian, count, samples
    h = stats.expert_total("low", "blocks.0.self_attn.qkv")    # all bins of an expert merged

A resumed run must use the same samples, settings and model: the work dir records a content hash of every sample and
the model's fingerprint, and a mismatch raises `CalibrationMismatchError` naming it (``restart=True`` starts over).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.io.atomic import atomic_write, write_json_atomic
from wanjax.model.dit import current_layer_index
from wanjax.model.layers import linear_interceptor
from wanjax.model.names import BLOCK_LINEAR_NAMES
from wanjax.model.rope import rope_cos_sin
from wanjax.quant.bins import EXPERTS, TimestepBins, seed_bins
from wanjax.quant.rtn import ActQuantSpec
from wanjax.quant.stats import (
    ALL_BINS,
    CONTEXT_NAME,
    CalibStats,
    init_stats,
    input_name,  # noqa: F401
    save_stats,
    stat_name,
    to_host,
    update_stats,
)
from wanjax.sampling.guidance import cfg_batch, cfg_combine, guided_velocity

__all__ = [
    "CalibConfig",
    "CalibSample",
    "CalibStats",
    "CalibrationMismatchError",
    "GroupCapture",
    "block_groups",
    "calibrate",
    "captured_steps",
    "check_calibration_model",
    "input_name",
    "stat_name",
    "stats_unit_id",
    "trajectory_path",
    "mx_act_quant_transform",
    "record_trajectory",
    "sample_fingerprint",
]

F32 = jnp.float32
_FIRST_OF_SHARED = {"self_attn.qkv": "self_attn.q", "cross_attn.kv": "cross_attn.k"}
_CONTEXT_SALT = 0x7FFFFFF


def _block_inputs(cfg, per_layer: bool) -> dict[str, int]:
    """Per-block captured inputs (local name -> K), without the shared context entry."""
    out = {}
    for layer in BLOCK_LINEAR_NAMES:
        local = input_name(layer, per_layer)
        if local != "cross_attn.kv":
            out[local] = cfg.ffn_dim if layer == "ffn.fc2" else cfg.dim
    return out


@dataclasses.dataclass(frozen=True)
class CalibSample:
    """One calibration sample: ``image`` + ``prompt`` (encoded by the pipeline), or a precomputed condition ``y``
    [1, F, h, w, 20] and/or ``context`` [2, L, D] (positive, negative) / [1, L, D] (cond-only). ``seed``: noise."""

    image: Any = None
    prompt: str | None = None
    negative_prompt: str | None = None
    y: Any = None
    context: Any = None
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """Calibration settings.

    Attributes:
      gen: sampler settings (`wanjax.generation_config.GenerationConfig`: frames, area, steps, shift, boundary,
        guidance...).
      bins: timestep bins (default: the seed's 6 bins over ``gen``'s schedule).
      cfg_mode: ``"cond"`` (seed: conditional-only forwards) or ``"both"`` (CFG trajectory, cond + uncond rows).
      experts: which experts to calibrate.
      hessian: collect ``X^T X``.
      hessian_per_bin: keep a Hessian per bin (default); False keeps one per expert (bin name ``"all"``, what the
        seed's GPTQ uses; 1/3 of the memory and disk with 3 bins per expert) and per-bin abs-max / samples only.
      reservoir: rows kept per (expert, input, bin) for the clip search (0: none).
      rows_per_call: candidate rows per layer call offered to the reservoir (uniform stride; 0: all).
      sample_dtype: dtype of the kept rows (None: the inputs' dtype, lossless).
      hessian_transform: ``fn(expert, block_index, layer, x) -> x_for_hessian`` (traceable; ``block_index`` may be
        traced); statistics are then kept per layer. See `mx_act_quant_transform`.
      blocks_per_group: blocks captured per pass in stream mode (0: all). Default 10: for I2V-A14B at 480p a pass
        holds 10 * 1.45 GB of accumulators (see the module docstring).
      steps_per_bin: stream mode: capture at most this many recorded steps per bin and sample, evenly spread
        over the bin's steps (`captured_steps`; 0: every step, the seed's budget). The trajectories still run every
        step of the schedule; only the capture, (G + 1) / 2 forwards per captured step, gets cheaper.
      offload_idle_expert: stream mode: while one expert is captured, the pipeline's other expert is moved to host
        memory (and put back, with its original shardings, when done), so one 80 GB GPU holds one expert.
      seed: base of the reservoir's random keys.
    """

    gen: Any = None
    bins: TimestepBins | None = None
    cfg_mode: str = "cond"
    experts: tuple[str, ...] = EXPERTS
    hessian: bool = True
    hessian_per_bin: bool = True
    reservoir: int = 2048
    rows_per_call: int = 4096
    sample_dtype: Any = None
    hessian_transform: Callable | None = None
    blocks_per_group: int = 10
    steps_per_bin: int = 0
    offload_idle_expert: bool = True
    seed: int = 0

    def resolved(self):
        from wanjax.generation_config import GenerationConfig
        from wanjax.sampling import flow_schedule

        gen = self.gen or GenerationConfig()
        bins = self.bins or seed_bins(flow_schedule(gen.steps, shift=gen.shift), gen.boundary)
        if self.cfg_mode not in ("cond", "both"):
            raise ValueError(f"cfg_mode must be 'cond' or 'both', got {self.cfg_mode!r}")
        bad = [e for e in self.experts if e not in EXPERTS]
        if bad or not self.experts:
            raise ValueError(f"experts must be a non-empty subset of {EXPERTS}, got {self.experts}")
        if self.blocks_per_group < 0 or self.reservoir < 0 or self.steps_per_bin < 0:
            raise ValueError("blocks_per_group, reservoir and steps_per_bin must be >= 0")
        return dataclasses.replace(self, gen=gen, bins=bins)

    def fingerprint(self) -> dict:
        """The settings that define the statistics (a resumed run must match them)."""
        g = dataclasses.asdict(self.gen)
        extra = {"steps_per_bin": self.steps_per_bin} if self.steps_per_bin else {}  # absent: older work dirs match
        return dict(
            **extra,
            gen=json.loads(json.dumps(g, default=str)),
            bins=self.bins.to_dict(),
            cfg_mode=self.cfg_mode,
            hessian=self.hessian,
            hessian_per_bin=self.hessian_per_bin,
            blocks_per_group=self.blocks_per_group,
            reservoir=self.reservoir,
            rows_per_call=self.rows_per_call,
            sample_dtype=None if self.sample_dtype is None else str(jnp.dtype(self.sample_dtype)),
            per_layer=self.hessian_transform is not None,
            hessian_transform=getattr(self.hessian_transform, "__qualname__", repr(self.hessian_transform))
            if self.hessian_transform is not None
            else None,
            seed=self.seed,
        )


def mx_act_quant_transform(smooth: dict | None = None, spec: ActQuantSpec | str = "mxfp4", **spec_fields) -> Callable:
    """A ``hessian_transform`` giving ``QDQ(x / s)``, the seed's GPTQ Hessian input.

    ``smooth``: ``{expert: {layer: s [num_layers, K]}}`` smoothing vectors stacked over blocks (missing: s = 1).
    ``spec``: the activation quantizer, a `wanjax.quant.rtn.ActQuantSpec` or a format name completed by
    ``spec_fields`` (``ActQuantSpec(spec, **spec_fields)``). Default: MXFP4 with the seed's activation rule
    (``scale_rule="safe_ceil"``, clip 1.0, offset 0). The quantizer checks its input for NaN/Inf (the formats'
    ``nonfinite="raise"``), so a non-finite calibration input fails instead of entering the Hessian.
    """
    if not isinstance(spec, ActQuantSpec):
        spec = ActQuantSpec(spec, **spec_fields)
    elif spec_fields:
        spec = dataclasses.replace(spec, **spec_fields)

    def fn(expert, block_index, layer, x):
        s = (smooth or {}).get(expert, {}).get(layer)
        xs = x.astype(F32)
        if s is not None:
            xs = xs / jnp.asarray(s, F32)[block_index]
        return spec.qdq(xs, nonfinite="raise")

    return fn


# ------------------------------------------------------------------------------------------------ capture
def _salt(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class _Capture:
    """The interceptor: accumulate the inputs of the target layers into ``self.acc`` (traced, functional)."""

    def __init__(
        self,
        acc: dict,
        key,
        expert: str,
        cfg: CalibConfig,
        *,
        block_index=None,
        with_context=True,
        hacc: dict | None = None,
    ):
        self.acc = dict(acc)
        self.hacc = None if hacc is None else dict(hacc)  # per-expert Hessians (hessian_per_bin=False)
        self.key = key
        self.expert = expert
        self.cfg = cfg
        self.per_layer = cfg.hessian_transform is not None
        self.block_index = block_index  # stream mode: the (traced) block index; online: None
        self.with_context = with_context
        self.first_inputs: dict = {}

    def _entry(self, i, local):
        """Accumulator dict key and reservoir key of input ``local`` of block ``i``."""
        if local == "cross_attn.kv":
            return CONTEXT_NAME, jax.random.fold_in(jax.random.fold_in(self.key, _CONTEXT_SALT), _salt(local))
        name = local if self.block_index is not None else f"blocks.{i}.{local}"
        return name, jax.random.fold_in(jax.random.fold_in(self.key, i), _salt(local))

    def __call__(self, module, x):
        y = module.apply_default(x)
        if not module.path.startswith("blocks."):
            return y
        layer = module.path[len("blocks.") :]
        if layer not in BLOCK_LINEAR_NAMES:
            return y
        if self.block_index is not None:
            i = self.block_index
        else:
            i = current_layer_index()
            if i is None:
                raise RuntimeError("calibration capture: no block index; the model must run with scan_layers=False")
        local = input_name(layer, self.per_layer)
        if local == "cross_attn.kv" and not self.with_context:
            return y
        tag = local if local == "cross_attn.kv" else (0 if self.block_index is not None else i, local)
        if local in _FIRST_OF_SHARED:
            if layer != _FIRST_OF_SHARED[local] or tag in self.first_inputs:
                if self.first_inputs.get(tag) is not x:
                    raise RuntimeError(
                        f"calibration capture: {module.path} was expected to read the same input as "
                        f"{_FIRST_OF_SHARED[local]} (shared {local}); the model changed?"
                    )
                return y  # already captured (shared input)
            self.first_inputs[tag] = x
        xm = x.astype(module.dtype)  # statistics of the matmul operand (what the layer multiplies)
        name, key = self._entry(i, local)
        hx = None
        if self.cfg.hessian_transform is not None and self.cfg.hessian:
            hx = self.cfg.hessian_transform(self.expert, i, layer, xm)
        self.acc[name] = update_stats(self.acc[name], xm, key, rows_per_call=self.cfg.rows_per_call, hessian_x=hx)
        if self.hacc is not None:
            self.hacc[name] = update_stats(self.hacc[name], xm, hessian_x=hx)
        return y


def _init_acc(names_k: dict[str, int], cfg: CalibConfig, dtype) -> dict:
    """Per-bin accumulators (with the Hessian only when it is kept per bin)."""
    sd = cfg.sample_dtype or dtype
    return {
        n: init_stats(k, hessian=cfg.hessian and cfg.hessian_per_bin, reservoir=cfg.reservoir, sample_dtype=sd)
        for n, k in names_k.items()
    }


def _init_hacc(names_k: dict[str, int], cfg: CalibConfig):
    """Per-expert Hessian accumulators (bin ``"all"``), or None when Hessians are kept per bin."""
    if not cfg.hessian or cfg.hessian_per_bin:
        return None
    return {n: init_stats(k, hessian=True, reservoir=0) for n, k in names_k.items()}


def _bin_key(cfg: CalibConfig, expert: str, bin_name: str):
    return jax.random.fold_in(jax.random.key(cfg.seed), _salt(f"{expert}/{bin_name}"))


def _model_inputs(x, y, ctx, t, cond_only: bool):
    """``(inputs, timesteps, context)`` of one forward: the conditional rows only, or (cond, uncond) batched as
    `wanjax.sampling.guided_velocity` batches them (`wanjax.sampling.cfg_batch`)."""
    if cond_only:
        inp = jnp.concatenate([x, y.astype(x.dtype)], axis=-1)
        return inp, jnp.full((inp.shape[0],), t, F32), ctx[:1]
    return cfg_batch(x, y, ctx, t)


# ------------------------------------------------------------------------------------------- trajectories
def record_trajectory(pipe, y, context, gen, cfg_mode: str = "cond", noise=None, velocity=None, progress: bool = False):
    """Run the pipeline's denoise loop and record, per step, the latent fed to the model.

    ``cfg_mode="cond"`` samples with the conditional velocity only (the seed's calibration trajectory); ``"both"``
    with the pipeline's guided velocity. ``velocity``: optional ``fn(expert, params, x, t, guide) -> v`` overriding
    both (the online capture uses it). Returns ``(xs [N, ...] float32 numpy, timesteps [N], experts [N])``.
    """
    cond_jit = _plain_fn(pipe.graphdef, True)
    orig = pipe._velocity
    xs, ts, names = [], [], []

    def recorder(expert, params, x, y_, ctx, t, guide):
        xs.append(np.asarray(x, np.float32))
        ts.append(float(t))
        names.append(expert)
        if velocity is not None:
            return velocity(expert, params, x, t, guide)
        if cfg_mode == "cond":
            return cond_jit(params, x, y_, ctx, t, guide)
        return orig(params, x, y_, ctx, t, guide)

    pipe.denoise(y, context, gen, noise=noise, progress=progress, velocity_fn=recorder)
    return np.stack(xs), np.asarray(ts), names


def _prepare(pipe, sample: CalibSample, gen, cfg_mode):
    y, ctx = sample.y, sample.context
    if y is None:
        if sample.image is None:
            raise ValueError("calibration sample needs an image (or a precomputed y)")
        y, _ = pipe.prepare_condition(sample.image, gen.num_frames, gen.max_area)
    if ctx is None:
        if sample.prompt is None:
            raise ValueError("calibration sample needs a prompt (or a precomputed context)")
        from wanjax.conditioning import NEGATIVE_PROMPT

        ctx = pipe.encode_text([sample.prompt, sample.negative_prompt or NEGATIVE_PROMPT])
    ctx = jnp.asarray(ctx)
    if ctx.ndim != 3 or ctx.shape[0] not in (1, 2):
        raise ValueError(f"calibration context must be [2, L, D] (positive, negative) or [1, L, D], got {ctx.shape}")
    if ctx.shape[0] == 1:
        if cfg_mode == "both":
            raise ValueError("cfg_mode='both' needs a [2, L, D] context (positive, negative)")
        ctx = jnp.concatenate([ctx, ctx], 0)  # the denoise loop wants two rows; only row 0 is used
    return jnp.asarray(y, F32), ctx


# ------------------------------------------------------------------------------------------- provenance
class CalibrationMismatchError(ValueError):
    """A calibration work dir holds a run of other samples, settings or model than the one asked for (resuming
    would mix them); the message names what differs. ``calibrate(..., restart=True)`` starts over instead."""


def _sha(*parts: bytes) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "little"))
        h.update(p)
    return h.hexdigest()


def _array_digest(a) -> str:
    a = np.ascontiguousarray(np.asarray(jax.device_get(a)))
    return _sha(a.dtype.name.encode(), json.dumps(list(a.shape)).encode(), a.tobytes())


def _image_digest(image, index: int) -> str | None:
    """Content hash of a sample image: the file's bytes for a path, mode + size + pixels for a PIL image, dtype +
    shape + bytes for an array (the name of a file does not matter, its content does)."""
    if image is None:
        return None
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration sample {index}: image {path!r} does not exist or is not a file")
        import hashlib

        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return "file:" + h.hexdigest()
    if hasattr(image, "tobytes") and hasattr(image, "mode") and hasattr(image, "size"):  # PIL.Image
        return "pil:" + _sha(str(image.mode).encode(), json.dumps(list(image.size)).encode(), image.tobytes())
    return "array:" + _array_digest(image)


def sample_fingerprint(sample: CalibSample, index: int = 0) -> dict:
    """Content hashes of one calibration sample: ``{"image", "prompt", "negative_prompt", "y", "context"}`` (None
    where not given) and its ``seed``."""

    def text(s):
        return None if s is None else _sha(s.encode())

    return {
        "image": _image_digest(sample.image, index),
        "prompt": text(sample.prompt),
        "negative_prompt": text(sample.negative_prompt),
        "y": None if sample.y is None else _array_digest(sample.y),
        "context": None if sample.context is None else _array_digest(sample.context),
        "seed": int(sample.seed),
    }


def _dict_diff(have, want, prefix="") -> list[str]:
    """``["a.b: old -> new", ...]`` between two JSON trees."""
    if isinstance(have, dict) and isinstance(want, dict):
        out = []
        for k in sorted(set(have) | set(want), key=str):
            out += _dict_diff(have.get(k), want.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if have != want:

        def short(v):
            r = json.dumps(v, default=str)
            return r if len(r) <= 60 else r[:57] + "..."

        return [f"{prefix}: {short(have)} -> {short(want)}"]
    return []


def _sample_diff(have: list, want: list) -> list[str]:
    if len(have) != len(want):
        return [f"{len(have)} samples -> {len(want)}"]
    out = []
    for i, (a, b) in enumerate(zip(have, want)):
        fields = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        if fields:
            seed = f" ({a.get('seed')} -> {b.get('seed')})" if "seed" in fields else ""
            out.append(f"sample {i}: {', '.join(fields)}{seed}")
    return out


def _model_fingerprint(pipe, experts):
    """The fingerprint of the pipeline's experts (`wanjax.quant.artifact.model_fingerprint`), or None for a
    pipeline-like object without experts to fingerprint (quantized experts, test stubs)."""
    from wanjax.quant.artifact import model_fingerprint

    try:
        return model_fingerprint(pipe, experts=tuple(experts))
    except (TypeError, ValueError):
        return None


def _clear_work_dir(work_dir: str) -> None:
    """Remove what a calibration run wrote (manifest, trajectories, statistics, temp files); nothing else."""
    import shutil

    for sub in ("stats", "traj"):
        shutil.rmtree(os.path.join(work_dir, sub), ignore_errors=True)
    import glob

    for p in [os.path.join(work_dir, "manifest.json"), *glob.glob(os.path.join(work_dir, ".manifest.json.*.tmp"))]:
        with contextlib.suppress(FileNotFoundError):
            os.remove(p)


def _write_manifest(work_dir, cfg: CalibConfig, samples: Sequence[CalibSample], pipe, restart: bool = False):
    """Record (or, resuming, check) what defines this run: settings, model config and fingerprint, and a content
    hash per sample. A mismatch raises `CalibrationMismatchError` naming what differs, unless ``restart``, which
    clears the work dir's earlier run first."""
    import warnings

    hashes = [sample_fingerprint(s, i) for i, s in enumerate(samples)]  # before any work: missing images
    path = os.path.join(work_dir, "manifest.json")
    if restart:
        _clear_work_dir(work_dir)
    os.makedirs(os.path.join(work_dir, "stats"), exist_ok=True)
    os.makedirs(os.path.join(work_dir, "traj"), exist_ok=True)
    fp = _model_fingerprint(pipe, cfg.experts)
    want = json.loads(
        json.dumps(
            dict(
                format="wanjax.calibration/1",
                config=cfg.fingerprint(),
                samples=len(samples),
                model=pipe.cfg.to_dict(),
                sample_hashes=hashes,
                model_fingerprint=fp,
            ),
            default=str,
        )
    )
    if os.path.exists(path):
        with open(path) as f:
            have = json.load(f)
        settings = _dict_diff(
            {k: have.get(k) for k in ("format", "config", "model")}, {k: want[k] for k in ("format", "config", "model")}
        )
        if have.get("samples") != want["samples"]:
            settings.append(f"samples: {have.get('samples')} -> {want['samples']}")
        kinds, details = [], []
        if settings:
            kinds.append("settings")
            details += settings
        upgrade = []
        if "sample_hashes" not in have:
            upgrade.append("sample hashes")
        elif not settings:
            diff = _sample_diff(have["sample_hashes"], hashes)
            if diff:
                kinds.append("samples")
                details += diff
        if have.get("model_fingerprint") is None or fp is None:
            if fp is not None:
                upgrade.append("model fingerprint")
        else:
            from wanjax.quant.artifact import _fingerprint_problem

            problem = _fingerprint_problem(have["model_fingerprint"], fp, "calibrated on")
            if problem:
                kinds.append("model weights")
                details.append(problem)
        if kinds:
            shown = details[:6] + ([f"... {len(details) - 6} more"] if len(details) > 6 else [])
            raise CalibrationMismatchError(
                f"{work_dir}: existing calibration run has different {' and '.join(kinds)} ({'; '.join(shown)}); "
                "resuming would mix them: pass restart=True (wanjax quantize --restart) to discard its statistics "
                "and start over, or use another work dir"
            )
        if not upgrade:
            return
        warnings.warn(
            f"{work_dir}: the existing calibration run records no {' / '.join(upgrade)} (an older wanjax): "
            "cannot check that it used the same samples / model; resuming it and recording them now",
            stacklevel=3,
        )
    write_json_atomic(path, want, indent=1)


def check_calibration_model(work_dir: str | os.PathLike, pipe) -> None:
    """Raise `CalibrationMismatchError` if the calibration in ``work_dir`` (e.g. ``wanjax quantize --stats DIR``)
    was run on another model than ``pipe``'s: another model config, or weights whose fingerprint differs
    (`wanjax.quant.artifact.model_fingerprint`). A work dir of an older wanjax without a fingerprint is checked by
    its config only."""
    work_dir = os.fspath(work_dir)
    path = os.path.join(work_dir, "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{work_dir}: no manifest.json (not a calibration directory)")
    with open(path) as f:
        have = json.load(f)
    details = _dict_diff(
        {"model": have.get("model")}, json.loads(json.dumps({"model": pipe.cfg.to_dict()}, default=str))
    )
    recorded = have.get("model_fingerprint")
    if recorded is not None and not details:
        fp = _model_fingerprint(pipe, tuple(recorded["experts"]))
        if fp is not None:
            from wanjax.quant.artifact import _fingerprint_problem

            problem = _fingerprint_problem(recorded, fp, "calibrated on")
            if problem:
                details.append(problem)
    if details:
        raise CalibrationMismatchError(
            f"{work_dir}: the calibration statistics were collected on another model "
            f"({'; '.join(details[:4])}); calibrate this model instead"
        )


def _atomic_savez(path, **arrays):
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


# ------------------------------------------------------------------------------------------------ drivers
def calibrate(
    pipe,
    samples: Sequence[CalibSample],
    cfg: CalibConfig | None = None,
    *,
    work_dir: str | os.PathLike,
    mode: str = "stream",
    progress: bool = True,
    on_unit: Callable[[str, str], None] | None = None,
    restart: bool = False,
) -> CalibStats:
    """Calibrate ``pipe``'s experts on ``samples``; statistics go to ``work_dir`` (resumable), returned as a reader.

    Args:
      pipe: a `wanjax.pipeline.WanI2VPipeline` (the real sampler and both experts).
      samples: `CalibSample` s (image + prompt, or precomputed y / context).
      cfg: `CalibConfig` (default: the seed's settings: 40 steps, shift 5, 6 bins, conditional-only).
      work_dir: progress and results; re-running with the same ``work_dir``, samples, settings and model resumes
        (finished trajectories and (expert, block group, bin) units are skipped). The work dir's ``manifest.json``
        records the settings, the model config and fingerprint (`wanjax.quant.artifact.model_fingerprint`) and a
        content hash per sample (image file bytes / pixels / array bytes, prompt, negative prompt, seed,
        precomputed y / context: `sample_fingerprint`); any difference raises `CalibrationMismatchError` naming it
        (e.g. ``sample 1: image, prompt``). A work dir of an older wanjax without sample hashes resumes with a
        warning.
      mode: ``"stream"`` (block groups, resumable; the full model) or ``"online"`` (everything in memory during
        the sampler run; small models).
      progress: tqdm bars.
      on_unit: called as ``on_unit(kind, unit_id)`` after each unit is saved (``kind``: "trajectory" / "stats").
      restart: discard an earlier run in ``work_dir`` (its manifest, trajectories and statistics; nothing else)
        and start over instead of resuming or raising `CalibrationMismatchError`.
    """
    cfg = (cfg or CalibConfig()).resolved()
    samples = list(samples)
    if not samples:
        raise ValueError("calibrate: no calibration samples")
    if mode not in ("stream", "online"):
        raise ValueError(f"calibrate: mode must be 'stream' or 'online', got {mode!r}")
    work_dir = os.fspath(work_dir)
    _write_manifest(work_dir, cfg, samples, pipe, restart=restart)
    if mode == "online" and cfg.steps_per_bin:
        raise ValueError("calibrate: steps_per_bin needs mode='stream' (online mode captures every step)")
    if mode == "online":
        _run_online(pipe, samples, cfg, work_dir, progress, on_unit)
    else:
        _run_stream(pipe, samples, cfg, work_dir, progress, on_unit)
    return CalibStats(work_dir)


def _params(pipe, expert):
    return pipe._params_high if expert == "high" else pipe._params_low


def _model_dtype(pipe):
    return nnx.merge(pipe.graphdef, pipe._params_high).dtype


def _check_trajectory(cfg: CalibConfig, ts, experts):
    from wanjax.sampling import flow_schedule

    want = flow_schedule(cfg.gen.steps, shift=cfg.gen.shift).timesteps
    if len(ts) != len(want) or np.any(np.asarray(ts) != want):
        raise RuntimeError(f"calibration: the sampler ran timesteps {list(ts)[:4]}..., expected {want[:4].tolist()}...")
    for i, e in enumerate(experts):
        b = cfg.bins.bin_of_step(i)
        if cfg.bins.experts[b] != e:
            raise ValueError(
                f"calibration bins disagree with the pipeline's expert switch at step {i} (t={ts[i]}): "
                f"bin {cfg.bins.names[b]!r} is {cfg.bins.experts[b]}-noise, the pipeline ran {e!r}; "
                f"build the bins with the same boundary ({cfg.gen.boundary})"
            )


def _save_unit(work_dir, unit_id, expert, bin_name, stats: dict):
    path = os.path.join(work_dir, "stats", f"{unit_id}.npz")
    save_stats(path, {n: to_host(s) for n, s in stats.items()}, meta=dict(expert=expert, bin=bin_name))


def _bar(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="fwd")


# ---- online: capture during the sampler run
def _run_online(pipe, samples, cfg, work_dir, progress, on_unit):
    g = pipe.graphdef
    L = pipe.cfg.num_layers
    per_layer = cfg.hessian_transform is not None
    dtype = _model_dtype(pipe)
    local = _block_inputs(pipe.cfg, per_layer)
    names_k = {f"blocks.{i}.{n}": k for i in range(L) for n, k in local.items()}
    if not per_layer:
        names_k[CONTEXT_NAME] = pipe.cfg.dim
    accs = {e: {b: _init_acc(names_k, cfg, dtype) for b in cfg.bins.expert_bins(e)} for e in cfg.experts}
    haccs = {e: _init_hacc(names_k, cfg) for e in cfg.experts}
    cond_only = cfg.cfg_mode == "cond"
    fwd_jit = _online_fn(g, cfg)
    plain_jit = _plain_fn(g, cond_only)
    state = {}

    def velocity(expert, params, x, t, guide):
        if expert not in cfg.experts:  # not calibrated: the plain forward drives the trajectory
            return plain_jit(params, x, state["y"], state["ctx"], t, guide)
        b = cfg.bins.names[cfg.bins.index(float(t))]
        v, accs[expert][b], haccs[expert] = fwd_jit(
            params,
            accs[expert][b],
            haccs[expert],
            x,
            state["y"],
            state["ctx"],
            t,
            guide,
            _bin_key(cfg, expert, b),
            expert=_static_expert(cfg, expert),
        )
        return v

    for k, s in enumerate(samples):
        y, ctx = _prepare(pipe, s, cfg.gen, cfg.cfg_mode)
        state.update(y=y, ctx=ctx)
        _, ts, experts = record_trajectory(
            pipe, y, ctx, dataclasses.replace(cfg.gen, seed=s.seed), cfg.cfg_mode, velocity=velocity, progress=progress
        )
        _check_trajectory(cfg, ts, experts)
    for e in cfg.experts:
        for b in cfg.bins.expert_bins(e):
            _save_unit(work_dir, f"{e}.online.{b}", e, b, accs[e][b])
            if on_unit:
                on_unit("stats", f"{e}.online.{b}")
        if haccs[e] is not None:
            _save_unit(work_dir, f"{e}.online.{ALL_BINS}", e, ALL_BINS, haccs[e])


# ---- stream: trajectories first, then (expert, block group, bin) units
def _embed(model, inp, t, ctx):
    """The model's own input stage (as `WanDiT.__call__`): tokens, e0, embedded context, RoPE tables."""
    b, f, h, w, _ = inp.shape
    c = model.cfg
    tb = jnp.broadcast_to(jnp.asarray(t, F32), (b,))
    tokens = model.patch_embedding(model.patchify(inp)).astype(F32)
    _, e0 = model.embed_time(tb)
    ctx_e = model.embed_text(ctx)
    rope = rope_cos_sin((f, h // 2, w // 2), c.head_dim, c.rope_split, c.rope_max_seq_len, c.rope_theta)
    return tokens, e0, ctx_e, rope


def _block(model, i):
    """Block ``i`` (may be traced) of the stacked blocks, as `WanDiT.run_blocks` builds it."""
    gd, st = nnx.split(model.blocks)
    return nnx.merge(gd, jax.tree.map(lambda a: a[i], st))


@functools.lru_cache(maxsize=8)
def _plain_fn(g, cond_only: bool):
    """Jitted velocity without capture: conditional-only, or CFG-guided."""

    def plain(params, x, y, ctx, t, guide):
        if not cond_only:
            return guided_velocity(g, params, x, y, ctx, t, guide)
        inp, tb, c = _model_inputs(x, y, ctx, t, cond_only)
        return nnx.merge(g, params)(inp, tb, c)

    return jax.jit(plain)


@functools.lru_cache(maxsize=8)
def _online_fn(g, cfg: CalibConfig):
    """Jitted velocity of the unrolled model with every target layer captured into ``acc``."""
    cond_only = cfg.cfg_mode == "cond"

    def fwd(params, acc, hacc, x, y, ctx, t, guide, key, expert):
        model = nnx.merge(g, params)
        model.scan_layers = False
        inp, tb, c = _model_inputs(x, y, ctx, t, cond_only)
        cap = _Capture(acc, key, expert, cfg, hacc=hacc)
        with linear_interceptor(cap):
            v = model(inp, tb, c)
        if not cond_only:
            v = cfg_combine(v, guide)
        return v, cap.acc, cap.hacc

    return jax.jit(fwd, static_argnames=("expert",), donate_argnames=("acc", "hacc"))


def _static_expert(cfg, expert):
    """The expert name matters to the traced code only through a ``hessian_transform`` (avoid recompiles)."""
    return expert if cfg.hessian_transform is not None else None


@functools.lru_cache(maxsize=8)
def _prefix_fn(g, cond_only: bool):
    """Jitted: model input stage + blocks ``0 .. n_blocks-1`` (``n_blocks`` traced) -> (h, e0, ctx_e, rope)."""

    def prefix(params, x, y, ctx, t, n_blocks):
        model = nnx.merge(g, params)
        inp, _, c = _model_inputs(x, y, ctx, t, cond_only)
        h, e0, ctx_e, rope = _embed(model, inp, t, c)

        def body(i, h):
            return _block(model, i)(h, e0, ctx_e, rope)

        h = jax.lax.fori_loop(0, n_blocks, body, h)
        return h, e0, ctx_e, rope

    return jax.jit(prefix)


@functools.lru_cache(maxsize=8)
def _capture_fn(g, cfg: CalibConfig):
    """Jitted: block ``i`` (traced) under the capture -> (h, acc, hacc)."""

    def capture(params, i, h, e0, ctx_e, rope, acc, hacc, key, expert, with_context):
        model = nnx.merge(g, params)
        cap = _Capture(acc, key, expert, cfg, block_index=i, with_context=with_context, hacc=hacc)
        with linear_interceptor(cap):
            h = _block(model, i)(h, e0, ctx_e, rope)
        return h, cap.acc, cap.hacc

    return jax.jit(capture, static_argnames=("expert", "with_context"), donate_argnames=("acc", "hacc"))


def trajectory_path(work_dir, k: int) -> str:
    """Where sample ``k``'s recorded trajectory is saved in a calibration work dir."""
    return os.path.join(work_dir, "traj", f"sample_{k:05d}.npz")


def _record_sample(pipe, sample: CalibSample, k: int, cfg: CalibConfig, work_dir, progress) -> bool:
    """Record sample ``k``'s trajectory into the work dir (skipped when already there); True if recorded now."""
    path = trajectory_path(work_dir, k)
    if os.path.exists(path):
        return False
    y, ctx = _prepare(pipe, sample, cfg.gen, cfg.cfg_mode)
    xs, ts, experts = record_trajectory(
        pipe, y, ctx, dataclasses.replace(cfg.gen, seed=sample.seed), cfg.cfg_mode, progress=progress
    )
    _check_trajectory(cfg, ts, experts)
    # np.savez cannot round-trip bfloat16 (it reads back as raw '|V2'): store f32 + the dtype name
    _atomic_savez(
        path,
        xs=np.asarray(xs, np.float32),
        ts=ts,
        y=np.asarray(y, np.float32),
        ctx=np.asarray(jnp.asarray(ctx, jnp.float32)),
        ctx_dtype=np.asarray(str(ctx.dtype)),
    )
    return True


def _trajectories(pipe, samples, cfg, work_dir, progress, on_unit):
    for k, s in enumerate(samples):
        if _record_sample(pipe, s, k, cfg, work_dir, progress) and on_unit:
            on_unit("trajectory", f"sample_{k:05d}")


def _run_stream(pipe, samples, cfg, work_dir, progress, on_unit):
    _trajectories(pipe, samples, cfg, work_dir, progress, on_unit)
    L = pipe.cfg.num_layers
    groups = block_groups(cfg, L)
    per_bin = cfg.hessian_per_bin or not cfg.hessian
    # a unit: (expert, block group, bins); with per-expert Hessians all bins of a group form one unit
    units = [
        (e, g0, g1, (b,) if per_bin else cfg.bins.expert_bins(e))
        for e in cfg.experts
        for g0, g1 in groups
        for b in (cfg.bins.expert_bins(e) if per_bin else [None])
    ]
    uid = stats_unit_id
    last = lambda u: uid(*u[:3], u[3][0] if per_bin else ALL_BINS)  # noqa: E731  (written last)
    todo = [u for u in units if not os.path.exists(os.path.join(work_dir, "stats", f"{last(u)}.npz"))]
    n_steps = lambda b: len(captured_steps(cfg, b))  # noqa: E731
    bar = _bar(sum(n_steps(b) for u in todo for b in u[3]) * len(samples), "calibrate", progress)
    traj_paths = [trajectory_path(work_dir, k) for k in range(len(samples))]
    for expert in cfg.experts:
        mine = [u for u in todo if u[0] == expert]
        if not mine:
            continue
        with _idle_expert_on_host(pipe, "low" if expert == "high" else "high", cfg.offload_idle_expert):
            for e, g0, g1, bin_names in mine:
                _stream_unit(pipe, cfg, traj_paths, e, g0, g1, bin_names, bar, work_dir, uid)
                if on_unit:
                    on_unit("stats", last((e, g0, g1, bin_names)))
    if bar is not None:
        bar.close()


@contextlib.contextmanager
def _idle_expert_on_host(pipe, idle: str, enabled: bool):
    """Move ``pipe``'s ``idle`` expert parameters to host memory for the duration (restored with their shardings)."""
    attr = "_params_high" if idle == "high" else "_params_low"
    if not enabled:
        yield
        return
    dev = getattr(pipe, attr)
    shardings = jax.tree.map(lambda a: a.sharding, dev)
    host = jax.device_get(dev)
    setattr(pipe, attr, host)
    del dev
    try:
        yield
    finally:
        setattr(pipe, attr, jax.device_put(host, shardings))


def block_groups(cfg: CalibConfig, num_layers: int) -> list[tuple[int, int]]:
    """The stream mode's block groups ``[(g0, g1), ...]`` (``blocks_per_group`` blocks each, 0: one group)."""
    size = cfg.blocks_per_group or num_layers
    return [(g0, min(g0 + size, num_layers)) for g0 in range(0, num_layers, size)]


def stats_unit_id(expert: str, g0: int, g1: int, bin_name: str) -> str:
    """Name of the statistics unit of blocks ``g0..g1-1`` of ``expert`` and one bin (``stats/<id>.npz``)."""
    return f"{expert}.blocks{g0:03d}-{g1 - 1:03d}.{bin_name}"


def captured_steps(cfg: CalibConfig, bin_name: str) -> tuple[int, ...]:
    """The recorded steps of bin ``bin_name`` the stream mode captures: all of them, or with ``cfg.steps_per_bin =
    k`` the k steps at the centres of k equal parts of the bin (``floor((j + 0.5) n / k)`` of its n steps)."""
    steps = cfg.bins.steps[cfg.bins.names.index(bin_name)]
    k = cfg.steps_per_bin
    if not k or k >= len(steps):
        return tuple(steps)
    return tuple(steps[int((j + 0.5) * len(steps) / k)] for j in range(k))


class GroupCapture:
    """Capture of blocks ``g0..g1-1`` of expert ``expert`` in stream mode, one (bin, sample) at a time.

    ``accs()`` / ``haccs()`` make empty per-block accumulators (per bin / per expert), ``run(params, accs, haccs,
    traj_path, bin_name)`` adds one recorded sample's captured steps of a bin, ``collect`` names them as the
    statistics files do (``blocks.{j}.{input}``, ``context.cross_attn.kv``) and `split` is its inverse. The
    calibration's stream mode and `wanjax.quant.stream` both run it, so their statistics are the same."""

    def __init__(self, pipe, cfg: CalibConfig, expert: str, g0: int, g1: int):
        self.pipe, self.cfg, self.expert, self.g0, self.g1 = pipe, cfg, expert, g0, g1
        self.prefix = _prefix_fn(pipe.graphdef, cfg.cfg_mode == "cond")
        self.capture = _capture_fn(pipe.graphdef, cfg)
        per_layer = cfg.hessian_transform is not None
        self.dtype = _model_dtype(pipe)
        self.local = _block_inputs(pipe.cfg, per_layer)
        self.with_ctx = g0 == 0 and not per_layer
        self.local0 = dict(self.local, **({CONTEXT_NAME: pipe.cfg.dim} if self.with_ctx else {}))

    def accs(self) -> list:
        return [
            _init_acc(self.local0 if j == 0 else self.local, self.cfg, self.dtype) for j in range(self.g1 - self.g0)
        ]

    def haccs(self) -> list:
        return [_init_hacc(self.local0 if j == 0 else self.local, self.cfg) for j in range(self.g1 - self.g0)]

    def collect(self, accs) -> dict:
        out = {}
        for j in range(self.g0, self.g1):
            for n, st in (accs[j - self.g0] or {}).items():
                out[n if n == CONTEXT_NAME else f"blocks.{j}.{n}"] = st
        return out

    def split(self, flat: dict) -> list:
        """``collect``'s inverse: ``{name: LayerStats}`` -> per-block dicts."""
        out = [{} for _ in range(self.g0, self.g1)]
        for n, st in flat.items():
            if n == CONTEXT_NAME:
                out[0][n] = st
            else:
                _, j, local = n.split(".", 2)
                out[int(j) - self.g0][local] = st
        return out

    def run(self, params, accs, haccs, traj_path, bin_name, on_step=None):
        """Add sample ``traj_path``'s captured steps of ``bin_name``; returns the new ``(accs, haccs)``."""
        e, g0, g1, cfg = self.expert, self.g0, self.g1, self.cfg
        key = _bin_key(cfg, e, bin_name)
        accs, haccs = list(accs), list(haccs)
        with np.load(traj_path) as z:
            xs, ts, y, ctx = z["xs"], z["ts"], jnp.asarray(z["y"]), jnp.asarray(z["ctx"])
            if "ctx_dtype" in z.files:
                ctx = ctx.astype(str(z["ctx_dtype"]))
        for i in captured_steps(cfg, bin_name):
            h, e0, ctx_e, rope = self.prefix(params, jnp.asarray(xs[i]), y, ctx, jnp.float32(ts[i]), g0)
            for j in range(g0, g1):
                h, accs[j - g0], haccs[j - g0] = self.capture(
                    params,
                    j,
                    h,
                    e0,
                    ctx_e,
                    rope,
                    accs[j - g0],
                    haccs[j - g0],
                    key,
                    expert=_static_expert(cfg, e),
                    with_context=self.with_ctx and j == g0,
                )
            if on_step is not None:
                on_step()
        return accs, haccs


def _stream_unit(pipe, cfg, traj_paths, e, g0, g1, bin_names, bar, work_dir, uid):
    """Capture blocks ``g0..g1-1`` of expert ``e`` over the recorded steps of ``bin_names``; save."""
    cap = GroupCapture(pipe, cfg, e, g0, g1)
    params = _params(pipe, e)
    haccs = cap.haccs()
    for b in bin_names:
        accs = cap.accs()
        for path in traj_paths:
            accs, haccs = cap.run(params, accs, haccs, path, b, on_step=None if bar is None else lambda: bar.update(1))
        _save_unit(work_dir, uid(e, g0, g1, b), e, b, cap.collect(accs))
        del accs
    if haccs[0] is not None:
        _save_unit(work_dir, uid(e, g0, g1, ALL_BINS), e, ALL_BINS, cap.collect(haccs))
