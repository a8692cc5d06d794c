"""Every workaround for pyvene 0.1.8 (and HF transformers 5.x) lives here, each with a test in tests/test_compat.py.

1. pyvene removes *all* forward hooks from the model on every call, which kills transformers 5's
   lazily installed ``output_hidden_states`` capture hooks and any user hook  -> `pyvene_guard`.
2. The short ``unit_locations`` forms set a sticky ``use_fast`` flag, after which every batch row is
   patched at row 0's position                                                -> `base_locations`, `reset_use_fast`.
3. ``{"base": [2, 3]}`` is read as (source position 2, base position 3)       -> `base_locations` never emits it.
4. ``load_intervention`` hard-codes ``map_location='cuda:0'``; ``save``/``load`` pickle ``.bin`` files and
   ``load`` imports any module named in ``config.json``                         -> `save_intervenable`,
   `load_intervenable`, `load_intervention_weights`; `install_serialization` routes pyvene's own methods there.
5. A custom class's constructor arguments are lost on reload                  -> the plugin's interventions keep
   them in their state and rebuild from it; `reloadable_kwargs_check` refuses classes that would lose them.
6. Gemma 3 is not registered with pyvene                                       -> `register_model_types`.
7. HF's last ``hidden_states`` entry is already after the final norm; the paper's code therefore patches
   the last layer *after* the final norm (``skip_final_ln``)                   -> `hidden_state_site`.
8. pyvene prints a notice to stdout on import, which would corrupt ``--json`` output -> silenced above.
9. Wrapping a model freezes it (``requires_grad=False``, ``eval()``) and overwrites ``config.model_type``
                                                                               -> `pyvene_guard` restores them.
"""
from __future__ import annotations

import contextlib
import copy
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

from .errors import PatchscopeError, SpecError, UnknownNameError

_ORIGINAL_REMOVE_HOOKS = pv_base.remove_forward_hooks


# ---- 1. hooks ------------------------------------------------------------------------------------
def _is_pyvene_hook(fn: object) -> bool:
    return getattr(fn, "__module__", "").startswith("pyvene")


def remove_pyvene_hooks(module: nn.Module) -> None:
    """Remove only the hooks pyvene registered, leaving HF's capture hooks and the user's own."""
    for sub in module.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks):
            for hook_id in [k for k, fn in hooks.items() if _is_pyvene_hook(fn)]:
                hooks.pop(hook_id)
                for extra in (getattr(sub, "_forward_hooks_with_kwargs", {}),
                              getattr(sub, "_forward_pre_hooks_with_kwargs", {}),
                              getattr(sub, "_forward_hooks_always_called", {})):
                    extra.pop(hook_id, None)


def install() -> None:
    """Patch pyvene globally so that it only ever removes its own hooks (for users' own pyvene pipelines)."""
    pv_base.remove_forward_hooks = remove_pyvene_hooks


def uninstall() -> None:
    pv_base.remove_forward_hooks = _ORIGINAL_REMOVE_HOOKS


@dataclass
class _ModelState:
    training: bool
    requires_grad: list[bool]
    model_type: object


@contextlib.contextmanager
def pyvene_guard(model: nn.Module) -> Iterator[None]:
    """Run pyvene calls on `model` and leave it as it was: same hooks, `requires_grad`, mode and config."""
    params = list(model.parameters())
    state = _ModelState(model.training, [p.requires_grad for p in params],
                        model.config.__dict__.get("model_type", None) if hasattr(model, "config") else None)
    had_model_type = hasattr(model, "config") and "model_type" in model.config.__dict__
    previous = pv_base.remove_forward_hooks
    pv_base.remove_forward_hooks = remove_pyvene_hooks
    try:
        yield
    finally:
        pv_base.remove_forward_hooks = previous
        remove_pyvene_hooks(model)
        model.train(state.training)
        for param, flag in zip(params, state.requires_grad):
            param.requires_grad_(flag)
        if hasattr(model, "config"):
            if had_model_type:
                model.config.__dict__["model_type"] = state.model_type
            else:
                model.config.__dict__.pop("model_type", None)


