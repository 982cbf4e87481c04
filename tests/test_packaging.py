"""The distribution ships `wanjax`, `wanjax.quant` and `wanjax.kernels`, and no top-level `quant`/`kernels`."""
import subprocess
import sys
import zipfile

import pytest


@pytest.mark.slow
def test_wheel_contents(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), "."], check=True, capture_output=True)
    (whl,) = tmp_path.glob("wanjax-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    for pkg in ("wanjax/__init__.py", "wanjax/quant/__init__.py", "wanjax/kernels/__init__.py",
                "wanjax/model/dit.py", "wanjax/io/dit_loader.py", "wanjax/sampling/unipc.py"):
        assert pkg in names, pkg
    # every package of the source tree is in the wheel (a non-editable install must not lose subpackages)
    import pathlib
    root = pathlib.Path(__file__).resolve().parents[1]
    src = {"wanjax/" + str(p.parent.relative_to(root / "wanjax")).replace(".", "").strip("/")
           for p in (root / "wanjax").rglob("__init__.py")}
    for pkg in sorted(src):
        assert (pkg.rstrip("/") + "/__init__.py") in names, f"package {pkg} missing from the wheel"
    assert "wanjax/evaluation/sets/eval_mini.json" in names
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"wanjax"}, tops
    # the wheel imports on its own (zip import; wanjax.config needs no third-party package)
    code = "import sys; sys.path.insert(0, sys.argv[1]); import wanjax, wanjax.quant, wanjax.kernels; " \
           "assert wanjax.__file__.startswith(sys.argv[1]), wanjax.__file__"
    subprocess.run([sys.executable, "-c", code, str(whl)], check=True, cwd=tmp_path)


def test_installed_import_names(tmp_path):
    """Outside the repo root (whose folders are on sys.path only there), only the wanjax.* names exist."""
    code = ("import importlib.util as u, wanjax.quant, wanjax.kernels; "
            "assert u.find_spec('kernels') is None and u.find_spec('quant') is None; "
            "assert wanjax.quant.__name__ == 'wanjax.quant'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
