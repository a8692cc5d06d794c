"""pyvene's ``IntervenableModel``, built with the workarounds that apply to every instance (#2, #6, #10).

Call `intervenable` inside `pyvene_guard(model)` (#1, #9), which undoes what wrapping and calling do to the model.
Remove when: each workaround it applies is removed (see `locations`, `registry`, `index_device`); then it is
``pv.IntervenableModel(config, model)``.
"""

from __future__ import annotations

import pyvene as pv
from torch import nn

from .index_device import index_on_activation_device
from .locations import reset_use_fast
from .registry import register_model_types


def intervenable(config: pv.IntervenableConfig, model: nn.Module) -> pv.IntervenableModel:
    """Build a pyvene IntervenableModel; call inside `pyvene_guard(model)` so its side effects are undone."""
    register_model_types(model)
    pvm = pv.IntervenableModel(config, model)
    reset_use_fast(pvm)
    index_on_activation_device(pvm)
    return pvm