def intervenable(config: pv.IntervenableConfig, model: nn.Module) -> pv.IntervenableModel:
    """Build a pyvene IntervenableModel; call inside `pyvene_guard(model)` so its side effects are undone."""
    register_model_types()
    pvm = pv.IntervenableModel(config, model)
    reset_use_fast(pvm)
    return pvm


# ---- 2./3. unit locations ------------------------------------------------------------------------
def base_locations(positions: Sequence[int], n_interventions: int = 1) -> dict:
    """Canonical nested ``unit_locations`` for base-only interventions: one position per batch row.

    Always ``{"sources->base": (None, [[[p_row0], [p_row1], ...]] * n)}``: never an int or a flat list,
    which pyvene would read as a static location (sticky ``use_fast``) or as a (source, base) pair.
    """
    rows = [[int(p)] for p in positions]
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
_ORIGINAL_SAVE = pv.IntervenableModel.save
_ORIGINAL_LOAD = pv.IntervenableModel.load
_ORIGINAL_SAVE_INTERVENTION = pv.IntervenableModel.save_intervention
_ORIGINAL_LOAD_INTERVENTION = pv.IntervenableModel.load_intervention
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.#\-]+$")


def _weights_file(directory: Path, key: str, suffix: str) -> Path:
    """``intkey_<key><suffix>`` inside `directory`; a key that could leave the folder is refused."""
    if not _SAFE_KEY.match(key) or ".." in key:
        raise SpecError(f"intervention key {key!r} is not allowed in a file name "
                        "(allowed: letters, digits, '_', '.', '#', '-', no '..')")
    return directory / f"intkey_{key}{suffix}"


def _stateful(intervention: nn.Module) -> bool:
    return isinstance(intervention, pv.TrainableIntervention) or \
        getattr(intervention, "source_representation", None) is not None


def save_intervention_weights(pvm: pv.IntervenableModel, directory: str | Path) -> list[Path]:
    """Write each stateful intervention's ``state_dict`` as ``intkey_<key>.safetensors`` (no pickle)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key, intervention in pvm.interventions.items():
        if _stateful(intervention):
            state = {k: v.detach().cpu().contiguous() for k, v in intervention.state_dict().items()}
            path = _weights_file(directory, key, ".safetensors")
            save_file(state, str(path))
            written.append(path)
    return written


def read_weights(path: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors file, or a legacy pyvene ``.bin`` read with ``weights_only=True``; errors name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise SpecError(f"weights file {path.name!r} is missing from {path.parent}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path), device=str(device))
        return torch.load(path, map_location=device, weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError) as err:
        raise SpecError(f"refusing to load weights file {path.name!r}: {str(err).splitlines()[0][:200]}") from None


def load_intervention_weights(pvm: pv.IntervenableModel, directory: str | Path,
                              device: str | torch.device = "cpu") -> None:
    """What ``IntervenableModel.load_intervention`` should do: load on `device`, never execute pickled code.

    Reads ``intkey_<key>.safetensors`` if present, else pyvene's ``intkey_<key>.bin`` with
    ``weights_only=True`` (tensors only; a file that needs arbitrary unpickling is refused).
    """
    directory = Path(directory)
    for key, intervention in pvm.interventions.items():
        if not isinstance(intervention, pv.TrainableIntervention):
            continue
        safe = _weights_file(directory, key, ".safetensors")
        state = read_weights(safe if safe.exists() else _weights_file(directory, key, ".bin"), device)
        _load_state(intervention, state, key)


def _load_state(intervention: nn.Module, state: dict, key: str) -> None:
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
    """pyvene's ``save`` with safetensors instead of pickled ``.bin`` files (same ``config.json``)."""
    directory = Path(directory)
    with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints "Directory ... already exists"
        _ORIGINAL_SAVE(pvm, str(directory), include_model=False)
    for stale in directory.glob("intkey_*.bin"):
        stale.unlink()
    save_intervention_weights(pvm, directory)
    if include_model:
        from safetensors.torch import save_file

        trainable = {n: p.detach().cpu().contiguous() for n, p in pvm.model.named_parameters() if p.requires_grad}
        save_file(trainable, str(directory / "model.safetensors"))
    return directory


