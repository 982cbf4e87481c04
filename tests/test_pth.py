"""`wanjax.io.pth.read_pth`: torch.save checkpoints read without torch and without running code from the file."""

import collections
import io
import os
import pathlib
import pickle
import sys
import zipfile

import numpy as np
import pytest

from wanjax.io.errors import CheckpointError
from wanjax.io.pth import read_pth

torch = pytest.importorskip("torch")

MINI = pathlib.Path(__file__).resolve().parents[1] / "models" / "mini"
MINI_PTH = ["Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"]


def _bytes(t) -> bytes:
    """The C-order bytes of a torch tensor (any dtype, bf16 / float8 included)."""
    t = t.detach().contiguous().reshape(-1)
    return t.numpy().tobytes() if t.dtype == torch.bool else t.view(torch.uint8).numpy().tobytes()


def _assert_same(ours: dict, ref: dict):
    assert list(ours) == list(ref)
    for k, t in ref.items():
        a = ours[k]
        assert isinstance(a, np.ndarray), k
        assert a.shape == tuple(t.shape), (k, a.shape, tuple(t.shape))
        assert str(a.dtype) == str(t.dtype).removeprefix("torch."), (k, a.dtype, t.dtype)
        assert np.ascontiguousarray(a).tobytes() == _bytes(t), k


@pytest.mark.parametrize("name", MINI_PTH)
def test_shipped_mini_pth_equals_torch_load(name):
    path = MINI / name
    ours = read_pth(path)
    ref = torch.load(path, map_location="cpu", weights_only=True)
    assert len(ref) > 10
    _assert_same(ours, ref)


def test_loaders_read_pth_without_torch(monkeypatch):
    from wanjax.io import t5_loader, vae_loader

    ref = {k: _bytes(v) for k, v in torch.load(MINI / "Wan2.1_VAE.pth", weights_only=True).items()}
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    sd = vae_loader.read_official_pth(MINI / "Wan2.1_VAE.pth")
    assert {k: v.tobytes() for k, v in sd.items()} == ref
    assert vae_loader.vae_config_from_official_state(sd).z_dim == 16
    enc = t5_loader.load_t5_encoder(str(MINI / "models_t5_umt5-xxl-enc-bf16.pth"))
    assert enc is not None


_DTYPES = [
    "bfloat16",
    "float16",
    "float32",
    "float64",
    "int64",
    "int32",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "float8_e4m3fn",
    "uint16",
]


@pytest.mark.parametrize("dtype", _DTYPES)
def test_roundtrip_dtypes_and_views(tmp_path, dtype):
    dt = getattr(torch, dtype)
    base = (torch.arange(4 * 6 * 5) % 7 - 3).reshape(4, 6, 5).to(dt)
    sd = {
        "w": base,
        "wt": base.transpose(0, 2),  # non-contiguous: a copy
        "slice": base[1:3, ::2, 1:],  # offset and strides into the shared storage
        "row": base[2, 3],  # offset, contiguous view
        "scalar": base[1, 1, 1],
        "empty": base[:0],
        "expanded": base[0, 0].expand(3, 5),  # stride 0
    }
    p = tmp_path / f"{dtype}.pth"
    torch.save(sd, p)
    out = read_pth(p)
    _assert_same(out, sd)
    assert out["wt"].flags.c_contiguous
    assert not out["w"].flags.writeable  # a read-only memory map of the file


def test_parameters_wrapper_and_module_state_dict(tmp_path):
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    p = tmp_path / "m.pth"
    torch.save({"state_dict": m.state_dict()}, p)
    _assert_same(read_pth(p), m.state_dict())
    torch.save({"a": torch.nn.Parameter(torch.ones(2, 3))}, p)  # a Parameter: _rebuild_parameter
    np.testing.assert_array_equal(read_pth(p)["a"], np.ones((2, 3), np.float32))


_MARK = "wanjax_pth_test_marker"


class _Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _EvalEvil:
    def __reduce__(self):
        return (eval, (f"open({_MARK!r}, 'w').write('x')",))


@pytest.mark.parametrize(
    "payload, glob", [(lambda m: _Evil(f"touch {m}"), "system"), (lambda m: _EvalEvil(), r"__builtin__\.eval")]
)
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, monkeypatch, payload, glob):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / _MARK
    p = tmp_path / "evil.pth"
    torch.save({"w": torch.ones(2), "x": payload(marker)}, p)  # a valid zip checkpoint whose data.pkl calls code
    with pytest.raises(CheckpointError, match=rf"evil\.pth: data\.pkl refers to the global .*{glob}.*refusing"):
        read_pth(p)
    assert not marker.exists()


