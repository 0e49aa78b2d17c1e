"""Names of a package loaded on first use (PEP 562), for packages whose `import` must stay
cheap: `lfm2` (torch only for the model), `devices` (no runtime for an agent's CLI) and
`nas.quality` (no torch for `lfm2-nas --help`)."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from importlib import import_module
from typing import Any


class _KeepsExportsOverSubmodules(types.ModuleType):
    """A package whose exported name equals one of its submodules' names (`reports.pick`, the
    function, from `reports/pick.py`): importing the submodule makes Python bind the module to
    the package under that name, which would hide the export from then on (`from reports
    import pick` would give the module or the function depending on what ran first). Bound
    here, the submodule is replaced by its own attribute of that name."""

    _exported_from_namesakes: frozenset[str] = frozenset()

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._exported_from_namesakes and isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


def lazy_attributes(package: str, sources: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package` that imports `sources[name]` (a module
    path) the first time `name` is asked for, and keeps the value in the package. A name
    exported from a submodule of the same name stays the export whatever is imported first
    (`_KeepsExportsOverSubmodules`)."""
    namesakes = frozenset(name for name, source in sources.items() if source == f"{package}.{name}")
    if namesakes:
        module = sys.modules[package]
        module.__class__ = _KeepsExportsOverSubmodules
        object.__setattr__(module, "_exported_from_namesakes", namesakes)

    def __getattr__(name: str) -> Any:
        if name not in sources:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(sources[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__


__all__ = ["lazy_attributes"]
