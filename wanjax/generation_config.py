"""Sampling settings (`GenerationConfig`) and the per-model defaults read from ``generation_config.json``.

A model directory may carry ``generation_config.json`` beside its weights (as Hugging Face models do) with the
settings the model was made for, e.g. the mini model's 17 frames at 128x128 and 20 steps. Every entry point (the
Python API, ``wanjax generate``, ``wanjax quantize``, ``wanjax eval``) resolves settings the same way:

    explicit argument  >  the model's generation_config.json  >  the official Wan2.2-I2V-A14B defaults
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

#: Name of the per-model defaults file inside a model directory.
GENERATION_CONFIG_FILE = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings; defaults are the official Wan2.2-I2V-A14B ones.

    ``guide_scale`` is ``(low-noise expert, high-noise expert)`` as the official config orders it; prefer the
    explicit names `guidance_low` / `guidance_high` when building one (`GenerationConfig.create`).
    """

    num_frames: int = 81
    max_area: Any = "480p"            # "480p" (480*832), "720p" (720*1280), "WxH" or an int area
    steps: int = 40
    shift: float = 5.0
    guide_scale: tuple[float, float] = (3.5, 3.5)   # (low-noise expert, high-noise expert), as the official config
    boundary: float = 0.900
    solver: str = "unipc"
    seed: int = 0
    fps: int = 16

    @property
    def guidance_low(self) -> float:
        """Guidance scale of the low-noise expert (t < boundary)."""
        return float(self.guide_scale[0])

    @property
    def guidance_high(self) -> float:
        """Guidance scale of the high-noise expert (t >= boundary)."""
        return float(self.guide_scale[1])

    @classmethod
    def create(cls, *, guidance_low: float | None = None, guidance_high: float | None = None,
               **fields) -> "GenerationConfig":
        """Build from field names plus the explicit guidance names (``guidance_low``, ``guidance_high``); an
        unknown name raises a ``TypeError`` listing the valid ones."""
        _check_names(fields, extra=("guidance_low", "guidance_high"))
        gs = tuple(fields.pop("guide_scale", cls.guide_scale))
        gs = (gs[0] if guidance_low is None else guidance_low, gs[1] if guidance_high is None else guidance_high)
        return cls(guide_scale=(float(gs[0]), float(gs[1])), **fields)

    @classmethod
    def for_model(cls, model_dir: str | os.PathLike | None, **overrides) -> "GenerationConfig":
        """The official defaults, updated by ``model_dir``'s ``generation_config.json`` (if any), then by
        ``overrides`` (field names or ``guidance_low`` / ``guidance_high``; ``None`` values are ignored)."""
        fields = read_generation_config(model_dir) if model_dir is not None else {}
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls.create(**fields)

    def to_dict(self) -> dict:
        """JSON-ready fields (``guide_scale`` as a list)."""
        d = dataclasses.asdict(self)
        d["guide_scale"] = list(d["guide_scale"])
        return d

    def describe(self) -> str:
        """One line with the resolved settings, for the start of a long run."""
        return (f"{self.num_frames} frames, size {self.max_area}, {self.steps} steps ({self.solver}, shift "
                f"{self.shift:g}), guidance low {self.guidance_low:g} / high {self.guidance_high:g}, boundary "
                f"{self.boundary:g}, seed {self.seed}, {self.fps} fps")


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
        if k.startswith("_"):                     # comments / provenance, e.g. "_note"
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
