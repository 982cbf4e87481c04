"""Calibration statistics of one linear-layer input, accumulated over calls: the `LayerStats` pytree.

Per (expert, layer input, timestep bin) calibration keeps:

* ``absmax`` [K] f32 - per-input-channel max |x| (smoothing);
* ``hessian`` [K, K] f32 - the sum ``X^T X`` over all rows (GPTQ; divide by ``count`` for the seed's mean), or
  ``None`` when not collected; ``count`` - rows summed into ``absmax``/``hessian``;
* ``samples`` [n, K] - a bounded uniform reservoir sample of input rows (clip search), in the inputs' dtype, and
  ``seen`` - how many candidate rows were offered to it. Each call first takes ``rows_per_call`` rows on a uniform
  stride (the seed takes <= 4096 per hook call), then offers them to the reservoir (Algorithm R; a vectorised form
  where, for two candidates drawing the same slot, the later one wins exactly as the sequential algorithm).

`update_stats` is pure and jit-friendly (the random draw is keyed by the caller's key and ``seen``, so the same
sequence of calls gives the same sample whatever the program layout). `merge_stats` combines two accumulators
exactly (the reservoir merge draws how many rows come from each side hypergeometrically). `save_stats` /
`load_stats` store a ``{name: LayerStats}`` dict as one ``.npz`` file, written atomically (temp file, then rename);
a Hessian is stored as its upper triangle and read back symmetric (the lower triangle mirrors the upper one).

Names of the calibrated inputs (`stat_name`: ``"blocks.3.self_attn.qkv"``, ``"blocks.3.ffn.fc2"``,
``"context.cross_attn.kv"``) and `CalibStats`, the lazy reader over a calibration directory written by
`wanjax.quant.calibrate.calibrate`, live here too.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from wanjax.io.atomic import atomic_write
from wanjax.model.names import BLOCK_LINEAR_NAMES
from wanjax.quant.bins import TimestepBins

__all__ = [
    "LayerStats",
    "init_stats",
    "update_stats",
    "merge_stats",
    "hessian_mean",
    "stride_rows",
    "save_stats",
    "load_stats",
    "to_host",
    "CONTEXT_NAME",
    "ALL_BINS",
    "input_name",
    "stat_name",
    "CalibStats",
]

F32 = jnp.float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Accumulated statistics of one layer input (see the module docstring). ``hessian``/``samples`` may be None."""

    absmax: jax.Array
    count: jax.Array
    hessian: jax.Array | None
    samples: jax.Array | None
    seen: jax.Array

    @property
    def in_features(self) -> int:
        return int(self.absmax.shape[-1])

    @property
    def num_samples(self) -> int:
        """Rows of the reservoir actually filled."""
        if self.samples is None:
            return 0
        return int(min(int(self.seen), self.samples.shape[0]))


def init_stats(k: int, *, hessian: bool = True, reservoir: int = 0, sample_dtype=jnp.float32) -> LayerStats:
    """Empty accumulator for inputs with ``k`` channels; ``reservoir`` rows of sample (0: none)."""
    if k < 1 or reservoir < 0:
        raise ValueError(f"init_stats: need k >= 1 and reservoir >= 0, got k={k}, reservoir={reservoir}")
    return LayerStats(
        absmax=jnp.zeros((k,), F32),
        count=jnp.zeros((), jnp.int32),
        hessian=jnp.zeros((k, k), F32) if hessian else None,
        samples=jnp.zeros((reservoir, k), sample_dtype) if reservoir else None,
        seen=jnp.zeros((), jnp.int32),
    )


def stride_rows(m: int, rows_per_call: int) -> np.ndarray:
    """Indices of ``min(m, rows_per_call)`` rows on a uniform stride over ``m`` rows (all rows if ``rows_per_call``
    is 0 or >= m), as the seed's ``linspace`` sampling."""
    if rows_per_call <= 0 or rows_per_call >= m:
        return np.arange(m)
    return np.floor(np.linspace(0, m - 1, rows_per_call)).astype(np.int64)


def _gram(x: jax.Array) -> jax.Array:
    """``x^T x`` in f32: bf16 operands give exact products with f32 accumulation; f32 runs at full precision."""
    if x.dtype == jnp.bfloat16:
        return jnp.dot(x.T, x, preferred_element_type=F32)
    x = x.astype(F32)
    return jnp.dot(x.T, x, precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)


