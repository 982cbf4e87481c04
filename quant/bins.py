"""Timestep bins: per-expert intervals of the sampling schedule that index every per-bin quantization table.

A bin is a contiguous run of steps of ONE expert. Bins are cut by the step's fractional position
``r = idx / n_steps_of_that_expert`` inside that expert's own step list (the seed's rule, arXiv 2605.27003 code,
``shared/reference/seed_method_w4a4_wan22.md`` section 2.6), so they follow the actual schedule (steps, shift,
boundary). The default reproduces the seed's 6 bins::

    high_early   r < 0.33        boundary_post   r < 0.20
    high_mid     r < 0.66        low_mid         r < 0.70
    boundary_pre rest            low_late        rest

For 40 UniPC steps, shift 5, boundary 0.9 they hold 5/5/5 | 5/13/7 steps, timesteps 999-978, 972-944, 937-902 |
892-846, 833-555, 514-113. ``uniform`` cuts give any count per expert (``r < (j+1)/n``).

Look-up works for any timestep, on the host (`TimestepBins.index`) or inside jit (`TimestepBins.lookup`, a
comparison against a small table of lower edges): a timestep on the schedule maps to its bin exactly; one between
two bins goes to the bin above it; the expert boundary is respected (``t >= boundary * T`` only ever maps to a
high-noise bin).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["EXPERTS", "SEED_BIN_NAMES", "SEED_FRACTIONS", "TimestepBins", "make_bins", "seed_bins", "uniform_bins"]

EXPERTS = ("high", "low")

#: The seed's fractional cut points (r < cut opens the next bin) and names, per expert.
SEED_FRACTIONS = {"high": (0.33, 0.66), "low": (0.20, 0.70)}
SEED_BIN_NAMES = {"high": ("high_early", "high_mid", "boundary_pre"), "low": ("boundary_post", "low_mid", "low_late")}


@dataclasses.dataclass(frozen=True)
class TimestepBins:
    """Bins over one schedule, ordered by decreasing timestep (all high-noise bins first).

    Attributes:
      names: bin names, e.g. ``("high_early", ..., "low_late")``.
      experts: ``"high"``/``"low"`` per bin.
      steps: per bin, the step indices (into the schedule) it holds.
      t_max, t_min: per bin, the largest and smallest schedule timestep in it.
      lower: per bin, the lower edge used by look-up: ``t_min`` for a bin followed by one of the same expert,
        ``boundary * T`` for the last high-noise bin, ``-inf`` for the last bin.
      boundary_t: ``boundary * num_train_timesteps`` (the expert switch, ``t >= boundary_t`` is high noise).
    """

    names: tuple[str, ...]
    experts: tuple[str, ...]
    steps: tuple[tuple[int, ...], ...]
    t_max: tuple[int, ...]
    t_min: tuple[int, ...]
    lower: tuple[float, ...]
    boundary_t: float

    @property
    def num_bins(self) -> int:
        return len(self.names)

    def expert_bins(self, expert: str) -> tuple[str, ...]:
        """Names of ``expert``'s bins, in order."""
        _check_expert(expert)
        return tuple(n for n, e in zip(self.names, self.experts) if e == expert)

    def offset(self, expert: str) -> int:
        """Global index of ``expert``'s first bin."""
        _check_expert(expert)
        return self.experts.index(expert) if expert in self.experts else self.num_bins

    def bin_of_step(self, step: int) -> int:
        """Global bin index of schedule step ``step``."""
        for b, s in enumerate(self.steps):
            if step in s:
                return b
        raise ValueError(f"step {step} is in no bin (bins hold steps {self.steps})")

    def index(self, t) -> int:
        """Global bin index (host) of timestep ``t`` (any real value)."""
        return int(sum(float(t) < lo for lo in self.lower[:-1]))

    def name(self, t) -> str:
        """Bin name of timestep ``t``."""
        return self.names[self.index(t)]

    def lookup(self, t) -> jnp.ndarray:
        """Global bin index of ``t`` as an int32 array; traceable (``t`` may be a traced scalar or an array)."""
        lower = jnp.asarray(self.lower[:-1], jnp.float32)
        t = jnp.asarray(t, jnp.float32)
        return jnp.sum(t[..., None] < lower, axis=-1).astype(jnp.int32)

    def local_lookup(self, t) -> jnp.ndarray:
        """Bin index of ``t`` inside its own expert's bins (0 .. n_expert - 1); traceable."""
        g = self.lookup(t)
        off_low = self.offset("low")
        return jnp.where(g >= off_low, g - off_low, g).astype(jnp.int32)

    def table(self) -> list[dict]:
        """One dict per bin: name, expert, number of steps, timestep range (for reports and tests)."""
        return [
            dict(name=n, expert=e, steps=len(s), t_max=hi, t_min=lo)
            for n, e, s, hi, lo in zip(self.names, self.experts, self.steps, self.t_max, self.t_min)
        ]

    def to_dict(self) -> dict:
        """JSON-friendly form (saved beside calibration statistics)."""
        d = dataclasses.asdict(self)
        d["lower"] = [None if not np.isfinite(v) else v for v in self.lower]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TimestepBins":
        """Inverse of `to_dict`."""
        lower = tuple(-np.inf if v is None else float(v) for v in d["lower"])
        return cls(
            names=tuple(d["names"]),
            experts=tuple(d["experts"]),
            steps=tuple(tuple(int(i) for i in s) for s in d["steps"]),
            t_max=tuple(int(v) for v in d["t_max"]),
            t_min=tuple(int(v) for v in d["t_min"]),
            lower=lower,
            boundary_t=float(d["boundary_t"]),
        )