def load_intervenable(directory: str | Path, model: nn.Module, device: str | torch.device | None = None,
                      include_model: bool = False) -> pv.IntervenableModel:
    """pyvene's ``load``, made safe: JSON + safetensors, CPU-friendly, and only known intervention classes.

    Unlike pyvene 0.1.8 it never imports a module named in the file (``get_type_from_string``), never
    unpickles, and never assumes CUDA; intervention classes must be pyvene's own or registered with
    `register_intervention`.
    """
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise SpecError(f"no pyvene config.json in {directory}")
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SpecError(f"pyvene config.json in {directory} is malformed: {err}") from None
    allowed = _allowed_intervention_types()
    types, reps = raw.get("intervention_types"), raw.get("representations")
    if not isinstance(types, list) or not isinstance(reps, list) or len(types) != len(reps):
        raise SpecError("pyvene config.json needs equal-length lists 'intervention_types' and 'representations'")
    classes = []
    for name in types:
        if name not in allowed:
            raise UnknownNameError(f"intervention type {name!r} is not allowed (allowed: pyvene's own classes and "
                                   "classes registered with register_intervention); nothing was imported")
        classes.append(allowed[name])
    try:
        representations = [pv.RepresentationConfig(*opts) for opts in reps]
    except TypeError as err:
        raise SpecError(f"pyvene config.json has a malformed representation: {err}") from None
    device = device if device is not None else next(model.parameters()).device
    config = pv.IntervenableConfig.from_dict({k: v for k, v in raw.items() if k != "transformers_version"})
    config.intervention_types = classes
    config.representations = representations
    register_model_types()
    with contextlib.redirect_stdout(io.StringIO()):
        pvm = pv.IntervenableModel(config, model)
    constants = raw.get("intervention_constant_sources") or [False] * len(classes)
    dims = raw.get("intervention_dimensions") or [None] * len(classes)
    for i, (key, intervention) in enumerate(pvm.interventions.items()):
        intervention.is_source_constant = bool(constants[i])
        if dims[i] is not None:
            intervention.set_interchange_dim(dims[i])
        if isinstance(intervention, pv.TrainableIntervention):
            _load_state(intervention, _read_intervention_state(directory, key, device), key)
        elif constants[i] and not isinstance(intervention, _NO_SOURCE):
            state = _read_intervention_state(directory, key, device)
            if "source_representation" not in state:
                raise SpecError(f"weights for intervention {key!r} lack 'source_representation'")
            _set_constant_source(intervention, state["source_representation"])
        intervention.to(device)
    if include_model:
        pvm.model.load_state_dict(read_weights(directory / "model.safetensors", device), strict=False)
    return pvm


# constant-source classes that hold no source vector: nothing to read back for them
_NO_SOURCE = (pv.ZeroIntervention, pv.SourcelessIntervention, pv.CollectIntervention, pv.NoiseIntervention)


def _set_constant_source(intervention: nn.Module, tensor: torch.Tensor) -> None:
    """Give `intervention` its saved constant source (e.g. an addition's steering vector).

    pyvene's constructor leaves ``source_representation = None`` as a plain attribute when no vector is
    given, and ``register_buffer`` refuses a name that already exists, so the attribute goes first.
    """
    if "source_representation" not in intervention._buffers and hasattr(intervention, "source_representation"):
        delattr(intervention, "source_representation")
    intervention.register_buffer("source_representation", tensor)


def _read_intervention_state(directory: Path, key: str, device) -> dict[str, torch.Tensor]:
    safe = _weights_file(directory, key, ".safetensors")
    return read_weights(safe if safe.exists() else _weights_file(directory, key, ".bin"), device)


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
    save_intervention_weights(self, save_directory)
    if include_model:
        from safetensors.torch import save_file

        trainable = {n: p.detach().cpu().contiguous() for n, p in self.model.named_parameters() if p.requires_grad}
        save_file(trainable, str(Path(save_directory) / "model.safetensors"))


