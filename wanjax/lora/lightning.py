"""The Wan2.2-Lightning 4-step path: its two LoRAs (one per expert) and its schedule.

    gen = wanjax.lora.use_lightning(pipe, "Wan2.2-I2V-A14B-4steps-lora-rank64-Seko-V1/")
    out = pipe.generate("image.jpg", "a cat surfing", gen=gen)        # 4 forwards, no CFG

The release (ModelTC/Wan2.2-Lightning) ships ``high_noise_model.safetensors`` and ``low_noise_model.safetensors``
(keys ``diffusion_model.blocks.N.<layer>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, rank 64, float32),
merged by its loader as ``W + alpha / rank * up @ down`` at strength 1. The schedule is the preset
`wanjax.generation_config.GenerationConfig.lightning` (`LIGHTNING`: 4 Euler steps, shift 5, sigmas 1, 0.9375,
0.8333, 0.625, guidance 1.0 on both experts, boundary 0.9: high-noise expert for steps 0-1, low-noise for 2-3).
"""

from __future__ import annotations

import os

from wanjax.generation_config import LIGHTNING, GenerationConfig, lightning_schedule
from wanjax.lora.manager import apply_lora

__all__ = ["LIGHTNING", "LIGHTNING_FILES", "lightning_files", "lightning_schedule", "use_lightning"]

#: expert -> file name in the release directory
LIGHTNING_FILES = {"high": "high_noise_model.safetensors", "low": "low_noise_model.safetensors"}


def lightning_files(path: str | os.PathLike) -> dict[str, str]:
    """``{"high": ..., "low": ...}``: the two LoRA files of a Lightning release directory (or of a directory with
    ``*high*`` / ``*low*`` ``.safetensors``, as Kijai's ``..._HIGH_fp16`` / ``..._LOW_fp16`` copies are named).
    ``FileNotFoundError`` says what was found."""
    d = os.fspath(path)
    if not os.path.isdir(d):
        raise FileNotFoundError(f"{d}: not a directory (expected the Lightning LoRA directory with {LIGHTNING_FILES})")
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    out = {}
    for e, fname in LIGHTNING_FILES.items():
        if fname in files:
            out[e] = os.path.join(d, fname)
            continue
        hits = [f for f in files if e in f.lower() and ("high" if e == "low" else "low") not in f.lower()]
        if len(hits) != 1:
            raise FileNotFoundError(
                f"{d}: cannot tell the {e}-noise LoRA: expected {fname!r} or one file with {e!r} in its name, found "
                f"{files}"
            )
        out[e] = os.path.join(d, hits[0])
    return out


def use_lightning(
    pipe, loras: str | os.PathLike | dict | None = None, *, strength: float = 1.0, set_defaults: bool = True
) -> GenerationConfig:
    """Put the pipeline on the Lightning 4-step path: apply the two LoRAs (``loras``: a release directory, or
    ``{"high": path, "low": path}``; None when the experts already carry them, e.g. merged before quantization) and
    return the Lightning settings over the pipeline's own (frames, size, seed, fps kept). ``set_defaults`` also makes
    them ``pipe.generation_defaults``. Returns the `GenerationConfig` to pass as ``gen=``."""
    if loras is not None:
        files = loras if isinstance(loras, dict) else lightning_files(loras)
        unknown = sorted(set(files) - set(LIGHTNING_FILES))
        if unknown:
            raise ValueError(f"use_lightning: unknown expert(s) {unknown}; expected 'high' and 'low'")
        for e, f in files.items():
            apply_lora(pipe, f, expert=e, strength=strength, name=f"lightning-{e}")
    gen = GenerationConfig.lightning(pipe.generation_defaults)
    if set_defaults:
        pipe.generation_defaults = gen
    return gen
