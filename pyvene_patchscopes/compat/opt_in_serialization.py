"""Workaround #4, opt-in: route pyvene's own ``save``/``load``/``save_intervention``/``load_intervention`` here.

Importing the plugin leaves pyvene's methods alone; `install_safe_serialization` (process-wide) or
`safe_serialization()` (around a block) swap in the safe ones (`folders`, `weights`), and the files stay pyvene's.

Tests: tests/test_compat.py (test_bug4_load_intervention_weights_on_cpu_without_pickle),
tests/test_no_side_effects.py (test_safe_serialization_*, test_a_folder_saved_under_the_opt_in_*).
Remove when: `folders` and `weights` are removed (pyvene's own methods are then safe).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import pyvene as pv
from torch import nn

from ..models.devices import input_device
from .folders import load_intervenable, save_intervenable
from .weights import load_intervention_weights, load_model_weights, save_intervention_weights, save_model_weights

PYVENE_LOAD = pv.IntervenableModel.load
PYVENE_SAVE_INTERVENTION = pv.IntervenableModel.save_intervention
PYVENE_LOAD_INTERVENTION = pv.IntervenableModel.load_intervention
_SERIALIZATION_METHODS = ("save", "load", "save_intervention", "load_intervention")
# the class's own entries (``load`` is a staticmethod there), so uninstalling puts back the very same objects
PYVENE_ENTRIES = {name: pv.IntervenableModel.__dict__[name] for name in _SERIALIZATION_METHODS}


def _patched_save(
    self: pv.IntervenableModel,
    save_directory: str,
    save_to_hf_hub: bool = False,
    hf_repo_name: str = "my-awesome-model",
    include_model: bool = False,
) -> None:
    save_intervenable(self, save_directory, include_model=include_model)
    if save_to_hf_hub:  # optional: only for users with a hub
        from huggingface_hub import HfApi

        HfApi().create_repo(hf_repo_name, exist_ok=True)
        HfApi().upload_folder(folder_path=str(save_directory), repo_id=hf_repo_name)


def _patched_load(
    load_directory: str,
    model: nn.Module,
    local_directory: str | None = None,
    from_huggingface_hub: bool = False,
    include_model: bool = False,
) -> pv.IntervenableModel:
    if from_huggingface_hub or not Path(load_directory).exists():
        from huggingface_hub import snapshot_download

        load_directory = snapshot_download(repo_id=load_directory, local_dir=local_directory)
    return load_intervenable(load_directory, model, include_model=include_model)


def _patched_save_intervention(self: pv.IntervenableModel, save_directory: str, include_model: bool = True) -> None:
    save_intervention_weights(self, save_directory, trainable_only=True)
    if include_model:
        save_model_weights(self, Path(save_directory))


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
    _set_methods(
        {
            "save": _patched_save,
            "load": staticmethod(_patched_load),
            "save_intervention": _patched_save_intervention,
            "load_intervention": _patched_load_intervention,
        }
    )


def uninstall_safe_serialization() -> None:
    """Give pyvene back its own ``save``/``load``/``save_intervention``/``load_intervention``."""
    _set_methods(PYVENE_ENTRIES)


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
