"""Converted-checkpoint cache: an orbax checkpoint of the wanjax parameter tree plus its config.

Layout of a cache directory ``DST``::

    DST/wanjax_dit.json   {"format": "wanjax-dit", "version": 1, "config": {...WanConfig...},
                           "param_dtype": "bfloat16", "compressed": false, "source": "<converted from>",
                           "files": {"params/...": {"size": n, "sha256": "..."}, ...},
                           "meta_sha256": "<sha256 of the canonical JSON of everything above>"}
    DST/params/           orbax PyTree checkpoint (OCDBT) of the pure parameter dict

``files`` and ``meta_sha256`` are checked by `load_cached` (``verify=True``): a modified, truncated or missing
file raises `CheckpointError` naming it. Caches written before they existed load with a warning.

`convert` builds everything in a temporary sibling directory and renames it to ``DST`` only when complete, so an
interrupted conversion never leaves a half-written ``DST``. `wanjax.load_dit` recognises such a directory by its
``wanjax_dit.json`` and restores it directly (no transposes, no stacking, no validation of a foreign layout).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from wanjax.config import WanConfig
from wanjax.io.atomic import check_not_overlapping, make_temp_dir, publish_dir
from wanjax.io.dit_params import (
    build_model,
    disk_where,
    flatten_tree,
    raise_if_nonfinite,
    stream_safetensors,
    target_tree,
    unflatten_tree,
)
from wanjax.io.dit_source import ORBAX_MARKER, resolve
from wanjax.io.errors import CheckpointError

FORMAT = "wanjax-dit"
VERSION = 1
#: Orbax in-flight byte budgets (GB): bound the host memory orbax adds on top of the parameters themselves.
SAVE_CONCURRENT_GB = 1
RESTORE_CONCURRENT_GB = 2
#: Parameters are restored in groups of about this many bytes (a leaf larger than this is restored alone), which
#: bounds orbax's staging memory: measured peak 1.12x the converted expert vs 1.3-1.4x restoring all at once.
RESTORE_GROUP_BYTES = 256 << 20
#: Cache files are hashed in blocks of this size, on up to this many threads (sha256 releases the GIL).
HASH_CHUNK_BYTES = 8 << 20
HASH_THREADS = 8


def _checkpointer(compress: bool = False) -> ocp.Checkpointer:
    handler = ocp.PyTreeCheckpointHandler(
        save_concurrent_gb=SAVE_CONCURRENT_GB, restore_concurrent_gb=RESTORE_CONCURRENT_GB, use_compression=compress
    )
    return ocp.Checkpointer(handler)


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def _cache_files(root: str) -> list[str]:
    """Paths (relative to ``root``, ``/``-separated) of every file under ``root/params``, sorted."""
    out = []
    for d, _, files in os.walk(os.path.join(root, "params")):
        for name in files:
            out.append(os.path.relpath(os.path.join(d, name), root).replace(os.sep, "/"))
    return sorted(out)


def _hash_files(root: str, rels: list[str]) -> dict[str, str]:
    """``{rel: sha256}``; files are hashed on several threads (hashlib releases the GIL on large buffers)."""
    workers = max(1, min(HASH_THREADS, len(rels)))
    pool = ThreadPoolExecutor(workers)
    try:
        return dict(zip(rels, pool.map(lambda r: _sha256_file(os.path.join(root, r)), rels)))
    finally:  # on Ctrl-C do not wait for the files still queued
        pool.shutdown(wait=False, cancel_futures=True)


def _canonical(meta: dict) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    config: WanConfig | None = None,
    ignore_unknown: bool = False,
    overwrite: bool = False,
    compress: bool = False,
    check_finite: bool = True,
) -> str:
    """Convert a safetensors checkpoint (any form `load_dit` accepts) into an orbax cache at ``dst``; return it.

    Atomic: written to a temporary directory beside ``dst`` and renamed at the end; on any error (or interrupt)
    the temporary directory is removed and ``dst`` is untouched. ``dst`` must not exist unless ``overwrite``, and
    may never be, contain or lie inside the source (`CheckpointError`: replacing it would delete the source).
    ``compress``: zstd-compress the arrays (about 20 % smaller for bf16 weights, but restoring took 2x longer on
    a 2-core host in `wanjax.io.measure`-style runs), off by default. ``check_finite``: refuse weights with
    NaN/Inf (naming file and key) before anything is written. The sha256 of every cache file is recorded in
    ``wanjax_dit.json`` (``files``), and the metadata's own checksum in ``meta_sha256``; `load_cached` checks both.
    """
    dst = os.path.abspath(os.fspath(dst))
    source = resolve(src)
    inputs = [os.fspath(src), *source.files, source.index_path, source.config_path]
    try:
        check_not_overlapping(dst, *inputs, what="convert destination")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: destination exists (pass overwrite=True / --overwrite to replace it)")
    if os.path.lexists(dst) and not (
        os.path.isdir(dst) and (not os.listdir(dst) or os.path.isfile(os.path.join(dst, ORBAX_MARKER)))
    ):
        raise CheckpointError(
            f"{dst}: destination exists and is not a wanjax cache (no {ORBAX_MARKER}); "
            "overwrite only replaces an earlier cache or an empty directory: remove it yourself "
            "or choose another destination"
        )
    if source.kind == "orbax":
        raise CheckpointError(f"{os.fspath(src)}: already a converted wanjax cache; nothing to convert")
    tmp = make_temp_dir(dst)
    try:
        cfg, params, chosen = stream_safetensors(source, dtype, config=config, ignore_unknown=ignore_unknown)
        # Hand orbax host-side jax arrays (one leaf moved and freed at a time): with numpy leaves orbax makes extra
        # full copies (measured 2.8x the converted size at peak vs ~1.7x this way).
        try:
            cpu = jax.local_devices(backend="cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS excludes cpu: let orbax take the numpy arrays
            cpu = None
        if cpu is not None:
            params = {p: jax.device_put(params.pop(p), cpu).block_until_ready() for p in list(params)}
            if check_finite:  # one jitted reduction on the host CPU (numpy leaves: checked again at load)
                raise_if_nonfinite(params, cfg, source.path, disk_where(chosen))
        with _checkpointer(compress) as ckpt:
            ckpt.save(os.path.join(tmp, "params"), args=ocp.args.PyTreeSave(unflatten_tree(params)))
        del params
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "config": cfg.to_dict(),
            "param_dtype": jnp.dtype(dtype).name,
            "compressed": bool(compress),
            "source": os.path.abspath(os.fspath(src)),
        }
        rels = _cache_files(tmp)
        hashes = _hash_files(tmp, rels)
        meta["files"] = {r: {"size": os.path.getsize(os.path.join(tmp, r)), "sha256": hashes[r]} for r in rels}
        meta["meta_sha256"] = hashlib.sha256(_canonical(meta)).hexdigest()
        with open(os.path.join(tmp, ORBAX_MARKER), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        # overwrite: the old one is moved aside first, so dst is never half-written; never onto an input
        publish_dir(tmp, dst, inputs=inputs, what="convert destination")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def read_cache_meta(path: str | os.PathLike) -> tuple[WanConfig, dict]:
    """Read and check ``wanjax_dit.json`` of a cache directory -> (config, metadata dict)."""
    mpath = os.path.join(os.fspath(path), ORBAX_MARKER)
    try:
        with open(mpath, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: cannot read cache metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{mpath}: expected format {FORMAT!r} version {VERSION}, got "
            f"{meta.get('format') if isinstance(meta, dict) else meta!r} "
            f"version {meta.get('version') if isinstance(meta, dict) else None}"
        )
    try:
        c = dict(meta["config"])
        c["patch_size"] = tuple(c["patch_size"])
        cfg = WanConfig(**c)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{mpath}: invalid config in cache metadata ({e})") from None
    has_files, has_sum = "files" in meta, "meta_sha256" in meta
    if has_files != has_sum:
        raise CheckpointError(
            f"{mpath}: cache metadata has {'files' if has_files else 'meta_sha256'} but no "
            f"{'meta_sha256' if has_files else 'files'} (edited by hand?); re-run wanjax convert"
        )
    if has_sum:
        rest = {k: v for k, v in meta.items() if k != "meta_sha256"}
        got = hashlib.sha256(_canonical(rest)).hexdigest()
        if got != meta["meta_sha256"]:
            raise CheckpointError(
                f"{mpath}: metadata checksum mismatch (stored {meta['meta_sha256']}, computed "
                f"{got}): the metadata was modified or corrupted; re-run wanjax convert"
            )
        files = meta["files"]
        if (
            not isinstance(files, dict)
            or not all(
                isinstance(v, dict) and isinstance(v.get("sha256"), str) and isinstance(v.get("size"), int)
                for v in files.values()
            )
            or not all(isinstance(k, str) and k.startswith("params/") and ".." not in k.split("/") for k in files)
        ):
            raise CheckpointError(f"{mpath}: malformed 'files' table in cache metadata")
    return cfg, meta


def verify_cache(path: str | os.PathLike, meta: dict | None = None) -> None:
    """Check every file of the cache at ``path`` against the sizes and sha256 recorded by `convert`.

    Raises `CheckpointError` listing each missing, resized or modified file (by path). A cache written before
    checksums were recorded is accepted with a warning; files not in the table are ignored with a warning.
    """
    path = os.path.abspath(os.fspath(path))
    if meta is None:
        _, meta = read_cache_meta(path)
    if "files" not in meta:
        warnings.warn(
            f"{path}: cache has no checksums (written by an older wanjax); its files cannot be verified. "
            "Re-run wanjax convert to add them",
            stacklevel=2,
        )
        return
    table: dict = meta["files"]
    problems: list[str] = []
    present = set(_cache_files(path))
    to_hash = []
    for rel, want in sorted(table.items()):
        fpath = os.path.join(path, rel)
        if rel not in present:
            problems.append(f"{fpath}: missing (the cache metadata lists it)")
        elif os.path.getsize(fpath) != want["size"]:
            problems.append(
                f"{fpath}: size {os.path.getsize(fpath)} bytes, the cache metadata says {want['size']} "
                "(the file was modified, truncated or corrupted)"
            )
        else:
            to_hash.append(rel)
    for rel, got in _hash_files(path, to_hash).items():
        if got != table[rel]["sha256"]:
            problems.append(
                f"{os.path.join(path, rel)}: sha256 mismatch: the cache metadata says "
                f"{table[rel]['sha256']}, the file has {got} (the file was modified or corrupted)"
            )
    if problems:
        raise CheckpointError(
            f"{path}: cache files do not match their checksums ({len(problems)} problem(s)); "
            "re-run wanjax convert:\n  " + "\n  ".join(problems),
            problems,
        )
    extra = sorted(present - set(table))
    if extra:
        warnings.warn(f"{path}: ignoring {len(extra)} file(s) not written by wanjax convert: {extra[:8]}", stacklevel=2)


#: Environment variable: ``0`` / ``false`` / ``no`` / ``off`` skips the checksum verification of caches by default.
VERIFY_ENV = "WANJAX_VERIFY_CACHE"


def verify_by_default() -> bool:
    """Whether `load_cached` verifies checksums when not told (``$WANJAX_VERIFY_CACHE``, default on)."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def load_cached(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    *,
    config: WanConfig | None = None,
    sharding: jax.sharding.Sharding | None = None,
    verify: bool | None = None,
    check_finite: bool = True,
):
    """Restore a `WanDiT` from a cache written by `convert` (parameters cast to ``dtype``'s policy if needed),
    each parameter placed with ``sharding`` (default: the default device).

    ``verify``: check the sha256 of every cache file first (`verify_cache`; costs one extra read of the cache,
    hashed on several threads); default: on, unless the environment sets ``WANJAX_VERIFY_CACHE=0``.
    ``check_finite``: refuse parameters holding NaN/Inf (one jitted reduction).
    """
    if verify is None:
        verify = verify_by_default()
    path = os.path.abspath(os.fspath(path))
    cfg, meta = read_cache_meta(path)
    if config is not None and config != cfg:
        raise CheckpointError(f"{path}: the cache holds config {cfg}, but config={config} was requested")
    dev = sharding if sharding is not None else jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev) for p, s in target_tree(cfg, dtype).items()}
    ppath = os.path.join(path, "params")
    if not os.path.isdir(ppath):
        raise CheckpointError(f"{path}: cache has no params/ directory")
    if verify:
        verify_cache(path, meta)
    groups: list[list] = [[]]
    acc = 0
    for p, s in target.items():
        n = math.prod(s.shape) * jnp.dtype(s.dtype).itemsize
        if groups[-1] and acc + n > RESTORE_GROUP_BYTES:
            groups.append([])
            acc = 0
        groups[-1].append(p)
        acc += n
    restored: dict = {}
    try:
        with _checkpointer() as ckpt:
            for group in groups:
                sub = {p: target[p] for p in group}
                args = {
                    p: ocp.ArrayRestoreArgs(sharding=s.sharding, global_shape=s.shape, dtype=s.dtype)
                    for p, s in sub.items()
                }
                out = ckpt.restore(
                    ppath,
                    args=ocp.args.PyTreeRestore(
                        unflatten_tree(sub), restore_args=unflatten_tree(args), partial_restore=len(groups) > 1
                    ),
                )
                restored.update(flatten_tree(out))
    except Exception as e:  # orbax raises various types for structure/shape mismatches
        raise CheckpointError(f"{ppath}: cannot restore parameters ({type(e).__name__}: {e})") from None
    if set(restored) != set(target):
        missing, extra = sorted(set(target) - set(restored)), sorted(set(restored) - set(target))
        raise CheckpointError(
            f"{ppath}: restored parameters do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    if check_finite:
        raise_if_nonfinite(restored, cfg, ppath)
    return build_model(cfg, dtype, restored, sharding)
