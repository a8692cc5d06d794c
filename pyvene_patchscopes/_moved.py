"""Old module paths and where they moved (issue 38): each old path keeps working for one release, with a warning.

Every entry is ``old path: (new path, the release that removes the old one)``, relative to the package. The old
path is a `MovedModule` in ``sys.modules``: reading or setting any of its names warns ``DeprecationWarning`` naming
the new path, then acts on the new module, so that a ``monkeypatch`` through an old path reaches the real module
(loudly) rather than a dead copy. Paths that a package keeps (``spec``, ``result``, ``models``, ``persist``,
``export``, ...) re-export their old public names and need no entry here.

Why not a shim file per path: importing a submodule sets the parent's attribute of that name, so a file
``sweep.py`` would replace the exported function ``pyvene_patchscopes.sweep`` with a module. A ``sys.modules``
entry never touches the package's attributes.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import Any

PACKAGE = "pyvene_patchscopes"

MOVED: dict[str, tuple[str, str]] = {
    "adapters": ("models.adapters", "0.3.0"),
    "architectures": ("models.architectures", "0.3.0"),
    "devices": ("models.devices", "0.3.0"),
    "discovery": ("models.discovery", "0.3.0"),
    "engine": ("execution.engine", "0.3.0"),
    "execution.batching": ("plan.batching", "0.3.0"),
    "execution.plan": ("plan.rows", "0.3.0"),
    "families": ("tools.families", "0.3.0"),
    "files": ("core.files", "0.3.0"),
    "fit": ("analysis.fit", "0.3.0"),
    "jacobian.view": ("export.attribution", "0.3.0"),
    "jlens.lens": ("persist.jlens", "0.3.0"),
    "mappings": ("spec.mappings", "0.3.0"),
    "outputs": ("core.outputs", "0.3.0"),
    "pipeline": ("execution.pipeline", "0.3.0"),
    "plot": ("export.figures", "0.3.0"),
    "plugins": ("core.plugins", "0.3.0"),
    "positions": ("spec.positions", "0.3.0"),
    "pyvene_config": ("plan.pyvene_config", "0.3.0"),
    "scales": ("analysis.scales", "0.3.0"),
    "sites": ("models.sites", "0.3.0"),
    "states": ("execution.states", "0.3.0"),
    "sweep": ("execution.sweeps", "0.3.0"),
    "sweep_folder": ("persist.sweep_folder", "0.3.0"),
    "sweep_records": ("persist.sweep_records", "0.3.0"),
    "writes": ("spec.writes", "0.3.0"),
}


def moved_message(old: str) -> str:
    new, release = MOVED[old]
    return f"{PACKAGE}.{old} moved to {PACKAGE}.{new}; the old path is removed in {release}"


class MovedModule(types.ModuleType):
    """An old module path: every name read or set through it warns, then acts on the module it moved to."""

    def __init__(self, old: str) -> None:
        super().__init__(f"{PACKAGE}.{old}", f"Moved: {moved_message(old)}.")
        object.__setattr__(self, "_old", old)

    def _new(self) -> types.ModuleType:
        return importlib.import_module(f"{PACKAGE}.{MOVED[self._old][0]}")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # the import system's own probes (__path__, ...) say nothing
            raise AttributeError(name)
        warnings.warn(moved_message(self._old), DeprecationWarning, stacklevel=2)
        return getattr(self._new(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        warnings.warn(moved_message(self._old), DeprecationWarning, stacklevel=2)
        setattr(self._new(), name, value)

    def __delattr__(self, name: str) -> None:
        warnings.warn(moved_message(self._old), DeprecationWarning, stacklevel=2)
        delattr(self._new(), name)

    def __dir__(self) -> list[str]:
        return dir(self._new())


def install() -> None:
    """Put each old path in ``sys.modules`` (never over a module already there)."""
    for old in MOVED:
        sys.modules.setdefault(f"{PACKAGE}.{old}", MovedModule(old))


def moved_attribute(name: str) -> types.ModuleType:
    """``pyvene_patchscopes.<old>`` read as an attribute of the package: the old module path, with a warning."""
    if name not in MOVED:
        raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}")
    warnings.warn(moved_message(name), DeprecationWarning, stacklevel=3)
    return sys.modules[f"{PACKAGE}.{name}"]
