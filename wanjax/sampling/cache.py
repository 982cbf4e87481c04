"""Timestep-aware step caching (MagCache-style): reuse the block stack's residual on steps where it changes little.

A DiT forward is ``tokens -> blocks -> head``. The *residual* of a step is ``r = blocks(tokens) - tokens`` (fp32
[2B, S, D]: cond and uncond rows of the CFG batch). On a skipped step the block stack does not run: the patch, time
and text embeddings and the head still do, on ``tokens + r_cached``. Which steps are skipped is decided on the host
between the jitted calls of the pipeline's Python loop, from constants only, so the schedule is known before the run
and no step recompiles (two executables: compute, skip).

The rule (MagCache, Ma et al. 2025, arXiv 2506.09045): the *magnitude ratio* ``gamma_i = mean_tokens(|r_i| /
|r_{i-1}|)`` of successive residuals is nearly input-independent, so it is calibrated once per (model, steps, shift,
boundary) and per expert and CFG branch (`calibrate_ratios` records it from uncached runs; `CacheCalibration` stores
it, ``cache_calibration.json``). Skipping from the last computed step ``c`` to step ``i`` costs about ``|1 - prod_{c<j
<=i} gamma_j|``; the errors of consecutive skips are accumulated, and step ``i`` is skipped while the accumulated error
of *every* CFG branch stays below ``threshold`` and at most ``max_skips`` steps in a row were skipped. The first
``warmup`` steps of each expert are always computed, and the expert switch resets the cache (a high-noise residual
means nothing to the low-noise expert). Both branches are decided jointly so that cond and uncond stay one batch.

    cal = CacheCalibration.load("models/mini")                      # models/mini/cache_calibration.json
    cache = StepCache(CacheConfig(threshold=0.1, max_skips=2), cal)
    out = pipe.generate(image, prompt, cache=cache)                  # cache.computed / cache.skipped

This module is the model layer's part: the pure rule (`plan_skips`), the calibration file and the split forward
(`forward_residual`, `forward_skip`, `cached_guided_velocity`). The pipeline (`wanjax.pipeline`) runs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wanjax.model.dit import F32
from wanjax.model.rope import rope_cos_sin
from wanjax.sampling.guidance import cfg_batch, cfg_combine

__all__ = [
    "BRANCHES",
    "CALIBRATION_FILE",
    "CacheCalibration",
    "CacheCalibrationError",
    "CacheConfig",
    "StepCache",
    "cached_guided_velocity",
    "forward_residual",
    "forward_skip",
    "plan_skips",
    "plan_tea",
    "residual_ratio",
]

#: The file name `CacheCalibration.save` / `load` use inside a directory (a model dir or a quantized artifact).
CALIBRATION_FILE = "cache_calibration.json"
FORMAT = "wanjax-step-cache"
VERSION = 1
#: CFG branches in the order of the batched rows (`wanjax.sampling.cfg_batch`: cond rows first).
BRANCHES = ("cond", "uncond")


class CacheCalibrationError(ValueError):
    """A cache calibration file that is missing, malformed, or made for other settings (names the file and key)."""


# ---------------------------------------------------------------------------------------------------- the forward
def _embed(model, x, t, context):
    b, f, h, w, _ = x.shape
    grid = (f, h // 2, w // 2)
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    tokens = model.patch_embedding(model.patchify(x)).astype(F32)
    temb, e0 = model.embed_time(t)
    ctx = model.embed_text(context)
    cfg = model.cfg
    rope = rope_cos_sin(grid, cfg.head_dim, cfg.rope_split, cfg.rope_max_seq_len, cfg.rope_theta)
    return tokens, temb, e0, ctx, rope, grid


def forward_residual(model, x, t, context):
    """``model(x, t, context)`` (`wanjax.model.dit.WanDiT.__call__`, same ops) that also returns the block stack's
    residual ``blocks(tokens) - tokens`` (fp32 [B, S, dim])."""
    tokens, temb, e0, ctx, rope, grid = _embed(model, x, t, context)
    out_tokens = model.run_blocks(tokens, e0, ctx, rope)
    v = model.unpatchify(model.head(out_tokens, temb), grid).astype(F32)
    return v, out_tokens - tokens


def forward_skip(model, x, t, context, residual):
    """The forward with the block stack replaced by ``tokens + residual`` (embeddings and head still run)."""
    tokens, temb, _, _, _, grid = _embed(model, x, t, context)
    return model.unpatchify(model.head(tokens + residual.astype(F32), temb), grid).astype(F32)


def modulated_input(model, x, t, context):
    """TeaCache's indicator input: the first block's timestep-modulated, normalized input ``LN(tokens) * (1 +
    scale1) + shift1`` (fp32 [B, S, dim]); only the patch and time embeddings run."""
    from wanjax.model.layers import layer_norm

    b = x.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    tokens = model.patch_embedding(model.patchify(x)).astype(F32)
    _, e0 = model.embed_time(t)
    mod = model.blocks.modulation[...]
    e = mod.reshape(-1, *mod.shape[-2:])[0].astype(F32) + e0  # block 0 (the blocks are stacked)
    return layer_norm(tokens, model.cfg.eps) * (1.0 + e[:, 1:2]) + e[:, 0:1]


def cached_guided_indicator(graphdef, params, x, y, ctx, t, constrain: Callable | None = None):
    """`modulated_input` of the CFG batch of `cached_guided_velocity` ([2B, S, dim], cond rows first)."""
    model = nnx.merge(graphdef, params)
    args = cfg_batch(x, y, ctx, t)
    if constrain is not None:
        args = tuple(constrain(a) for a in args)
    return modulated_input(model, *args)


@jax.jit
def rel_l1(new, old):
    """Relative L1 change per batch row: ``mean|new - old| / mean|old|``."""
    axes = tuple(range(1, new.ndim))
    return jnp.mean(jnp.abs(new - old), axis=axes) / jnp.maximum(jnp.mean(jnp.abs(old), axis=axes), 1e-12)


def cached_guided_velocity(graphdef, params, x, y, ctx, t, guide, residual=None, constrain: Callable | None = None):
    """`wanjax.sampling.guided_velocity` split at the block stack. ``residual=None``: compute, returning
    ``(v, residual [2B, S, dim])``; else skip the blocks and reuse ``residual``, returning ``(v, residual)``."""
    model = nnx.merge(graphdef, params)
    args = cfg_batch(x, y, ctx, t)
    if constrain is not None:
        args = tuple(constrain(a) for a in args)
    if residual is None:
        v, r = forward_residual(model, *args)
    else:
        r = residual
        v = forward_skip(model, *args, r)
    return cfg_combine(v, guide), r


@jax.jit
def residual_ratio(r_new, r_old):
    """MagCache's magnitude ratio per batch row: mean over tokens of ``|r_new| / |r_old|`` (L2 over channels)."""
    n_new = jnp.linalg.norm(r_new.astype(F32), axis=-1)
    n_old = jnp.linalg.norm(r_old.astype(F32), axis=-1)
    return jnp.mean(n_new / jnp.maximum(n_old, 1e-12), axis=-1)