def _reservoir(samples, seen, cand, key):
    n, m = samples.shape[0], cand.shape[0]
    j = seen + jnp.arange(m, dtype=jnp.int32)  # global index of each candidate
    r = jax.random.randint(key, (m,), 0, j + 1, dtype=jnp.int32)  # uniform in [0, j]
    slot = jnp.where(j < n, j, jnp.where(r < n, r, n))  # n = dropped
    winner = jax.ops.segment_max(jnp.arange(m, dtype=jnp.int32), slot, num_segments=n + 1)[:n]
    take = winner >= 0
    new = jnp.where(take[:, None], cand[jnp.clip(winner, 0, m - 1)].astype(samples.dtype), samples)
    return new, seen + m


def update_stats(
    st: LayerStats,
    x: jax.Array,
    key: jax.Array | None = None,
    *,
    rows_per_call: int = 0,
    hessian_x: jax.Array | None = None,
) -> LayerStats:
    """Add the rows of ``x`` [..., K] to ``st``; pure (returns a new accumulator), traceable.

    Args:
      key: PRNG key for the reservoir (needed when ``st.samples`` is not None); it is folded with ``st.seen``.
      rows_per_call: candidate rows offered to the reservoir per call (uniform stride; 0 = all rows).
      hessian_x: rows to use for the Hessian instead of ``x`` (same shape), e.g. activation-quantized inputs.
    """
    k = st.in_features
    if x.shape[-1] != k:
        raise ValueError(f"update_stats: input has {x.shape[-1]} channels, the accumulator {k}")
    rows = x.reshape(-1, k)
    absmax = jnp.maximum(st.absmax, jnp.max(jnp.abs(rows), axis=0).astype(F32))
    hessian = st.hessian
    if hessian is not None:
        hx = rows if hessian_x is None else hessian_x.reshape(-1, k)
        if hx.shape != rows.shape:
            raise ValueError(f"update_stats: hessian_x has shape {hessian_x.shape}, expected {x.shape}")
        hessian = hessian + _gram(hx)
    samples, seen = st.samples, st.seen
    if samples is not None:
        if key is None:
            raise ValueError("update_stats: a key is needed to update the reservoir sample")
        cand = rows[stride_rows(rows.shape[0], rows_per_call)]
        samples, seen = _reservoir(samples, seen, cand, jax.random.fold_in(key, seen))
    return LayerStats(absmax=absmax, count=st.count + rows.shape[0], hessian=hessian, samples=samples, seen=seen)


def hessian_mean(st: LayerStats) -> jax.Array:
    """``H / count`` (the seed's ``(1/N) sum x x^T``); raises if no rows or no Hessian were collected."""
    if st.hessian is None:
        raise ValueError("hessian_mean: these statistics were collected without a Hessian")
    if int(st.count) == 0:
        raise ValueError("hessian_mean: no rows were accumulated (count = 0)")
    return st.hessian / jnp.asarray(st.count, F32)


def to_host(st: LayerStats) -> LayerStats:
    """The same statistics as numpy arrays (frees device memory once the device copy is dropped)."""
    return jax.tree.map(np.asarray, st)


def merge_stats(a: LayerStats, b: LayerStats, seed: int = 0) -> LayerStats:
    """Statistics of the union of the rows of ``a`` and ``b`` (host-side, numpy).

    ``absmax`` max, ``hessian``/``count``/``seen`` sums; the reservoir keeps a uniform sample of the union: the
    number of rows taken from ``a`` is hypergeometric(``seen_a``, ``seen_b``, n), the rows a random subset of each.
    """
    a, b = to_host(a), to_host(b)
    if a.in_features != b.in_features:
        raise ValueError(f"merge_stats: channel counts differ ({a.in_features} vs {b.in_features})")
    if (a.hessian is None) != (b.hessian is None) or (a.samples is None) != (b.samples is None):
        raise ValueError("merge_stats: one accumulator has a Hessian/sample the other lacks")
    hessian = None if a.hessian is None else a.hessian + b.hessian
    samples = None
    sa, sb = int(a.seen), int(b.seen)
    if a.samples is not None:
        if a.samples.shape != b.samples.shape:
            raise ValueError(f"merge_stats: reservoir shapes differ ({a.samples.shape} vs {b.samples.shape})")
        n = a.samples.shape[0]
        rng = np.random.default_rng(seed)
        total = min(n, sa + sb)
        ka = int(rng.hypergeometric(sa, sb, total)) if sa and sb else (total if sa else 0)
        pick_a = rng.permutation(min(n, sa))[:ka]
        pick_b = rng.permutation(min(n, sb))[: total - ka]
        samples = np.zeros_like(a.samples)
        samples[:total] = np.concatenate([a.samples[pick_a], b.samples[pick_b]], 0)
        samples[:total] = samples[:total][rng.permutation(total)]
    return LayerStats(
        absmax=np.maximum(a.absmax, b.absmax),
        count=np.asarray(int(a.count) + int(b.count), np.int64),
        hessian=hessian,
        samples=samples,
        seen=np.asarray(sa + sb, np.int64),
    )


