"""Streamed, resumable quantization: capture and quantize block group by block group, then assemble the artifact.

    from wanjax.quant.stream import calib_config, quantize_streamed
    cfg = calib_config("default", gen, budget="fast")
    res = quantize_streamed(pipe, samples, "default", "q_default", cfg=cfg, work_dir="q_default.calib",
                            deadline=time.time() + 540)          # stop cleanly between units at the deadline
    while not res.done:                                          # (another process, another day: same call)
        res = quantize_streamed(pipe, samples, "default", "q_default", cfg=cfg, work_dir="q_default.calib")

``wanjax quantize --calib`` runs this. The work, in units that are each saved to ``work_dir`` when done (written to
a temporary name and renamed) and skipped when a run is resumed:

1. **trajectories**: per sample, the sampler's latents at every step (`wanjax.quant.calibrate`, ``traj/``);
2. per **block group** ``g`` (``CalibConfig.blocks_per_group`` blocks; 10 = 4 groups of I2V-A14B):

   a. **capture**: per expert the group still needs and per timestep bin, the statistics of the group's layer
      inputs over every sample (`calibrate.GroupCapture`, the code ``calibrate(mode="stream")`` runs:
      ``stats/<expert>.blocksAAA-BBB.<bin>.npz``). A run stopped by its ``deadline`` inside a unit saves the
      accumulators after the last whole sample (``quant/partial/``) and continues from there;
   b. **quantize**: per expert and block Linear path, the recipe (`wanjax.quant.quantize.quantize_layer`: its
      transforms, `pack_layer`, the table search) on blocks ``g0..g1-1`` (``quant/units/<expert>.blocksAAA-BBB.
      <path>.npz``: the packed arrays stacked over the group's blocks, the layer config, the SQNR per block and
      bin);
   c. the group's statistics are deleted (``keep_calib=False``), so at most one group of statistics (both experts
      for a recipe with ``calibration="shared"``) is on disk at a time;

3. **assemble**: per expert, its quantized model (the units of every group + the expert's 16-bit layers) is
   written into ``quant/staging/`` (`wanjax.quant.artifact.write_expert_file`) and its units deleted; then the
   manifest, and the staging dir is renamed to ``out``. ``out`` is never half-written: it appears complete or not
   at all.

The artifact is the one ``calibrate`` + ``quantize`` + ``save_artifact`` write from the same statistics (the same
capture code and keys, the same per-layer quantization; tested bitwise equal on the mini model), and a run
interrupted anywhere and resumed gives the same artifact.

What is held where (I2V-A14B, dim 5120, ffn 13,824, 40 blocks): the device holds one expert (28.6 GB bf16; the
pipeline's ``expert_placement="swap"`` keeps the other in host memory), the group's accumulators (reservoirs
``n x 39,424`` bf16 per block and bin: 1.6 GB for 10 blocks at n = 2048; no Hessian for recipes that build theirs
from the sampled rows, as ``default`` does: `needs_captured_hessian`) and one layer's quantization (a 13,824 x
13,824 f32 Hessian is 0.76 GB). Disk: the trajectories (362 MB per sample at 81 frames 480p), one group's statistics
(2 experts x 3 bins x 10 blocks x 161 MB = 9.7 GB at n = 2048), the quantized units (7.4 GB per expert) and, while
assembling, one expert file at a time (7.9 GB) whose units are deleted as soon as it is written.

Calibration budgets (`BUDGETS`, ``--calib-budget``): ``seed`` (every sample given, every step of every bin: the
seed's 12 samples x 40 steps) and ``fast`` (the first 4 samples, 2 steps per bin), with the costs in
docs/QUANTIZATION.md ("Full size").
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import shutil
import time
from typing import Callable, Sequence

import jax
import numpy as np
from flax import nnx

from wanjax.io.atomic import atomic_write, make_temp_dir, publish_dir, write_json_atomic
from wanjax.quant import calibrate as qc
from wanjax.quant.apply import BLOCK_LINEARS, get_submodule, quantize_model
from wanjax.quant.bins import EXPERTS, TimestepBins
from wanjax.quant.fuse import layer_units
from wanjax.quant.qlinear import QLinear, QLinearConfig
from wanjax.quant.recipes import Recipe, get_recipe, recipe_to_dict
from wanjax.quant.stats import ALL_BINS, CONTEXT_NAME, load_stats, save_stats, to_host

__all__ = [
    "BUDGETS",
    "CalibBudget",
    "StreamResult",
    "calib_config",
    "needs_captured_hessian",
    "quantize_streamed",
    "sqnr_summary",
]

STREAM_FORMAT = "wanjax.quant_stream/1"
UNIT_FORMAT = "wanjax.quant_unit/1"


# ------------------------------------------------------------------------------------------------ budgets
@dataclasses.dataclass(frozen=True)
class CalibBudget:
    """How much calibration a quantization runs.

    Attributes:
      name: preset name.
      samples: use the first ``samples`` calibration samples (0: all given).
      steps_per_bin: capture this many recorded steps per timestep bin and sample (0: all; `CalibConfig
        .steps_per_bin`). Trajectories always run the whole schedule.
      reservoir: sampled input rows kept per (expert, layer input, bin): the rows GPTQ's Hessian, the smoothing,
        the low-rank search and the clip search see.
    """

    name: str
    samples: int = 0
    steps_per_bin: int = 0
    reservoir: int = 2048

    def __post_init__(self):
        if self.samples < 0 or self.steps_per_bin < 0 or self.reservoir < 1:
            raise ValueError(
                f"CalibBudget {self.name!r}: samples and steps_per_bin must be >= 0 and reservoir >= 1, got "
                f"{self.samples}, {self.steps_per_bin}, {self.reservoir}"
            )

    def select(self, samples: Sequence) -> list:
        """The samples this budget calibrates on (the first ``samples`` of them)."""
        samples = list(samples)
        return samples[: self.samples] if self.samples else samples


#: ``seed``: every sample given (the seed: 12) and every step of the 40-step schedule in every bin; ``fast``: the
#: first 4 samples and 2 steps per bin (12 of 40 steps): 1/3 of the samples and 30 % of the captured steps, about
#: 1/6 of the capture forwards at full size (docs/QUANTIZATION.md, "Full size", has its PSNR cost on the mini model).
BUDGETS = {
    "seed": CalibBudget("seed"),
    "fast": CalibBudget("fast", samples=4, steps_per_bin=2),
}


def get_budget(budget) -> CalibBudget:
    if isinstance(budget, CalibBudget):
        return budget
    if budget not in BUDGETS:
        raise KeyError(f"unknown calibration budget {budget!r}; expected one of {sorted(BUDGETS)} or a CalibBudget")
    return BUDGETS[budget]


def needs_captured_hessian(recipe) -> bool:
    """Whether ``recipe`` reads a captured ``X^T X`` (``GPTQ(hessian="raw" | "captured")``); the others build their
    Hessian from the sampled rows, so calibration need not collect one (it is most of the statistics' size)."""
    return any(getattr(t, "hessian", None) in ("raw", "captured") for t in get_recipe(recipe).transforms)


def calib_config(recipe, gen=None, budget="seed", **overrides) -> qc.CalibConfig:
    """The calibration settings a streamed quantization with ``recipe`` uses: a Hessian only when the recipe reads
    one (one per expert, ``hessian_per_bin=False``: GPTQ sums the bins anyway), the budget's reservoir and steps per
    bin; ``overrides`` go to `CalibConfig` (e.g. ``blocks_per_group``)."""
    b = get_budget(budget)
    kw = dict(
        gen=gen,
        hessian=needs_captured_hessian(recipe),
        hessian_per_bin=False,
        reservoir=b.reservoir,
        steps_per_bin=b.steps_per_bin,
    )
    kw.update(overrides)
    return qc.CalibConfig(**kw)


def sqnr_summary(reports: dict) -> dict:
    """``{expert: {path: [mean SQNR dB per bin]}}`` (rounded to 0.01), the ``mean_sqnr_db_per_bin`` of an artifact's
    report (as ``wanjax quantize`` writes it)."""
    return {
        e: {p: [round(float(v), 2) for v in np.asarray(s).mean(axis=0)] for p, s in r["sqnr_db"].items()}
        for e, r in reports.items()
    }


# ------------------------------------------------------------------------------------------------ results
@dataclasses.dataclass
class StreamResult:
    """What `quantize_streamed` did.

    Attributes:
      done: the artifact is published at ``out``.
      out: its path (None unless done).
      reports: ``{expert: {"expert", "recipe", "sqnr_db": {path: [L, B]}}}`` as `quantize` returns (None unless
        done).
      bins: the timestep bins.
      units: the units this call finished: ``{"kind", "unit", "seconds", "end"}`` (``kind``: trajectory, capture,
        quantize, assemble, publish).
      stopped: why the call returned early (``"deadline"``), else None.
      remaining: work left when it stopped (``{"trajectory": n, "capture": n, "quantize": n, "assemble": n}``).
    """

    done: bool
    out: str | None
    reports: dict | None
    bins: TimestepBins
    units: list
    stopped: str | None = None
    remaining: dict | None = None


class _Stop(Exception):
    """The deadline leaves no room for the next unit."""


class _Clock:
    """The deadline and the duration of each kind of unit, as last measured (kept in the work dir, so that a
    resumed run knows how long a unit takes before it runs one)."""

    def __init__(self, deadline: float | None, path: str, estimates: dict | None = None):
        self.deadline, self.path = deadline, path
        self.times = dict(estimates or {})
        if os.path.isfile(path):
            with contextlib.suppress(OSError, ValueError):
                with open(path) as f:
                    self.times.update(json.load(f))

    def check(self, key: str, scale: float = 1.0) -> None:
        """Raise `_Stop` unless the unit ``key`` (its last duration times ``scale``) ends before the deadline; a unit
        never measured starts if the deadline has not passed."""
        if self.deadline is None:
            return
        est = self.times.get(key)
        if time.time() + (0.0 if est is None else est * scale) > self.deadline:
            raise _Stop(key)

    def record(self, key: str, seconds: float) -> None:
        self.times[key] = float(seconds)
        write_json_atomic(self.path, self.times, indent=1, fsync=False)


# ------------------------------------------------------------------------------------------------ unit files
def _encode(a) -> tuple[np.ndarray, str]:
    from wanjax.quant.artifact import _encode as enc

    return enc(a)


def _decode(a: np.ndarray, name: str) -> np.ndarray:
    from wanjax.quant.artifact import _decode as dec

    return dec(a, name)


def _unit_id(expert: str, g0: int, g1: int, path: str) -> str:
    return f"{expert}.blocks{g0:03d}-{g1 - 1:03d}.{path}"


def _save_unit(path: str, header: dict, arrays: dict, sqnr: np.ndarray) -> None:
    data, dtypes = {}, {}
    for name, a in arrays.items():
        if a is None:
            dtypes[name] = None
            continue
        data[f"a.{name}"], dtypes[name] = _encode(a)
    head = dict(header, format=UNIT_FORMAT, dtypes=dtypes)
    data["sqnr"] = np.asarray(sqnr)  # as the quantizer returned it (float64 on the host): reports equal quantize()'s
    data["__header__"] = np.frombuffer(json.dumps(head).encode(), np.uint8)
    with atomic_write(path, "wb") as f:
        np.savez(f, **data)


def _load_unit(path: str) -> tuple[dict, dict, np.ndarray]:
    with np.load(path) as z:
        head = json.loads(bytes(z["__header__"]).decode())
        if head.get("format") != UNIT_FORMAT:
            raise ValueError(f"{path}: not a quantized unit (format {head.get('format')!r}, expected {UNIT_FORMAT})")
        arrays = {n: (None if dt is None else _decode(z[f"a.{n}"], dt)) for n, dt in head["dtypes"].items()}
        sqnr = np.asarray(z["sqnr"])
    return head, arrays, sqnr


# ------------------------------------------------------------------------------------------------ the run
class _Run:
    def __init__(
        self, pipe, samples, recipe: Recipe, out, cfg, work_dir, keep_calib, deadline, progress, on_unit, estimates
    ):
        self.pipe, self.samples, self.recipe, self.out, self.cfg = pipe, samples, recipe, out, cfg
        self.work_dir, self.keep_calib, self.progress, self.on_unit = work_dir, keep_calib, progress, on_unit
        self.qdir = os.path.join(work_dir, "quant")
        self.unit_dir = os.path.join(self.qdir, "units")
        self.partial_dir = os.path.join(self.qdir, "partial")
        self.staging = os.path.join(self.qdir, "staging")
        self.entries = os.path.join(self.qdir, "staging.entries")
        for d in (self.unit_dir, self.partial_dir, self.staging, self.entries):
            os.makedirs(d, exist_ok=True)
        self.clock = _Clock(deadline, os.path.join(self.qdir, "timings.json"), estimates)
        self.groups = qc.block_groups(cfg, pipe.cfg.num_layers)
        self.shared = recipe.calibration == "shared"
        # the quantization units: every block Linear, or (fuse_qkv) the fused q/k/v as one unit at q's place
        self.qunits = layer_units(BLOCK_LINEARS, recipe.fuse_qkv)
        self.unit_paths = [u[0] for u in self.qunits]
        self.hacc = cfg.hessian and not cfg.hessian_per_bin
        self.traj = [qc.trajectory_path(work_dir, k) for k in range(len(samples))]
        self.units: list = []
        self.bar = None

    # ---- bookkeeping
    def _done(self, kind: str, unit: str, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.units.append({"kind": kind, "unit": unit, "seconds": dt, "end": time.time()})
        if self.on_unit is not None:
            self.on_unit(kind, unit, dt)

    def _begin(self, what: str) -> None:
        """Name the step now running on the bar."""
        if self.bar is not None:
            self.bar.set_postfix_str(what)

    def _tick(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def _stats_path(self, e, g0, g1, b) -> str:
        return os.path.join(self.work_dir, "stats", f"{qc.stats_unit_id(e, g0, g1, b)}.npz")

    def _unit_path(self, e, g0, g1, path) -> str:
        return os.path.join(self.unit_dir, f"{_unit_id(e, g0, g1, path)}.npz")

    def _partial_path(self, e, g0, g1) -> str:
        return os.path.join(self.partial_dir, f"{e}.blocks{g0:03d}-{g1 - 1:03d}.npz")

    def _entry_path(self, e) -> str:
        return os.path.join(self.entries, f"{e}.json")

    def _entry(self, e) -> dict | None:
        """Expert ``e``'s staged file entry, if its file is complete in the staging dir."""
        p = self._entry_path(e)
        if not os.path.isfile(p):
            return None
        with open(p) as f:
            rec = json.load(f)
        fpath = os.path.join(self.staging, rec["entry"]["file"])
        if not os.path.isfile(fpath) or os.path.getsize(fpath) != rec["size"]:
            return None
        return rec

    def _quant_missing(self, e, g0, g1) -> list[str]:
        return [p for p in self.unit_paths if not os.path.exists(self._unit_path(e, g0, g1, p))]

    def _group_done(self, g0, g1) -> bool:
        return all(self._entry(e) is not None or not self._quant_missing(e, g0, g1) for e in EXPERTS)

    def _needs_stats(self, e, g0, g1) -> bool:
        """Whether group ``(g0, g1)`` still needs expert ``e``'s statistics."""
        if self.shared:
            return any(self._entry(x) is None and self._quant_missing(x, g0, g1) for x in EXPERTS)
        return self._entry(e) is None and bool(self._quant_missing(e, g0, g1))

    def _bins_to_capture(self, e, g0, g1) -> list[str]:
        """The bins of expert ``e`` that group ``(g0, g1)`` still has to capture. With a per-expert Hessian (summed
        over the bins) every bin from the saved partial state's bin on (or every bin, without one) runs again until
        the Hessian is saved: bin files alone cannot rebuild it."""
        bins = list(self.cfg.bins.expert_bins(e))
        if self.hacc and not os.path.exists(self._stats_path(e, g0, g1, ALL_BINS)):
            p = self._partial_path(e, g0, g1)
            if os.path.exists(p):
                with np.load(p) as z:
                    start = int(json.loads(bytes(z["__header__"]).decode())["meta"]["bin_index"])
                return bins[start:]
            return bins
        return [b for b in bins if not os.path.exists(self._stats_path(e, g0, g1, b))]

    def remaining(self) -> dict:
        s = len(self.samples)
        out = {"trajectory": sum(not os.path.exists(p) for p in self.traj), "capture": 0, "quantize": 0}
        for g0, g1 in self.groups:
            for e in EXPERTS:
                if self._needs_stats(e, g0, g1):
                    out["capture"] += s * len(self._bins_to_capture(e, g0, g1))
                if self._entry(e) is None:
                    out["quantize"] += len(self._quant_missing(e, g0, g1))
        out["assemble"] = sum(self._entry(e) is None for e in EXPERTS) + 1
        return out

    # ---- expert placement
    def _resident(self) -> str | None:
        if getattr(self.pipe, "expert_placement", "device") == "swap":
            return getattr(self.pipe, "_resident", None)
        return None

    @contextlib.contextmanager
    def _on_device(self, e):
        """Expert ``e``'s parameters on the device for the duration (the pipeline's swap, or the idle expert moved
        to host memory as `calibrate` does)."""
        pipe = self.pipe
        if getattr(pipe, "expert_placement", "device") == "swap":
            yield pipe.expert_params(e)
            return
        other = "low" if e == "high" else "high"
        with qc._idle_expert_on_host(pipe, other, self.cfg.offload_idle_expert):
            yield qc._params(pipe, e)

    # ---- 1. trajectories
    def trajectories(self) -> None:
        for k, s in enumerate(self.samples):
            if os.path.exists(self.traj[k]):
                continue
            self.clock.check("trajectory")
            self._begin(f"trajectory {k + 1}/{len(self.samples)}")
            t0 = time.perf_counter()
            qc._record_sample(self.pipe, s, k, self.cfg, self.work_dir, progress=False)
            self.clock.record("trajectory", time.perf_counter() - t0)
            self._tick()
            self._done("trajectory", f"sample_{k:05d}", t0)

    # ---- 2a. capture
    def _save_partial(self, cap, e, g0, g1, bin_index, sample, accs, haccs) -> None:
        flat = {f"acc.{n}": to_host(st) for n, st in cap.collect(accs).items()}
        if haccs[0] is not None:
            flat.update({f"hacc.{n}": to_host(st) for n, st in cap.collect(haccs).items()})
        meta = dict(expert=e, g0=g0, g1=g1, bin_index=bin_index, sample=sample)
        save_stats(self._partial_path(e, g0, g1), flat, meta=meta)

    def _load_partial(self, cap, e, g0, g1):
        p = self._partial_path(e, g0, g1)
        if not os.path.exists(p):
            return None
        flat, meta = load_stats(p)
        accs = cap.split({n[4:]: st for n, st in flat.items() if n.startswith("acc.")})
        haccs = cap.haccs()
        if haccs[0] is not None:
            haccs = cap.split({n[5:]: st for n, st in flat.items() if n.startswith("hacc.")})
        return int(meta["bin_index"]), int(meta["sample"]), accs, haccs

    def capture(self, e, g0, g1) -> None:
        todo = self._bins_to_capture(e, g0, g1)
        if not todo:
            return
        cap = qc.GroupCapture(self.pipe, self.cfg, e, g0, g1)
        bins = list(self.cfg.bins.expert_bins(e))
        partial = self._load_partial(cap, e, g0, g1)
        haccs = partial[3] if partial is not None else cap.haccs()
        key = f"capture_step:{g0}"
        with self._on_device(e) as params:
            for bi, b in enumerate(bins):
                resume = partial is not None and bi == partial[0]
                if b not in todo and not resume:
                    continue
                accs, k0 = (partial[2], partial[1]) if resume else (cap.accs(), 0)
                n_steps = len(qc.captured_steps(self.cfg, b))
                t_unit = time.perf_counter()
                for k in range(k0, len(self.traj)):
                    try:
                        self.clock.check(key, n_steps)
                    except _Stop:
                        if k > 0 or haccs[0] is not None:  # something to keep
                            self._save_partial(cap, e, g0, g1, bi, k, accs, haccs)
                        raise
                    self._begin(f"capture {e} blocks {g0}-{g1 - 1} {b} sample {k + 1}/{len(self.traj)}")
                    t0 = time.perf_counter()
                    accs, haccs = cap.run(params, accs, haccs, self.traj[k], b)
                    jax.block_until_ready((accs, haccs))
                    self.clock.record(key, (time.perf_counter() - t0) / max(n_steps, 1))
                    self._tick()
                uid = qc.stats_unit_id(e, g0, g1, b)
                qc._save_unit(self.work_dir, uid, e, b, cap.collect(accs))
                del accs
                if haccs[0] is None:  # a partial state of this bin is obsolete now
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self._partial_path(e, g0, g1))
                    partial = None
                self._done("capture", uid, t_unit)
            if haccs[0] is not None:
                qc._save_unit(self.work_dir, qc.stats_unit_id(e, g0, g1, ALL_BINS), e, ALL_BINS, cap.collect(haccs))
        with contextlib.suppress(FileNotFoundError):
            os.remove(self._partial_path(e, g0, g1))

    def drop_stats(self, g0, g1) -> None:
        """Delete the group's statistics (``keep_calib``: keep them). The shared cross-attention k/v input
        (``context.cross_attn.kv``, captured with the first group and read by every block's k/v) moves to
        ``stats/<expert>.context.<bin>.npz`` until the last group is quantized."""
        if self.keep_calib:
            return
        last = g1 == self.groups[-1][1]
        for e in EXPERTS:
            for b in (*self.cfg.bins.expert_bins(e), ALL_BINS):
                p = self._stats_path(e, g0, g1, b)
                if g0 == 0 and not last and os.path.exists(p):
                    keep = os.path.join(self.work_dir, "stats", f"{e}.context.{b}.npz")
                    with np.load(p) as z:
                        names = json.loads(bytes(z["__header__"]).decode())["names"]
                    if CONTEXT_NAME in names:
                        st, meta = load_stats(p, [CONTEXT_NAME])
                        save_stats(keep, st, meta=meta)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
                if last:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(self.work_dir, "stats", f"{e}.context.{b}.npz"))
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._partial_path(e, g0, g1))

    # ---- 2b. quantize
    def _source(self):
        from wanjax.quant.quantize import CalibrationSource, SharedExpertSource

        src = CalibrationSource(qc.CalibStats(self.work_dir), self.cfg.bins)
        return _MemoSource(SharedExpertSource(src) if self.shared else src, self.shared)

    def quantize(self, e, g0, g1, src, paths) -> None:
        from wanjax.quant.quantize import quantize_unit

        model = nnx.merge(self.pipe.graphdef, qc._params(self.pipe, e))
        missing = self._quant_missing(e, g0, g1)
        for unit in [u for u in self.qunits if u[0] in paths and u[0] in missing]:
            path = unit[0]
            self.clock.check(f"quantize:{path}", g1 - g0)
            self._begin(f"quantize {e} blocks {g0}-{g1 - 1} {path}")
            t0 = time.perf_counter()
            config, per_layer, sqnr = None, [], []
            for l in range(g0, g1):
                cfg_l, arrays, info = quantize_unit(self.recipe, model, unit, src, index=l, expert=e)
                if config is not None and cfg_l != config:
                    raise ValueError(f"quantize_streamed: {path}: block {l} got config {cfg_l}, block {g0} {config}")
                config = cfg_l
                per_layer.append(jax.device_get(arrays))
                sqnr.append(np.asarray(info["sqnr_db"]))
            stacked = {
                n: None if per_layer[0][n] is None else np.stack([np.asarray(a[n]) for a in per_layer])
                for n in per_layer[0]
            }
            header = dict(expert=e, path=path, g0=g0, g1=g1, config=dataclasses.asdict(config))
            _save_unit(self._unit_path(e, g0, g1, path), header, stacked, np.stack(sqnr))
            dt = time.perf_counter() - t0
            self.clock.record(f"quantize:{path}", dt / (g1 - g0))
            self._tick()
            self._done("quantize", _unit_id(e, g0, g1, path), t0)

    # ---- 3. assemble
    def assemble(self, e) -> dict:
        from wanjax.quant.artifact import write_expert_file

        rec = self._entry(e)
        if rec is not None:
            return rec
        self.clock.check("assemble")
        self._begin(f"writing the {e}-noise expert")
        t0 = time.perf_counter()
        model = nnx.merge(self.pipe.graphdef, qc._params(self.pipe, e))
        qlayers, sqnr = {}, {}
        with jax.default_device(jax.devices("cpu")[0]):  # the quantized arrays stay in host memory
            for path, unit_parts in self.qunits:
                heads, parts, sq = [], [], []
                for g0, g1 in self.groups:
                    h, a, s = _load_unit(self._unit_path(e, g0, g1, path))
                    heads.append(h)
                    parts.append(a)
                    sq.append(s)
                configs = {json.dumps(h["config"], sort_keys=True) for h in heads}
                if len(configs) != 1:
                    raise ValueError(f"quantize_streamed: {e} {path}: the block groups' layer configs differ")
                config = QLinearConfig(**heads[0]["config"])
                arrays = {n: None if parts[0][n] is None else np.concatenate([p[n] for p in parts]) for n in parts[0]}
                del parts
                lin = get_submodule(model, unit_parts[0])
                qlayers[path] = QLinear(config, dtype=lin.dtype, mode="fake", path=path, **arrays)
                sqnr[path] = np.concatenate(sq)
            qmodel = quantize_model(model, qlayers, mode="fake")
            del qlayers
            entry = write_expert_file(self.staging, e, qmodel)
        del qmodel
        size = os.path.getsize(os.path.join(self.staging, entry["file"]))
        rec = {"entry": entry, "size": size, "sqnr_db": {p: s.tolist() for p, s in sqnr.items()}}
        write_json_atomic(self._entry_path(e), rec, indent=None)
        self.clock.record("assemble", time.perf_counter() - t0)
        if not self.keep_calib:
            for g0, g1 in self.groups:
                for path in self.unit_paths:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self._unit_path(e, g0, g1, path))
        self._tick()
        self._done("assemble", e, t0)
        return rec


