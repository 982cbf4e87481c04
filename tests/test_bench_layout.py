"""bench runs from a plain checkout: ``PYTHONPATH=. python -m bench.x`` with no install of wanjax (as on the GPU
machine), through `bench.layout.ensure_package_layout`; no bench module edits ``sys.path`` for our packages."""

import ast
import os
import pathlib
import site
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _plain_checkout_env() -> dict:
    """PYTHONPATH = the checkout + the interpreter's site-packages, run with ``-S``: the dependencies import, but the
    editable install of wanjax (a .pth import hook, processed only by ``site``) is invisible."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *site.getsitepackages()])
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(*args):
    return subprocess.run(
        [sys.executable, "-S", *args], cwd=ROOT, env=_plain_checkout_env(), capture_output=True, text=True, timeout=300
    )


def test_without_the_layout_quant_is_not_importable():
    """The premise: in this environment the install is really hidden (else the next tests prove nothing)."""
    p = _run("-c", "import importlib.util as u; print(u.find_spec('wanjax.quant'))")
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "None"


def test_ensure_package_layout_registers_quant_and_kernels():
    p = _run(
        "-c",
        "from bench.layout import ensure_package_layout, ROOT; ensure_package_layout(); "
        "import wanjax.quant.qlinear, wanjax.kernels.dispatch, os; "
        "print(os.path.relpath(wanjax.quant.qlinear.__file__, ROOT), "
        "os.path.relpath(wanjax.kernels.dispatch.__file__, ROOT))",
    )
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == [os.path.join("quant", "qlinear.py"), os.path.join("kernels", "dispatch.py")]


@pytest.mark.parametrize("module", ["bench.gemm", "bench.kernels", "bench.pipeline", "bench.step_profile"])
def test_bench_help_from_a_plain_checkout(module):
    p = _run("-m", module, "--help")
    assert p.returncode == 0, p.stderr
    assert "usage:" in p.stdout


def test_no_bench_module_edits_sys_path_for_our_packages():
    """``sys.path.insert`` / ``append`` of the checkout is gone from bench (diffusers' wheel site is another matter)."""
    for path in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("insert", "append")
                and ast.unparse(node.func.value) == "sys.path"
            ):
                assert "target" in ast.unparse(node), f"{path.name}:{node.lineno}: {ast.unparse(node)}"
