"""Every workaround for pyvene 0.1.8 (and HF transformers 5.x) lives here, each with a test in tests/test_compat.py.

1. pyvene removes *all* forward hooks from the model on every call, which kills transformers 5's
   lazily installed ``output_hidden_states`` capture hooks and any user hook  -> `pyvene_guard`.
2. The short ``unit_locations`` forms set a sticky ``use_fast`` flag, after which every batch row is
   patched at row 0's position                                                -> `base_locations`, `reset_use_fast`.
3. ``{"base": [2, 3]}`` is read as (source position 2, base position 3)       -> `base_locations` never emits it.
4. ``load_intervention`` hard-codes ``map_location='cuda:0'`` and unpickles     -> `load_intervention_weights`.
5. A custom class's constructor arguments are lost on reload                  -> `reloadable_kwargs_check`.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

with contextlib.redirect_stdout(io.StringIO()):  # pyvene prints an nnsight notice on import; keep stdout clean
    import pyvene as pv
    import pyvene.models.intervenable_base as pv_base

from .errors import PatchscopeError

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


# ---- 4. loading weights ----------------------------------------------------------------------------
def load_intervention_weights(pvm: pv.IntervenableModel, directory: str | Path,
                              device: str | torch.device = "cpu") -> None:
    """What ``IntervenableModel.load_intervention`` should do: load on `device`, never execute pickled code.

    Reads ``intkey_<key>.safetensors`` if present, else pyvene's ``intkey_<key>.bin`` with
    ``weights_only=True`` (tensors only; a file that needs arbitrary unpickling is refused).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    for key, intervention in pvm.interventions.items():
        if not isinstance(intervention, pv.TrainableIntervention):
            continue
        safe = directory / f"intkey_{key}.safetensors"
        if safe.exists():
            state = load_file(str(safe), device=str(device))
        else:
            try:
                state = torch.load(directory / f"intkey_{key}.bin", map_location=device, weights_only=True)
            except Exception as err:  # UnpicklingError for code-bearing files
                raise PatchscopeError(f"refusing to load intervention weights {key!r}: {err}") from None
        intervention.load_state_dict(state)


# ---- 5. constructor arguments ---------------------------------------------------------------------
def reloadable_kwargs_check(intervention: nn.Module) -> None:
    """Raise if `intervention` keeps constructor arguments that pyvene's save/load would drop.

    pyvene 0.1.8 rebuilds an intervention as ``cls(**RepresentationConfig fields, embed_dim=...)`` and
    then restores ``state_dict()`` only for trainable ones; any other plain attribute set from a
    constructor argument silently returns to its default. Hyper-parameters must live in buffers.
    """
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
    "register_model_types", "final_norm_path", "hidden_state_site", "Site",
]
