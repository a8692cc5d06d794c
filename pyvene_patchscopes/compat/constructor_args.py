"""Workaround #5: refuse an intervention whose constructor arguments pyvene's save/load would drop.

pyvene 0.1.8 rebuilds an intervention from its class and ``RepresentationConfig`` alone, so a custom class's
constructor arguments are lost on reload -> the plugin's interventions keep them in their state and rebuild from it;
`reloadable_kwargs_check` refuses classes that would lose them.

Test: tests/test_compat.py (test_bug5_constructor_arguments_lost_on_reload).
Remove when: pyvene saves and restores an intervention's constructor arguments (not so on main as of 9e33390), and
the pinned pyvene is that release.
"""

from __future__ import annotations

import inspect

import pyvene as pv
from torch import nn

from ..errors import PatchscopeError


def reloadable_kwargs_check(intervention: nn.Module) -> None:
    """Raise if `intervention` keeps constructor arguments that pyvene's save/load would drop.

    pyvene 0.1.8 rebuilds an intervention as ``cls(**RepresentationConfig fields, embed_dim=...)`` and
    then restores ``state_dict()`` only for trainable ones; any other plain attribute set from a
    constructor argument silently returns to its default. Hyper-parameters must live in buffers, or the
    class must rebuild itself from its loaded state (``restores_arguments_from_state = True``, as the
    plugin's own interventions do).
    """
    if getattr(intervention, "restores_arguments_from_state", False) and isinstance(
        intervention, pv.TrainableIntervention
    ):
        return
    signature = inspect.signature(type(intervention).__init__)
    explicit = [
        n for n, p in signature.parameters.items() if n != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    state = set(intervention.state_dict())
    lost = [
        n
        for n in explicit
        if n not in state
        and n not in pv.RepresentationConfig._fields
        and n not in ("embed_dim", "use_fast", "keep_last_dim")
    ]
    if lost:
        raise PatchscopeError(
            f"{type(intervention).__name__} takes constructor argument(s) {lost} that pyvene 0.1.8 loses on "
            "reload; store them as buffers (register_buffer) and accept only **kwargs"
        )