# ---------------------------------------------------------------------------------------------------- the rule
@dataclasses.dataclass(frozen=True)
class CacheConfig:
    """Settings of the step cache.

    ``rule``: ``"mag"`` (MagCache: calibrated magnitude ratios, a schedule fixed before the run) or ``"tea"``
    (TeaCache: the relative L1 change of the first block's timestep-modulated input, rescaled by the polynomial
    fitted at calibration, measured each step: one scalar transfer per step). ``threshold``: the accumulated error
    (per CFG branch) below which a step may be skipped; 0 skips nothing. ``max_skips``: the most consecutive skipped steps. ``warmup``: the first steps of each expert that are
    always computed (at least 1: the expert switch resets the cache). ``scale_residual``: multiply the reused
    residual by the accumulated calibrated ratio (a magnitude correction; off = upstream MagCache).
    """

    threshold: float = 0.1
    max_skips: int = 2
    warmup: int = 2
    scale_residual: bool = False
    rule: str = "mag"

    def validate(self) -> "CacheConfig":
        if self.rule not in ("mag", "tea"):
            raise ValueError(f"cache rule must be 'mag' or 'tea', got {self.rule!r}")
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"cache threshold must be a finite number >= 0, got {self.threshold!r}")
        if not isinstance(self.max_skips, int) or self.max_skips < 0:
            raise ValueError(f"cache max_skips must be an integer >= 0, got {self.max_skips!r}")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise ValueError(
                f"cache warmup must be an integer >= 1 (the first step of each expert), got {self.warmup!r}"
            )
        return self