class _MemoSource:
    """A statistics source that keeps the `LayerInputs` of the last layer input it read (every block of the group):
    q / k / v read one input, cross-attention k / v another, and with pooled statistics both experts read the same,
    so each is loaded from disk once per group instead of up to six times."""

    def __init__(self, src, shared: bool):
        self.src, self.shared = src, shared
        self.name, self.memo = None, {}

    def layer(self, expert: str, path: str, index: int):
        from wanjax.quant.stats import input_name

        name = input_name(path[len("blocks.") :] if path.startswith("blocks.") else path)
        if name != self.name:
            self.name, self.memo = name, {}
        key = (None if self.shared else expert, index)
        if key not in self.memo:
            self.memo[key] = self.src.layer(expert, path, index)
        return self.memo[key]


def _quant_manifest(work_dir: str, recipe: Recipe, restart: bool) -> None:
    """Record (or check) the recipe of the quantized units in ``work_dir/quant``."""
    qdir = os.path.join(work_dir, "quant")
    if restart:
        shutil.rmtree(qdir, ignore_errors=True)
    path = os.path.join(qdir, "manifest.json")
    with open(os.path.join(work_dir, "manifest.json"), "rb") as f:
        calib = hashlib.sha256(f.read()).hexdigest()
    want = json.loads(json.dumps({"format": STREAM_FORMAT, "recipe": recipe_to_dict(recipe), "calibration": calib}))
    if os.path.isfile(path):
        with open(path) as f:
            have = json.load(f)
        diff = qc._dict_diff({k: have.get(k) for k in ("format", "recipe")}, {k: want[k] for k in ("format", "recipe")})
        if diff:
            raise qc.CalibrationMismatchError(
                f"{work_dir}: its quantized units were made with another recipe ({'; '.join(diff[:4])}); resuming "
                "would mix them: pass restart=True (wanjax quantize --restart) to start over, or use another work dir"
            )
        if have.get("calibration") != calib:  # the calibration manifest was upgraded (same run): units still valid
            write_json_atomic(path, want, indent=1)
        return
    os.makedirs(qdir, exist_ok=True)
    write_json_atomic(path, want, indent=1)


