"""Sampling settings (`GenerationConfig`) and the per-model defaults read from ``generation_config.json``.

A model directory may carry ``generation_config.json`` beside its weights (as Hugging Face models do) with the
settings the model was made for, e.g. the mini model's 17 frames at 128x128 and 20 steps. Every entry point (the
Python API, ``wanjax generate``, ``wanjax quantize``, ``wanjax eval``) resolves settings the same way:

    explicit argument  >  the model's generation_config.json  >  a diffusers layout's own files  >  official defaults

The diffusers layout's files are ``model_index.json`` (``boundary_ratio`` -> ``boundary``) and
``scheduler/scheduler_config.json`` (``flow_shift`` -> ``shift``), read by `read_diffusers_defaults`.

`GenerationConfig.validate` refuses settings that would run but give a wrong or empty result (NaN/Inf guidance or
shift, a frame count that is not 4n+1, ...); `apply_overrides` maps keyword arguments, including the diffusers names
(``num_inference_steps``, ``height``/``width``, ``guidance_scale``/``guidance_scale_2``), onto a config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import numpy as np

#: Name of the per-model defaults file inside a model directory.
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings; defaults are the official Wan2.2-I2V-A14B ones.

    ``guide_scale`` is ``(low-noise expert, high-noise expert)`` as the official config orders it; prefer the
    explicit names `guidance_low` / `guidance_high` when building one (`GenerationConfig.create`).
    """

    num_frames: int = 81
    max_area: Any = "480p"  # "480p" (480*832), "720p" (720*1280), "WxH" or an int area
    steps: int = 40
    shift: float = 5.0
    guide_scale: tuple[float, float] = (3.5, 3.5)  # (low-noise expert, high-noise expert), as the official config
    boundary: float = 0.900
    solver: str = "unipc"
    seed: int = 0
    fps: int = 16
    schedule: str = "official"  # the sigma grid: "official" (FlowUniPC's) or "lightning" (`lightning_schedule`)

    @property
    def guidance_low(self) -> float:
        """Guidance scale of the low-noise expert (t < boundary)."""
        return float(self.guide_scale[0])

    @property
    def guidance_high(self) -> float:
        """Guidance scale of the high-noise expert (t >= boundary)."""
        return float(self.guide_scale[1])

    @classmethod
    def create(
        cls, *, guidance_low: float | None = None, guidance_high: float | None = None, **fields
    ) -> "GenerationConfig":
        """Build from field names plus the explicit guidance names (``guidance_low``, ``guidance_high``); an
        unknown name raises a ``TypeError`` listing the valid ones."""
        _check_names(fields, extra=("guidance_low", "guidance_high"))
        gs = tuple(fields.pop("guide_scale", cls.guide_scale))
        gs = (gs[0] if guidance_low is None else guidance_low, gs[1] if guidance_high is None else guidance_high)
        return cls(guide_scale=(float(gs[0]), float(gs[1])), **fields)

    @classmethod
    def lightning(cls, base: "GenerationConfig | None" = None, **overrides) -> "GenerationConfig":
        """The Wan2.2-Lightning 4-step preset (`LIGHTNING`): 4 Euler steps on the Lightning sigma grid (shift 5,
        ``t = 1000, 937.5, 833.3, 625``), CFG off (guidance 1.0 for both experts: one forward per step), boundary
        0.9 (the high-noise expert for the first 2 steps, the low-noise one for the last 2). ``base`` (e.g. a
        model's ``generation_defaults``) gives the other settings (frames, size, seed, fps); ``overrides`` as
        `replace`. Use it with the Lightning LoRAs on both experts (``wanjax.lora.use_lightning``)."""
        return apply_overrides(apply_overrides(base if base is not None else cls(), LIGHTNING), overrides)

    @classmethod
    def preset(cls, name: str, base: "GenerationConfig | None" = None, **overrides) -> "GenerationConfig":
        """A named preset (`PRESETS`: ``"lightning"``) over ``base`` (default: the official defaults)."""
        if name not in PRESETS:
            raise ValueError(f"unknown generation preset {name!r}; expected one of {sorted(PRESETS)}")
        return apply_overrides(apply_overrides(base if base is not None else cls(), PRESETS[name]), overrides)

    def sigma_schedule(self, num_train_timesteps: int = 1000):
        """The `wanjax.sampling.FlowSchedule` these settings sample on: the official FlowUniPC grid
        (`wanjax.sampling.flow_schedule`) or, with ``schedule="lightning"``, `lightning_schedule`."""
        if self.schedule == "lightning":
            return lightning_schedule(self.steps, self.shift, num_train_timesteps)
        from wanjax.sampling.schedule import flow_schedule

        return flow_schedule(self.steps, shift=self.shift, num_train_timesteps=num_train_timesteps)

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike | None, **overrides) -> "GenerationConfig":
        """The official defaults, updated by a diffusers layout's ``boundary_ratio`` / ``flow_shift``
        (`read_diffusers_defaults`), then by ``model_dir``'s ``generation_config.json`` (if any), then by
        ``overrides`` (field names or ``guidance_low`` / ``guidance_high``; ``None`` values are ignored)."""
        fields = {}
        if model_dir is not None:
            fields.update(read_diffusers_defaults(model_dir))
            fields.update(read_generation_config(model_dir))
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls.create(**fields)

    def validate(self, source: str | None = None) -> "GenerationConfig":
        """Check every setting before any heavy work; return ``self`` or raise ``ValueError`` listing each problem.

        Refused: a frame count that is not ``4n + 1``; an unreadable or too small ``max_area``; ``steps < 1``; a
        non-finite or non-positive ``shift``; NaN/Inf guidance; ``boundary`` outside [0, 1]; an unknown solver; a
        non-integer seed; ``fps <= 0`` or non-finite. ``source`` (e.g. a file name) prefixes the message.
        """
        from wanjax.conditioning import max_area_from_size
        from wanjax.sampling.loop import SOLVERS

        problems = []

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def finite(v):
            return isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and math.isfinite(float(v))

        f = self.num_frames
        if not is_int(f) or f < 1 or (f - 1) % 4:
            lo = max(1, (int(f) - 1) // 4 * 4 + 1) if finite(f) and f >= 1 else 1
            problems.append(f"num_frames: expected 4n+1 (1, 5, ..., 81), got {f!r}; nearest valid: {lo} or {lo + 4}")
        try:
            max_area_from_size(self.max_area)
        except (ValueError, TypeError) as e:
            problems.append(f"max_area: {e}")
        if not is_int(self.steps) or self.steps < 1:
            problems.append(f"steps: expected an integer >= 1, got {self.steps!r}")
        if not finite(self.shift) or self.shift <= 0:
            problems.append(f"shift: expected a finite number > 0, got {self.shift!r}")
        gs = self.guide_scale
        if not (isinstance(gs, (tuple, list)) and len(gs) == 2):
            problems.append(f"guide_scale: expected (low, high), got {gs!r}")
        else:
            for name, g in (("guidance_low", gs[0]), ("guidance_high", gs[1])):
                if not finite(g):
                    problems.append(f"{name}: expected a finite number, got {g!r}")
        if not finite(self.boundary) or not 0.0 <= float(self.boundary) <= 1.0:
            problems.append(
                f"boundary: expected a number in [0, 1] (fraction of the 1000 training timesteps), got "
                f"{self.boundary!r}"
            )
        if self.solver not in SOLVERS:
            problems.append(f"solver: expected one of {sorted(SOLVERS)}, got {self.solver!r}")
        if not is_int(self.seed):
            problems.append(f"seed: expected an integer, got {self.seed!r}")
        if not finite(self.fps) or self.fps <= 0:
            problems.append(f"fps: expected a finite number > 0, got {self.fps!r}")
        if self.schedule not in SCHEDULES:
            problems.append(f"schedule: expected one of {list(SCHEDULES)}, got {self.schedule!r}")
        if problems:
            where = f"{source}: " if source else ""
            raise ValueError(
                f"{where}invalid generation setting{'s' if len(problems) > 1 else ''}: " + "; ".join(problems)
            )
        return self

    def replace(self, **overrides) -> "GenerationConfig":
        """A copy with ``overrides`` applied (field names, ``guidance_low`` / ``guidance_high``, or the diffusers
        names of `apply_overrides`); not validated."""
        return apply_overrides(self, overrides)

    def to_dict(self) -> dict:
        """JSON-ready fields (``guide_scale`` as a list)."""
        d = dataclasses.asdict(self)
        d["guide_scale"] = list(d["guide_scale"])
        return d

    def describe(self) -> str:
        """One line with the resolved settings, for the start of a long run."""
        return (
            f"{self.num_frames} frames, size {self.max_area}, {self.steps} steps ({self.solver}, shift "
            f"{self.shift:g}), guidance low {self.guidance_low:g} / high {self.guidance_high:g}, boundary "
            f"{self.boundary:g}, seed {self.seed}, {self.fps} fps"
            + ("" if self.schedule == "official" else f", {self.schedule} schedule")
        )


#: The sigma grids `GenerationConfig.sigma_schedule` knows.
SCHEDULES = ("official", "lightning")

#: Wan2.2-Lightning (ModelTC/Wan2.2-Lightning, I2V-A14B-4steps-lora-rank64-Seko-V1; ``wan/configs/wan_i2v_A14B.py``,
#: ``generate.py``): 4 steps, Euler (the distillation's solver), shift 5.0, guide scale (1.0, 1.0) (no CFG
#: forward), boundary 0.900; sigmas from ``linspace(1, 0, steps + 1)`` shifted (`lightning_schedule`).
LIGHTNING: dict[str, Any] = {
    "steps": 4,
    "shift": 5.0,
    "solver": "euler",
    "guide_scale": (1.0, 1.0),
    "boundary": 0.900,
    "schedule": "lightning",
}

#: Named presets of `GenerationConfig.preset`.
PRESETS: dict[str, dict[str, Any]] = {"lightning": LIGHTNING}


def lightning_schedule(num_steps: int = 4, shift: float = 5.0, num_train_timesteps: int = 1000):
    """The Lightning sigma grid (``wan/utils/fm_solvers_euler.py::EulerScheduler``): ``sigma = linspace(1, 0, N +
    1)`` shifted by ``shift s / (1 + (shift - 1) s)``; with 4 steps and shift 5: sigmas ``1, 0.9375, 0.8333, 0.625,
    0`` and timesteps ``1000, 937.5, 833.33, 625``. Unlike the official grid it starts at sigma 1 (not 0.999).

    Returns a `wanjax.sampling.FlowSchedule`; its ``timesteps`` are integers (the loop's contract), so
    ``floor(1000 sigma)``: ``1000, 937, 833, 625``: the Euler updates use the exact sigmas, the time embedding sees
    t rounded down by < 1 (the release feeds the float t)."""
    from wanjax.sampling.schedule import FlowSchedule, shift_sigmas

    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    base = np.linspace(1.0, 0.0, int(num_steps) + 1)
    shifted = shift_sigmas(base, shift)
    timesteps = np.floor(shifted[:-1] * num_train_timesteps + 1e-6).astype(np.int64)
    return FlowSchedule(
        sigmas=shifted.astype(np.float32),
        timesteps=timesteps,
        shift=float(shift),
        num_train_timesteps=int(num_train_timesteps),
    )


#: diffusers ``WanImageToVideoPipeline.__call__`` names accepted where they mean the same thing, and ours.
DIFFUSERS_ALIASES = {
    "num_inference_steps": "steps",
    "num_frames": "num_frames",
    "height": "max_area (height * width; the aspect ratio comes from the image)",
    "width": "max_area (height * width; the aspect ratio comes from the image)",
    "guidance_scale": "guidance_high (and guidance_low when guidance_scale_2 is not given)",
    "guidance_scale_2": "guidance_low",
}


def valid_names() -> tuple[str, ...]:
    """Every keyword `apply_overrides` accepts: the fields, the explicit guidance names and the diffusers names."""
    names = _field_names() + ("guidance_low", "guidance_high")
    return names + tuple(k for k in DIFFUSERS_ALIASES if k not in names)


_ALIAS_NOTE = (
    "diffusers names: num_inference_steps -> steps, height * width -> max_area, guidance_scale -> "
    "guidance_high (and guidance_low if guidance_scale_2 is absent), guidance_scale_2 -> guidance_low"
)


def apply_overrides(gen: GenerationConfig, overrides: dict, *, also_valid: tuple[str, ...] = ()) -> GenerationConfig:
    """``gen`` updated by keyword arguments: field names, ``guidance_low`` / ``guidance_high``, and the diffusers
    names that mean the same thing here:

    * ``num_inference_steps`` -> ``steps``;
    * ``height`` and ``width`` (both) -> ``max_area = height * width``. Unlike diffusers, which resizes the image to
      exactly ``height x width``, the output keeps the input image's aspect ratio: both sides are multiples of 16,
      rounded down, with ``h * w <= height * width`` (as the official code and ``--size``);
    * ``guidance_scale`` -> the high-noise expert's scale (diffusers' ``transformer``, ``t >= boundary``) and, when
      ``guidance_scale_2`` is absent, the low-noise one too (diffusers: "If None ... uses the same value as
      guidance_scale");
    * ``guidance_scale_2`` -> the low-noise expert's scale (diffusers' ``transformer_2``).

    ``None`` values are ignored (as unset). An unknown name, or one setting given twice under two names (``steps``
    and ``num_inference_steps``, ``guidance_high`` and ``guidance_scale``, ...), raises ``TypeError`` listing the
    valid names (plus ``also_valid``, the caller's other keywords, in the message). The result is not validated
    (`GenerationConfig.validate`).
    """
    kw = {k: v for k, v in overrides.items() if v is not None}
    valid = valid_names()
    bad = sorted(k for k in kw if k not in valid)
    if bad:
        raise TypeError(f"unknown argument(s) {bad}; valid names: {', '.join(also_valid + valid)} ({_ALIAS_NOTE})")

    def take(ours: str, theirs: str):
        if ours in kw and theirs in kw:
            raise TypeError(
                f"both {ours}={kw[ours]!r} and {theirs}={kw[theirs]!r} given; they set the same thing, pass one"
            )
        return kw.pop(theirs) if theirs in kw else kw.pop(ours, None)

    steps = take("steps", "num_inference_steps")
    if steps is not None:
        kw["steps"] = steps
    h, w = kw.pop("height", None), kw.pop("width", None)
    if (h is None) != (w is None):
        raise TypeError(f"height and width go together (max_area = height * width), got height={h!r}, width={w!r}")
    if h is not None:
        if "max_area" in kw:
            raise TypeError(
                f"both max_area={kw['max_area']!r} and height/width given; they set the same thing, pass one"
            )
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (h, w)):
            raise ValueError(f"height and width: expected positive integers, got height={h!r}, width={w!r}")
        kw["max_area"] = int(h) * int(w)
    g_high = take("guidance_high", "guidance_scale")
    g_low = take("guidance_low", "guidance_scale_2")
    if "guidance_scale" in overrides and overrides["guidance_scale"] is not None and g_low is None:
        g_low = g_high  # diffusers: guidance_scale_2 defaults to guidance_scale
    gs = kw.pop("guide_scale", None)
    if gs is not None:
        if g_low is not None or g_high is not None:
            raise TypeError(
                "guide_scale=(low, high) together with guidance_low/guidance_high/guidance_scale; pass "
                "either the pair or the explicit names"
            )
        if isinstance(gs, (int, float)) and not isinstance(gs, bool):
            gs = (gs, gs)
        if not (isinstance(gs, (tuple, list)) and len(gs) == 2):
            raise ValueError(f"guide_scale: expected (low-noise, high-noise) or one number, got {gs!r}")
        g_low, g_high = gs
    low = gen.guide_scale[0] if g_low is None else g_low
    high = gen.guide_scale[1] if g_high is None else g_high
    return dataclasses.replace(gen, guide_scale=(_num(low), _num(high)), **kw)


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v  # left for validate() to name


