"""The pyvene boundary: every workaround for pyvene 0.1.8 (with HF transformers 5.x), one module per topic.

Each module says what pyvene does wrong, its test, and "Remove when: ..." (the pyvene change that makes it
unneeded); `tests/test_compat.py` holds one test per numbered pitfall.

1. pyvene removes *all* forward hooks on every call                          -> `hooks`: `pyvene_guard`, `install`.
2. short ``unit_locations`` forms set a sticky ``use_fast`` flag             -> `locations`: `base_locations`,
                                                                                `reset_use_fast`.
3. ``{"base": [2, 3]}`` is read as (source 2, base 3)                         -> `locations`: `base_locations`.
4. ``load_intervention`` assumes CUDA, ``save``/``load`` pickle, and ``load`` imports modules named in a file
                                                                             -> `weights`, `folders`
   (`save_intervenable`, `load_intervenable`), `plugins_file` (``plugins.json``), and the opt-in
   `opt_in_serialization` (`safe_serialization`, `install_safe_serialization`).
   Importing the plugin leaves pyvene's methods alone.
5. a custom class's constructor arguments are lost on reload                 -> `constructor_args`:
                                                                                `reloadable_kwargs_check`.
6. Qwen 3, Gemma 3, Phi-3, OLMo 2 and found families are not registered      -> `registry`: `register_model_types`.
7. (moved) HF's last ``hidden_states`` entry is already after the final norm   -> `models.sites.hidden_state_site`.
8. pyvene prints a notice to stdout on import, which would corrupt ``--json`` output -> silenced here, before any
   other module imports pyvene. Remove when: pyvene imports quietly without nnsight (not so on main as of
   9e33390). Test: tests/test_compat.py (test_bug8_importing_the_plugin_prints_nothing).
9. wrapping a model freezes it and overwrites ``config.model_type``           -> `hooks`: `pyvene_guard`.
10. gather/scatter indices are built on ``model.device`` (``meta`` when offloaded) -> `index_device`.

`intervenable` (`intervenable_model`) builds an ``IntervenableModel`` with #2, #6 and #10 applied.

Every name is defined in its topic module and re-exported here. Setting a name on this package (a
``monkeypatch.setattr(compat, ...)``) sets it in the topic modules that hold it too, so that the code using it sees
the change, as it did when compat was one module.
"""

from __future__ import annotations

import contextlib
import io
import sys
import types

with contextlib.redirect_stdout(io.StringIO()):  # #8: pyvene prints an nnsight notice on import; keep stdout clean
    import pyvene  # noqa: F401  (imported here for its notice to go nowhere: #8)
    import pyvene.models.intervenable_base  # noqa: F401  (the same, for its submodules)

from . import (
    constructor_args,
    folders,
    hooks,
    index_device,
    intervenable_model,
    locations,
    opt_in_serialization,
    plugins_file,
    registry,
    weights,
)
from .constructor_args import reloadable_kwargs_check

# the one-module compat's other names: pyvene's own methods, the hook records, constants
from .folders import (
    PYVENE_SAVE as PYVENE_SAVE,
    load_intervenable,
    save_intervenable,
)
from .hooks import (
    PYVENE_HOOKS as PYVENE_HOOKS,
    PYVENE_REMOVE_HOOKS as PYVENE_REMOVE_HOOKS,
    install,
    pyvene_guard,
    remove_pyvene_hooks,
    uninstall,
)
from .index_device import index_on_activation_device
from .intervenable_model import intervenable
from .locations import base_locations, per_intervention_locations, reset_use_fast
from .opt_in_serialization import (
    PYVENE_ENTRIES as PYVENE_ENTRIES,
    PYVENE_LOAD as PYVENE_LOAD,
    PYVENE_LOAD_INTERVENTION as PYVENE_LOAD_INTERVENTION,
    PYVENE_SAVE_INTERVENTION as PYVENE_SAVE_INTERVENTION,
    install_safe_serialization,
    safe_serialization,
    uninstall_safe_serialization,
)
from .plugins_file import (
    PLUGINS_FILE,
    PLUGINS_FORMAT as PLUGINS_FORMAT,
    PluginModules,
    plugin_modules,
    read_plugin_modules,
)
from .registry import (
    check_hookable,
    found_module_table as found_module_table,
    register_model_types,
)
from .weights import (
    MODEL_WEIGHTS as MODEL_WEIGHTS,
    load_intervention_weights,
    load_model_weights,
    read_weights,
    save_intervention_weights,
    weights_file as weights_file,
)

# their private names in the one-module compat, kept as aliases (the tests compare against them)
_ALIASES = {
    "_ORIGINAL_SAVE": "PYVENE_SAVE",
    "_ORIGINAL_LOAD": "PYVENE_LOAD",
    "_ORIGINAL_SAVE_INTERVENTION": "PYVENE_SAVE_INTERVENTION",
    "_ORIGINAL_LOAD_INTERVENTION": "PYVENE_LOAD_INTERVENTION",
    "_ORIGINAL_ENTRIES": "PYVENE_ENTRIES",
    "_ORIGINAL_REMOVE_HOOKS": "PYVENE_REMOVE_HOOKS",
    "_PYVENE_HOOKS": "PYVENE_HOOKS",
    "_weights_file": "weights_file",
}
globals().update({alias: globals()[name] for alias, name in _ALIASES.items()})

_TOPICS = (
    constructor_args,
    folders,
    hooks,
    index_device,
    intervenable_model,
    locations,
    opt_in_serialization,
    plugins_file,
    registry,
    weights,
)
_ABSENT = object()


class _Workarounds(types.ModuleType):
    """This package: a name set on it is set in every topic module that holds the same object under that name
    (under its new name, for an old private alias)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in self.__dict__:
            old, defined = self.__dict__[name], _ALIASES.get(name, name)
            for topic in _TOPICS:
                if topic.__dict__.get(defined, _ABSENT) is old:
                    setattr(topic, defined, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Workarounds

__all__ = [
    "install",
    "uninstall",
    "pyvene_guard",
    "intervenable",
    "remove_pyvene_hooks",
    "base_locations",
    "per_intervention_locations",
    "reset_use_fast",
    "load_intervention_weights",
    "reloadable_kwargs_check",
    "save_intervenable",
    "load_intervenable",
    "save_intervention_weights",
    "read_weights",
    "load_model_weights",
    "install_safe_serialization",
    "uninstall_safe_serialization",
    "safe_serialization",
    "register_model_types",
    "check_hookable",
    "index_on_activation_device",
    "plugin_modules",
    "read_plugin_modules",
    "PluginModules",
    "PLUGINS_FILE",
]
