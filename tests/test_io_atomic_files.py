"""wanjax.io.atomic's file helpers (atomic_path / atomic_write / write_json_atomic) and wanjax.io.jsonio."""

import json
import os
import stat

import numpy as np
import pytest

from wanjax.io.atomic import atomic_path, atomic_write, current_umask, write_json_atomic
from wanjax.io.jsonio import json_default, to_jsonable


def _siblings(d):
    return sorted(os.listdir(d))


def test_atomic_write_replaces_with_the_usual_mode(tmp_path):
    p = tmp_path / "sub" / "a.csv"  # the parent is created
    with atomic_write(p) as f:
        f.write("x,y\n")
    assert p.read_text() == "x,y\n"
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o666 & ~current_umask()
    with atomic_write(p, "wb") as f:
        f.write(b"new")
    assert p.read_bytes() == b"new" and _siblings(p.parent) == ["a.csv"]


def test_an_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    p = tmp_path / "a.json"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p) as f:
            f.write("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old" and _siblings(tmp_path) == ["a.json"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(p, suffix=".tmp.png") as tmp:
            assert tmp.endswith(".tmp.png") and os.path.dirname(tmp) == str(tmp_path)
            raise KeyboardInterrupt
    assert _siblings(tmp_path) == ["a.json"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_write(p, "a"):
            pass


def test_write_json_atomic_converts_numpy(tmp_path):
    obj = {"f": np.float32(1.5), "i": np.int64(3), "b": np.bool_(True), "a": np.arange(3), "o": object}
    write_json_atomic(tmp_path / "r.json", obj, indent=2)
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["f"] == 1.5 and got["i"] == 3 and got["b"] is True and got["a"] == [0, 1, 2]
    assert got["o"] == str(object)
    assert to_jsonable({"x": np.float64(2.0)}) == {"x": 2.0}
    assert json_default(np.int8(-1)) == -1 and isinstance(json_default(np.int8(-1)), int)
