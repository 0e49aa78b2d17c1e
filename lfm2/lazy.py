"""Names of a package loaded on first use (PEP 562), for packages whose `import` must stay
cheap: `lfm2` (torch only for the model), `devices` (no runtime for an agent's CLI) and
`nas.quality` (no torch for `lfm2-nas --help`)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_attributes(package: str, sources: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports `sources[name]` (a module
    path) the first time `name` is asked for, and keeps the value in the package."""

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(sources[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["lazy_attributes"]
