"""Subpackages named like the function they export (``verify``, ``export``) stay callable.

``fusionsurgery.verify`` is both a function of the lazy top-level API and a subpackage. Importing
the subpackage (as any ``from fusionsurgery.verify import ...`` does) makes Python bind the package
attribute to the module, replacing the function; a module of this class answers the call itself,
so ``fusionsurgery.verify(...)`` works whichever of the two the attribute holds.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__name__.rsplit(".", 1)[-1])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    """Let the module ``module_name`` be called as its own same-named function."""
    sys.modules[module_name].__class__ = _CallableModule