# ---------------------------------------------------------------------------------------------------- storage
_FIELDS = ("absmax", "count", "hessian", "samples", "seen")


def _encode(a: np.ndarray) -> tuple[np.ndarray, str]:
    name = str(a.dtype)
    if name == "bfloat16":  # numpy's .npy has no bf16: store the raw bits
        return a.view(np.uint16), name
    return a, name


def _pack_triu(h: np.ndarray) -> np.ndarray:
    k = h.shape[0]
    if h.shape != (k, k):
        raise ValueError(f"save_stats: a Hessian must be square, got {h.shape}")
    return np.concatenate([h[i, i:] for i in range(k)])


def _unpack_triu(packed: np.ndarray) -> np.ndarray:
    k = int(round((np.sqrt(8 * packed.size + 1) - 1) / 2))
    if k * (k + 1) // 2 != packed.size:
        raise ValueError(f"load_stats: packed Hessian of {packed.size} values is not a triangle")
    h = np.empty((k, k), packed.dtype)
    pos = 0
    for i in range(k):
        h[i, i:] = packed[pos : pos + k - i]
        h[i:, i] = packed[pos : pos + k - i]
        pos += k - i
    return h


def save_stats(path: str | os.PathLike, stats: dict[str, LayerStats], meta: dict | None = None) -> None:
    """Write ``{name: LayerStats}`` (+ a JSON-able ``meta`` dict) to ``path`` (.npz) atomically."""
    path = os.fspath(path)
    arrays, dtypes = {}, {}
    for name, st in stats.items():
        if "/" in name:
            raise ValueError(f"save_stats: stat names may not contain '/', got {name!r}")
        for f in _FIELDS:
            v = getattr(st, f)
            if v is None:
                continue
            arr = np.asarray(v)
            if f == "hessian":  # symmetric: keep the upper triangle (half the disk)
                arr = _pack_triu(arr)
            arr, dt = _encode(arr)
            arrays[f"{name}/{f}"] = arr
            dtypes[f"{name}/{f}"] = dt
    header = json.dumps({"format": "wanjax.calib_stats/1", "names": list(stats), "dtypes": dtypes, "meta": meta or {}})
    arrays["__header__"] = np.frombuffer(header.encode(), np.uint8)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    with atomic_write(path, "wb") as f:
        np.savez(f, **arrays)


def load_stats(path: str | os.PathLike, names=None) -> tuple[dict[str, LayerStats], dict]:
    """Read a file written by `save_stats` -> (``{name: LayerStats}`` as numpy, meta). ``names``: only these."""
    import ml_dtypes

    path = os.fspath(path)
    with np.load(path) as z:
        if "__header__" not in z.files:
            raise ValueError(f"{path}: not a calibration statistics file (no __header__ entry)")
        header = json.loads(bytes(z["__header__"]).decode())
        if header.get("format") != "wanjax.calib_stats/1":
            raise ValueError(
                f"{path}: unknown statistics format {header.get('format')!r}, expected 'wanjax.calib_stats/1'"
            )
        want = header["names"] if names is None else list(names)
        missing = [n for n in want if n not in header["names"]]
        if missing:
            raise KeyError(
                f"{path}: no statistics named {missing[:5]} (has {len(header['names'])} names, "
                f"e.g. {header['names'][:3]})"
            )
        out = {}
        for name in want:
            vals = {}
            for f in _FIELDS:
                key = f"{name}/{f}"
                if key not in z.files:
                    vals[f] = None
                    continue
                arr = z[key]
                if header["dtypes"][key] == "bfloat16":
                    arr = arr.view(ml_dtypes.bfloat16)
                if f == "hessian":
                    arr = _unpack_triu(arr)
                vals[f] = arr
            out[name] = LayerStats(**vals)
    return out, header["meta"]


# ------------------------------------------------------------------------------------- names and reader
_SHARED = {
    "self_attn.q": "self_attn.qkv",
    "self_attn.k": "self_attn.qkv",
    "self_attn.v": "self_attn.qkv",
    "cross_attn.k": "cross_attn.kv",
    "cross_attn.v": "cross_attn.kv",
}
CONTEXT_NAME = "context.cross_attn.kv"
ALL_BINS = "all"  # bin name of per-expert Hessians (``hessian_per_bin=False``)


