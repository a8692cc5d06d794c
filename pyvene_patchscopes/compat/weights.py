"""Workaround #4, the weights files: read on any device, never unpickle anything but tensors, stay inside the folder.

pyvene 0.1.8's ``load_intervention`` hard-codes ``map_location='cuda:0'`` (it fails on a CPU-only machine) and its
``.bin`` files are pickles. Here every weights file is written twice, as pyvene's ``intkey_<key>.bin`` (a plain
dict of tensors, which plain pyvene reads with torch's default ``weights_only=True``) and as a ``.safetensors``
twin; reading takes the safetensors file where there is one, else the ``.bin`` with ``weights_only=True``.

Tests: tests/test_compat.py (test_bug4_*), tests/test_hostile.py (test_d3_*, test_d5_non_finite_pyvene_weights_*).
Remove when: pyvene's ``load_intervention`` takes a ``map_location`` (or defaults to the CPU) and reads with
``weights_only=True`` (not so on main as of 9e33390; the cuda:0 default came with v0.1.8, PR #219), and the pinned
pyvene is that release.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Sequence

import pyvene as pv
import torch
from torch import nn

from ..core.files import check_finite, inside, is_file, read_safetensors
from ..core.outputs import replacing, save_tensors
from ..errors import SpecError
from ..models.devices import input_device

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.#\-]+$")
MODEL_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _weights_name(key: str, suffix: str) -> str:
    """``intkey_<key><suffix>``; a key that could leave the folder is refused."""
    if not _SAFE_KEY.match(key) or ".." in key:
        raise SpecError(
            f"intervention key {key!r} is not allowed in a file name "
            "(allowed: letters, digits, '_', '.', '#', '-', no '..')"
        )
    return f"intkey_{key}{suffix}"


def weights_file(directory: Path, key: str, suffix: str) -> Path:
    """``intkey_<key><suffix>`` inside `directory`; a key or link that could leave the folder is refused."""
    return inside(directory, _weights_name(key, suffix), "weights file")


def _stateful(intervention: nn.Module) -> bool:
    return (
        isinstance(intervention, pv.TrainableIntervention)
        or getattr(intervention, "source_representation", None) is not None
    )


def _write_state(state: dict[str, torch.Tensor], safe: Path, legacy: Path) -> None:
    """One state dict as safetensors and as pyvene's ``.bin`` (a plain dict of tensors, no other objects)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_tensors(safe, tensors)
    with replacing(legacy) as temporary:
        torch.save(tensors, temporary)


def save_intervention_weights(
    pvm: pv.IntervenableModel, directory: str | Path, trainable_only: bool = False
) -> list[Path]:
    """Write each stateful intervention's ``state_dict`` as ``intkey_<key>.safetensors`` and ``.bin``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for key, intervention in pvm.interventions.items():
        if isinstance(intervention, pv.TrainableIntervention) or (not trainable_only and _stateful(intervention)):
            safe = weights_file(directory, key, ".safetensors")
            _write_state(intervention.state_dict(), safe, weights_file(directory, key, ".bin"))
            written.append(safe)
    return written


def save_model_weights(pvm: pv.IntervenableModel, directory: Path) -> None:
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
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise SpecError(f"weights file {path.name!r} does not hold a dict of named tensors")
    return state


def _read_pair(directory: Path, names: Sequence[str], device) -> dict[str, torch.Tensor]:
    """The first of `names` (safetensors first) that exists inside `directory`."""
    paths = [inside(directory, name, "weights file") for name in names]
    for path in paths:
        if is_file(path):
            return read_weights(path, device)
    raise SpecError(f"weights file {names[-1]!r} is missing from {directory} (looked for: {', '.join(names)})")


def read_intervention_state(directory: Path, key: str, device) -> dict[str, torch.Tensor]:
    return _read_pair(directory, [_weights_name(key, ".safetensors"), _weights_name(key, ".bin")], device)


def load_intervention_weights(
    pvm: pv.IntervenableModel, directory: str | Path, device: str | torch.device = "cpu"
) -> None:
    """What ``IntervenableModel.load_intervention`` should do: load on `device`, never execute pickled code.

    Reads ``intkey_<key>.safetensors`` if present, else pyvene's ``intkey_<key>.bin`` with
    ``weights_only=True`` (tensors only; a file that needs arbitrary unpickling is refused).
    """
    directory = Path(directory)
    for key, intervention in pvm.interventions.items():
        if isinstance(intervention, pv.TrainableIntervention):
            load_state(intervention, read_intervention_state(directory, key, device), key)


def load_model_weights(pvm: pv.IntervenableModel, directory: str | Path, device=None) -> None:
    """``include_model``: the saved trainable parameters, from model.safetensors or pyvene's pytorch_model.bin."""
    device = device if device is not None else input_device(pvm.model)
    pvm.model.load_state_dict(_read_pair(Path(directory), MODEL_WEIGHTS, device), strict=False)


def load_state(intervention: nn.Module, state: dict, key: str) -> None:
    running = {k: v.dtype for k, v in intervention.state_dict().items()}  # load_state_dict casts to these
    check_finite(state, f"weights for intervention {key!r}: tensor", running)
    try:
        intervention.load_state_dict(state)
    except RuntimeError as err:  # missing/unexpected keys or shape mismatches
        raise SpecError(f"weights for intervention {key!r} do not fit it: {str(err).splitlines()[0][:300]}") from None
