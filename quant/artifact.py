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

from wanjax.io.atomic import publish_dir
from wanjax.quant.apply import qlinears, quantize_model
from wanjax.quant.qlinear import QLinear, QLinearConfig

__all__ = ["ARTIFACT_FORMAT", "ArtifactError", "attach_artifact", "load_artifact", "save_artifact", "layer_bits_per_weight"]

ARTIFACT_FORMAT = "wanjax.quant_artifact/1"
_MANIFEST = "manifest.json"
_RAW_BITS = {"bfloat16": np.uint16, "float8_e4m3fn": np.uint8, "float8_e5m2": np.uint8}
_QFIELDS = ("qweight", "wscale", "wtensor_scale", "smooth", "rot_signs", "down", "up", "bias", "act_clip",
            "act_exp_offset", "act_scale")


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
  return {"config": model.cfg.to_dict(), "dtype": jnp.dtype(model.dtype).name,
          "scan_layers": bool(model.scan_layers), "layers": layers}


def save_artifact(qdir: str | os.PathLike, experts: dict[str, nnx.Module], *, recipe: dict | None = None,
                  bins: dict | None = None, report: dict | None = None, overwrite: bool = False) -> str:
  """Writes quantized experts (``{name: quantized WanDiT}``) to ``qdir`` atomically; returns the path.

  Args:
    recipe: ``recipes.recipe_to_dict(recipe)`` (stored as is); bins: ``TimestepBins.to_dict()``; report: any
      JSON-able summary (e.g. mean SQNR per layer).
    overwrite: replace an existing ``qdir`` (else ``FileExistsError``).
  """
  from safetensors.numpy import save_file

  qdir = os.path.abspath(os.fspath(qdir))
  if os.path.exists(qdir) and not overwrite:
    raise FileExistsError(f"save_artifact: {qdir} exists; pass overwrite=True to replace it")
  parent = os.path.dirname(qdir)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(qdir)}-", dir=parent)
  try:
    manifest = {"format": ARTIFACT_FORMAT, "versions": _versions(), "recipe": recipe, "bins": bins,
                "report": report or {}, "experts": {}}
    for name, model in experts.items():
      if not name.isidentifier():
        raise ValueError(f"save_artifact: expert names must be identifiers (used as file names), got {name!r}")
      flat = _flat_state(model)
      tensors, table = {}, {}
      for key, v in flat.items():
        arr, dt = _encode(v)
        tensors[key] = np.ascontiguousarray(arr)
        table[key] = {"dtype": dt, "shape": list(arr.shape)}
      fname = f"{name}.safetensors"
      fpath = os.path.join(tmp, fname)
      save_file(tensors, fpath)
      with open(fpath, "rb+") as f:
        os.fsync(f.fileno())
      manifest["experts"][name] = {**_model_meta(model), "file": fname, "sha256": _sha256_file(fpath),
                                   "tensors": table}
    manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
    with open(os.path.join(tmp, _MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    publish_dir(tmp, qdir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return qdir


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
    raise ArtifactError(f"{path}: artifact format {manifest.get('format')!r}, this wanjax reads {ARTIFACT_FORMAT!r}")
  want = manifest.pop("manifest_sha256", None)
  got = hashlib.sha256(_canonical(manifest)).hexdigest()
  if want != got:
    raise ArtifactError(f"{path}: manifest checksum mismatch (stored {want}, computed {got}): the manifest was "
                        "modified or corrupted")
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
    raise ArtifactError(f"{fpath}: sha256 mismatch: manifest says {meta['sha256']}, the file has {got} (the file "
                        "was corrupted or modified)")
  raw = load_file(fpath)
  if set(raw) != set(meta["tensors"]):
    extra, miss = sorted(set(raw) - set(meta["tensors"])), sorted(set(meta["tensors"]) - set(raw))
    raise ArtifactError(f"{fpath}: tensor names differ from the manifest (extra {extra[:3]}, missing {miss[:3]})")
  out = {}
  for key, t in meta["tensors"].items():
    a = _decode(raw[key], t["dtype"])
    if list(a.shape) != t["shape"]:
      raise ArtifactError(f"{fpath}: tensor {key!r} has shape {a.shape}, manifest says {t['shape']}")
    out[key] = a
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
      qlayers[path] = QLinear(QLinearConfig(**lm["config"]), dtype=jnp.dtype(lm["dtype"]), mode=lm["mode"],
                              path=path, **arrays)
    return quantize_model(WanDiT(cfg, dtype=dtype, param_dtype=jnp.float32, scan_layers=meta["scan_layers"],
                                 rngs=nnx.Rngs(0)), qlayers)

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
          raise ArtifactError(f"tensor {key!r}: artifact shape {list(a.shape)}, the model expects {list(v.shape)}")
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
  file) or tensors that do not fit the model; warns when the library versions differ from the writer's.
  """
  qdir = os.fspath(qdir)
  manifest = read_manifest(qdir)
  names = list(manifest["experts"]) if experts is None else list(experts)
  out = {}
  for name in names:
    if name not in manifest["experts"]:
      raise ArtifactError(f"{qdir}: no expert {name!r} (has {sorted(manifest['experts'])})")
    meta = manifest["experts"][name]
    out[name] = _build_expert(meta, _load_tensors(qdir, name, meta))
  return out, manifest


def attach_artifact(pipe, qdir: str | os.PathLike, mode: str | None = None, *, prepare_kernels: bool = True,
                    int8_weights: bool = False) -> dict:
  """Loads the ``high`` / ``low`` experts of ``qdir`` into ``pipe`` (a `WanI2VPipeline`, e.g. for
  ``wanjax generate --quant QDIR``) with the artifact's timestep bins; ``mode`` optionally switches every QLinear
  (``"real"``: the W4A4 kernels). In real mode, ``prepare_kernels`` re-encodes MXFP4 weights once for the FP8
  kernel (``apply.prepare_kernel_weights``: faster, 1 byte a parameter more); ``int8_weights`` also keeps the
  per-channel INT4 codes unpacked to int8 for the GEMM (``prepare_kernel_weights(int4=True)``: 1 byte a parameter
  more, equal or faster per linear on an H200, docs/BENCHMARKS.md). Returns the manifest."""
  if int8_weights and not (mode == "real" and prepare_kernels):
    raise ValueError(f"int8_weights needs mode='real' and prepare_kernels=True (the kernels read them), got "
                     f"mode={mode!r}, prepare_kernels={prepare_kernels}")
  from wanjax.quant.apply import attach_to_pipeline, prepare_kernel_weights, set_mode
  from wanjax.quant.bins import TimestepBins

  experts, manifest = load_artifact(qdir, ("high", "low"))
  if manifest.get("bins") is None:
    raise ArtifactError(f"{qdir}: the artifact has no timestep bins; it cannot drive the two-expert sampler")
  if mode is not None:
    experts = {k: set_mode(v, mode) for k, v in experts.items()}
  if mode == "real" and prepare_kernels:
    experts = {k: prepare_kernel_weights(v, int4=int8_weights) for k, v in experts.items()}
  attach_to_pipeline(pipe, experts["high"], experts["low"], TimestepBins.from_dict(manifest["bins"]))
  apply_recipe_attention(manifest.get("recipe"))
  return manifest


def apply_recipe_attention(recipe: dict | None) -> str | None:
  """Sets the attention backend a recipe asks for (``recipe["attention"]``, e.g. ``"cudnn_fp8"``) process-wide via
  `wanjax.model.attention.set_attention_backend`, when running on a GPU (elsewhere the default backend stays, with
  a warning). Returns the backend set, or None."""
  from wanjax.model.attention import set_attention_backend

  name = (recipe or {}).get("attention")
  if not name:
    return None
  if jax.default_backend() != "gpu":
    warnings.warn(f"the recipe asks for attention {name!r}, which needs a GPU; keeping the default backend on "
                  f"{jax.default_backend()!r}")
    return None
  set_attention_backend(name)
  return name


def layer_bits_per_weight(q: QLinear, include_lowrank: bool = False) -> float:
  """Stored bits per weight of a (possibly stacked) QLinear: packed codes + weight scales (+ the low-rank factors
  when ``include_lowrank``), divided by the number of weights ``L * N * K``."""
  a = q.arrays()
  lead = int(np.prod(a["act_clip"].shape[:-1]))
  nw = lead * q.in_features * q.out_features
  names = ["qweight", "wscale", "wtensor_scale"] + (["down", "up"] if include_lowrank else [])
  nbytes = sum(int(a[n].size) * jnp.dtype(a[n].dtype).itemsize for n in names if a[n] is not None)
  return 8.0 * nbytes / nw
