"""The official Wan2.2 flow-matching sigma schedule.

Reproduces ``FlowUniPCMultistepScheduler`` of the official code
(``Wan-Video/Wan2.2:wan/utils/fm_solvers_unipc.py``) as ``image2video.py`` builds it:
constructed with ``shift=1`` and shifted once in ``set_timesteps(steps, shift=shift)``.

* training sigmas ``1 - linspace(1, 1/T, T)[::-1]`` stored as float32, so
  ``sigma_max = float32(0.999)`` and ``sigma_min = 0``;
* inference sigmas ``linspace(sigma_max, sigma_min, N + 1)[:-1]`` (float64), then the shift
  ``shift * s / (1 + (shift - 1) * s)``, applied exactly once;
* timesteps ``(sigmas * T).astype(int64)``, i.e. **truncated** (not rounded);
* sigmas stored as float32 with a final ``0`` appended (``final_sigmas_type="zero"``).

Diffusers' ``UniPCMultistepScheduler(use_flow_sigmas=True)`` uses ``linspace(1, 1/T, N+1)`` instead,
which moves some timesteps by one and can change how many steps the high-noise expert gets.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = [
    "FlowSchedule",
    "official_sigma_max",
    "shift_sigmas",
    "flow_schedule",
    "num_high_noise_steps",
]


def official_sigma_max(num_train_timesteps: int = 1000) -> float:
    """``sigma_max`` of the official scheduler: the float32 value of ``1 - 1/T`` (0.999 for T=1000)."""
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    alphas = np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps)[::-1]
    return float(np.float32(1.0 - alphas[0]))


def shift_sigmas(sigmas, shift: float):
    """Flow shift ``shift * s / (1 + (shift - 1) * s)`` (identity for ``shift == 1``)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


@dataclasses.dataclass(frozen=True)
class FlowSchedule:
    """A sampling schedule.

    Attributes:
      sigmas: float32 [N + 1], decreasing, ``sigmas[N] == 0``. Step ``i`` goes from ``sigmas[i]`` to
        ``sigmas[i + 1]``.
      timesteps: int64 [N], the integer timestep given to the model at step ``i``
        (``int(sigmas_float64[i] * T)``, truncated).
      shift: the flow shift used.
      num_train_timesteps: T.
    """

    sigmas: np.ndarray
    timesteps: np.ndarray
    shift: float
    num_train_timesteps: int

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def is_high_noise(self, boundary: float = 0.900) -> np.ndarray:
        """bool [N]: True where the official code uses the high-noise expert (``t >= boundary * T``)."""
        return self.timesteps >= boundary * self.num_train_timesteps


def flow_schedule(num_steps: int, shift: float = 5.0, num_train_timesteps: int = 1000) -> FlowSchedule:
    """The official Wan2.2 FlowUniPC schedule for ``num_steps`` steps and flow ``shift``.

    With the defaults (40 steps, shift 5.0) the timesteps start
    ``[999, 994, 989, 983, ...]`` and end ``[..., 288, 208, 113]``; 15 of them are ``>= 900``.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift!r}")
    num_steps = int(num_steps)
    sigma_max = official_sigma_max(num_train_timesteps)
    base = np.linspace(sigma_max, 0.0, num_steps + 1)[:-1]
    shifted = shift_sigmas(base, shift)
    timesteps = (shifted * num_train_timesteps).astype(np.int64)
    sigmas = np.concatenate([shifted, [0.0]]).astype(np.float32)
    return FlowSchedule(
        sigmas=sigmas, timesteps=timesteps, shift=float(shift), num_train_timesteps=int(num_train_timesteps)
    )


def num_high_noise_steps(schedule: FlowSchedule, boundary: float = 0.900) -> int:
    """How many leading steps use the high-noise expert (timesteps are decreasing)."""
    return int(np.sum(schedule.is_high_noise(boundary)))
