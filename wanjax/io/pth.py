"""Read PyTorch ``.pth`` state dicts (the ``torch.save`` zip format) as numpy arrays: no torch, no code from the file.

A ``torch.save`` file (PyTorch >= 1.6) is a zip archive::

    <name>/data.pkl        pickle (protocol 2) of the state dict; tensors are calls to torch._utils._rebuild_tensor_v2
                           whose storages are persistent ids ("storage", <torch.XStorage>, key, location, numel)
    <name>/data/<key>      the raw bytes of storage <key> (little-endian unless <name>/byteorder says "big")
    <name>/byteorder, <name>/version, <name>/.format_version, ...

`read_pth` unpickles ``data.pkl`` with a restricted `pickle.Unpickler`: ``find_class`` allows only the globals a
state dict of tensors needs (`ALLOWED_GLOBALS`: the tensor/parameter rebuild functions, the typed storage classes,
``collections.OrderedDict``), each replaced by a local stand-in, and refuses every other global with an error
naming the file and the global, before anything is called. Storages become numpy arrays of the storage's dtype
(bf16 as ``ml_dtypes.bfloat16``), memory-mapped when the zip entry is stored uncompressed (as torch writes them);
tensors are views of them (offset / size / stride; a non-contiguous view is copied). The legacy (pre-zip) torch
format and TorchScript archives are refused with a clear message.

Public API: `read_pth`, `ALLOWED_GLOBALS`, `STORAGE_DTYPES`, `TORCH_DTYPES`.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from wanjax.io.errors import CheckpointError

__all__ = ["read_pth", "ALLOWED_GLOBALS", "STORAGE_DTYPES", "TORCH_DTYPES"]

# torch storage class name -> numpy dtype of its elements (torch.UntypedStorage: raw bytes)
STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
    "ComplexDoubleStorage": np.complex128,
    "ComplexFloatStorage": np.complex64,
    "UntypedStorage": np.uint8,
}

# torch dtype name -> numpy dtype, for tensors pickled with _rebuild_tensor_v3 (dtypes without a typed storage class:
# float8, uint16/32/64); their storage is a torch.storage.UntypedStorage of bytes
TORCH_DTYPES: dict[str, Any] = {
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
    "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
    "float8_e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
    "float64": np.float64,
    "float32": np.float32,
    "float16": np.float16,
    "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64,
    "int32": np.int32,
    "int16": np.int16,
    "int8": np.int8,
    "uint8": np.uint8,
    "bool": np.bool_,
}

_REBUILD_TENSOR = ("torch._utils", "_rebuild_tensor_v2")
_REBUILD_TENSOR_V3 = ("torch._utils", "_rebuild_tensor_v3")
_REBUILD_PARAMETER = ("torch._utils", "_rebuild_parameter")
_ORDERED_DICT = ("collections", "OrderedDict")
ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {_REBUILD_TENSOR, _REBUILD_TENSOR_V3, _REBUILD_PARAMETER, _ORDERED_DICT, ("torch.storage", "UntypedStorage")}
    | {("torch", name) for name in STORAGE_DTYPES}
    | {("torch", name) for name in TORCH_DTYPES}
)

# pickle protocol 2 header torch writes first in the legacy format: the magic number 0x1950a86a20f9469cfc6c
_LEGACY_MAGIC = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


class _TorchName:
    """Stand-in for a torch object named ``torch.<name>`` that carries an element dtype (looked up in the subclass's
    ``_DTYPES``); not callable (pickle cannot build one)."""

    __slots__ = ("name", "dtype")
    _DTYPES: dict[str, Any] = {}

    def __init__(self, name: str):
        self.name, self.dtype = name, np.dtype(self._DTYPES[name])

    def __repr__(self):
        return f"torch.{self.name}"


class _StorageType(_TorchName):
    """Stand-in for a torch storage class: carries the element dtype."""

    __slots__ = ()
    _DTYPES = STORAGE_DTYPES


class _DType(_TorchName):
    """Stand-in for a torch dtype (an argument of _rebuild_tensor_v3)."""

    __slots__ = ()
    _DTYPES = TORCH_DTYPES


class _Storage:
    """One storage of the archive: a flat numpy array of ``numel`` elements."""

    __slots__ = ("key", "array")

    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class _Reader:
    """State of one `read_pth` call: the open zip, its prefix, the storages read so far."""

    def __init__(self, path: str, zf: zipfile.ZipFile, prefix: str, big_endian: bool):
        self.path, self.zf, self.prefix, self.big_endian = path, zf, prefix, big_endian
        self.storages: dict[Any, _Storage] = {}

    def fail(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")

    # ------------------------------------------------------------------------------------------- storages
    def _entry_bytes(self, info: zipfile.ZipInfo) -> np.ndarray:
        """The bytes of a zip entry: memory-mapped when stored uncompressed, else decompressed into memory."""
        if info.compress_type == zipfile.ZIP_STORED and info.file_size > 0:
            with open(self.path, "rb") as f:
                f.seek(info.header_offset)
                head = f.read(30)
            if len(head) == 30 and head[:4] == b"PK\x03\x04":
                n_name, n_extra = struct.unpack("<HH", head[26:30])
                start = info.header_offset + 30 + n_name + n_extra
                if start + info.file_size <= os.path.getsize(self.path):
                    return np.memmap(self.path, dtype=np.uint8, mode="r", offset=start, shape=(info.file_size,))
            raise self.fail(f"zip entry {info.filename!r} is truncated or corrupt")
        try:
            return np.frombuffer(self.zf.read(info), np.uint8)
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise self.fail(f"zip entry {info.filename!r} cannot be read ({e}): truncated or corrupt file") from None

    def persistent_load(self, pid) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self.fail(f"unsupported persistent id {pid!r:.200} in data.pkl (expected a tensor storage)")
        _, stype, key, _location, numel = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise self.fail(f"malformed storage reference {pid!r:.200} in data.pkl")
        if key in self.storages:
            return self.storages[key]
        name = f"{self.prefix}data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise self.fail(
                f"storage {key!r} ({stype}) is referenced by data.pkl but {name!r} is not in the "
                "archive (truncated or corrupt file)"
            ) from None
        dt = stype.dtype
        if stype.name == "UntypedStorage":
            numel = info.file_size
        if info.file_size < numel * dt.itemsize:
            raise self.fail(
                f"storage {name!r} has {info.file_size} bytes, expected {numel} x {dt.itemsize} "
                f"({stype}): truncated or corrupt file"
            )
        buf = self._entry_bytes(info)[: numel * dt.itemsize]
        arr = buf.view(dt)
        if self.big_endian and dt.itemsize > 1:
            arr = arr.byteswap()  # a native-order copy
        st = self.storages[key] = _Storage(key, arr)
        return st

    # -------------------------------------------------------------------------------------------- tensors
    def rebuild_tensor(
        self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None
    ) -> np.ndarray:
        """Stand-in for ``torch._utils._rebuild_tensor_v2``: a numpy view of ``storage``."""
        if not isinstance(storage, _Storage):
            raise self.fail(f"_rebuild_tensor_v2 got a {type(storage).__name__} where a storage was expected")
        size, stride = (
            tuple(size) if isinstance(size, (tuple, list)) else size,
            tuple(stride) if isinstance(stride, (tuple, list)) else stride,
        )
        if not (
            _is_int(storage_offset)
            and storage_offset >= 0
            and isinstance(size, tuple)
            and isinstance(stride, tuple)
            and len(size) == len(stride)
            and all(_is_int(s) and s >= 0 for s in size)
            and all(_is_int(s) and s >= 0 for s in stride)
        ):
            raise self.fail(
                f"malformed tensor (storage {storage.key!r}: offset {storage_offset!r}, size "
                f"{size!r:.100}, stride {stride!r:.100})"
            )
        base = storage.array
        numel = math.prod(size)
        if numel == 0:
            return np.zeros(size, base.dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= base.size:
            raise self.fail(
                f"tensor view (offset {storage_offset}, size {size}, stride {stride}) reaches element "
                f"{last} of storage {storage.key!r}, which has {base.size}: corrupt file"
            )
        contiguous, expect = True, 1
        for n, s in zip(reversed(size), reversed(stride)):
            if n != 1 and s != expect:
                contiguous = False
                break
            expect *= n
        if contiguous:
            return base[storage_offset : storage_offset + numel].reshape(size)
        # as_strided goes through __array_interface__, which loses ml_dtypes types: stride over opaque items
        items = base[storage_offset : last + 1].view(np.dtype((np.void, base.dtype.itemsize)))
        view = np.lib.stride_tricks.as_strided(
            items, shape=size, strides=tuple(s * items.itemsize for s in stride), writeable=False
        )
        return np.array(view, copy=True, order="C").view(base.dtype)

    def rebuild_tensor_v3(
        self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None
    ) -> np.ndarray:
        """Stand-in for ``torch._utils._rebuild_tensor_v3``: the storage's bytes viewed as ``dtype``."""
        if not isinstance(storage, _Storage) or not isinstance(dtype, _DType):
            raise self.fail(
                f"_rebuild_tensor_v3 got ({type(storage).__name__}, {type(dtype).__name__}) where a "
                "storage and a dtype were expected"
            )
        if self.big_endian and dtype.dtype.itemsize > 1:
            raise self.fail(f"big-endian archive with a {dtype} tensor: not supported")
        key = (storage.key, dtype.name)
        typed = self.storages.get(key)
        if typed is None:
            raw = storage.array.view(np.uint8)
            n = raw.size // dtype.dtype.itemsize
            typed = self.storages[key] = _Storage(storage.key, raw[: n * dtype.dtype.itemsize].view(dtype.dtype))
        return self.rebuild_tensor(typed, storage_offset, size, stride)

    def rebuild_parameter(self, data, requires_grad=False, backward_hooks=None) -> np.ndarray:
        """Stand-in for ``torch._utils._rebuild_parameter`` (an ``nn.Parameter`` in the state dict)."""
        if not isinstance(data, np.ndarray):
            raise self.fail(f"_rebuild_parameter got a {type(data).__name__} where a tensor was expected")
        return data


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, reader: _Reader):
        super().__init__(file)
        self._reader = reader

    def find_class(self, module: str, name: str):
        key = (module, name)
        if key == _REBUILD_TENSOR:
            return self._reader.rebuild_tensor
        if key == _REBUILD_TENSOR_V3:
            return self._reader.rebuild_tensor_v3
        if key == _REBUILD_PARAMETER:
            return self._reader.rebuild_parameter
        if key == _ORDERED_DICT:
            return collections.OrderedDict
        if key in ALLOWED_GLOBALS:
            return _StorageType(name) if name in STORAGE_DTYPES else _DType(name)
        raise CheckpointError(
            f"{self._reader.path}: data.pkl refers to the global {module}.{name}, which is not "
            "part of a state dict of tensors; refusing to load it (wanjax never runs code from "
            "a checkpoint). Allowed: the tensor rebuild functions, torch storage types and "
            "collections.OrderedDict."
        )

    def persistent_load(self, pid):
        return self._reader.persistent_load(pid)