def read_diffusers_defaults(model_dir: str | os.PathLike) -> dict:
    """Settings a diffusers Wan2.2 I2V directory carries: ``model_index.json``'s ``boundary_ratio`` (-> ``boundary``)
    and ``scheduler/scheduler_config.json``'s ``flow_shift`` (-> ``shift``); ``{}`` where absent. A malformed
    file or a non-finite / out-of-range value raises ``ValueError`` naming the file and key."""
    out: dict[str, Any] = {}
    d = os.fspath(model_dir)
    for rel, key, field in (
        ("model_index.json", "boundary_ratio", "boundary"),
        (os.path.join("scheduler", "scheduler_config.json"), "flow_shift", "shift"),
    ):
        path = os.path.join(d, rel)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable JSON file: {e}") from e
        v = raw.get(key) if isinstance(raw, dict) else None
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{path}: key {key!r}: expected a finite number, got {v!r}")
        if field == "boundary" and not 0.0 <= v <= 1.0:
            raise ValueError(f"{path}: key {key!r}: expected a number in [0, 1], got {v!r}")
        if field == "shift" and v <= 0:
            raise ValueError(f"{path}: key {key!r}: expected a number > 0, got {v!r}")
        out[field] = float(v)
    return out


def _field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(GenerationConfig))