def _patched_load_intervention(self: pv.IntervenableModel, load_directory: str, include_model: bool = True) -> None:
    load_intervention_weights(self, load_directory, next(self.model.parameters()).device)
    if include_model:
        self.model.load_state_dict(read_weights(Path(load_directory) / "model.safetensors"), strict=False)


def install_serialization() -> None:
    """Route pyvene's own ``save``/``load``/``save_intervention``/``load_intervention`` through the safe versions.

    Done when pyvene_patchscopes is imported, so ``IntervenableModel.save``/``load`` round-trip plugin
    interventions on CPU, in safetensors, without importing modules named in files.
    """
    pv.IntervenableModel.save = _patched_save
    pv.IntervenableModel.load = staticmethod(_patched_load)
    pv.IntervenableModel.save_intervention = _patched_save_intervention
    pv.IntervenableModel.load_intervention = _patched_load_intervention


def uninstall_serialization() -> None:
    pv.IntervenableModel.save = _ORIGINAL_SAVE
    pv.IntervenableModel.load = staticmethod(_ORIGINAL_LOAD)
    pv.IntervenableModel.save_intervention = _ORIGINAL_SAVE_INTERVENTION
    pv.IntervenableModel.load_intervention = _ORIGINAL_LOAD_INTERVENTION


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
def register_model_types() -> None:
    """Register model classes pyvene 0.1.8 lacks (Gemma 3), in place, next to the ones it knows."""
    from pyvene.models.llama.modelings_intervenable_llama import (
        llama_lm_type_to_dimension_mapping, llama_lm_type_to_module_mapping)

    try:
        from transformers import Gemma3ForCausalLM
    except ImportError:  # older transformers
        return
    if Gemma3ForCausalLM in pv.type_to_module_mapping:
        return
    dims = dict(llama_lm_type_to_dimension_mapping)
    for component in ("head_attention_value_output", "head_query_output", "head_key_output", "head_value_output"):
        dims[component] = ("head_dim",)  # Gemma 3's head_dim is not hidden_size / num_heads
    pv.type_to_module_mapping[Gemma3ForCausalLM] = copy.deepcopy(llama_lm_type_to_module_mapping)
    pv.type_to_dimension_mapping[Gemma3ForCausalLM] = dims


# ---- 7. where layer l lives -----------------------------------------------------------------------
_FINAL_NORM = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
               "model.decoder.final_layer_norm")


def final_norm_path(model: nn.Module) -> str:
    """Dotted path of the final norm that HF applies before the unembedding (and before hidden_states[-1])."""
    names = dict(model.named_modules())
    for path in _FINAL_NORM:
        if path in names:
            return path
    raise PatchscopeError(f"cannot find the final norm of {type(model).__name__} (looked for {_FINAL_NORM})")


@dataclass(frozen=True)
class Site:
    """A pyvene hook point: a component name (abstract or a raw module path) and its layer."""

    component: str
    layer: int


def hidden_state_site(model: nn.Module, layer: int, n_layers: int, after_final_norm: bool) -> Site:
    """The pyvene site of HF ``hidden_states[layer + 1]``.

    For layers below the last it is the block output. For the last layer HF's entry is already after
    the final norm; reading it there, and writing it there when source and target are both the last
    layer, is what the paper's code calls ``skip_final_ln``.
    """
    if layer == n_layers - 1 and after_final_norm:
        return Site(component=f"{final_norm_path(model)}.output", layer=layer)
    return Site(component="block_output", layer=layer)


__all__ = [
    "install", "uninstall", "pyvene_guard", "intervenable", "remove_pyvene_hooks", "base_locations",
    "per_intervention_locations", "reset_use_fast", "load_intervention_weights", "reloadable_kwargs_check",
    "save_intervenable", "load_intervenable", "save_intervention_weights", "read_weights", "install_serialization",
    "uninstall_serialization",
    "register_model_types", "final_norm_path", "hidden_state_site", "Site",
]
