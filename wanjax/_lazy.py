"""The lazy public names of a package: a module ``__getattr__`` that imports a name's module on first use."""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_getattr(package: str, table: dict[str, tuple[str, str]], prefix: str = "", whole_modules=()) -> Callable:
    """A module ``__getattr__`` for ``package``: ``table[name] = (module, attribute)`` is looked up in module
    ``prefix + module``, imported on first use; the names of ``whole_modules`` give the module itself. Any other name
    raises ``AttributeError`` (``module 'package' has no attribute 'name'``)."""

    def __getattr__(name: str) -> Any:
        if name in table:
            mod, attr = table[name]
            module = importlib.import_module(prefix + mod)
            return module if name in whole_modules else getattr(module, attr)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
