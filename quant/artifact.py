"""Save / load quantized experts: one safetensors file per expert + ``manifest.json``, written atomically.

Layout of an artifact directory ``QDIR``::

    QDIR/manifest.json          format, library versions, recipe, bins, per expert: model config, dtypes, the
                                static config of every QLinear, tensor table (name -> dtype, shape) and the
                                sha256 of its file; "manifest_sha256" covers the rest of the manifest
    QDIR/<expert>.safetensors   every array of the quantized model (packed codes, scales, per-bin tables,
                                low-rank factors, and the layers kept in 16-bit), keyed by their state path

Arrays whose dtype safetensors' numpy reader cannot return (bfloat16, float8) are stored as their raw bits
(uint16 / uint8) and viewed back on load, so a round trip is bit-exact. The directory is first written under a
temporary name beside ``QDIR`` and renamed into place, so a crash never leaves a half-written artifact. Loading
verifies every checksum first: a corrupted or modified file raises :class:`ArtifactError` naming the file, the
expected and the found hash.

Provenance and consistency (beyond the checksums, which a deliberate edit can recompute):

* ``manifest["model_fingerprint"]``: a fingerprint of the BF16 experts the artifact was quantized from
  (:func:`model_fingerprint`; ``save_artifact(..., source=pipe)``). :func:`attach_artifact` compares it with the
  pipeline's experts before replacing them and raises :class:`ArtifactError` naming both digests and the first
  differing tensors (``force=True``: a warning instead). Artifacts written before fingerprints existed attach with a
  warning.
* every expert file carries its layers' static configs in the safetensors header (``wanjax.layers``), covered by
  the file's sha256: an edit of a layer's format in ``manifest.json`` (with ``manifest_sha256`` recomputed) no longer
  matches its file. At load (:func:`load_artifact`), every layer config must be valid, agree with the recipe's
  formats and the timestep bins, and fit the stored tensors' dtypes and shapes; every floating tensor must be finite
  and the activation tables (``act_clip``, ``act_scale``) positive. Violations raise :class:`ArtifactError` naming
  the tensor (a NaN clip table is refused, not repaired).
* the quantized mode: ``attach_artifact(..., mode="auto")`` (default) runs the low-bit kernels where they exist
  (:func:`resolve_quant_mode`) and records the choice in the returned manifest (``attached_mode``,
  ``attached_mode_reason``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from wanjax.io.atomic import check_not_overlapping, publish_dir
from wanjax.quant.apply import qlinears, quantize_model
from wanjax.quant.qlinear import STORED_FIELDS, QLinear, QLinearConfig

__all__ = [
    "ARTIFACT_FORMAT",
    "ArtifactError",
    "attach_artifact",
    "compare_fingerprints",
    "fingerprint_digest",
    "load_artifact",
    "model_fingerprint",
    "new_manifest",
    "resolve_quant_mode",
    "save_artifact",
    "layer_bits_per_weight",
    "write_expert_file",
    "write_manifest",
]

ARTIFACT_FORMAT = "wanjax.quant_artifact/1"
_MANIFEST = "manifest.json"
_RAW_BITS = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}
_QFIELDS = STORED_FIELDS


class ArtifactError(ValueError):
    """A quantized artifact is missing, corrupted, tampered with or of an unsupported version."""


def _versions() -> dict:
    out = {"format": ARTIFACT_FORMAT}
    for pkg in ("wanjax", "jax", "flax", "numpy", "safetensors"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _canonical(d: dict) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


# arrays derived at load time (``apply.prepare_kernel_weights``): never written, so that an artifact holds one copy
DERIVED = ("kweight", "kscale")


def _flat_state(model: nnx.Module) -> dict[str, np.ndarray]:
    pure = nnx.to_pure_dict(nnx.state(model))
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                walk(v, key)
            elif v is not None and str(k) not in DERIVED:
                out[key] = v

    walk(pure, "")
    return out


def _encode(a) -> tuple[np.ndarray, str]:
    a = np.asarray(jax.device_get(a))
    name = str(a.dtype)
    return (a.view(_RAW_BITS[name]) if name in _RAW_BITS else a), name


def _decode(a: np.ndarray, name: str) -> np.ndarray:
    if name in _RAW_BITS:
        return a.view(getattr(ml_dtypes, name))
    if str(a.dtype) != name:
        raise ArtifactError(f"tensor stored as {a.dtype}, manifest says {name}")
    return a


def _model_meta(model: nnx.Module) -> dict:
    layers = {}
    for path, q in qlinears(model).items():
        layers[path] = {"config": dataclasses.asdict(q.config), "mode": q.mode, "dtype": jnp.dtype(q.dtype).name}
    return {
        "config": model.cfg.to_dict(),
        "dtype": jnp.dtype(model.dtype).name,
        "scan_layers": bool(model.scan_layers),
        "layers": layers,
    }


# ------------------------------------------------------------------------------------------ model fingerprint
FINGERPRINT_METHOD = "wanjax.model_fingerprint/1"
#: A tensor matches when its sums agree to this relative tolerance and its signed projection (divided by its L2
#: norm) to FINGERPRINT_ZTOL: loading one checkpoint at float32 or bfloat16 moves them by ~2**-9 / sqrt(n) and
#: ~1e-3 respectively, two independently drawn tensors of one shape differ by O(1) in the projection.
FINGERPRINT_RTOL = 1e-2
FINGERPRINT_ZTOL = 0.05


def _hash_signs(shape) -> jax.Array:
    """+-1 per element of ``shape`` from an integer hash of its flat index (iota arithmetic: fused into the
    reduction, never materialized; no reshape, so sharded tensors stay as they are)."""
    idx = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride & 0xFFFFFFFF)
        stride *= shape[d]
    h = idx * jnp.uint32(0x9E3779B1)
    h = h ^ (h >> 15)
    h = h * jnp.uint32(0x85EBCA77)
    h = h ^ (h >> 13)
    return jnp.where((h >> 7) & 1, 1.0, -1.0).astype(jnp.float32)


def _stats(w):
    """float32 ``[sum |w|, sum w^2, sum w * s]`` with ``s`` the hashed signs of :func:`_hash_signs`."""
    x = w.astype(jnp.float32)
    return jnp.stack([jnp.sum(jnp.abs(x)), jnp.sum(x * x), jnp.sum(x * _hash_signs(x.shape))])


_tensor_stats = jax.jit(_stats)  # one host tensor at a time
_tree_stats = jax.jit(lambda d: {k: _stats(v) for k, v in d.items()})  # all device-resident tensors in one program


def _expert_states(src) -> dict:
    """``{expert: params tree}`` of a `WanI2VPipeline` (its current ``high`` / ``low`` experts), a dict of WanDiT
    modules / nnx states / pure dicts, or a single module (named ``"expert"``)."""
    if hasattr(src, "_params_high") and hasattr(src, "_params_low"):
        return {"high": src._params_high, "low": src._params_low}
    if isinstance(src, nnx.Module):
        src = {"expert": src}
    if not isinstance(src, dict):
        raise TypeError(f"model_fingerprint: expected a WanI2VPipeline or {{name: WanDiT}}, got {type(src).__name__}")
    return {k: nnx.state(v) if isinstance(v, nnx.Module) else v for k, v in src.items()}


def _flat_params(tree) -> dict[str, object]:
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if leaf is None or not hasattr(leaf, "dtype") or not jnp.issubdtype(leaf.dtype, jnp.number):
            continue
        out[".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)] = leaf
    return out


def model_fingerprint(pipe_or_experts, experts=None) -> dict:
    """A cheap, dtype-tolerant fingerprint of unquantized experts: ``{expert: {"digest": str, "tensors": {name:
    [shape, sum |w|, sum w^2, sum w * s]}}}`` plus ``"method"``.

    Per tensor three float32 reductions (sum of absolute values, of squares, and of the values times a fixed +-1
    pattern hashed from the element index): one jitted program for the tensors on the device, one tensor at a time
    for tensors in host memory (an expert swapped out is not put on the device whole). Compared by :func:`compare_fingerprints` with tolerances, not by hash equality, so the same
    checkpoint loaded at float32 or bfloat16 matches while another model of the same config does not (see
    ``FINGERPRINT_RTOL`` / ``FINGERPRINT_ZTOL``); ``digest`` (a hash of the names, shapes and 2-digit-rounded sums) is
    for messages only. Cost: one read of the weights (milliseconds per expert on an accelerator).

    Args:
      pipe_or_experts: a `WanI2VPipeline` (its current experts, which must be unquantized) or ``{name: WanDiT or
        nnx.State}``.
      experts: only these expert names (default: all).
    """
    states = _expert_states(pipe_or_experts)
    out = {"method": FINGERPRINT_METHOD, "experts": {}}
    for name, tree in states.items():
        if experts is not None and name not in experts:
            continue
        flat = _flat_params(tree)
        if any(k.endswith(".qweight") for k in flat):
            raise ValueError(
                f"model_fingerprint: expert {name!r} is already quantized; fingerprint the BF16 model it "
                "was quantized from"
            )
        on_device = {k: v for k, v in flat.items() if isinstance(v, jax.Array)}
        stats = jax.device_get(_tree_stats(on_device)) if on_device else {}
        tensors = {}
        for key in sorted(flat):
            v = flat[key]
            st = np.asarray(stats[key] if key in stats else jax.device_get(_tensor_stats(v)), np.float64)
            tensors[key] = [list(v.shape), *(float(x) for x in st)]
        out["experts"][name] = {"digest": _digest(tensors), "tensors": tensors}
    return out


def _digest(tensors: dict) -> str:
    rounded = {k: [v[0]] + [float(f"{x:.2g}") for x in v[1:3]] for k, v in tensors.items()}
    return hashlib.sha256(_canonical(rounded)).hexdigest()[:16]


def fingerprint_digest(fp: dict, expert: str) -> str:
    """The short digest of ``expert`` in fingerprint ``fp`` (for messages)."""
    return fp["experts"][expert]["digest"]


def _tensor_mismatch(a: list, b: list) -> str | None:
    if list(a[0]) != list(b[0]):
        return f"shape {a[0]} vs {b[0]}"
    (_, a1, a2, a3), (_, b1, b2, b3) = a, b
    for what, x, y in (("sum|w|", a1, b1), ("sum w^2", a2, b2)):
        if not (np.isfinite(x) and np.isfinite(y)):
            if not (np.isnan(x) and np.isnan(y)) and x != y:
                return f"{what} {x:.6g} vs {y:.6g}"
        elif abs(x - y) > FINGERPRINT_RTOL * max(abs(x), abs(y)) + 1e-30:
            return f"{what} {x:.6g} vs {y:.6g}"
    za = a3 / np.sqrt(a2) if a2 > 0 else 0.0
    zb = b3 / np.sqrt(b2) if b2 > 0 else 0.0
    if np.isfinite(za) and np.isfinite(zb) and abs(za - zb) > FINGERPRINT_ZTOL:
        return f"signed projection {za:.4f} vs {zb:.4f}"
    return None


def compare_fingerprints(recorded: dict, current: dict) -> dict[str, list[str]]:
    """``{expert: [difference, ...]}`` for the experts of ``recorded`` whose tensors differ in ``current`` (names,
    shapes, or statistics beyond the tolerances); ``{}`` when they match. An expert missing from ``current`` is
    reported as such."""
    if recorded.get("method") != current.get("method"):
        return {
            e: [f"fingerprint method {recorded.get('method')!r} vs {current.get('method')!r}"]
            for e in recorded.get("experts", {})
        }
    out = {}
    for e, rec in recorded["experts"].items():
        cur = current["experts"].get(e)
        if cur is None:
            out[e] = ["no such expert here"]
            continue
        diffs = []
        a, b = rec["tensors"], cur["tensors"]
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        if missing:
            diffs.append(f"tensors missing here: {missing[:3]}{' ...' if len(missing) > 3 else ''}")
        if extra:
            diffs.append(f"tensors not in the recorded model: {extra[:3]}{' ...' if len(extra) > 3 else ''}")
        for k in sorted(set(a) & set(b)):
            why = _tensor_mismatch(a[k], b[k])
            if why:
                diffs.append(f"{k}: {why}")
        if diffs:
            out[e] = diffs
    return out


def _fingerprint_problem(recorded: dict, current: dict, recorded_as: str = "artifact made from") -> str | None:
    """One message for an ArtifactError / warning, or None when ``current`` matches ``recorded``."""
    diff = compare_fingerprints(recorded, current)
    if not diff:
        return None
    parts = []
    for e, d in diff.items():
        got = current["experts"].get(e, {}).get("digest")
        n = len(d)
        parts.append(
            f"expert {e!r}: {recorded_as} {recorded['experts'][e].get('digest')}, this model is {got}; "
            f"{n} difference{'s' if n > 1 else ''}, first: {'; '.join(d[:2])}"
        )
    return "; ".join(parts)


def _source_paths(source) -> list:
    """Paths a source object says it was loaded from (attributes some loaders set), for the overlap check."""
    out = []
    for attr in ("model_dir", "source_path", "path"):
        v = getattr(source, attr, None)
        if isinstance(v, (str, os.PathLike)):
            out.append(v)
    return out


def save_artifact(
    qdir: str | os.PathLike,
    experts: dict[str, nnx.Module],
    *,
    recipe: dict | None = None,
    bins: dict | None = None,
    report: dict | None = None,
    overwrite: bool = False,
    source=None,
    model_fingerprint: dict | None = None,
    inputs: tuple | list = (),
) -> str:
    """Writes quantized experts (``{name: quantized WanDiT}``) to ``qdir`` atomically; returns the path.

    Args:
      recipe: ``recipes.recipe_to_dict(recipe)`` (stored as is; every layer's formats must be the recipe's);
        bins: ``TimestepBins.to_dict()`` (every ``high`` / ``low`` layer must have that expert's number of bins);
        report: any JSON-able summary (e.g. mean SQNR per layer).
      overwrite: replace an existing ``qdir`` (else ``FileExistsError``).
      source: the unquantized model the experts were made from (the `WanI2VPipeline` given to ``quantize``, or
        ``{name: WanDiT}``): its fingerprint (:func:`model_fingerprint`, restricted to the saved experts) is recorded
        so that :func:`attach_artifact` can check the model it is attached to. Computing it reads the weights once.
      model_fingerprint: a precomputed fingerprint instead of ``source`` (e.g. taken before the source was freed).
        With neither, the artifact has no fingerprint and attaches with a warning.
      inputs: paths the artifact was made from (model directory, calibration directory, ...): ``qdir`` must not be,
        contain or lie inside any of them, nor any path ``source`` names (``ValueError``, before anything is
        written), so that ``overwrite`` can never delete an input.

    The directory is written under a temporary name beside ``qdir`` (removed on any error or interrupt), given the
    modes of normally created files (``0o666 & ~umask``, directories ``0o777 & ~umask``) and renamed into place.
    """
    qdir = os.path.abspath(os.fspath(qdir))
    check_not_overlapping(qdir, *inputs, *_source_paths(source), what="artifact directory")
    if os.path.exists(qdir) and not overwrite:
        raise FileExistsError(f"save_artifact: {qdir} exists; pass overwrite=True to replace it")
    for name in experts:
        if not name.isidentifier():
            raise ValueError(f"save_artifact: expert names must be identifiers (used as file names), got {name!r}")
    fp = model_fingerprint
    if fp is None and source is not None:
        fp = _model_fingerprint_fn(source, experts=tuple(experts))
    if fp is not None:
        missing = sorted(set(experts) - set(fp.get("experts", {})))
        if missing:
            raise ValueError(
                f"save_artifact: the model fingerprint has no expert {missing} (has {sorted(fp.get('experts', {}))})"
            )
        fp = {"method": fp["method"], "experts": {e: fp["experts"][e] for e in experts}}
    parent = os.path.dirname(qdir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(qdir)}-", dir=parent)
    try:
        manifest = new_manifest(recipe=recipe, bins=bins, report=report, model_fingerprint=fp)
        for name, model in experts.items():
            manifest["experts"][name] = write_expert_file(tmp, name, model)
        write_manifest(tmp, manifest, where=f"save_artifact({qdir})")
        publish_dir(tmp, qdir)  # modes normalized to the umask (mkdtemp makes 0700), then renamed
    finally:
        if os.path.exists(tmp):  # not published: an error or an interrupt (KeyboardInterrupt included)
            shutil.rmtree(tmp, ignore_errors=True)
    return qdir


_model_fingerprint_fn = model_fingerprint  # save_artifact's argument of the same name shadows it there
_FILE_LAYERS_KEY = "wanjax.layers"


def new_manifest(*, recipe=None, bins=None, report=None, model_fingerprint=None) -> dict:
    """The manifest of an artifact before its experts are added (`write_expert_file`, `write_manifest`)."""
    manifest = {
        "format": ARTIFACT_FORMAT,
        "versions": _versions(),
        "recipe": recipe,
        "bins": bins,
        "report": report or {},
        "experts": {},
    }
    if model_fingerprint is not None:
        manifest["model_fingerprint"] = model_fingerprint
    return manifest


def write_expert_file(directory: str, name: str, model: nnx.Module) -> dict:
    """Write quantized expert ``model`` as ``directory/<name>.safetensors`` (fsynced); returns its manifest entry
    (model meta, file name, sha256, tensor table). `save_artifact` calls it per expert; `wanjax.quant.stream`
    writes the experts of a streamed run one at a time with it."""
    from safetensors.numpy import save_file

    flat = _flat_state(model)
    tensors, table = {}, {}
    for key, v in flat.items():
        arr, dt = _encode(v)
        tensors[key] = np.ascontiguousarray(arr)
        table[key] = {"dtype": dt, "shape": list(arr.shape)}
    del flat
    meta = _model_meta(model)
    fname = f"{name}.safetensors"
    fpath = os.path.join(directory, fname)
    # the layer configs also go into the file's header (covered by its sha256): see _check_consistency
    save_file(tensors, fpath, metadata={_FILE_LAYERS_KEY: _canonical(meta["layers"]).decode()})
    del tensors
    with open(fpath, "rb+") as f:
        os.fsync(f.fileno())
    return {**meta, "file": fname, "sha256": _sha256_file(fpath), "tensors": table}


def write_manifest(directory: str, manifest: dict, where: str) -> dict:
    """Check ``manifest`` (its experts' entries from `write_expert_file`), add ``manifest_sha256`` and write it as
    ``directory/manifest.json`` (fsynced); returns it."""
    manifest = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    _check_manifest_consistency(manifest, where=where, saving=True)
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    with open(os.path.join(directory, _MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return manifest


# ------------------------------------------------------------------------------------------ consistency checks
# dtype of the weight codes / of the weight scales per weight format (what formats.quantize_* + pack() produce)
_CODE_DTYPE = {"int4": "uint8", "mxfp4": "uint8", "nvfp4": "uint8", "int8": "int8"}
_WSCALE_DTYPE = {"int4": "float32", "int8": "float32", "mxfp4": "uint8", "nvfp4": "float8_e4m3fn"}
# bit masks whose all-ones exponent marks Inf / NaN in the raw bits of the 8/16-bit float types
_NONFINITE_BITS = {
    "bfloat16": (np.uint16, 0x7F80, 0x7F80),
    "float16": (np.uint16, 0x7C00, 0x7C00),
    "float8_e4m3fn": (np.uint8, 0x7F, 0x7F),
    "float8_e5m2": (np.uint8, 0x7C, 0x7C),
}
# the config fields a recipe fixes for every layer (a_scale_rule only matters for mxfp4 activations)
_RECIPE_FIELDS = ("w_fmt", "w_group", "a_fmt", "a_group", "act_mode")


def _layer_config(where: str, expert: str, path: str, d: dict) -> QLinearConfig:
    try:
        return QLinearConfig(**d)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{where}: expert {expert!r} layer {path!r}: invalid quantization config ({e})") from e


def _check_manifest_consistency(manifest: dict, where: str, saving: bool = False) -> None:
    """Layer configs valid, equal to what the recipe gives (formats, groups, activation mode) and with as many bins as
    the stored timestep bins give their expert. Raises :class:`ArtifactError` naming the layer."""
    from wanjax.quant.bins import EXPERTS, TimestepBins

    recipe = None
    if manifest.get("recipe") is not None:
        from wanjax.quant.recipes import recipe_from_dict

        try:
            recipe = recipe_from_dict(manifest["recipe"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: the stored recipe cannot be read ({type(e).__name__}: {e})") from e
    bins = None
    if manifest.get("bins") is not None:
        try:
            bins = TimestepBins.from_dict(manifest["bins"])
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: the stored timestep bins cannot be read ({type(e).__name__}: {e})") from e
    for expert, meta in manifest["experts"].items():
        for path, lm in meta["layers"].items():
            c = _layer_config(where, expert, path, lm["config"])
            if lm.get("mode") not in ("fake", "real"):
                raise ArtifactError(
                    f"{where}: expert {expert!r} layer {path!r}: mode {lm.get('mode')!r} is not 'fake' or 'real'"
                )
            if recipe is not None:
                from wanjax.quant.quantize import layer_config

                want = layer_config(recipe.for_path(path), c.in_features, c.out_features, c.nbins)
                fields = _RECIPE_FIELDS + (("a_scale_rule",) if c.a_fmt == "mxfp4" else ())
                bad = [
                    f"{f}={getattr(c, f)!r} (recipe {recipe.name!r}: {getattr(want, f)!r})"
                    for f in fields
                    if getattr(c, f) != getattr(want, f)
                ]
                if bad:
                    hint = "the experts were not quantized with this recipe" if saving else "an edited manifest?"
                    raise ArtifactError(
                        f"{where}: expert {expert!r} layer {path!r}: {', '.join(bad)}: the layer's formats "
                        f"are not the recipe's ({hint})"
                    )
            if bins is not None and expert in EXPERTS and c.nbins != len(bins.expert_bins(expert)):
                raise ArtifactError(
                    f"{where}: expert {expert!r} layer {path!r} has {c.nbins} bins, the stored timestep "
                    f"bins give that expert {len(bins.expert_bins(expert))}"
                )


def _nonfinite(a: np.ndarray) -> tuple[int, tuple]:
    """(number of NaN / Inf entries of ``a``, index of the first) ((0, ()) for integer arrays)."""
    name = a.dtype.name
    if name in _NONFINITE_BITS:
        view, mask, val = _NONFINITE_BITS[name]
        bad = (a.view(view) & mask) == val
    elif np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
    else:
        return 0, ()
    n = int(np.count_nonzero(bad))
    if not n:
        return 0, ()
    return n, tuple(int(i) for i in np.unravel_index(int(np.argmax(bad.reshape(-1))), a.shape))


def _check_tensors(fpath: str, expert: str, meta: dict, tensors: dict[str, np.ndarray], file_layers) -> None:
    """The tensors of one expert file against its layer configs: the header's copy of the configs equals the
    manifest's, each QLinear array has the dtype and shape its formats give, every floating tensor is finite and the
    activation tables are positive. Raises :class:`ArtifactError` naming the tensor."""
    if file_layers is not None:
        try:
            fl = json.loads(file_layers)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{fpath}: unreadable layer configs in the file header ({e})") from e
        for path in sorted(set(fl) | set(meta["layers"])):
            a, b = meta["layers"].get(path), fl.get(path)
            if a != b:
                if a is None or b is None:
                    raise ArtifactError(
                        f"{fpath}: layer {path!r} is {'missing from' if a is None else 'only in'} the "
                        "manifest, the file was written with the other layer set (an edited manifest?)"
                    )
                diff = [
                    f"{k}: manifest {a['config'].get(k)!r}, file {b['config'].get(k)!r}"
                    for k in sorted(set(a["config"]) | set(b["config"]))
                    if a["config"].get(k) != b["config"].get(k)
                ]
                diff += [
                    f"{k}: manifest {a.get(k)!r}, file {b.get(k)!r}" for k in ("mode", "dtype") if a.get(k) != b.get(k)
                ]
                raise ArtifactError(
                    f"{fpath}: layer {path!r}: the manifest's config differs from the one the file was "
                    f"written with ({'; '.join(diff)}): the manifest was edited"
                )
    for path, lm in meta["layers"].items():
        c = QLinearConfig(**lm["config"])
        k, n = c.in_features, c.out_features

        def arr(field):
            return tensors.get(f"{path}.{field}")

        def expect(field, dtype, tail):
            a = arr(field)
            if a is None:
                raise ArtifactError(f"{fpath}: layer {path!r} ({c.w_fmt} weights) has no {field!r} tensor")
            if dtype is not None and a.dtype.name != dtype:
                raise ArtifactError(
                    f"{fpath}: tensor '{path}.{field}' is {a.dtype.name}, {c.w_fmt} weights / "
                    f"{c.a_fmt} activations store {dtype}: the stored formats do not match the config"
                )
            if tuple(a.shape[a.ndim - len(tail) :]) != tuple(tail):
                raise ArtifactError(
                    f"{fpath}: tensor '{path}.{field}' has shape {list(a.shape)}, the config ({c.w_fmt}, "
                    f"K={k}, N={n}, group {c.w_group}, {c.nbins} bins) gives [..., "
                    f"{', '.join(map(str, tail))}]"
                )

        expect("qweight", _CODE_DTYPE[c.w_fmt], (n, k // 2) if c.packed else (n, k))
        expect("wscale", _WSCALE_DTYPE[c.w_fmt], (n, k // c.w_group))
        expect("act_clip", "float32", (c.nbins,))
        if arr("act_exp_offset") is not None:
            expect("act_exp_offset", "int32", (c.nbins,))
        if (arr("wtensor_scale") is not None) != (c.w_fmt == "nvfp4"):
            raise ArtifactError(
                f"{fpath}: layer {path!r}: a wtensor_scale tensor goes with nvfp4 weights only (weights "
                f"{c.w_fmt}, tensor {'present' if arr('wtensor_scale') is not None else 'absent'})"
            )
        if (arr("act_scale") is not None) != (c.act_mode == "static"):
            raise ArtifactError(
                f"{fpath}: layer {path!r}: an act_scale table goes with act_mode='static' only "
                f"(act_mode {c.act_mode!r}, table {'present' if arr('act_scale') is not None else 'absent'})"
            )
        if arr("act_scale") is not None:
            expect("act_scale", "float32", (c.nbins,))
        _check_two_level(fpath, path, c, arr("wscale"), arr("wunit"), expect)
        for field in ("smooth", "rot_signs"):
            if arr(field) is not None:
                expect(field, None, (k,))
        for field in ("act_clip", "act_scale"):
            a = arr(field)
            if a is not None and np.any(a <= 0):
                raise ArtifactError(
                    f"{fpath}: tensor '{path}.{field}' (per-bin table) has non-positive entries "
                    f"{a[a <= 0][:4].tolist()}: refusing the artifact"
                )
    for key, a in tensors.items():
        cnt, first = _nonfinite(a)
        if cnt:
            raise ArtifactError(
                f"{fpath}: tensor {key!r} holds {cnt} non-finite value{'s' if cnt > 1 else ''} (NaN/Inf; "
                f"first at index {list(first)}): refusing the artifact (nothing is repaired silently)"
            )


def _check_two_level(fpath: str, path: str, c: QLinearConfig, wscale, wunit, expect) -> None:
    """A ``wunit`` tensor goes with ``w_scale_levels``; its group scales are integer multiples ``m`` in [1, L] of it
    (``wscale = f32(m * wunit)``), else the stored scales and units do not belong together."""
    if (wunit is not None) != (c.w_scale_levels is not None):
        raise ArtifactError(
            f"{fpath}: layer {path!r}: a wunit tensor goes with two-level scales (w_scale_levels) only (levels "
            f"{c.w_scale_levels}, tensor {'present' if wunit is not None else 'absent'})"
        )
    if wunit is None:
        return
    expect("wunit", "float32", (c.out_features,))
    ratio = np.asarray(wscale, np.float64) / np.asarray(wunit, np.float64)[..., None]
    m = np.round(ratio)
    bad = (np.abs(ratio - m) > 1e-4) | (m < 1) | (m > c.w_scale_levels)
    if np.any(bad):
        raise ArtifactError(
            f"{fpath}: layer {path!r}: wscale / wunit must be integers in [1, {c.w_scale_levels}] (two-level "
            f"scales), got {ratio[bad][:4].tolist()}"
        )


def read_manifest(qdir: str | os.PathLike) -> dict:
    """The verified manifest of ``qdir`` (format and manifest checksum checked)."""
    path = os.path.join(os.fspath(qdir), _MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{qdir}: not a quantized artifact (no {_MANIFEST})")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable manifest ({e})") from e
    if manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(
            f"{path}: artifact format {manifest.get('format')!r}, this wanjax reads {ARTIFACT_FORMAT!r}"
        )
    want = manifest.pop("manifest_sha256", None)
    got = hashlib.sha256(_canonical(manifest)).hexdigest()
    if want != got:
        raise ArtifactError(
            f"{path}: manifest checksum mismatch (stored {want}, computed {got}): the manifest was "
            "modified or corrupted"
        )
    mine = _versions()
    diff = {k: (v, mine.get(k)) for k, v in manifest["versions"].items() if k != "format" and mine.get(k) != v}
    if diff:
        warnings.warn(f"{qdir}: written with other library versions {{name: (artifact, here)}}: {diff}", stacklevel=3)
    return manifest


def _load_tensors(qdir: str, name: str, meta: dict) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    fpath = os.path.join(qdir, meta["file"])
    if not os.path.isfile(fpath):
        raise ArtifactError(f"{fpath}: missing file of expert {name!r}")
    got = _sha256_file(fpath)
    if got != meta["sha256"]:
        raise ArtifactError(
            f"{fpath}: sha256 mismatch: manifest says {meta['sha256']}, the file has {got} (the file "
            "was corrupted or modified)"
        )
    from safetensors import safe_open

    raw = load_file(fpath)
    with safe_open(fpath, framework="np") as f:
        header = f.metadata() or {}
    if set(raw) != set(meta["tensors"]):
        extra, miss = sorted(set(raw) - set(meta["tensors"])), sorted(set(meta["tensors"]) - set(raw))
        raise ArtifactError(f"{fpath}: tensor names differ from the manifest (extra {extra[:3]}, missing {miss[:3]})")
    out = {}
    for key, t in meta["tensors"].items():
        a = _decode(raw[key], t["dtype"])
        if list(a.shape) != t["shape"]:
            raise ArtifactError(f"{fpath}: tensor {key!r} has shape {a.shape}, manifest says {t['shape']}")
        out[key] = a
    _check_tensors(fpath, name, meta, out, header.get(_FILE_LAYERS_KEY))
    return out


def _build_expert(meta: dict, tensors: dict[str, np.ndarray]) -> nnx.Module:
    from wanjax.config import config_from_dict
    from wanjax.model.dit import WanDiT

    cfg = config_from_dict(meta["config"], source="artifact manifest")
    dtype = jnp.dtype(meta["dtype"])

    def skeleton():  # shapes only (nnx.eval_shape): every tensor is put on the device once, by `fill` below
        qlayers = {}
        for path, lm in meta["layers"].items():
            arrays = {f: tensors.get(f"{path}.{f}") for f in _QFIELDS}
            arrays = {f: None if a is None else jnp.zeros(a.shape, a.dtype) for f, a in arrays.items()}
            qlayers[path] = QLinear(
                QLinearConfig(**lm["config"]), dtype=jnp.dtype(lm["dtype"]), mode=lm["mode"], path=path, **arrays
            )
        return quantize_model(
            WanDiT(cfg, dtype=dtype, param_dtype=jnp.float32, scan_layers=meta["scan_layers"], rngs=nnx.Rngs(0)),
            qlayers,
        )

    model = nnx.eval_shape(skeleton)
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    used = set()

    def fill(node, prefix):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                fill(v, key)
            elif v is not None:
                if key not in tensors:
                    raise ArtifactError(f"artifact has no tensor {key!r} needed by the model")
                a = tensors[key]
                if tuple(a.shape) != tuple(v.shape):  # dtypes: the artifact's (param_dtype is a storage choice)
                    raise ArtifactError(
                        f"tensor {key!r}: artifact shape {list(a.shape)}, the model expects {list(v.shape)}"
                    )
                node[k] = jnp.asarray(a)
                used.add(key)

    fill(pure, "")
    unused = sorted(set(tensors) - used)
    if unused:
        raise ArtifactError(f"artifact tensors not used by the model: {unused[:5]}")
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def load_artifact(qdir: str | os.PathLike, experts=None) -> tuple[dict[str, nnx.Module], dict]:
    """Loads ``({name: quantized WanDiT}, manifest)`` from ``qdir`` (``experts``: only these names).

    Raises :class:`ArtifactError` for a missing manifest, unknown format, checksum mismatch (manifest or any tensor
    file), layer configs that are invalid, differ from the recipe, the bins or the file's own copy, tensors whose
    dtype / shape do not fit their formats or the model, and non-finite tensors or non-positive activation tables
    (named); warns when the library versions differ from the writer's.
    """
    qdir = os.fspath(qdir)
    manifest = read_manifest(qdir)
    _check_manifest_consistency(manifest, where=os.path.join(qdir, _MANIFEST))
    names = list(manifest["experts"]) if experts is None else list(experts)
    out = {}
    for name in names:
        if name not in manifest["experts"]:
            raise ArtifactError(f"{qdir}: no expert {name!r} (has {sorted(manifest['experts'])})")
        meta = manifest["experts"][name]
        out[name] = _build_expert(meta, _load_tensors(qdir, name, meta))
    return out, manifest


QUANT_MODES = ("auto", "fake", "real")


def _kernel_platform() -> tuple[str, bool, str]:
    """(platform, whether it is an NVIDIA Hopper GPU (sm_90), device kind), by `wanjax.kernels.dispatch`'s own
    detection (imported here, not at module level: the Pallas GPU modules load with it)."""
    from wanjax.kernels import dispatch

    platform = dispatch._platform()
    try:
        kind = str(jax.devices()[0].device_kind)
    except RuntimeError:  # pragma: no cover
        kind = platform
    return platform, dispatch._is_hopper(), kind


def resolve_quant_mode(mode: str | None, *, layers=None, mesh=None) -> tuple[str, str]:
    """The QLinear mode to run and why: ``("real" | "fake", reason)``.

    ``"fake"`` / ``"real"`` are returned as asked. ``None`` / ``"auto"`` pick ``"real"`` where low-bit kernels exist
    for the default backend (`wanjax.kernels.dispatch`'s detection: an NVIDIA Hopper GPU, sm_90, runs the Pallas
    Mosaic GPU kernels; a TPU its integer-MXU / TPU kernel path), else ``"fake"`` (simulated W4A4: CPU, other GPUs),
    e.g. ``("fake", "no low-bit kernels for cpu: simulated W4A4")``. Auto also picks ``"fake"`` when ``layers`` (QLinear
    configs, or the artifact's ``{path: {"config": {...}}}``) hold a format the kernels do not run, or when a ``mesh``
    would need the Pallas GPU kernels (no partitioning rule yet).
    """
    if mode in ("fake", "real"):
        return mode, f"{mode} mode requested"
    if mode not in (None, "auto"):
        raise ValueError(f"quant mode must be one of {QUANT_MODES} (or None = auto), got {mode!r}")
    platform, hopper, kind = _kernel_platform()
    if platform == "gpu" and not hopper:
        return "fake", (
            f"no low-bit kernels for this GPU ({kind}; the W4A4 kernels need an NVIDIA Hopper GPU, sm_90): "
            "simulated W4A4"
        )
    if platform not in ("gpu", "tpu"):
        return "fake", f"no low-bit kernels for {platform}: simulated W4A4"
    for path, c in (layers or {}).items():
        if isinstance(c, dict):
            c = QLinearConfig(**c.get("config", c))
        problem = c.real_mode_problem()
        if problem:
            return "fake", f"layer {path!r} has no low-bit kernel ({problem}): simulated W4A4"
    if mesh is not None and platform == "gpu":
        from wanjax.kernels import dispatch

        if dispatch.select_backend() == "pallas":
            return "fake", (
                "the Pallas GPU kernels have no partitioning rule for a mesh yet (WANJAX_KERNELS=xla with "
                "--quant-mode real runs XLA's int8 dots sharded): simulated W4A4"
            )
    where = (
        "an NVIDIA Hopper GPU (sm_90): Pallas Mosaic GPU W4A4 kernels"
        if platform == "gpu"
        else f"a TPU ({kind}): integer-MXU W4A4 kernels"
    )
    return "real", where


def _current_fingerprint(pipe, names) -> dict | None:
    """Fingerprint of the unquantized experts ``pipe`` holds now; for a pipeline already running quantized experts
    the one recorded when they were attached (None if unknown)."""
    if getattr(pipe, "quant_bins", None) is not None:
        return getattr(pipe, "quant_source_fingerprint", None)
    return model_fingerprint(pipe, experts=names)


def attach_artifact(
    pipe,
    qdir: str | os.PathLike,
    mode: str | None = "auto",
    *,
    prepare_kernels: bool = True,
    int8_weights: bool = False,
    force: bool = False,
) -> dict:
    """Loads the ``high`` / ``low`` experts of ``qdir`` into ``pipe`` (a `WanI2VPipeline`, e.g. for
    ``wanjax generate --quant QDIR``) with the artifact's timestep bins.

    Args:
      mode: ``"auto"`` (default; None means the same): the low-bit kernels where this platform has them, simulated
        W4A4 elsewhere (:func:`resolve_quant_mode`); ``"real"``: the W4A4 kernels (an error for layers they do not
        run); ``"fake"``: simulated.
      prepare_kernels: in real mode, re-encode MXFP4 weights once for the FP8 kernel
        (``apply.prepare_kernel_weights``: faster, 1 byte a parameter more).
      int8_weights: in real mode, also keep the per-channel INT4 codes unpacked to int8 for the GEMM
        (``prepare_kernel_weights(int4=True)``: 1 byte a parameter more; faster per linear where measured, docs/BENCHMARKS.md,
        docs/BENCHMARKS.md). With ``mode="fake"`` a ``ValueError``; with ``"auto"`` choosing fake, ignored with a
        warning.
      force: attach even when the artifact was made from another model (its recorded fingerprint differs from the
        pipeline's experts): a warning instead of :class:`ArtifactError`.

    Before replacing anything the artifact is loaded and checked (:func:`load_artifact`) and its model fingerprint
    compared with the pipeline's current experts (:func:`model_fingerprint`; an artifact without one attaches with a
    warning). Returns the manifest, with ``attached_mode`` and ``attached_mode_reason`` added.
    """
    if mode not in (None,) + QUANT_MODES:
        raise ValueError(f"attach_artifact: mode must be one of {QUANT_MODES}, got {mode!r}")
    if int8_weights and (mode == "fake" or not prepare_kernels):
        raise ValueError(
            f"int8_weights needs mode='real' and prepare_kernels=True (the kernels read them), got "
            f"mode={mode!r}, prepare_kernels={prepare_kernels}"
        )
    from wanjax.quant.apply import attach_to_pipeline, prepare_kernel_weights, set_mode
    from wanjax.quant.bins import TimestepBins

    manifest = read_manifest(qdir)  # the cheap checks first: nothing is read or replaced for a wrong model
    if manifest.get("bins") is None:
        raise ArtifactError(f"{qdir}: the artifact has no timestep bins; it cannot drive the two-expert sampler")
    recorded = manifest.get("model_fingerprint")
    current = None
    if recorded is None:
        warnings.warn(
            f"{qdir}: the artifact records no model fingerprint (written before wanjax recorded one, or "
            "without a source model): cannot check that it was made from this model",
            stacklevel=2,
        )
    else:
        current = _current_fingerprint(pipe, tuple(recorded["experts"]))
        if current is None:
            warnings.warn(
                f"{qdir}: the pipeline already runs quantized experts of unknown origin; cannot check the "
                "artifact's model fingerprint",
                stacklevel=2,
            )
        else:
            problem = _fingerprint_problem(recorded, current)
            if problem:
                msg = f"{qdir}: the artifact was made from another model than this pipeline's: {problem}"
                if not force:
                    raise ArtifactError(msg + " (force=True / --force attaches it anyway)")
                warnings.warn(msg + " (attached anyway: force=True)", stacklevel=2)
    experts, manifest = load_artifact(qdir, ("high", "low"))
    layers = {p: lm for m in manifest["experts"].values() for p, lm in m["layers"].items()}
    chosen, reason = resolve_quant_mode(mode, layers=layers, mesh=getattr(pipe, "mesh", None))
    if int8_weights and chosen != "real":
        warnings.warn(f"int8_weights ignored: mode 'auto' chose {chosen!r} ({reason})", stacklevel=2)
        int8_weights = False
    experts = {k: set_mode(v, chosen) for k, v in experts.items()}
    if chosen == "real" and prepare_kernels:
        experts = {k: prepare_kernel_weights(v, int4=int8_weights) for k, v in experts.items()}
    attach_to_pipeline(pipe, experts["high"], experts["low"], TimestepBins.from_dict(manifest["bins"]))
    pipe.quant_source_fingerprint = recorded if current is None else current
    apply_recipe_attention(manifest.get("recipe"))
    manifest["attached_mode"] = chosen
    manifest["attached_mode_reason"] = reason
    return manifest


def apply_recipe_attention(recipe: dict | None) -> str | None:
    """Sets the attention backend a recipe asks for (``recipe["attention"]``, e.g. ``"cudnn_fp8"``) process-wide via
    `wanjax.model.attention.set_attention_backend`, when running on a GPU (elsewhere the default backend stays, with
    a warning). Returns the backend set, or None."""
    from wanjax.model.attention import set_attention_backend

    name = (recipe or {}).get("attention")
    if not name:
        return None
    if name not in ("attn8", "auto8") and jax.default_backend() != "gpu":  # attn8 also runs on CPU and TPU; auto8
        # picks it on Hopper and the automatic backend elsewhere
        warnings.warn(
            f"the recipe asks for attention {name!r}, which needs a GPU; keeping the default backend on "
            f"{jax.default_backend()!r}"
        )
        return None
    set_attention_backend(name)
    return name


def layer_bits_per_weight(q: QLinear, include_lowrank: bool = False) -> float:
    """Stored bits per weight of a (possibly stacked) QLinear: packed codes + weight scales (+ the row units of
    two-level scales, + the low-rank factors when ``include_lowrank``), divided by the number of weights ``L * N * K``."""
    a = q.arrays()
    lead = int(np.prod(a["act_clip"].shape[:-1]))
    nw = lead * q.in_features * q.out_features
    names = ["qweight", "wscale", "wtensor_scale", "wunit"] + (["down", "up"] if include_lowrank else [])
    nbytes = sum(int(a[n].size) * jnp.dtype(a[n].dtype).itemsize for n in names if a[n] is not None)
    return 8.0 * nbytes / nw