def _zip_checkpoint(path, pkl: bytes, extra: dict | None = None):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl)
        z.writestr("archive/byteorder", "little")
        for k, v in (extra or {}).items():
            z.writestr(f"archive/{k}", v)


class _StorageRef:
    pass


class _TensorRef:
    def __init__(self, *args):
        self.args = args

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2, self.args)


def _tensor_pickle(offset, size, stride, numel) -> bytes:
    """data.pkl of {"a": tensor} whose view (offset, size, stride) is chosen freely over a FloatStorage '0'."""
    ref = _StorageRef()

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is ref else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"a": _TensorRef(ref, offset, size, stride, False, collections.OrderedDict())})
    return buf.getvalue()


def test_hand_made_pickles_are_refused(tmp_path):
    p = tmp_path / "x.pth"
    _zip_checkpoint(p, b"\x80\x02ctorch\nFloatStorage\n)R.")  # calling a storage type: not allowed
    with pytest.raises(CheckpointError, match=r"x\.pth: data\.pkl cannot be read"):
        read_pth(p)
    _zip_checkpoint(p, b"\x80\x02csubprocess\nPopen\n.")
    with pytest.raises(CheckpointError, match=r"global subprocess\.Popen"):
        read_pth(p)
    _zip_checkpoint(p, pickle.dumps({"a": [1, 2]}, protocol=2))
    with pytest.raises(CheckpointError, match=r"entry 'a' is a list, expected a tensor"):
        read_pth(p)
    _zip_checkpoint(p, pickle.dumps([1, 2], protocol=2))
    with pytest.raises(CheckpointError, match=r"expected a state dict"):
        read_pth(p)
    # a tensor view reaching past its storage: refused, not read out of bounds
    pkl = _tensor_pickle(offset=2, size=(4,), stride=(1,), numel=4)
    _zip_checkpoint(p, pkl, {"data/0": np.zeros(4, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=r"reaches element 5 of storage '0', which has 4"):
        read_pth(p)
    _zip_checkpoint(p, pkl, {"data/0": np.zeros(2, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=r"has 8 bytes, expected 4 x 4.*truncated"):
        read_pth(p)
    _zip_checkpoint(p, pkl)
    with pytest.raises(CheckpointError, match=r"'archive/data/0' is not in the archive"):
        read_pth(p)


def test_truncated_non_zip_legacy_and_missing(tmp_path):
    good = (MINI / "Wan2.1_VAE.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pth: damaged zip archive"):
        read_pth(cut)
    txt = tmp_path / "notes.pth"
    txt.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.pth: not a PyTorch checkpoint"):
        read_pth(txt)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth: not a PyTorch checkpoint"):
        read_pth(empty)
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy\.pth: legacy .*re-save it once with torch"):
        read_pth(legacy)
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        read_pth(tmp_path / "nope.pth")
    script = tmp_path / "ts.pth"  # the layout of torch.jit.save
    _zip_checkpoint(script, pickle.dumps({}, protocol=2), {"constants.pkl": pickle.dumps((), protocol=2)})
    with pytest.raises(CheckpointError, match=r"TorchScript"):
        read_pth(script)


def test_big_endian_archive(tmp_path):
    p = tmp_path / "be.pth"
    torch.save({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, p)
    src = zipfile.ZipFile(p)
    out = tmp_path / "be2.pth"
    with zipfile.ZipFile(out, "w") as z:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename:
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            z.writestr(info.filename, data)
    np.testing.assert_array_equal(read_pth(out)["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    assert read_pth(out)["w"].dtype == np.float32


def test_compressed_entries(tmp_path):
    """Storages in deflated zip entries (not what torch writes) are read into memory instead of mapped."""
    p = tmp_path / "c.pth"
    torch.save({"w": torch.arange(10, dtype=torch.int64)}, p)
    src = zipfile.ZipFile(p)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            z.writestr(info.filename, src.read(info))
    (tmp_path / "d.pth").write_bytes(buf.getvalue())
    np.testing.assert_array_equal(read_pth(tmp_path / "d.pth")["w"], np.arange(10))