def _check_expert(expert):
    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {EXPERTS}, got {expert!r}")


def _split(n: int, cuts: Sequence[float]) -> list[int]:
    """Bin number (0..len(cuts)) of each of ``n`` steps by ``r = idx / n`` against increasing ``cuts``."""
    return [sum(i / n >= c for c in cuts) for i in range(n)]


def make_bins(
    schedule,
    fractions: dict[str, Sequence[float]],
    names: dict[str, Sequence[str]] | None = None,
    boundary: float = 0.900,
) -> TimestepBins:
    """Bins from per-expert fractional cut points.

    Args:
      schedule: a `wanjax.sampling.FlowSchedule` (its ``timesteps`` must be decreasing).
      fractions: ``{"high": cuts, "low": cuts}``, each increasing in (0, 1); an expert gets ``len(cuts) + 1`` bins,
        step ``idx`` (0-based inside the expert) going to bin ``#{c in cuts : idx / n >= c}``.
      names: optional bin names per expert (default ``"high_0"``, ...).
      boundary: expert switch (``t >= boundary * T`` -> high noise), as in the pipeline.

    Raises:
      ValueError: a bin would hold no step (too many bins for the schedule), bad cuts, or a non-decreasing schedule.
    """
    ts = np.asarray(schedule.timesteps, dtype=np.int64)
    if ts.ndim != 1 or ts.size == 0 or np.any(np.diff(ts) >= 0):
        raise ValueError(f"schedule timesteps must be a non-empty strictly decreasing 1-D list, got {ts.tolist()}")
    boundary_t = float(boundary) * int(schedule.num_train_timesteps)
    high = ts >= boundary_t
    out_names, out_experts, out_steps = [], [], []
    for expert in EXPERTS:
        cuts = [float(c) for c in fractions.get(expert, ())]
        if any(not 0.0 < c < 1.0 for c in cuts) or any(b <= a for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"fractions[{expert!r}] must be increasing values in (0, 1), got {cuts}")
        idx = np.flatnonzero(high if expert == "high" else ~high)
        if idx.size == 0:
            continue  # e.g. a schedule that never reaches the boundary: no bins for it
        nb = len(cuts) + 1
        nm = list(names[expert]) if names and expert in names else [f"{expert}_{j}" for j in range(nb)]
        if len(nm) != nb:
            raise ValueError(f"names[{expert!r}] has {len(nm)} names for {nb} bins")
        which = _split(idx.size, cuts)
        for j in range(nb):
            members = tuple(int(idx[i]) for i in range(idx.size) if which[i] == j)
            if not members:
                raise ValueError(
                    f"bin {nm[j]!r} of the {expert}-noise expert holds no step: {idx.size} steps of "
                    f"that expert cannot fill {nb} bins with cuts {cuts} (use fewer bins or more steps)"
                )
            out_names.append(nm[j])
            out_experts.append(expert)
            out_steps.append(members)
    if len(set(out_names)) != len(out_names):
        raise ValueError(f"bin names must be unique, got {out_names}")
    t_max = tuple(int(ts[s[0]]) for s in out_steps)
    t_min = tuple(int(ts[s[-1]]) for s in out_steps)
    lower = []
    for b in range(len(out_names)):
        if b == len(out_names) - 1:
            lower.append(-np.inf)
        elif out_experts[b + 1] != out_experts[b]:
            lower.append(boundary_t)
        else:
            lower.append(float(t_min[b]))
    return TimestepBins(
        names=tuple(out_names),
        experts=tuple(out_experts),
        steps=tuple(out_steps),
        t_max=t_max,
        t_min=t_min,
        lower=tuple(lower),
        boundary_t=boundary_t,
    )


def seed_bins(schedule, boundary: float = 0.900) -> TimestepBins:
    """The seed's 6 named bins (3 per expert) over ``schedule``."""
    return make_bins(schedule, SEED_FRACTIONS, SEED_BIN_NAMES, boundary)


def uniform_bins(schedule, per_expert: int | dict[str, int] = 3, boundary: float = 0.900) -> TimestepBins:
    """``per_expert`` equal fractional slices of each expert's steps (``r < (j+1)/n``); names ``high_0``, ``low_2``..."""
    counts = per_expert if isinstance(per_expert, dict) else {e: per_expert for e in EXPERTS}
    fr = {}
    for e in EXPERTS:
        n = int(counts.get(e, 1))
        if n < 1:
            raise ValueError(f"per_expert[{e!r}] must be >= 1, got {n}")
        fr[e] = tuple(j / n for j in range(1, n))
    return make_bins(schedule, fr, boundary=boundary)