def quantize_streamed(
    pipe,
    samples: Sequence,
    recipe,
    out: str | os.PathLike,
    *,
    work_dir: str | os.PathLike,
    cfg: qc.CalibConfig | None = None,
    keep_calib: bool = False,
    deadline: float | None = None,
    overwrite: bool = False,
    restart: bool = False,
    inputs: Sequence = (),
    before_publish: Callable[[str], dict | None] | None = None,
    progress: bool = True,
    on_unit: Callable[[str, str, float], None] | None = None,
    estimates: dict | None = None,
) -> StreamResult:
    """Calibrate and quantize ``pipe``'s two experts with ``recipe`` group by group into the artifact ``out``.

    Args:
      pipe: a `wanjax.pipeline.WanI2VPipeline` (BF16 experts; ``expert_placement="swap"`` keeps one on the device).
      samples: `wanjax.quant.calibrate.CalibSample` s (a budget's ``select`` picks its share).
      recipe: a recipe name or `Recipe`; ``GPTQ(hessian="captured")`` (a calibration with a ``hessian_transform``)
        is not streamed: calibrate, then `quantize` + `save_artifact`.
      out: the artifact directory; published only when complete (``overwrite`` replaces an existing one).
      work_dir: progress: the calibration's trajectories and statistics (`calibrate`'s layout) and ``quant/``
        (units, staging dir, timings). A second call with the same arguments continues where the first stopped;
        another recipe, samples or settings raise `wanjax.quant.calibrate.CalibrationMismatchError` (``restart``:
        discard it all and start over).
      cfg: calibration settings (default: `calib_config` of the recipe at the seed budget); both experts are
        calibrated whatever ``cfg.experts`` says. Stream mode only (``blocks_per_group`` = the unit size).
      keep_calib: keep each group's statistics and the quantized units (else deleted once used).
      deadline: ``time.time()`` by which to stop: a unit starts only if its last measured duration ends before
        it (a unit never measured starts while the deadline is ahead), and a capture stopped between samples saves
        its accumulators. The result then has ``done=False``; call again to continue.
      inputs: paths the artifact is made from: ``out`` must not be, contain or lie in any (nor ``work_dir``).
      before_publish: ``fn(staging_dir) -> dict | None`` called once the experts and the manifest are in the
        staging dir, before it is renamed to ``out`` (e.g. ``wanjax quantize``'s step-cache calibration, which
        loads the artifact from there and adds its file); a dict returned is merged into the manifest's report.
      progress: one tqdm bar over the remaining steps (trajectory samples, capture (bin, sample) passes, quantized
        (expert, group, path) units, expert files) with rate and ETA.
      on_unit: ``fn(kind, unit_id, seconds)`` after each unit is saved (``kind``: trajectory, capture, quantize,
        assemble, publish).
      estimates: seconds assumed for units not measured yet in this work dir, by the keys of
        ``quant/timings.json`` (``trajectory``, ``capture_step:<g0>`` per captured step, ``quantize:<path>`` per
        block, ``assemble``, ``publish``), so that a first unit that would overrun the deadline is not started.
    """
    from wanjax.io.atomic import check_not_overlapping
    from wanjax.quant.artifact import new_manifest, write_manifest

    recipe = get_recipe(recipe)
    if any(getattr(t, "hessian", None) == "captured" for t in recipe.transforms):
        raise ValueError(
            f"quantize_streamed: recipe {recipe.name!r} uses GPTQ(hessian='captured'), the Hessian of a calibration "
            "with a hessian_transform: calibrate() with it, then quantize() and save_artifact()"
        )
    cfg = (cfg or calib_config(recipe)).resolved()
    cfg = dataclasses.replace(cfg, experts=EXPERTS)
    if cfg.hessian_transform is not None:
        raise ValueError("quantize_streamed: a hessian_transform is not supported (calibrate() + quantize() instead)")
    if needs_captured_hessian(recipe) and not cfg.hessian:
        raise ValueError(
            f"quantize_streamed: recipe {recipe.name!r} reads a captured Hessian; calibrate with hessian=True"
        )
    samples = list(samples)
    if not samples:
        raise ValueError("quantize_streamed: no calibration samples")
    out = os.path.abspath(os.fspath(out))
    work_dir = os.path.abspath(os.fspath(work_dir))
    check_not_overlapping(out, work_dir, *inputs, what="artifact directory")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"quantize_streamed: {out} exists; pass overwrite=True to replace it")
    qc._write_manifest(work_dir, cfg, samples, pipe, restart=restart)
    _quant_manifest(work_dir, recipe, restart)
    run = _Run(pipe, samples, recipe, out, cfg, work_dir, keep_calib, deadline, progress, on_unit, estimates)
    left = run.remaining()
    if progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=sum(left.values()), desc=f"quantize ({recipe.name})", unit="step")
    try:
        run.trajectories()
        for g0, g1 in run.groups:
            if run._group_done(g0, g1):
                run.drop_stats(g0, g1)
                continue
            res = run._resident()
            order = sorted(EXPERTS, key=lambda x: x != res) if res else list(EXPERTS)
            for e in order:
                if run._needs_stats(e, g0, g1):
                    run.capture(e, g0, g1)
            src = run._source()
            for path in run.unit_paths:  # layer by layer, both experts: layers reading one input share its statistics
                for e in order:
                    if run._entry(e) is None:
                        run.quantize(e, g0, g1, src, (path,))
            run.drop_stats(g0, g1)
        recs = {e: run.assemble(e) for e in EXPERTS}
        run.clock.check("publish")
        run._begin("publishing")
        t0 = time.perf_counter()
        reports = {
            e: {"expert": e, "recipe": recipe.name, "sqnr_db": {p: np.asarray(s) for p, s in r["sqnr_db"].items()}}
            for e, r in recs.items()
        }
        with open(os.path.join(work_dir, "manifest.json")) as f:
            fp = json.load(f).get("model_fingerprint")
        if fp is not None:
            fp = {"method": fp["method"], "experts": {e: fp["experts"][e] for e in EXPERTS}}
        manifest = new_manifest(
            recipe=recipe_to_dict(recipe),
            bins=cfg.bins.to_dict(),
            report={"mean_sqnr_db_per_bin": sqnr_summary(reports)},
            model_fingerprint=fp,
        )
        for e in EXPERTS:
            manifest["experts"][e] = recs[e]["entry"]
        where = f"quantize_streamed({out})"
        manifest = write_manifest(run.staging, manifest, where)
        if before_publish is not None:
            extra = before_publish(run.staging)
            if extra:
                manifest["report"] = {**manifest["report"], **extra}
                write_manifest(run.staging, manifest, where)
        _publish(run.staging, out, inputs)
        shutil.rmtree(run.entries, ignore_errors=True)
        run._tick()
        run._done("publish", os.path.basename(out), t0)
    except _Stop:
        return StreamResult(False, None, None, cfg.bins, run.units, stopped="deadline", remaining=run.remaining())
    finally:
        if run.bar is not None:
            run.bar.close()
    return StreamResult(True, out, reports, cfg.bins, run.units)


def _publish(staging: str, out: str, inputs) -> None:
    """Rename the complete staging dir to ``out`` (copied beside ``out`` first when on another filesystem)."""
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    if os.stat(staging).st_dev != os.stat(parent).st_dev:
        tmp = make_temp_dir(out, "tmp")
        try:
            for name in os.listdir(staging):
                shutil.copy2(os.path.join(staging, name), os.path.join(tmp, name))
            publish_dir(tmp, out, inputs=inputs, what="artifact directory")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
        return
    publish_dir(staging, out, inputs=inputs, what="artifact directory")


def stream_units_on_disk(work_dir: str) -> dict:
    """Counts of what a streamed run's work dir holds (trajectories, statistics, quantized units, staged experts)."""
    return {
        "trajectories": len(glob.glob(os.path.join(work_dir, "traj", "*.npz"))),
        "stats": len(glob.glob(os.path.join(work_dir, "stats", "*.npz"))),
        "units": len(glob.glob(os.path.join(work_dir, "quant", "units", "*.npz"))),
        "staged": len(glob.glob(os.path.join(work_dir, "quant", "staging.entries", "*.json"))),
    }
