"""Workarounds #1 and #9: pyvene's calls leave the model's hooks, ``requires_grad``, modes and config as found.

1. pyvene 0.1.8 removes *all* forward hooks from the model on every call (``modeling_utils.remove_forward_hooks``,
   from ``IntervenableModel._cleanup_states``), which kills transformers 5's lazily installed
   ``output_hidden_states`` capture hooks and any user hook -> `pyvene_guard` (and the opt-in `install`) remove only
   the hooks pyvene registered, known by their ids.
9. Wrapping a model freezes it (``requires_grad=False``, ``eval()``) and overwrites ``config.model_type``
   -> `pyvene_guard` restores them.

Tests: tests/test_compat.py (test_bug1_*, test_engine_leaves_requires_grad_mode_and_config_as_found),
tests/test_hostile.py (test_d2_*, test_d4_*).
Remove when: pyvene removes only the hooks it registered and leaves the wrapped model's flags and config alone
(#1 and #9 are open upstream; not fixed on main as of 9e33390, 2026-03), and the pinned pyvene is that release.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterator

import pyvene.models.intervenable_base as pv_base
import torch
from torch import nn

PYVENE_REMOVE_HOOKS = pv_base.remove_forward_hooks

# pyvene registers every hook it uses in IntervenableModel._intervention_getter / _intervention_setter and
# returns their handles. While tracking is on, those two methods are wrapped to record the handles' ids, and
# pyvene's "remove all hooks" is replaced by "remove the hooks pyvene registered": a hook is told apart by
# the id torch gave it when pyvene added it, never by the name of the module its function comes from.
PYVENE_HOOKS: dict[int, "torch.utils.hooks.RemovableHandle"] = {}  # hook id -> pyvene's handle for it
_TRACKED_METHODS = ("_intervention_getter", "_intervention_setter")
_ORIGINAL_METHODS = {name: pv_base.IntervenableModel.__dict__[name] for name in _TRACKED_METHODS}
_tracking_depth = 0


def _recording(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        handlers = method(self, *args, **kwargs)
        PYVENE_HOOKS.update((handle.id, handle) for handle in handlers.handlers)
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
        pv_base.remove_forward_hooks = PYVENE_REMOVE_HOOKS


def remove_pyvene_hooks(module: nn.Module) -> None:
    """Remove only the hooks pyvene registered while tracking was on; HF's and the user's own stay."""
    for sub in module.modules():
        for hooks in (sub._forward_hooks, sub._forward_pre_hooks):
            for hook_id in [k for k in hooks if k in PYVENE_HOOKS]:
                hooks.pop(hook_id)
                for extra in (
                    getattr(sub, "_forward_hooks_with_kwargs", {}),
                    getattr(sub, "_forward_pre_hooks_with_kwargs", {}),
                    getattr(sub, "_forward_hooks_always_called", {}),
                ):
                    extra.pop(hook_id, None)
    _forget_removed_hooks()


def _forget_removed_hooks() -> None:
    """Drop the records of hooks that are gone (removed here, or by pyvene's own handle.remove())."""
    for hook_id, handle in list(PYVENE_HOOKS.items()):
        hooks = handle.hooks_dict_ref()
        if hooks is None or hook_id not in hooks:
            del PYVENE_HOOKS[hook_id]


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
    state = _ModelState(
        [(m, m.training) for m in model.modules()],
        [p.requires_grad for p in params],
        model.config.__dict__.get("model_type", None) if hasattr(model, "config") else None,
    )
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