def plan_skips(
    ratios: dict[str, Sequence[float]], experts: Sequence[str], config: CacheConfig
) -> tuple[list[bool], list[float]]:
    """The skip schedule of a run (pure, host-side): ``(skip[i], scale[i])`` per step.

    ``ratios``: per CFG branch, the calibrated ratio ``gamma_i`` of each step (``gamma`` of an expert's first step is
    ignored); ``experts``: the expert of each step. ``scale[i]`` is the accumulated ratio product since the last
    computed step (the factor ``scale_residual`` applies; 1.0 on computed steps).
    """
    config.validate()
    n = len(experts)
    for b, r in ratios.items():
        if len(r) != n:
            raise ValueError(f"plan_skips: {len(r)} ratios for branch {b!r}, {n} steps")
    skip, scale = [], []
    acc_ratio = {b: 1.0 for b in ratios}
    acc_err = {b: 0.0 for b in ratios}
    run, since_switch, prev = 0, 0, None
    for i, e in enumerate(experts):
        since_switch = since_switch + 1 if e == prev else 0
        prev = e
        ok = since_switch >= config.warmup and config.threshold > 0 and run < config.max_skips
        if ok:
            new_ratio = {b: acc_ratio[b] * float(ratios[b][i]) for b in ratios}
            new_err = {b: acc_err[b] + abs(1.0 - new_ratio[b]) for b in ratios}
            ok = all(new_err[b] < config.threshold for b in ratios)
        if ok:
            acc_ratio, acc_err, run = new_ratio, new_err, run + 1
            skip.append(True)
            scale.append(float(np.mean(list(acc_ratio.values()))))
        else:
            acc_ratio = {b: 1.0 for b in ratios}
            acc_err = {b: 0.0 for b in ratios}
            run = 0
            skip.append(False)
            scale.append(1.0)
    return skip, scale


def plan_tea(cal, config: CacheConfig) -> list[bool]:
    """TeaCache's schedule as it would run on the calibration runs' mean input changes (an estimate: a real run
    measures its own; used to pick thresholds)."""
    config.validate()
    poly = np.poly1d(cal.tea["coefficients"])
    skip, acc, run, since, prev = [], {b: 0.0 for b in BRANCHES}, 0, 0, None
    for i, e in enumerate(cal.experts):
        since = since + 1 if e == prev else 0
        prev = e
        ok = since >= config.warmup and run < config.max_skips and config.threshold > 0
        if ok:
            new = {b: acc[b] + max(float(poly(cal.tea["rel_input"][b][i])), 0.0) for b in BRANCHES}
            ok = all(v < config.threshold for v in new.values())
        if ok:
            acc, run = new, run + 1
        else:
            acc, run = {b: 0.0 for b in BRANCHES}, 0
        skip.append(ok)
    return skip