def input_name(layer: str, per_layer: bool = False) -> str:
    """Name of the captured input of block layer ``layer`` (e.g. ``"self_attn.k"`` -> ``"self_attn.qkv"``)."""
    if layer not in BLOCK_LINEAR_NAMES:
        raise ValueError(f"unknown block layer {layer!r}; expected one of {BLOCK_LINEAR_NAMES}")
    return layer if per_layer else _SHARED.get(layer, layer)


def stat_name(block: int, layer: str, per_layer: bool = False) -> str:
    """Statistics name of ``layer`` of block ``block``: ``"blocks.3.ffn.fc2"``, ``"blocks.3.self_attn.qkv"``, or
    ``"context.cross_attn.kv"`` (cross k/v share one per-expert entry unless ``per_layer``)."""
    local = input_name(layer, per_layer)
    if local == "cross_attn.kv":
        return CONTEXT_NAME
    return f"blocks.{int(block)}.{local}"


class CalibStats:
    """Reader over a calibration ``work_dir``: statistics per (expert, name, bin), loaded lazily from unit files.

    ``get(expert, block, layer, bin)`` resolves shared inputs (``self_attn.k`` -> ``blocks.i.self_attn.qkv``);
    ``stats(expert, name, bin)`` takes a statistics name (bin ``"all"``: the per-expert Hessian, when collected
    with ``hessian_per_bin=False``); ``expert_total(expert, name)`` merges an expert's bins
    (the seed's per-expert abs-max and Hessian); ``to_dict()`` loads everything (small models only).
    """

    def __init__(self, work_dir: str | os.PathLike):
        self.work_dir = os.fspath(work_dir)
        man = os.path.join(self.work_dir, "manifest.json")
        if not os.path.exists(man):
            raise FileNotFoundError(f"{self.work_dir}: no manifest.json (not a calibration directory)")
        with open(man) as f:
            self.manifest = json.load(f)
        self.bins = TimestepBins.from_dict(self.manifest["config"]["bins"])
        self.per_layer = bool(self.manifest["config"]["per_layer"])
        self._index: dict[tuple[str, str, str], str] = {}
        for path in sorted(glob.glob(os.path.join(self.work_dir, "stats", "*.npz"))):
            with np.load(path) as z:
                header = json.loads(bytes(z["__header__"]).decode())
            m = header["meta"]
            for n in header["names"]:
                self._index[(m["expert"], n, m["bin"])] = path

    def keys(self):
        """All (expert, name, bin) triples present."""
        return sorted(self._index)

    def stats(self, expert: str, name: str, bin_name: str) -> LayerStats:
        try:
            path = self._index[(expert, name, bin_name)]
        except KeyError:
            raise KeyError(
                f"{self.work_dir}: no statistics for expert={expert!r} name={name!r} bin={bin_name!r} "
                f"(bins: {self.bins.names}; e.g. names {sorted({k[1] for k in self._index})[:4]})"
            ) from None
        return load_stats(path, [name])[0][name]

    def get(self, expert: str, block: int, layer: str, bin_name: str) -> LayerStats:
        return self.stats(expert, stat_name(block, layer, self.per_layer), bin_name)

    def expert_total(self, expert: str, name: str, seed: int = 0) -> LayerStats:
        """All bins of ``expert`` merged (abs-max max, Hessian and count sums, reservoir re-sampled); with
        per-expert Hessians (``hessian_per_bin=False``) the Hessian is the stored ``"all"`` one."""
        out = None
        for b in self.bins.expert_bins(expert):
            st = self.stats(expert, name, b)
            out = st if out is None else merge_stats(out, st, seed)
        if out is None:
            raise KeyError(f"expert {expert!r} has no bins")
        if (expert, name, ALL_BINS) in self._index:
            full = self.stats(expert, name, ALL_BINS)
            if int(full.count) != int(out.count):
                raise ValueError(
                    f"{self.work_dir}: {expert}/{name}: per-expert Hessian has {int(full.count)} rows, "
                    f"the bins {int(out.count)}"
                )
            out = dataclasses.replace(out, hessian=full.hessian)
        return out

    def to_dict(self) -> dict:
        """``{expert: {name: {bin: LayerStats}}}`` with everything loaded."""
        out: dict = {}
        for e, n, b in self.keys():
            out.setdefault(e, {}).setdefault(n, {})[b] = self.stats(e, n, b)
        return out
