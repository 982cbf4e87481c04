"""Where the checkout is, and the package layout of an uninstalled checkout (no jax imported here).

``python -m bench.x`` from the repository root imports ``wanjax`` from ``./wanjax``; the installed package maps
``wanjax.quant`` / ``wanjax.kernels`` to the top-level ``quant/`` and ``kernels/`` folders (pyproject's
package-dir), which a plain checkout (``PYTHONPATH=.``, the GPU machine) lacks: `ensure_package_layout` registers
them from those folders. Every bench entry point calls it before importing ``wanjax.quant`` / ``wanjax.kernels``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

#: the repository root (the folder holding bench/, wanjax/, quant/, kernels/)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ensure_package_layout() -> None:
    """Make ``wanjax.quant`` / ``wanjax.kernels`` importable from a plain checkout (``PYTHONPATH=.``, no install).

    The installed package maps them to the top-level ``quant/`` and ``kernels/`` folders (pyproject); without an
    install they are registered here from those folders. A no-op where they already import.
    """
    import wanjax

    for sub in ("quant", "kernels"):
        name = f"wanjax.{sub}"
        if name in sys.modules:
            continue
        try:
            if importlib.util.find_spec(name) is not None:
                continue
        except ModuleNotFoundError:
            pass
        folder = os.path.join(ROOT, sub)
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
        )
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
        setattr(wanjax, sub, mod)
