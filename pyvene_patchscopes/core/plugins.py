"""Plugins: the modules that register a user's own mappings and interventions, imported only when asked.

A mapping (`register_mapping`) or intervention (`register_intervention`) of your own is known in a process once
the module that registers it has been imported. A saved file names that module (`module_of`) so that a process
without it can say which one to import (`unregistered`); nothing is ever imported because a file names it. The
explicit ways are ``import my_plugins`` in Python, ``--import my_plugins`` on the command line (`import_module`),
and, for installed packages, the entry-point group ``pyvene_patchscopes.plugins`` (`load_plugins`), which the
command line loads and Python loads on request. Importing ``pyvene_patchscopes`` loads none of them.
"""

from __future__ import annotations

import importlib
import re
from importlib import metadata
from typing import Iterable

from ..errors import PatchscopeError, SpecError, UnknownNameError, first_line

PLUGIN_GROUP = "pyvene_patchscopes.plugins"
BUILT_IN = "pyvene_patchscopes"
MAIN = "__main__"
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,99}(\.[A-Za-z_][A-Za-z0-9_]{0,99}){0,15}$")
MODULE_HELP = "a Python module name such as my_plugins.mappings"


def module_of(cls: type) -> str | None:
    """The module a saved file names for `cls`: its ``__module__``, or None for the library's own classes (always
    registered once the package is imported)."""
    module = cls.__module__
    return None if module == BUILT_IN or module.startswith(BUILT_IN + ".") else module


def class_path(cls: type) -> str:
    """``module.qualname``: how a registration names a class. Two classes with one path are one class (a notebook
    cell or a module run again defines it anew)."""
    return f"{cls.__module__}.{cls.__qualname__}"


def claim(registry: dict[str, type], name: str, cls: type, kind: str) -> None:
    """Register `cls` under `name` in `registry` (`register_mapping`, `register_intervention`): the same class again
    is allowed, another class under a taken name is refused."""
    known = registry.get(name)
    if known is not None and class_path(known) != class_path(cls):
        raise SpecError(
            f"{kind} name {name!r} is already registered to {class_path(known)} (allowed: another name, "
            "or the same class again)"
        )
    registry[name] = cls


def check_module(value: object, field: str) -> str:
    """A module name as a saved file gives it: a dotted Python name, else a `SpecError` naming `field`."""
    if not isinstance(value, str) or not _MODULE.match(value):
        raise SpecError(f"{field}={value!r:.120} is not allowed (allowed: {MODULE_HELP})")
    return value


def unregistered(what: str, module: str | None, allowed: str | Iterable[str]) -> UnknownNameError:
    """The error for a name no registered class answers to, saying where the class comes from when a file says
    (`module`); `allowed` is the registered names, or a phrase for them."""
    known = f"(allowed: {allowed if isinstance(allowed, str) else ', '.join(sorted(allowed))})"
    if module is None:
        return UnknownNameError(
            f"{what} is not registered; a class of your own is known once the module that "
            "registers it is imported (in Python: import it; on the command line: --import "
            f"MODULE) {known}"
        )
    if module == MAIN:
        return UnknownNameError(
            f"{what} was registered in {MAIN} (a script or notebook) of the process that saved "
            "it, which no other process can import; move the class into an importable module, "
            f"import that, and save again {known}"
        )
    return UnknownNameError(
        f"{what} is registered by the module {module!r}, which this process has not imported; "
        f"import it first (in Python: import {module}; on the command line: patchscopes run "
        f"--import {module} ...) {known}"
    )


def import_module(name: str, flag: str = "--import") -> None:
    """Import `name` because the user asked (``--import NAME``); any failure is one line naming `flag` and `name`."""
    if not isinstance(name, str) or not _MODULE.match(name):
        raise PatchscopeError(f"{flag}={name!r:.120} is not a module name (allowed: {MODULE_HELP})")
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        raise PatchscopeError(
            f"{flag}={name!r} cannot be imported: {first_line(err)} (allowed: a module on the "
            "Python path, e.g. a package you installed or a file NAME.py in the working "
            "directory)"
        ) from None
    except (Exception, SystemExit) as err:  # noqa: BLE001  (the user's module may raise anything)
        raise PatchscopeError(
            f"{flag}={name!r} raised {type(err).__name__} while importing: {first_line(err)} "
            "(allowed: a module that imports without an error)"
        ) from None


def load_plugins() -> list[str]:
    """Import every installed plugin: the entry points of the group ``pyvene_patchscopes.plugins`` (each one a
    module, or ``module:attribute``), in name order. Returns their values. An entry point that fails to import is
    one line naming it and its package."""
    loaded = []
    for point in sorted(metadata.entry_points(group=PLUGIN_GROUP), key=lambda p: (p.name, p.value)):
        try:
            point.load()
        except (Exception, SystemExit) as err:  # noqa: BLE001
            package = f" of the package {point.dist.name!r}" if point.dist is not None else ""
            raise PatchscopeError(
                f"plugin entry point {point.name!r} = {point.value!r}{package} "
                f"(group {PLUGIN_GROUP}) raised {type(err).__name__} while importing: "
                f"{first_line(err)} (allowed: an "
                "installed plugin that imports without an error; fix or uninstall it)"
            ) from None
        loaded.append(point.value)
    return loaded


__all__ = [
    "PLUGIN_GROUP",
    "load_plugins",
    "import_module",
    "module_of",
    "class_path",
    "claim",
    "check_module",
    "unregistered",
]
