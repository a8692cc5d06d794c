"""Workaround #4, the folder: pyvene's ``save``/``load`` made safe, in pyvene's own format both ways.

`save_intervenable` writes pyvene's ``config.json`` and ``.bin`` files plus a safetensors twin of each (`weights`)
and ``plugins.json`` (`plugin_modules`); `load_intervenable` reads such a folder, or one written by plain pyvene,
without importing a module named in it, without unpickling, on any device, and nothing outside the folder.

Tests: tests/test_compat.py (test_bug4_*), tests/test_hostile.py (test_d3_*, test_d9_*pyvene_configs*, test_d10_*),
tests/test_serialization.py (test_pyvene_save_load_*, test_safe_loader_*).
Remove when: pyvene's ``load`` builds only known classes without importing named modules, reads tensors only, on
any device, inside the folder (not so on main as of 9e33390), and the pinned pyvene is that release.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Protocol

import pyvene as pv
import torch
from torch import nn

from ..core.files import inside, is_file, read_json
from ..errors import SpecError
from ..models.devices import input_device
from .plugins_file import check_mappings, read_plugin_modules, unknown_type, write_plugin_modules
from .registry import register_model_types
from .weights import (
    load_model_weights,
    load_state,
    read_intervention_state,
    save_intervention_weights,
    save_model_weights,
)

PYVENE_SAVE = pv.IntervenableModel.save


def _allowed_intervention_types() -> dict[str, type]:
    """``str(type)`` -> class, for pyvene's built-in interventions and the registered plugin classes only."""
    from pyvene.models import interventions as builtin

    from ..interventions import INTERVENTIONS

    allowed = {
        str(obj): obj
        for obj in vars(builtin).values()
        if isinstance(obj, type) and issubclass(obj, builtin.Intervention)
    }
    allowed.update({str(cls): cls for cls in INTERVENTIONS.values()})
    return allowed


def save_intervenable(pvm: pv.IntervenableModel, directory: str | Path, include_model: bool = False) -> Path:
    """pyvene's ``save`` (same config.json and .bin files), plus a safetensors twin of every weights file, and
    ``plugins.json`` naming the module of each registered class of the user's own (when there is one)."""
    directory = Path(directory)
    with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints "Directory ... already exists"
        PYVENE_SAVE(pvm, str(directory), include_model=False)
    # rewrites pyvene's .bin files from CPU copies (pyvene's keep the tensors' devices, which a CPU-only
    # reader cannot map) and writes their safetensors twins
    save_intervention_weights(pvm, directory)
    if include_model:
        save_model_weights(pvm, directory)
    write_plugin_modules(pvm, directory)
    return directory


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
            raise SpecError(
                f"pyvene config.json representations[{index}]={opts!r:.80} is not allowed "
                f"(allowed: a list of at most {len(fields)} fields: {', '.join(fields)})"
            )
        rep = pv.RepresentationConfig(*opts)
        if (
            isinstance(rep.layer, bool)
            or not isinstance(rep.layer, int)
            or not isinstance(rep.component, str)
            or not isinstance(rep.unit, str)
        ):
            raise SpecError(
                f"pyvene config.json representations[{index}] needs an int layer and string component "
                f"and unit, got layer={rep.layer!r:.40}, component={rep.component!r:.40}, "
                f"unit={rep.unit!r:.40}"
            )
        out.append(rep)
    return out


def load_intervenable(
    directory: str | Path, model: nn.Module, device: str | torch.device | None = None, include_model: bool = False
) -> pv.IntervenableModel:
    """pyvene's ``load``, made safe: JSON + safetensors (or tensor-only .bin), CPU-friendly, known classes only.

    Unlike pyvene 0.1.8 it never imports a module named in the file (``get_type_from_string``), never
    unpickles anything but tensors, never assumes CUDA, and reads nothing outside the folder; intervention
    classes must be pyvene's own or registered with `register_intervention`.
    """
    from ..interventions import set_constant_source

    directory = Path(directory)
    raw = _read_pyvene_config(directory)
    allowed = _allowed_intervention_types()
    types, reps = raw.get("intervention_types"), raw.get("representations")
    if not isinstance(types, list) or not isinstance(reps, list) or len(types) != len(reps) or not types:
        raise SpecError(
            "pyvene config.json needs equal-length, non-empty lists 'intervention_types' and 'representations'"
        )
    plugins = read_plugin_modules(directory)
    classes = []
    for name in types:
        if not isinstance(name, str) or name not in allowed:
            raise unknown_type(name, plugins.interventions)
        classes.append(allowed[name])
    check_mappings(plugins.mappings)
    representations = _representations(reps)
    constants = raw.get("intervention_constant_sources")
    dims = raw.get("intervention_dimensions")
    constants = [False] * len(classes) if constants is None else constants
    dims = [None] * len(classes) if dims is None else dims
    if not (isinstance(constants, list) and isinstance(dims, list) and len(constants) == len(dims) == len(classes)):
        raise SpecError(
            "pyvene config.json 'intervention_constant_sources' and 'intervention_dimensions' must "
            f"be lists of {len(classes)} entries, one per intervention"
        )
    device = device if device is not None else input_device(model)
    try:
        config = pv.IntervenableConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
        config.intervention_types = classes
        config.representations = representations
        register_model_types(model)
        with contextlib.redirect_stdout(io.StringIO()):
            pvm = pv.IntervenableModel(config, model)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError, NameError, RuntimeError) as err:
        raise SpecError(
            f"pyvene config.json in {directory} does not fit this model: "
            f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        ) from None
    for i, (key, intervention) in enumerate(pvm.interventions.items()):
        intervention.is_source_constant = bool(constants[i])
        _set_dimension(intervention, dims[i], representations[i], model, key)
        if isinstance(intervention, pv.TrainableIntervention):
            load_state(intervention, read_intervention_state(directory, key, device), key)
        elif constants[i] and not isinstance(intervention, _NO_SOURCE):
            state = read_intervention_state(directory, key, device)
            if "source_representation" not in state:
                raise SpecError(f"weights for intervention {key!r} lack 'source_representation'")
            set_constant_source(intervention, state["source_representation"])
        intervention.to(device)
    if include_model:
        load_model_weights(pvm, directory, device)
    return pvm


class _Dimensioned(Protocol):
    """A pyvene intervention, as far as `_set_dimension` uses it."""

    def set_interchange_dim(self, interchange_dim: int | list[int]) -> None: ...


def _set_dimension(intervention: _Dimensioned, dim: object, rep, model: nn.Module, key: str) -> None:
    """pyvene's rule: the saved interchange dimension, else the model's hidden size (per head for head_*)."""
    if dim is None:
        config = getattr(model, "config", None)
        hidden = getattr(config, "hidden_size", None)
        if config is None or hidden is None:
            return
        dim = hidden // config.num_attention_heads if rep.component.startswith("head_") else hidden
    if isinstance(dim, bool) or not (
        isinstance(dim, int) or (isinstance(dim, list) and all(isinstance(d, int) for d in dim))
    ):
        raise SpecError(
            f"pyvene config.json intervention_dimensions for {key!r} is {dim!r:.60} "
            "(allowed: an int, a list of ints, or null)"
        )
    intervention.set_interchange_dim(dim)


# constant-source classes that hold no source vector: nothing to read back for them
_NO_SOURCE = (pv.ZeroIntervention, pv.SourcelessIntervention, pv.CollectIntervention, pv.NoiseIntervention)
