"""Packages whose names are imported on first use (PEP 562), so that importing a package
costs nothing until one of its names is used: a Ray worker that only reads and decodes
images never imports torch (1.2 s on 2 cores, paid by every new worker process).
``surgery`` and ``pipeline`` both use it."""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import Any

__all__ = ["lazy_package"]


class _Package(types.ModuleType):
    """Importing a submodule binds it on its package; where a submodule shares its name with
    the function it defines (``featurize``, ``summary``), the function keeps the name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and self.__dict__.get("_EXPORTS", {}).get(name) == name:
            return
        super().__setattr__(name, value)


def lazy_package(name: str, exports: dict[str, str | None]) -> list[str]:
    """Make the package ``name`` import each of ``exports`` (name -> the submodule that
    defines it, relative to the package, or a whole module name with a dot in it, such as
    ``freezeray.images``; None: the name is a submodule) on first use. Returns its ``__all__``.

    Example:
        >>> __all__ = lazy_package(__name__, {"zoo": None, "TransferLearning": "builder"})
    """
    module = sys.modules[name]

    def __getattr__(attr: str) -> Any:
        if attr not in exports:
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        where = exports[attr]
        if where is None:
            value = import_module(f".{attr}", name)
        else:
            value = getattr(import_module(where) if "." in where else import_module(f".{where}", name), attr)
        setattr(module, attr, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(module)) | set(exports))

    module.__class__ = _Package
    module._EXPORTS = exports  # type: ignore[attr-defined]
    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    module.__dir__ = __dir__  # type: ignore[method-assign]
    return list(exports)