def _prefix_of(path: str, zf: zipfile.ZipFile) -> str:
    names = zf.namelist()
    pkls = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
        raise CheckpointError(
            f"{path}: this is a TorchScript archive (torch.jit.save), not a state dict saved "
            "with torch.save; save the module's state_dict() with torch.save instead"
        )
    if not pkls:
        raise CheckpointError(f"{path}: zip archive without data.pkl: not a PyTorch checkpoint")
    if len(pkls) > 1:
        raise CheckpointError(
            f"{path}: zip archive with several data.pkl entries {pkls[:4]}: not a single PyTorch checkpoint"
        )
    return pkls[0][: -len("data.pkl")]


def read_pth(path: str | os.PathLike, *, unwrap_state_dict: bool = True) -> dict[str, np.ndarray]:
    """Read a ``torch.save`` state dict as ``{name: numpy array}`` without torch and without running code.

    Arrays keep the stored dtype (bf16 as ``ml_dtypes.bfloat16``); contiguous tensors of uncompressed entries are
    read-only memory maps of the file. A top-level ``{"state_dict": {...}}`` wrapper is unwrapped when
    ``unwrap_state_dict``. Raises `CheckpointError` (a ``ValueError``) naming the file for anything that is not a
    zip checkpoint of plain tensors (legacy format, TorchScript, truncated file, a pickled global outside
    `ALLOWED_GLOBALS`, a non-tensor entry), ``FileNotFoundError`` for a missing file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_MAGIC))
    if not zipfile.is_zipfile(path):
        if head.startswith(_LEGACY_MAGIC):
            raise CheckpointError(
                f"{path}: legacy (pre-zip, torch < 1.6 or _use_new_zipfile_serialization=False) "
                "PyTorch format, which wanjax does not read; re-save it once with torch: "
                "torch.save(torch.load(p, weights_only=True), p)"
            )
        if head.startswith(b"PK"):
            raise CheckpointError(
                f"{path}: damaged zip archive (truncated download?): not a readable PyTorch checkpoint"
            )
        raise CheckpointError(
            f"{path}: not a PyTorch checkpoint (a .pth file written by torch.save is a zip "
            f"archive; this file starts with {head[:8]!r})"
        )
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path}: damaged zip archive ({e}): not a readable PyTorch checkpoint") from None
    with zf:
        prefix = _prefix_of(path, zf)
        big = False
        if f"{prefix}byteorder" in zf.namelist():
            order = zf.read(f"{prefix}byteorder").decode("ascii", "replace").strip()
            if order not in ("little", "big"):
                raise CheckpointError(f"{path}: unknown byteorder {order!r}")
            big = order == "big"
        reader = _Reader(path, zf, prefix, big)
        try:
            with zf.open(f"{prefix}data.pkl") as f:
                obj = _Unpickler(f, reader).load()
        except CheckpointError:
            raise
        except (
            pickle.UnpicklingError,
            EOFError,
            zipfile.BadZipFile,
            TypeError,
            ValueError,
            AttributeError,
            IndexError,
            KeyError,
            struct.error,
        ) as e:
            raise CheckpointError(
                f"{path}: data.pkl cannot be read as a state dict of tensors ({type(e).__name__}: {e})"
            ) from None
    if unwrap_state_dict and isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (mapping of name -> tensor), got {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path}: state dict key {k!r:.80} is a {type(k).__name__}, expected a string")
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"{path}: entry {k!r} is a {type(v).__name__}, expected a tensor")
        out[k] = v
    return out