def _check_names(fields: dict, extra: tuple[str, ...] = ()) -> None:
    valid = _field_names() + extra
    bad = sorted(k for k in fields if k not in valid)
    if bad:
        raise TypeError(f"unknown generation setting(s) {bad}; valid names: {', '.join(valid)}")


def read_generation_config(model_dir: str | os.PathLike) -> dict:
    """The settings in ``model_dir/generation_config.json`` as `GenerationConfig` field names (``{}`` if the file
    is absent). Accepts ``guidance_low`` / ``guidance_high`` and ``guide_scale`` (a number or a [low, high] pair).
    Unknown keys, non-finite numbers or a malformed file raise ``ValueError`` naming the file and key."""
    path = os.path.join(os.fspath(model_dir), GENERATION_CONFIG_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file: {e}") from e
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    out: dict[str, Any] = {}
    valid = _field_names() + ("guidance_low", "guidance_high")
    for k, v in raw.items():
        if k.startswith("_"):  # comments / provenance, e.g. "_note"
            continue
        if k not in valid:
            raise ValueError(f"{path}: unknown key {k!r}; expected some of {', '.join(valid)}")
        if k == "guide_scale":
            v = [v, v] if isinstance(v, (int, float)) else v
            if not (isinstance(v, list) and len(v) == 2):
                raise ValueError(f"{path}: key 'guide_scale': expected a number or [low, high], got {v!r}")
            v = tuple(float(g) for g in v)
        nums = v if isinstance(v, tuple) else (v,)
        if any(isinstance(n, float) and not math.isfinite(n) for n in nums):
            raise ValueError(f"{path}: key {k!r}: expected a finite number, got {v!r}")
        out[k] = v
    return out
