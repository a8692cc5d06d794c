"""Workaround #4, the user's own classes: ``plugins.json`` names their modules, for the error, and is never acted on.

A pyvene folder names its intervention classes by ``str(type)``, and pyvene's ``load`` imports whatever module such
a string names. The safe loader imports nothing; when a folder holds a class (or a mapping) of the user's own,
``plugins.json`` beside it says which module registers it, so that the refusal can say what to import.

Tests: tests/test_plugins.py (plugins.json), tests/test_serialization.py
(test_safe_loader_never_imports_modules_named_in_a_pyvene_config).
Remove when: pyvene's ``load`` stops importing modules named in ``config.json`` and can name the module a class
needs (not so on main as of 9e33390), and the pinned pyvene is that release.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyvene as pv

from ..core.files import inside, is_file, read_json
from ..core.outputs import write_text
from ..core.plugins import MAIN, check_module, module_of, unregistered
from ..errors import SpecError, UnknownNameError

PLUGINS_FILE = "plugins.json"
PLUGINS_FORMAT = "pyvene-patchscopes/plugins"


@dataclass(frozen=True)
class PluginModules:
    """What ``plugins.json`` says: pyvene's type string -> module, and mapping name -> module."""

    interventions: dict[str, str]
    mappings: dict[str, str]


def plugin_modules(pvm: pv.IntervenableModel) -> PluginModules:
    """The modules of `pvm`'s registered intervention classes and mappings that are the user's own."""
    from ..interventions import INTERVENTIONS
    from ..spec.mappings import MAPPINGS, MappingFunction, mapping_module

    registered = {str(cls) for cls in INTERVENTIONS.values()}  # as the loader matches them: by pyvene's type string
    interventions, mappings = {}, {}
    for intervention in pvm.interventions.values():
        module = module_of(type(intervention))
        if str(type(intervention)) in registered and module is not None:
            interventions[str(type(intervention))] = module
        mapping = getattr(intervention, "mapping", None)
        # the module that registers the name the state records, as a spec records it (`MappingSpec.module`)
        if isinstance(mapping, MappingFunction) and mapping.name in MAPPINGS and (home := mapping_module(mapping.name)):
            mappings[mapping.name] = home
    return PluginModules(interventions, mappings)


def write_plugin_modules(pvm: pv.IntervenableModel, directory: Path) -> None:
    found = plugin_modules(pvm)
    path = inside(directory, PLUGINS_FILE, "plugins file")
    if not (found.interventions or found.mappings):
        path.unlink(missing_ok=True)  # an earlier save's list, in this folder, no longer holds
        return
    write_text(
        path,
        json.dumps(
            {"format": PLUGINS_FORMAT, "version": 1, "interventions": found.interventions, "mappings": found.mappings},
            indent=2,
            sort_keys=True,
        )
        + "\n",
    )


def read_plugin_modules(directory: Path) -> PluginModules:
    """``plugins.json`` of a pyvene folder, checked (empty when there is none); only read, never acted on."""
    path = inside(directory, PLUGINS_FILE, "plugins file")
    if not is_file(path):
        return PluginModules({}, {})
    raw = read_json(path, f"{PLUGINS_FILE} in {directory}")
    fields = {"format", "version", "interventions", "mappings"}
    if (
        not isinstance(raw, dict)
        or set(raw) != fields
        or raw["format"] != PLUGINS_FORMAT
        or isinstance(raw["version"], bool)
        or raw["version"] != 1
    ):
        raise SpecError(
            f"{PLUGINS_FILE} in {directory} is not allowed (allowed: an object with {sorted(fields)}, "
            f"format {PLUGINS_FORMAT!r}, version 1)"
        )
    for part in ("interventions", "mappings"):
        if not isinstance(raw[part], dict) or not all(isinstance(k, str) for k in raw[part]):
            raise SpecError(
                f"{PLUGINS_FILE} in {directory}: {part!r} is not allowed (allowed: an object of names to module names)"
            )
        for value in raw[part].values():
            check_module(value, f"{PLUGINS_FILE} {part} module")
    return PluginModules(raw["interventions"], raw["mappings"])


def unknown_type(name: object, modules: dict[str, str]) -> UnknownNameError:
    """A type string no allowed class has: where the folder says it comes from, or a class of `__main__`."""
    allowed = "pyvene's own classes and classes registered with register_intervention"
    module = modules.get(name) if isinstance(name, str) else None
    if module is None and isinstance(name, str) and name.startswith(f"<class '{MAIN}."):
        module = MAIN
    if module is None:
        return UnknownNameError(
            f"intervention type {name!r:.120} is not allowed (allowed: {allowed}); nothing was imported"
        )
    return unregistered(f"intervention type {name!r:.120}", module, allowed)


def check_mappings(modules: dict[str, str]) -> None:
    """Every mapping the folder names a module for is registered here (else the error names that module)."""
    from ..spec.mappings import MAPPINGS

    for name, module in sorted(modules.items()):
        if name not in MAPPINGS:
            raise unregistered(f"the saved intervention's mapping {name!r:.80}", module, MAPPINGS)