# ---------------------------------------------------------------------------------------------------- calibration
@dataclasses.dataclass
class CacheCalibration:
    """Calibrated magnitude ratios of one setting: ``ratios[branch][i]`` at step ``i`` of the ``steps``-step
    schedule with ``shift`` and ``boundary`` (``timesteps``, ``experts`` as the run had them), mean over
    ``samples`` runs (``std`` their spread). ``precision`` names the experts it was measured on (``"bf16"``,
    ``"w4a4:<recipe>"``...). A file holds several (one per step count...): `save` merges by setting."""

    steps: int
    shift: float
    boundary: float
    timesteps: list[int]
    experts: list[str]
    ratios: dict[str, list[float]]
    std: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    samples: int = 1
    precision: str = "bf16"
    solver: str = "unipc"
    #: TeaCache's data: ``coefficients`` (polynomial, highest power first, input change -> output change) and the
    #: mean recorded ``rel_input`` / ``rel_output`` per branch and step (0 at an expert's first step); {} if absent.
    tea: dict = dataclasses.field(default_factory=dict)

    def key(self) -> tuple:
        return (self.steps, round(self.shift, 6), round(self.boundary, 6), self.solver)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, where: str = "cache calibration") -> "CacheCalibration":
        """Validated: every problem raises `CacheCalibrationError` naming ``where`` and the key."""

        def bad(key, why):
            return CacheCalibrationError(f"{where}: {key!r}: {why}")

        if not isinstance(d, dict):
            raise CacheCalibrationError(f"{where}: expected an object, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise bad(unknown[0], f"unknown key (expected {sorted(fields)})")
        for key in ("steps", "shift", "boundary", "timesteps", "experts", "ratios"):
            if key not in d:
                raise bad(key, "missing")
        steps = d["steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise bad("steps", f"expected a positive integer, got {steps!r}")
        for key in ("shift", "boundary"):
            if not isinstance(d[key], (int, float)) or not math.isfinite(d[key]):
                raise bad(key, f"expected a finite number, got {d[key]!r}")

        def seq(key, value, kind, n=steps):
            if not isinstance(value, list) or len(value) != n:
                got = len(value) if isinstance(value, list) else type(value).__name__
                raise bad(key, f"expected a list of {n} values (one per step), got {got}")
            for j, v in enumerate(value):
                if kind == "num" and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
                    raise bad(key, f"element {j}: expected a finite number >= 0, got {v!r}")
                if kind == "int" and not isinstance(v, int):
                    raise bad(key, f"element {j}: expected an integer timestep, got {v!r}")
                if kind == "expert" and v not in ("high", "low"):
                    raise bad(key, f"element {j}: expected 'high' or 'low', got {v!r}")
            return list(value)

        timesteps = seq("timesteps", d["timesteps"], "int")
        experts = seq("experts", d["experts"], "expert")
        for name in ("ratios", "std"):
            if name in d and (not isinstance(d[name], dict) or (name == "ratios" and set(d[name]) != set(BRANCHES))):
                raise bad(name, f"expected an object with keys {list(BRANCHES)}, got {d[name]!r:.80}")
        ratios = {b: seq(f"ratios.{b}", d["ratios"][b], "num") for b in BRANCHES}
        std = {b: seq(f"std.{b}", v, "num") for b, v in d.get("std", {}).items()}
        tea = d.get("tea", {})
        if not isinstance(tea, dict):
            raise bad("tea", f"expected an object, got {type(tea).__name__}")
        if tea:
            coef = tea.get("coefficients")
            if (
                not isinstance(coef, list)
                or not coef
                or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in coef)
            ):
                raise bad("tea.coefficients", f"expected a non-empty list of finite numbers, got {coef!r:.80}")
            for name in ("rel_input", "rel_output"):
                v = tea.get(name)
                if not isinstance(v, dict) or set(v) != set(BRANCHES):
                    raise bad(f"tea.{name}", f"expected an object with keys {list(BRANCHES)}")
                for b in BRANCHES:
                    seq(f"tea.{name}.{b}", v[b], "num")
        samples = d.get("samples", 1)
        if not isinstance(samples, int) or samples < 1:
            raise bad("samples", f"expected a positive integer, got {samples!r}")
        return cls(
            steps=steps,
            shift=float(d["shift"]),
            boundary=float(d["boundary"]),
            timesteps=timesteps,
            experts=experts,
            ratios=ratios,
            std=std,
            samples=samples,
            precision=str(d.get("precision", "bf16")),
            solver=str(d.get("solver", "unipc")),
            tea=tea,
        )

    # ---- files
    @staticmethod
    def path_of(path: str | os.PathLike) -> str:
        """``path`` itself for a file, ``path/cache_calibration.json`` for a directory."""
        p = os.fspath(path)
        return os.path.join(p, CALIBRATION_FILE) if os.path.isdir(p) or not p.endswith(".json") else p

    @classmethod
    def load_all(cls, path: str | os.PathLike) -> list["CacheCalibration"]:
        """Every calibration in the file (or ``DIR/cache_calibration.json``), validated."""
        file = cls.path_of(path)
        if not os.path.isfile(file):
            raise CacheCalibrationError(
                f"{file}: no step-cache calibration there; `wanjax quantize` writes one into its artifact, "
                "`pipe.calibrate_cache(samples, gen).save(DIR)` makes one for any pipeline (BF16 too)"
            )
        try:
            with open(file) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise CacheCalibrationError(f"{file}: not readable JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise CacheCalibrationError(f"{file}: 'format': expected {FORMAT!r}, got {got!r}")
        if doc.get("version") != VERSION:
            raise CacheCalibrationError(f"{file}: 'version': expected {VERSION}, got {doc.get('version')!r}")
        entries = doc.get("calibrations")
        if not isinstance(entries, list) or not entries:
            raise CacheCalibrationError(f"{file}: 'calibrations': expected a non-empty list")
        return [cls.from_dict(e, where=f"{file}: calibrations[{j}]") for j, e in enumerate(entries)]

    @classmethod
    def load(
        cls, path: str | os.PathLike, steps: int | None = None, shift: float | None = None, boundary=None, solver=None
    ) -> "CacheCalibration":
        """The calibration of the file matching the given settings (None: any); `CacheCalibrationError` listing
        what the file holds when none matches."""
        cals = cls.load_all(path)
        want = {"steps": steps, "shift": shift, "boundary": boundary, "solver": solver}
        for c in cals:
            if all(
                v is None or getattr(c, k) == v or (isinstance(v, float) and abs(getattr(c, k) - v) < 1e-6)
                for k, v in want.items()
            ):
                return c
        have = ", ".join(f"steps={c.steps} shift={c.shift} boundary={c.boundary} solver={c.solver}" for c in cals)
        asked = " ".join(f"{k}={v}" for k, v in want.items() if v is not None)
        raise CacheCalibrationError(
            f"{cls.path_of(path)}: no calibration for {asked} (the file has: {have}); calibrate for these settings"
        )

    def save(self, path: str | os.PathLike) -> str:
        """Write (atomically) into the file or ``DIR/cache_calibration.json``, replacing an entry of the same
        setting and keeping the others. Returns the file path."""
        from wanjax.io.atomic import write_json_atomic

        file = self.path_of(path)
        entries = [c for c in (self.load_all(file) if os.path.isfile(file) else []) if c.key() != self.key()]
        entries.append(self)
        doc = {"format": FORMAT, "version": VERSION, "calibrations": [c.to_dict() for c in entries]}
        return write_json_atomic(file, doc)

    def check_run(self, timesteps: Sequence[int], experts: Sequence[str], where: str = "cache calibration") -> None:
        """Refuse a run whose schedule differs from the calibrated one (another step count, shift or boundary)."""
        if [int(t) for t in timesteps] != list(self.timesteps) or list(experts) != list(self.experts):
            raise CacheCalibrationError(
                f"{where}: calibrated for steps={self.steps} shift={self.shift} boundary={self.boundary} "
                f"(timesteps {self.timesteps[:3]}..., {self.experts.count('high')} high-noise steps); this run has "
                f"{len(timesteps)} steps (timesteps {[int(t) for t in timesteps[:3]]}..., "
                f"{list(experts).count('high')} high-noise steps): calibrate for these settings"
            )


# ---------------------------------------------------------------------------------------------------- runtime
class StepCache:
    """Host-side state of one cached run (pass it to ``WanI2VPipeline.generate(cache=...)`` / ``denoise``).

    ``config``: `CacheConfig`; ``calibration``: `CacheCalibration` (needed unless ``record`` or a threshold of 0).
    ``record=True`` computes every step and records the magnitude ratios (`calibrate_ratios` uses it); after a run,
    ``computed`` / ``skipped`` count forwards, ``schedule`` is the per-step plan ("C" computed, "S" skipped) and
    ``recorded`` the ratios per branch. One `StepCache` may serve several runs (each run starts over).
    """

    def __init__(
        self, config: CacheConfig | None = None, calibration: CacheCalibration | None = None, *, record: bool = False
    ):
        self.config = (config or CacheConfig()).validate()
        self.calibration = calibration
        self.record = record
        if calibration is None and not record and self.config.threshold > 0:
            raise ValueError("StepCache: a threshold > 0 needs a calibration (CacheCalibration.load(DIR))")
        self.reset()

    def reset(self) -> None:
        self.computed = 0
        self.skipped = 0
        self.schedule = ""
        self.recorded: dict[str, list[float]] = {b: [] for b in BRANCHES}
        self.recorded_input: dict[str, list[float]] = {b: [] for b in BRANCHES}  # TeaCache: rel L1 of the input
        self.recorded_output: dict[str, list[float]] = {b: [] for b in BRANCHES}  # and of the residual
        self._h = None
        self._tea = False
        self._acc = {b: 0.0 for b in BRANCHES}
        self._run = 0
        self._since = 0
        self._plan: list[bool] | None = None
        self._scale: list[float] | None = None
        self._residual = None
        self._expert = None

    def begin(self, timesteps: Sequence[int], experts: Sequence[str]) -> None:
        """Start a run over ``timesteps`` with ``experts[i]`` at step i: plans the skips (from the calibration)."""
        self.reset()
        if self.record or self.config.threshold == 0:
            self._plan, self._scale = [False] * len(experts), [1.0] * len(experts)
            return
        self.calibration.check_run(timesteps, experts)
        if self.config.rule == "tea":
            if not self.calibration.tea:
                raise CacheCalibrationError(
                    "cache rule 'tea': this calibration has no TeaCache data (calibrate again with this version)"
                )
            self._plan, self._scale = None, [1.0] * len(experts)  # decided per step from the measured input
            self._poly = np.poly1d(self.calibration.tea["coefficients"])
            self._tea = True
            return
        self._plan, self._scale = plan_skips(self.calibration.ratios, experts, self.config)

    def _tea_skip(self, i: int, h) -> bool:
        """TeaCache's decision at step ``i`` from the modulated input ``h`` (the previous one is ``self._h``)."""
        c = self.config
        if self._since < c.warmup or self._h is None or self._run >= c.max_skips or c.threshold == 0:
            return False
        rel = np.asarray(rel_l1(h, self._h))
        n = rel.shape[0] // 2
        acc = {
            b: self._acc[b] + max(float(self._poly(float(np.mean(r)))), 0.0)
            for b, r in zip(BRANCHES, (rel[:n], rel[n:]))
        }
        if all(a < c.threshold for a in acc.values()):
            self._acc = acc
            return True
        return False

    def step(self, i: int, expert: str, compute: Callable, skip: Callable, indicator: Callable | None = None):
        """Step ``i`` with ``expert``: ``compute() -> (v, residual)`` or ``skip(residual) -> (v, residual)``;
        ``indicator() -> modulated input`` (rule "tea" and recording)."""
        if self._plan is None and not self._tea:
            raise RuntimeError("StepCache.step before begin()")
        if expert != self._expert:  # the expert switch (and the first step) resets the cache
            self._residual, self._expert, self._h, self._since = None, expert, None, 0
        else:
            self._since += 1
        tea = self._tea
        h = indicator() if indicator is not None and (tea or self.record) else None
        if tea and h is None:
            raise ValueError("cache rule 'tea' needs the indicator (the pipeline passes it)")
        if tea:
            do_skip = self._residual is not None and self._tea_skip(i, h)
            self._h = h
        else:
            do_skip = self._plan[i] and self._residual is not None
        if do_skip:
            self._run += 1
            r = self._residual
            if self.config.scale_residual:
                r = r * jnp.float32(self._scale[i])
            v, _ = skip(r)
            self.skipped += 1
            self.schedule += "S"
            return v
        v, r = compute()
        self._run, self._acc = 0, {b: 0.0 for b in BRANCHES}
        if self.record:
            first = self._residual is None
            rows = {
                "ratio": [1.0, 1.0] if first else np.asarray(residual_ratio(r, self._residual)),
                "in": [0.0, 0.0] if first or h is None else np.asarray(rel_l1(h, self._h)),
                "out": [0.0, 0.0] if first else np.asarray(rel_l1(r, self._residual)),
            }
            for key, dst in (("ratio", self.recorded), ("in", self.recorded_input), ("out", self.recorded_output)):
                a = np.asarray(rows[key], np.float64)
                n = a.shape[0] // 2  # rows: cond (B), uncond (B)
                dst["cond"].append(float(np.mean(a[:n])))
                dst["uncond"].append(float(np.mean(a[n:])))
            self._h = h
        self._residual = r
        self.computed += 1
        self.schedule += "C"
        return v

    def summary(self) -> str:
        n = self.computed + self.skipped
        speed = n / self.computed if self.computed else float("nan")
        return f"step cache: {self.computed} of {n} forwards computed, {self.skipped} skipped ({speed:.2f}x fewer)"


def fit_tea(rel_input: Sequence[dict], rel_output: Sequence[dict], experts, degree: int = 4) -> list[float]:
    """TeaCache's rescaling polynomial: least squares of the residual's relative L1 change on the modulated input's,
    over every recorded (run, branch, step) but each expert's first step; highest power first."""
    first = {experts.index(e) for e in set(experts)}
    xs, ys = [], []
    for ri, ro in zip(rel_input, rel_output):
        for b in BRANCHES:
            for i in range(len(experts)):
                if i not in first:
                    xs.append(ri[b][i])
                    ys.append(ro[b][i])
    degree = max(1, min(degree, len(set(xs)) - 1))
    return [float(c) for c in np.polyfit(np.asarray(xs), np.asarray(ys), degree)]


def calibration_from_runs(
    runs: Sequence[dict[str, list[float]]],
    timesteps,
    experts,
    *,
    steps,
    shift,
    boundary,
    solver,
    precision="bf16",
    rel_input: Sequence[dict] = (),
    rel_output: Sequence[dict] = (),
) -> CacheCalibration:
    """Average recorded ratio curves (`StepCache.recorded` of several runs) into a `CacheCalibration`; with the
    runs' ``recorded_input`` / ``recorded_output`` also TeaCache's fitted polynomial."""
    ratios = {b: np.mean([r[b] for r in runs], axis=0) for b in BRANCHES}
    std = {b: np.std([r[b] for r in runs], axis=0) for b in BRANCHES}
    tea = {}
    if rel_input and rel_output and len(experts) > 2:
        tea = {
            "coefficients": fit_tea(rel_input, rel_output, list(experts)),
            "rel_input": {b: [round(float(v), 6) for v in np.mean([r[b] for r in rel_input], 0)] for b in BRANCHES},
            "rel_output": {b: [round(float(v), 6) for v in np.mean([r[b] for r in rel_output], 0)] for b in BRANCHES},
        }
    return CacheCalibration(
        steps=int(steps),
        shift=float(shift),
        boundary=float(boundary),
        timesteps=[int(t) for t in timesteps],
        experts=list(experts),
        ratios={b: [round(float(v), 6) for v in ratios[b]] for b in BRANCHES},
        std={b: [round(float(v), 6) for v in std[b]] for b in BRANCHES},
        samples=len(runs),
        precision=precision,
        solver=solver,
        tea=tea,
    )
