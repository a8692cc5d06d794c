"""Every workaround for pyvene 0.1.8 (and HF transformers 5.x) lives here, each with a test in tests/test_compat.py.

1. pyvene removes *all* forward hooks from the model on every call, which kills transformers 5's
   lazily installed ``output_hidden_states`` capture hooks and any user hook  -> `pyvene_guard` (and the
   opt-in `install`) remove only the hooks pyvene registered, known by their ids.
2. The short ``unit_locations`` forms set a sticky ``use_fast`` flag, after which every batch row is
   patched at row 0's position                                                -> `base_locations`, `reset_use_fast`.
3. ``{"base": [2, 3]}`` is read as (source position 2, base position 3)       -> `base_locations` never emits it.
4. ``load_intervention`` hard-codes ``map_location='cuda:0'``; ``save``/``load`` pickle ``.bin`` files and
   ``load`` imports any module named in ``config.json``                         -> `save_intervenable`,
   `load_intervenable`, `load_intervention_weights`; opt-in: `safe_serialization()` (or
   `install_safe_serialization`) routes pyvene's own methods there. Importing the plugin leaves them alone.
5. A custom class's constructor arguments are lost on reload                  -> the plugin's interventions keep
   them in their state and rebuild from it; `reloadable_kwargs_check` refuses classes that would lose them.
6. pyvene knows a few dozen classes; Qwen 3, Gemma 3, Phi-3, OLMo 2 and every family found in the model
   (`architectures.found`) are not registered with it                       -> `register_model_types`,
   from the architecture table and the found paths, on first use.
7. (moved) HF's last ``hidden_states`` entry is already after the final norm    -> `sites.hidden_state_site`.
8. pyvene prints a notice to stdout on import, which would corrupt ``--json`` output -> silenced above.
9. Wrapping a model freezes it (``requires_grad=False``, ``eval()``) and overwrites ``config.model_type``
                                                                               -> `pyvene_guard` restores them.
10. pyvene builds its gather/scatter indices on ``model.device``, the device of the model's first parameter.
    For an offloaded model that is ``meta``, and a gather with a meta index returns uninitialised memory
    (silently wrong readouts); for a model split over GPUs it is the first GPU, wrong for later layers
                                                                               -> `index_on_activation_device`.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import json
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints an nnsight notice on import; keep stdout clean
    import pyvene as pv
    import pyvene.models.intervenable_base as pv_base

from .models.architectures import FAMILIES, Architecture, family
from .models.devices import input_device
from .errors import PatchscopeError, SpecError, UnknownNameError
from .core.files import check_finite, inside, is_file, read_json, read_safetensors
from .core.outputs import replacing, save_tensors, write_text
from .core.plugins import MAIN, check_module, module_of, unregistered

_ORIGINAL_REMOVE_HOOKS = pv_base.remove_forward_hooks


# ---- 1. hooks ------------------------------------------------------------------------------------
# pyvene registers every hook it uses in IntervenableModel._intervention_getter / _intervention_setter and
# returns their handles. While tracking is on, those two methods are wrapped to record the handles' ids, and
# pyvene's "remove all hooks" is replaced by "remove the hooks pyvene registered": a hook is told apart by
# the id torch gave it when pyvene added it, never by the name of the module its function comes from.
_PYVENE_HOOKS: dict[int, "torch.utils.hooks.RemovableHandle"] = {}  # hook id -> pyvene's handle for it
_TRACKED_METHODS = ("_intervention_getter", "_intervention_setter")
_ORIGINAL_METHODS = {name: pv_base.IntervenableModel.__dict__[name] for name in _TRACKED_METHODS}
_tracking_depth = 0


def _recording(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        handlers = method(self, *args, **kwargs)
        _PYVENE_HOOKS.update((handle.id, handle) for handle in handlers.handlers)
        return handlers
    return wrapper


def _start_tracking() -> None:
    global _tracking_depth
    if _tracking_depth == 0:
        for name, method in _ORIGINAL_METHODS.items():
            setattr(pv_base.IntervenableModel, name, _recording(method))
        pv_base.remove_forward_hooks = remove_pyvene_hooks
    _tracking_depth += 1


def _stop_tracking() -> None:
    global _tracking_depth
    _tracking_depth -= 1
    if _tracking_depth == 0:
        for name, method in _ORIGINAL_METHODS.items():
            setattr(pv_base.IntervenableModel, name, method)
        pv_base.remove_forward_hooks = _ORIGINAL_REMOVE_HOOKS


def remove_pyvene_hooks(module: nn.Module) -> None:
    """Remove only the hooks pyvene registered while tracking was on; HF's and the user's own stay."""
    for sub in module.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks):
            for hook_id in [k for k in hooks if k in _PYVENE_HOOKS]:
                hooks.pop(hook_id)
                for extra in (getattr(sub, "_forward_hooks_with_kwargs", {}),
                              getattr(sub, "_forward_pre_hooks_with_kwargs", {}),
                              getattr(sub, "_forward_hooks_always_called", {})):
                    extra.pop(hook_id, None)
    _forget_removed_hooks()


def _forget_removed_hooks() -> None:
    """Drop the records of hooks that are gone (removed here, or by pyvene's own handle.remove())."""
    for hook_id, handle in list(_PYVENE_HOOKS.items()):
        hooks = handle.hooks_dict_ref()
        if hooks is None or hook_id not in hooks:
            del _PYVENE_HOOKS[hook_id]


def install() -> None:
    """Opt-in, process-wide: pyvene removes only its own hooks, for users' own pyvene pipelines too."""
    _start_tracking()


def uninstall() -> None:
    """Undo one `install`."""
    if _tracking_depth > 0:
        _stop_tracking()


@dataclass
class _ModelState:
    training: list[tuple[nn.Module, bool]]
    requires_grad: list[bool]
    model_type: object


@contextlib.contextmanager
def pyvene_guard(model: nn.Module) -> Iterator[None]:
    """Run pyvene calls on `model` and leave it as it was: same hooks, `requires_grad`, modes and config.

    Build and call your own ``IntervenableModel`` inside it (``with pyvene_guard(handle.model):``). Without it
    pyvene 0.1.8 removes every forward hook from the model on each call (HF's ``output_hidden_states`` capture
    and your own, for good), and wrapping the model freezes it, puts it in eval mode and rewrites
    ``config.model_type``. Inside it only the hooks pyvene adds in the block are removed.

    Every module's own training flag is recorded and restored (pyvene's wrapping calls ``model.eval()``,
    and ``model.train(flag)`` would flatten a mix of train and eval submodules).
    """
    params = list(model.parameters())
    state = _ModelState([(m, m.training) for m in model.modules()], [p.requires_grad for p in params],
                        model.config.__dict__.get("model_type", None) if hasattr(model, "config") else None)
    had_model_type = hasattr(model, "config") and "model_type" in model.config.__dict__
    _start_tracking()
    try:
        yield
    finally:
        remove_pyvene_hooks(model)
        _stop_tracking()
        for module, flag in state.training:
            module.training = flag
        for param, flag in zip(params, state.requires_grad):
            param.requires_grad_(flag)
        if hasattr(model, "config"):
            if had_model_type:
                model.config.__dict__["model_type"] = state.model_type
            else:
                model.config.__dict__.pop("model_type", None)


def intervenable(config: pv.IntervenableConfig, model: nn.Module) -> pv.IntervenableModel:
    """Build a pyvene IntervenableModel; call inside `pyvene_guard(model)` so its side effects are undone."""
    register_model_types(model)
    pvm = pv.IntervenableModel(config, model)
    reset_use_fast(pvm)
    index_on_activation_device(pvm)
    return pvm


# ---- 10. index device ------------------------------------------------------------------------------
def index_on_activation_device(pvm: pv.IntervenableModel) -> pv.IntervenableModel:
    """Build this IntervenableModel's gather/scatter indices on the device of the activation they index.

    pyvene passes ``device=self.get_device()`` (``model.device``) to ``gather_neurons``/``scatter_neurons``;
    with ``device=None`` they use the activation's own device, which is right for every layout. Only this
    instance changes (its ``get_device`` returns None); pyvene's class is left alone, and a user's own
    IntervenableModel over an offloaded or split model can opt in with this function.
    """
    pvm.get_device = lambda: None  # type: ignore[method-assign]
    return pvm


# ---- 2./3. unit locations ------------------------------------------------------------------------
def base_locations(positions: Sequence[int] | Sequence[Sequence[int]], n_interventions: int = 1) -> dict:
    """Canonical nested ``unit_locations`` for base-only interventions: one position per batch row, or (a
    sequence per row) several, as many in every row.

    Always ``{"sources->base": (None, [[[p_row0], [p_row1], ...]] * n)}``: never an int or a flat list,
    which pyvene would read as a static location (sticky ``use_fast``) or as a (source, base) pair.
    """
    rows = [[int(q) for q in p] if isinstance(p, (list, tuple)) else [int(p)] for p in positions]
    return {"sources->base": (None, [copy.deepcopy(rows) for _ in range(n_interventions)])}


def per_intervention_locations(positions: Sequence[Sequence[int]]) -> dict:
    """Canonical base-only locations with different rows per intervention: ``positions[k][row]``."""
    return {"sources->base": (None, [[[int(p)] for p in rows] for rows in positions])}


def reset_use_fast(pvm: pv.IntervenableModel) -> None:
    """Undo a sticky ``use_fast=True`` left by an earlier short-form call on the same instance."""
    pvm.use_fast = False
    for intervention in pvm.interventions.values():
        intervention.use_fast = False


# ---- 4./5. saving and loading interventions ---------------------------------------------------------
# The format stays pyvene's own, both ways: `save_intervenable` writes pyvene's config.json and its
# ``intkey_<key>.bin`` / ``pytorch_model.bin`` (tensor-only state dicts, which plain pyvene reads with torch's
# default ``weights_only=True``), plus a ``.safetensors`` twin of each. `load_intervenable` reads the
# safetensors file where there is one, else pyvene's ``.bin`` with ``weights_only=True``: a folder written
# by plain pyvene loads here, and a folder written here loads in plain pyvene.
_ORIGINAL_SAVE = pv.IntervenableModel.save
_ORIGINAL_LOAD = pv.IntervenableModel.load
_ORIGINAL_SAVE_INTERVENTION = pv.IntervenableModel.save_intervention
_ORIGINAL_LOAD_INTERVENTION = pv.IntervenableModel.load_intervention
_SERIALIZATION_METHODS = ("save", "load", "save_intervention", "load_intervention")
# the class's own entries (``load`` is a staticmethod there), so uninstalling puts back the very same objects
_ORIGINAL_ENTRIES = {name: pv.IntervenableModel.__dict__[name] for name in _SERIALIZATION_METHODS}
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.#\-]+$")
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _weights_name(key: str, suffix: str) -> str:
    """``intkey_<key><suffix>``; a key that could leave the folder is refused."""
    if not _SAFE_KEY.match(key) or ".." in key:
        raise SpecError(f"intervention key {key!r} is not allowed in a file name "
                        "(allowed: letters, digits, '_', '.', '#', '-', no '..')")
    return f"intkey_{key}{suffix}"


def _weights_file(directory: Path, key: str, suffix: str) -> Path:
    """``intkey_<key><suffix>`` inside `directory`; a key or link that could leave the folder is refused."""
    return inside(directory, _weights_name(key, suffix), "weights file")


def _stateful(intervention: nn.Module) -> bool:
    return isinstance(intervention, pv.TrainableIntervention) or \
        getattr(intervention, "source_representation", None) is not None


def _write_state(state: dict[str, torch.Tensor], safe: Path, legacy: Path) -> None:
    """One state dict as safetensors and as pyvene's ``.bin`` (a plain dict of tensors, no other objects)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_tensors(safe, tensors)
    with replacing(legacy) as temporary:
        torch.save(tensors, temporary)


def save_intervention_weights(pvm: pv.IntervenableModel, directory: str | Path,
                              trainable_only: bool = False) -> list[Path]:
    """Write each stateful intervention's ``state_dict`` as ``intkey_<key>.safetensors`` and ``.bin``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key, intervention in pvm.interventions.items():
        if isinstance(intervention, pv.TrainableIntervention) or (not trainable_only and _stateful(intervention)):
            safe = _weights_file(directory, key, ".safetensors")
            _write_state(intervention.state_dict(), safe, _weights_file(directory, key, ".bin"))
            written.append(safe)
    return written


def _save_model_weights(pvm: pv.IntervenableModel, directory: Path) -> None:
    """The model's trainable parameters, as pyvene's ``include_model`` saves them (plus a safetensors twin)."""
    trainable = {n: p for n, p in pvm.model.named_parameters() if p.requires_grad}
    _write_state(trainable, directory / MODEL_WEIGHTS[0], directory / MODEL_WEIGHTS[1])


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file, or a pyvene ``.bin`` read with ``weights_only=True``; errors name the file."""
    if path.suffix == ".safetensors":
        return read_safetensors(path, "weights file", device)
    if not is_file(path):
        raise SpecError(f"weights file {path.name!r} is missing from {path.parent}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, AttributeError, TypeError) as err:
        raise SpecError(f"refusing to load weights file {path.name!r}: {str(err).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise SpecError(f"weights file {path.name!r} does not hold a dict of named tensors")
    return state


def _read_pair(directory: Path, names: Sequence[str], device) -> dict[str, torch.Tensor]:
    """The first of `names` (safetensors first) that exists inside `directory`."""
    paths = [inside(directory, name, "weights file") for name in names]
    for path in paths:
        if is_file(path):
            return read_weights(path, device)
    raise SpecError(f"weights file {names[-1]!r} is missing from {directory} (looked for: {', '.join(names)})")


def _read_intervention_state(directory: Path, key: str, device) -> dict[str, torch.Tensor]:
    return _read_pair(directory, [_weights_name(key, ".safetensors"), _weights_name(key, ".bin")], device)


def load_intervention_weights(pvm: pv.IntervenableModel, directory: str | Path,
                              device: str | torch.device = "cpu") -> None:
    """What ``IntervenableModel.load_intervention`` should do: load on `device`, never execute pickled code.

    Reads ``intkey_<key>.safetensors`` if present, else pyvene's ``intkey_<key>.bin`` with
    ``weights_only=True`` (tensors only; a file that needs arbitrary unpickling is refused).
    """
    directory = Path(directory)
    for key, intervention in pvm.interventions.items():
        if isinstance(intervention, pv.TrainableIntervention):
            _load_state(intervention, _read_intervention_state(directory, key, device), key)


def load_model_weights(pvm: pv.IntervenableModel, directory: str | Path, device=None) -> None:
    """``include_model``: the saved trainable parameters, from model.safetensors or pyvene's pytorch_model.bin."""
    device = device if device is not None else input_device(pvm.model)
    pvm.model.load_state_dict(_read_pair(Path(directory), MODEL_WEIGHTS, device), strict=False)


def _load_state(intervention: nn.Module, state: dict, key: str) -> None:
    running = {k: v.dtype for k, v in intervention.state_dict().items()}  # load_state_dict casts to these
    check_finite(state, f"weights for intervention {key!r}: tensor", running)
    try:
        intervention.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches
        raise SpecError(f"weights for intervention {key!r} do not fit it: {str(err).splitlines()[0][:300]}") from None


def _allowed_intervention_types() -> dict[str, type]:
    """``str(type)`` -> class, for pyvene's built-in interventions and the registered plugin classes only."""
    from pyvene.models import interventions as builtin

    from .interventions import INTERVENTIONS

    allowed = {str(obj): obj for obj in vars(builtin).values()
               if isinstance(obj, type) and issubclass(obj, builtin.Intervention)}
    allowed.update({str(cls): cls for cls in INTERVENTIONS.values()})
    return allowed


def save_intervenable(pvm: pv.IntervenableModel, directory: str | Path, include_model: bool = False) -> Path:
    """pyvene's ``save`` (same config.json and .bin files), plus a safetensors twin of every weights file, and
    ``plugins.json`` naming the module of each registered class of the user's own (when there is one)."""
    directory = Path(directory)
    with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints "Directory ... already exists"
        _ORIGINAL_SAVE(pvm, str(directory), include_model=False)
    # rewrites pyvene's .bin files from CPU copies (pyvene's keep the tensors' devices, which a CPU-only
    # reader cannot map) and writes their safetensors twins
    save_intervention_weights(pvm, directory)
    if include_model:
        _save_model_weights(pvm, directory)
    _write_plugin_modules(pvm, directory)
    return directory


# ---- the modules of the user's own classes: named in plugins.json, for the error, never imported ----------------
PLUGINS_FILE = "plugins.json"
PLUGINS_FORMAT = "pyvene-patchscopes/plugins"


@dataclass(frozen=True)
class PluginModules:
    """What ``plugins.json`` says: pyvene's type string -> module, and mapping name -> module."""

    interventions: dict[str, str]
    mappings: dict[str, str]


def plugin_modules(pvm: pv.IntervenableModel) -> PluginModules:
    """The modules of `pvm`'s registered intervention classes and mappings that are the user's own."""
    from .interventions import INTERVENTIONS
    from .spec.mappings import MAPPINGS, MappingFunction, mapping_module

    registered = {str(cls) for cls in INTERVENTIONS.values()}  # as the loader matches them: by pyvene's type string
    interventions, mappings = {}, {}
    for intervention in pvm.interventions.values():
        module = module_of(type(intervention))
        if str(type(intervention)) in registered and module is not None:
            interventions[str(type(intervention))] = module
        mapping = getattr(intervention, "mapping", None)
        # the module that registers the name the state records, as a spec records it (`MappingSpec.module`)
        if isinstance(mapping, MappingFunction) and mapping.name in MAPPINGS and mapping_module(mapping.name):
            mappings[mapping.name] = mapping_module(mapping.name)
    return PluginModules(interventions, mappings)


def _write_plugin_modules(pvm: pv.IntervenableModel, directory: Path) -> None:
    found = plugin_modules(pvm)
    path = inside(directory, PLUGINS_FILE, "plugins file")
    if not (found.interventions or found.mappings):
        path.unlink(missing_ok=True)  # an earlier save's list, in this folder, no longer holds
        return
    write_text(path, json.dumps({"format": PLUGINS_FORMAT, "version": 1, "interventions": found.interventions,
                                 "mappings": found.mappings}, indent=2, sort_keys=True) + "\n")


def read_plugin_modules(directory: Path) -> PluginModules:
    """``plugins.json`` of a pyvene folder, checked (empty when there is none); only read, never acted on."""
    path = inside(directory, PLUGINS_FILE, "plugins file")
    if not is_file(path):
        return PluginModules({}, {})
    raw = read_json(path, f"{PLUGINS_FILE} in {directory}")
    fields = {"format", "version", "interventions", "mappings"}
    if not isinstance(raw, dict) or set(raw) != fields or raw["format"] != PLUGINS_FORMAT \
            or isinstance(raw["version"], bool) or raw["version"] != 1:
        raise SpecError(f"{PLUGINS_FILE} in {directory} is not allowed (allowed: an object with {sorted(fields)}, "
                        f"format {PLUGINS_FORMAT!r}, version 1)")
    for part in ("interventions", "mappings"):
        if not isinstance(raw[part], dict) or not all(isinstance(k, str) for k in raw[part]):
            raise SpecError(f"{PLUGINS_FILE} in {directory}: {part!r} is not allowed (allowed: an object of names "
                            "to module names)")
        for value in raw[part].values():
            check_module(value, f"{PLUGINS_FILE} {part} module")
    return PluginModules(raw["interventions"], raw["mappings"])


def _unknown_type(name: object, modules: dict[str, str]) -> UnknownNameError:
    """A type string no allowed class has: where the folder says it comes from, or a class of `__main__`."""
    allowed = "pyvene's own classes and classes registered with register_intervention"
    module = modules.get(name) if isinstance(name, str) else None
    if module is None and isinstance(name, str) and name.startswith(f"<class '{MAIN}."):
        module = MAIN
    if module is None:
        return UnknownNameError(f"intervention type {name!r:.120} is not allowed (allowed: {allowed}); nothing was "
                                "imported")
    return unregistered(f"intervention type {name!r:.120}", module, allowed)


def _check_mappings(modules: dict[str, str]) -> None:
    """Every mapping the folder names a module for is registered here (else the error names that module)."""
    from .spec.mappings import MAPPINGS

    for name, module in sorted(modules.items()):
        if name not in MAPPINGS:
            raise unregistered(f"the saved intervention's mapping {name!r:.80}", module, MAPPINGS)


def _read_pyvene_config(directory: Path) -> dict:
    path = inside(directory, "config.json", "pyvene config")
    if not is_file(path):
        raise SpecError(f"no pyvene config.json in {directory}")
    raw = read_json(path, f"pyvene config.json in {directory}")
    if not isinstance(raw, dict):
        raise SpecError(f"pyvene config.json in {directory} must hold a JSON object, got {type(raw).__name__}")
    return raw


def _representations(reps: list) -> list:
    """pyvene's positional representation lists -> RepresentationConfig, with a clear error for bad ones."""
    fields = pv.RepresentationConfig._fields
    out = []
    for index, opts in enumerate(reps):
        if not isinstance(opts, list) or not 1 <= len(opts) <= len(fields):
            raise SpecError(f"pyvene config.json representations[{index}]={opts!r:.80} is not allowed "
                            f"(allowed: a list of at most {len(fields)} fields: {', '.join(fields)})")
        rep = pv.RepresentationConfig(*opts)
        if isinstance(rep.layer, bool) or not isinstance(rep.layer, int) or not isinstance(rep.component, str) \
                or not isinstance(rep.unit, str):
            raise SpecError(f"pyvene config.json representations[{index}] needs an int layer and string component "
                            f"and unit, got layer={rep.layer!r:.40}, component={rep.component!r:.40}, "
                            f"unit={rep.unit!r:.40}")
        out.append(rep)
    return out


def load_intervenable(directory: str | Path, model: nn.Module, device: str | torch.device | None = None,
                      include_model: bool = False) -> pv.IntervenableModel:
    """pyvene's ``load``, made safe: JSON + safetensors (or tensor-only .bin), CPU-friendly, known classes only.

    Unlike pyvene 0.1.8 it never imports a module named in the file (``get_type_from_string``), never
    unpickles anything but tensors, never assumes CUDA, and reads nothing outside the folder; intervention
    classes must be pyvene's own or registered with `register_intervention`.
    """
    from .interventions import set_constant_source

    directory = Path(directory)
    raw = _read_pyvene_config(directory)
    allowed = _allowed_intervention_types()
    types, reps = raw.get("intervention_types"), raw.get("representations")
    if not isinstance(types, list) or not isinstance(reps, list) or len(types) != len(reps) or not types:
        raise SpecError("pyvene config.json needs equal-length, non-empty lists 'intervention_types' and "
                        "'representations'")
    plugins = read_plugin_modules(directory)
    classes = []
    for name in types:
        if not isinstance(name, str) or name not in allowed:
            raise _unknown_type(name, plugins.interventions)
        classes.append(allowed[name])
    _check_mappings(plugins.mappings)
    representations = _representations(reps)
    constants = raw.get("intervention_constant_sources")
    dims = raw.get("intervention_dimensions")
    constants = [False] * len(classes) if constants is None else constants
    dims = [None] * len(classes) if dims is None else dims
    if not (isinstance(constants, list) and isinstance(dims, list) and len(constants) == len(dims) == len(classes)):
        raise SpecError("pyvene config.json 'intervention_constant_sources' and 'intervention_dimensions' must "
                        f"be lists of {len(classes)} entries, one per intervention")
    device = device if device is not None else input_device(model)
    try:
        config = pv.IntervenableConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
        config.intervention_types = classes
        config.representations = representations
        register_model_types(model)
        with contextlib.redirect_stdout(io.StringIO()):
            pvm = pv.IntervenableModel(config, model)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NameError, RuntimeError) as err:
        raise SpecError(f"pyvene config.json in {directory} does not fit this model: "
                        f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from None
    for i, (key, intervention) in enumerate(pvm.interventions.items()):
        intervention.is_source_constant = bool(constants[i])
        _set_dimension(intervention, dims[i], representations[i], model, key)
        if isinstance(intervention, pv.TrainableIntervention):
            _load_state(intervention, _read_intervention_state(directory, key, device), key)
        elif constants[i] and not isinstance(intervention, _NO_SOURCE):
            state = _read_intervention_state(directory, key, device)
            if "source_representation" not in state:
                raise SpecError(f"weights for intervention {key!r} lack 'source_representation'")
            set_constant_source(intervention, state["source_representation"])
        intervention.to(device)
    if include_model:
        load_model_weights(pvm, directory, device)
    return pvm


def _set_dimension(intervention: nn.Module, dim: object, rep, model: nn.Module, key: str) -> None:
    """pyvene's rule: the saved interchange dimension, else the model's hidden size (per head for head_*)."""
    if dim is None:
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if hidden is None:
            return
        dim = hidden // config.num_attention_heads if rep.component.startswith("head_") else hidden
    if isinstance(dim, bool) or not (isinstance(dim, int) or (isinstance(dim, list)
                                                              and all(isinstance(d, int) for d in dim))):
        raise SpecError(f"pyvene config.json intervention_dimensions for {key!r} is {dim!r:.60} "
                        "(allowed: an int, a list of ints, or null)")
    intervention.set_interchange_dim(dim)


# constant-source classes that hold no source vector: nothing to read back for them
_NO_SOURCE = (pv.ZeroIntervention, pv.SourcelessIntervention, pv.CollectIntervention, pv.NoiseIntervention)


def _patched_save(self: pv.IntervenableModel, save_directory: str, save_to_hf_hub: bool = False,
                  hf_repo_name: str = "my-awesome-model", include_model: bool = False) -> None:
    save_intervenable(self, save_directory, include_model=include_model)
    if save_to_hf_hub:  # optional: only for users with a hub
        from huggingface_hub import HfApi

        HfApi().create_repo(hf_repo_name, exist_ok=True)
        HfApi().upload_folder(folder_path=str(save_directory), repo_id=hf_repo_name)


def _patched_load(load_directory: str, model: nn.Module, local_directory: str | None = None,
                  from_huggingface_hub: bool = False, include_model: bool = False) -> pv.IntervenableModel:
    if from_huggingface_hub or not Path(load_directory).exists():
        from huggingface_hub import snapshot_download

        load_directory = snapshot_download(repo_id=load_directory, local_dir=local_directory)
    return load_intervenable(load_directory, model, include_model=include_model)


def _patched_save_intervention(self: pv.IntervenableModel, save_directory: str, include_model: bool = True) -> None:
    save_intervention_weights(self, save_directory, trainable_only=True)
    if include_model:
        _save_model_weights(self, Path(save_directory))


def _patched_load_intervention(self: pv.IntervenableModel, load_directory: str, include_model: bool = True) -> None:
    load_intervention_weights(self, load_directory, input_device(self.model))
    if include_model:
        load_model_weights(self, load_directory)


def install_safe_serialization() -> None:
    """Opt-in, process-wide: route pyvene's ``save``/``load``/``save_intervention``/``load_intervention`` here.

    ``IntervenableModel.save``/``load`` then round-trip plugin interventions on CPU without importing
    modules named in files; the files stay pyvene's (see above). `uninstall_safe_serialization` undoes it;
    `safe_serialization` does both around a block.
    """
    _set_methods({"save": _patched_save, "load": staticmethod(_patched_load),
                  "save_intervention": _patched_save_intervention, "load_intervention": _patched_load_intervention})


def uninstall_safe_serialization() -> None:
    """Give pyvene back its own ``save``/``load``/``save_intervention``/``load_intervention``."""
    _set_methods(_ORIGINAL_ENTRIES)


def _set_methods(entries: dict[str, object]) -> None:
    for name, entry in entries.items():
        setattr(pv.IntervenableModel, name, entry)


@contextlib.contextmanager
def safe_serialization() -> Iterator[None]:
    """Within the block, pyvene's own save/load methods are the safe ones; after it, whatever was there before.

    What was installed before is put back (pyvene's originals, or an outer `install_safe_serialization`),
    even when the block raises.
    """
    before = {name: pv.IntervenableModel.__dict__[name] for name in _SERIALIZATION_METHODS}
    install_safe_serialization()
    try:
        yield
    finally:
        _set_methods(before)


# ---- 5. constructor arguments ---------------------------------------------------------------------
def reloadable_kwargs_check(intervention: nn.Module) -> None:
    """Raise if `intervention` keeps constructor arguments that pyvene's save/load would drop.

    pyvene 0.1.8 rebuilds an intervention as ``cls(**RepresentationConfig fields, embed_dim=...)`` and
    then restores ``state_dict()`` only for trainable ones; any other plain attribute set from a
    constructor argument silently returns to its default. Hyper-parameters must live in buffers, or the
    class must rebuild itself from its loaded state (``restores_arguments_from_state = True``, as the
    plugin's own interventions do).
    """
    if getattr(intervention, "restores_arguments_from_state", False) and \
            isinstance(intervention, pv.TrainableIntervention):
        return
    signature = inspect.signature(type(intervention).__init__)
    explicit = [n for n, p in signature.parameters.items()
                if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
    state = set(intervention.state_dict())
    lost = [n for n in explicit if n not in state and n not in pv.RepresentationConfig._fields
            and n not in ("embed_dim", "use_fast", "keep_last_dim")]
    if lost:
        raise PatchscopeError(
            f"{type(intervention).__name__} takes constructor argument(s) {lost} that pyvene 0.1.8 loses on "
            "reload; store them as buffers (register_buffer) and accept only **kwargs"
        )


# ---- 6. model registry ----------------------------------------------------------------------------
def register_model_types(model: nn.Module | None = None) -> None:
    """Register the table's families that pyvene 0.1.8 lacks (Qwen 3, Gemma 3, Phi-3, OLMo 2), and `model`'s class.

    Each table family borrows the module table of a family pyvene knows (``Architecture.pyvene_like``), with
    per-head sizes read from ``config.head_dim`` where the family sets its head size so
    (``Architecture.head_dim``). A class pyvene lacks and the table does not hold gets the paths found in the
    model (`found_module_table`). Done on first use (`intervenable`, `check_hookable`), never on import.
    """
    import transformers

    for arch in FAMILIES:
        if arch.pyvene_like is None:
            continue
        like = _pyvene_class(family(arch.pyvene_like))
        for name in arch.classes:
            cls = getattr(transformers, name, None)
            if cls is None or like is None or cls in pv.type_to_module_mapping:
                continue
            dims = dict(pv.type_to_dimension_mapping[like])
            if arch.head_dim:
                for component in ("head_attention_value_output", "head_query_output", "head_key_output",
                                  "head_value_output"):
                    dims[component] = ("head_dim",)
            pv.type_to_module_mapping[cls] = copy.deepcopy(pv.type_to_module_mapping[like])
            pv.type_to_dimension_mapping[cls] = dims
    if model is not None and type(model) not in pv.type_to_module_mapping:
        modules, dims = found_module_table(model)
        pv.type_to_module_mapping[type(model)] = modules
        pv.type_to_dimension_mapping[type(model)] = dims


def found_module_table(model: nn.Module) -> tuple[dict, dict]:
    """pyvene's two tables for `model`'s class, from its found architecture: blocks, and their attention and MLP."""
    from pyvene.models.constants import CONST_INPUT_HOOK, CONST_OUTPUT_HOOK

    from .models.architectures import architecture

    arch = architecture(model)
    block = f"{arch.layers}[%s]"
    modules = {"block_input": (block, CONST_INPUT_HOOK), "block_output": (block, CONST_OUTPUT_HOOK)}
    children = dict(arch.module(model, arch.layers)[0].named_children())
    for name in ("self_attn", "attention", "attn", "self_attention"):
        if name in children:
            modules["attention_output"] = (f"{block}.{name}", CONST_OUTPUT_HOOK)
            modules["attention_input"] = (f"{block}.{name}", CONST_INPUT_HOOK)
            break
    for name in ("mlp", "feed_forward", "block_sparse_moe", "ffn"):
        if name in children:
            modules["mlp_output"] = (f"{block}.{name}", CONST_OUTPUT_HOOK)
            modules["mlp_input"] = (f"{block}.{name}", CONST_INPUT_HOOK)
            break
    text = "" if model.config.get_text_config() is model.config else _text_config_path(model.config)
    size = (f"{text}hidden_size",)
    return modules, {component: size for component in modules}


def _text_config_path(config) -> str:
    """Where a multimodal config keeps its language model's config, as pyvene's dotted lookup reads it."""
    text = config.get_text_config()
    for name, value in vars(config).items():
        if value is text:
            return f"{name}."
    return ""


def _pyvene_class(arch: Architecture) -> type | None:
    import transformers

    for name in arch.classes:
        cls = getattr(transformers, name, None)
        if cls is not None and cls in pv.type_to_module_mapping:
            return cls
    return None


def check_hookable(model: nn.Module) -> None:
    """A model pyvene can hook (its class in pyvene's registry, after ours), else an error naming the families."""
    if type(model) in pv.type_to_module_mapping:
        return
    register_model_types(model)


__all__ = [
    "install", "uninstall", "pyvene_guard", "intervenable", "remove_pyvene_hooks", "base_locations",
    "per_intervention_locations", "reset_use_fast", "load_intervention_weights", "reloadable_kwargs_check",
    "save_intervenable", "load_intervenable", "save_intervention_weights", "read_weights", "load_model_weights",
    "install_safe_serialization", "uninstall_safe_serialization", "safe_serialization",
    "register_model_types", "check_hookable", "index_on_activation_device", "plugin_modules", "read_plugin_modules",
    "PluginModules", "PLUGINS_FILE",
]
