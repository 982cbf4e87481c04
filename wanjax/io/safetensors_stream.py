"""Tensor-by-tensor reading of (sharded) safetensors checkpoints.

Metadata (keys, dtypes, shapes) is read from the headers only, so a checkpoint can be validated before any weight
is touched. Tensors are then read one at a time with ``safetensors.safe_open(..., framework="numpy")`` (bf16 comes
back as an ``ml_dtypes.bfloat16`` array). ``safe_open`` memory-maps the file; pages it touched stay resident until
the handle is closed, so `TensorReader` reopens the file after every ``reopen_bytes`` read to keep the resident
mapping small (a 10 GB shard is never fully mapped in at once).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from typing import Callable, Iterator

import numpy as np
from safetensors import safe_open

from wanjax.io.errors import CheckpointError

#: safetensors dtype names accepted for weights.
FLOAT_DTYPES = ("F32", "BF16", "F16")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One tensor as described by a file header: on-disk key, file, safetensors dtype name, shape, byte size and
    byte offset of its data (within the data section)."""

    key: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int = 0


def read_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse the header of one ``.safetensors`` file (no tensor data is read).

    Raises `CheckpointError` naming the file when it is missing/unreadable, truncated (the header describes more
    bytes than the file holds) or malformed.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes, smaller than the 8-byte header length)"
                )
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} bytes is implausible)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e.strerror or e})") from None
    if len(raw) < n:
        raise CheckpointError(
            f"{path}: truncated safetensors file (header claims {n} bytes, file has {size} bytes in total)"
        )
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: malformed safetensors header (expected a JSON object)")
    data_size = size - 8 - n
    infos: dict[str, TensorInfo] = {}
    end_max = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(s) for s in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: malformed safetensors header entry for key {key!r}: {entry!r}") from None
        end_max = max(end_max, int(end))
        infos[key] = TensorInfo(key, path, str(dtype), shape, int(end) - int(start), int(start))
    if end_max > data_size:
        raise CheckpointError(
            f"{path}: truncated safetensors file: the header describes {end_max} bytes of tensor "
            f"data, the file holds only {data_size}"
        )
    return infos


def read_index(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``*.safetensors.index.json`` -> ``{key: absolute shard path}``.

    Raises `CheckpointError` naming the file when it is unreadable, not JSON, has no ``weight_map`` object, or
    names a shard that does not exist.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read index file ({getattr(e, 'strerror', None) or e})") from None
    try:
        index = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: index file is not valid JSON ({e})") from None
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(
            f"{path}: index file must hold a 'weight_map' object mapping tensor names to shard "
            f"file names; got {type(wm).__name__ if wm is not None else 'no weight_map'}"
        )
    base = os.path.dirname(os.path.abspath(path))
    out = {k: os.path.join(base, v) for k, v in wm.items()}
    missing = sorted({v for v in out.values() if not os.path.isfile(v)})
    if missing:
        raise CheckpointError(f"{path}: index names shard file(s) that do not exist: {missing}")
    return out


def scan(files: list[str], index: dict[str, str] | None = None, index_path: str | None = None) -> list[TensorInfo]:
    """Headers of all ``files`` -> every tensor found (duplicates across files included, for validation).

    With an ``index``, it must agree with the files: a key the index places in a shard that does not hold it is an
    error; so is a key found in a shard the index attributes elsewhere or does not list.
    """
    found: list[TensorInfo] = []
    for f in files:
        found.extend(read_header(f).values())
    if index is not None:
        where: dict[str, list[str]] = {}
        for t in found:
            where.setdefault(t.key, []).append(t.file)
        problems = []
        for key, shard in index.items():
            if shard not in where.get(key, []):
                problems.append(f"index maps {key!r} to {os.path.basename(shard)}, which does not contain it")
        for key, shards in where.items():
            for s in shards:
                if index.get(key) != s:
                    problems.append(
                        f"{os.path.basename(s)} contains {key!r}, which the index "
                        + ("does not list" if key not in index else f"places in {os.path.basename(index[key])}")
                    )
        if problems:
            raise CheckpointError(
                f"{index_path}: index and shard files disagree ({len(problems)} problems): "
                + "; ".join(problems[:10])
                + (" ..." if len(problems) > 10 else ""),
                problems,
            )
    return found


class TensorReader:
    """Read tensors of one file one at a time (context manager).

    ``reopen_bytes``: close and reopen the memory-mapped file after this many bytes were read, so the pages
    touched so far leave the process's resident set.
    """

    def __init__(self, path: str, reopen_bytes: int = 16 << 20):
        self.path = path
        self.reopen_bytes = reopen_bytes
        self._ctx = None
        self._f = None
        self._since_open = 0

    def _open(self):
        self._close()
        try:
            self._ctx = safe_open(self.path, framework="numpy")
            self._f = self._ctx.__enter__()
        except Exception as e:  # SafetensorError, OSError
            self._ctx = self._f = None
            raise CheckpointError(f"{self.path}: cannot open safetensors file ({e})") from None
        self._since_open = 0

    def _close(self):
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
        self._ctx = self._f = None

    def __enter__(self) -> "TensorReader":
        self._open()
        return self

    def __exit__(self, *exc):
        self._close()

    def get(self, key: str) -> np.ndarray:
        """The tensor ``key`` as a numpy array of its stored dtype (a fresh copy, not a view of the mapping)."""
        if self._f is None or self._since_open >= self.reopen_bytes:
            self._open()
        try:
            arr = self._f.get_tensor(key)
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read tensor {key!r} ({e})") from None
        self._since_open += arr.nbytes
        return arr

    def get_rows(self, key: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (first axis) of tensor ``key``; F32/F16 only (safetensors cannot slice BF16 to numpy)."""
        if self._f is None or self._since_open >= self.reopen_bytes:
            self._open()
        try:
            arr = self._f.get_slice(key)[start:stop]
        except Exception as e:
            raise CheckpointError(f"{self.path}: cannot read rows {start}:{stop} of tensor {key!r} ({e})") from None
        self._since_open += arr.nbytes
        return arr


def iter_chunks(
    infos: list[TensorInfo],
    chunk_bytes: int = 16 << 20,
    reopen_bytes: int = 16 << 20,
    can_split: Callable[[TensorInfo], bool] = lambda t: True,
) -> Iterator[tuple[TensorInfo, int, np.ndarray]]:
    """Yield ``(info, first_row, rows)`` for ``infos`` grouped by file, in file-offset order within a file
    (sequential reads).

    A tensor larger than ``chunk_bytes`` is yielded as consecutive row blocks of about ``chunk_bytes`` when it is
    F32/F16 and ``can_split(info)``; otherwise whole (``first_row == 0``). Host memory held at any time: one chunk
    plus at most ``reopen_bytes`` (+ one chunk) of memory-mapped file pages.
    """
    by_file: dict[str, list[TensorInfo]] = {}
    for t in infos:
        by_file.setdefault(t.file, []).append(t)
    for path, items in by_file.items():
        with TensorReader(path, reopen_bytes) as r:
            for t in sorted(items, key=lambda i: i.offset):
                rows = t.shape[0] if t.shape else 0
                if t.nbytes <= chunk_bytes or rows < 2 or t.dtype not in ("F32", "F16") or not can_split(t):
                    yield t, 0, r.get(t.key)
                    continue
                step = max(1, chunk_bytes // (t.nbytes // rows))
                for start in range(0, rows, step):
                    yield t, start, r.get_rows(t.key, start, min(rows, start + step))
