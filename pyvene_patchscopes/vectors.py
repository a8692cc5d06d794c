"""Vectors to read in words, from where researchers keep them: an SAE's decoder rows (sae-lens's saved format), a
pyvene DAS intervention's learned basis, a probe's weight rows, or any tensor; each becomes a `VectorSource`.

sae-lens saves an SAE as a folder: ``cfg.json`` (``d_in``, ``d_sae``, ``architecture``, and the hook it was
trained on, ``hook_name``, at the top level in older versions and under ``metadata`` since 6.0) and
``sae_weights.safetensors`` (``W_enc`` [d_in, d_sae], ``W_dec`` [d_sae, d_in], ``b_enc``, ``b_dec``). Latent k
writes ``W_dec[k]`` into the residual stream at that hook. This module reads the folder without sae-lens:
JSON and safetensors only, size-capped, inside the folder, every shape and value checked, and the hook named
as the layer whose block output it is (the layer l of a Patchscope source).

Every source built here lives in the residual stream at a block output, the last block's included: before the
final norm (TransformerLens applies ``ln_final`` after ``blocks.{last}.hook_resid_post``; pyvene's
``block_output`` is the block's own output). So at l* = l = the last layer it is written there and the final norm
runs on it (`VectorSource.after_final_norm` False). A vector taken from the library's own last-layer reads
(`hidden_states`, a `Source`), which are after the final norm, says so with ``after_final_norm=True``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from .core.files import check_finite, expand, inside, read_json, read_safetensors
from .errors import SpecError, as_index
from .models import ModelHandle
from .spec import VectorSource

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"

# hook names -> (pattern, offset): the hook is the output of block (captured index + offset)
_HOOKS = (
    (re.compile(r"^blocks\.(\d+)\.hook_resid_post$"), 0),  # TransformerLens names: after block l
    (re.compile(r"^blocks\.(\d+)\.hook_resid_pre$"), -1),  # before block l = after block l - 1
    (re.compile(r"^(?:model\.)?(?:layers|h)\.(\d+)$"), 0),  # a Hugging Face block's own output
)
HOOKS_ALLOWED = (
    "blocks.L.hook_resid_post, blocks.L.hook_resid_pre (L >= 1), model.layers.L: the residual stream at a block output"
)


def hook_layer(hook_name: object) -> int:
    """The block whose output `hook_name` is, or a `SpecError` naming the hook and what is allowed."""
    if isinstance(hook_name, str):
        for pattern, offset in _HOOKS:
            match = pattern.match(hook_name)
            if match and int(match.group(1)) + offset >= 0:
                return int(match.group(1)) + offset
    raise SpecError(
        f"SAE hook_name={hook_name!r} is not a residual-stream hook this library can write at "
        f"(allowed: {HOOKS_ALLOWED})"
    )


@dataclass(frozen=True)
class SAEDecoder:
    """An SAE's decoder: one direction per latent, written at block output `layer` (``W_dec``, [d_sae, d_in])."""

    directions: torch.Tensor  # [d_sae, d_in]
    layer: int
    hook_name: str
    architecture: str
    normalize_activations: str

    @property
    def d_in(self) -> int:
        return int(self.directions.shape[1])

    @property
    def d_sae(self) -> int:
        return int(self.directions.shape[0])

    def latent(self, k: int) -> torch.Tensor:
        """Latent k's decoder direction ``W_dec[k]`` ([d_in])."""
        index = None if isinstance(k, bool) else as_index(k)
        if index is None or not 0 <= index < self.d_sae:
            raise SpecError(f"latent={k!r} is out of range for this SAE (allowed: 0..{self.d_sae - 1})")
        return self.directions[index]


def _field(config: dict[str, Any], name: str) -> Any:
    """A config field at the top level (before sae-lens 6), or under ``metadata`` (6.x's ``save_model``) or
    ``meta`` (as some 6.x releases and pretrained configs name it)."""
    if name in config:
        return config[name]
    for key in ("metadata", "meta"):
        if isinstance(config.get(key), dict) and name in config[key]:
            return config[key][name]
    return None


def load_sae(folder: str | os.PathLike, model: Any = None) -> SAEDecoder:
    """The decoder of the SAE saved in `folder` (sae-lens's format), checked against `model` when given:
    its width ``d_in`` must be the model's hidden size, and its hook one of the model's block outputs."""
    path = expand(folder)
    config = read_json(inside(path, CONFIG_FILE), "SAE config")
    if not isinstance(config, dict):
        raise SpecError(f"SAE config {CONFIG_FILE!r} in {path} is not a JSON object (allowed: sae-lens's cfg.json)")
    sizes = {}
    for name in ("d_in", "d_sae"):
        value = config.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"SAE config {name}={value!r} is not allowed (allowed: a positive integer)")
        sizes[name] = value
    layer = hook_layer(_field(config, "hook_name"))
    weights = read_safetensors(inside(path, WEIGHTS_FILE), "SAE weights")
    if "W_dec" not in weights:
        raise SpecError(f"SAE weights {WEIGHTS_FILE!r} have no 'W_dec' (found: {sorted(weights)[:8]})")
    decoder = weights["W_dec"]
    if tuple(decoder.shape) != (sizes["d_sae"], sizes["d_in"]):
        raise SpecError(
            f"SAE W_dec has shape {list(decoder.shape)}, but cfg.json says d_sae={sizes['d_sae']}, "
            f"d_in={sizes['d_in']} (allowed: [d_sae, d_in])"
        )
    check_finite({"W_dec": decoder}, "SAE weight", torch.float32)
    sae = SAEDecoder(
        decoder.float(),
        layer,
        str(_field(config, "hook_name")),
        str(config.get("architecture", "")),
        str(config.get("normalize_activations", "none")),
    )
    if model is not None:
        check_against(sae, model)
    return sae


def check_against(sae: SAEDecoder, model: Any) -> None:
    """The SAE fits `model` (a `ModelHandle`): same width, and its layer exists."""
    if sae.d_in != model.hidden_size:
        raise SpecError(
            f"SAE d_in={sae.d_in} does not match {model.name}'s hidden size {model.hidden_size} "
            f"(allowed: an SAE trained on {model.name}'s residual stream)"
        )
    if not 0 <= sae.layer < model.n_layers:
        raise SpecError(
            f"SAE hook_name={sae.hook_name!r} is layer {sae.layer}, out of range for {model.name} "
            f"(allowed: 0..{model.n_layers - 1})"
        )


def vector_source(
    tensor: torch.Tensor, model: Any, layer: int, name: str = "vector", after_final_norm: bool = False
) -> VectorSource:
    """Any tensor ([d], or [slots, d]) as a source written as if read at `layer` of `model` (a handle or a name),
    its width checked against the model when a handle is given; at the last layer it lives before the final norm
    unless `after_final_norm` (see `VectorSource`)."""
    handle = model if isinstance(model, ModelHandle) else None
    source = VectorSource(torch.as_tensor(tensor), layer, handle.name if handle else str(model), name, after_final_norm)
    if handle is not None:
        if source.width != handle.hidden_size:
            raise SpecError(
                f"vector {name!r} has width {source.width}, but {handle.name}'s hidden size is "
                f"{handle.hidden_size} (allowed: {handle.hidden_size})"
            )
        if not -handle.n_layers <= layer < handle.n_layers:
            raise SpecError(
                f"layer={layer} is out of range for {handle.name} (allowed: {-handle.n_layers}..{handle.n_layers - 1})"
            )
    return source


def sae_source(sae: SAEDecoder, latent: int, model: Any) -> VectorSource:
    """Latent k of an SAE: ``W_dec[k]`` at the layer its hook names (`load_sae`), in the residual stream there:
    every hook `hook_layer` accepts is a block output, so the last block's is before the final norm."""
    if isinstance(model, ModelHandle):
        check_against(sae, model)
    return vector_source(
        sae.latent(latent), model, sae.layer, f"sae:{sae.hook_name}/latent-{int(latent)}", after_final_norm=False
    )


def probe_source(
    weight: torch.Tensor, row: int, model: Any, layer: int, name: str = "probe", after_final_norm: bool = False
) -> VectorSource:
    """Row `row` of a linear probe's weight ([classes, d], as ``nn.Linear(d, classes).weight``) read at `layer`;
    a probe trained on the library's last-layer states (after the final norm) passes ``after_final_norm=True``."""
    weight = torch.as_tensor(weight)
    if weight.ndim != 2:
        raise SpecError(f"probe weight has shape {list(weight.shape)} (allowed: [classes, d], as nn.Linear's weight)")
    index = None if isinstance(row, bool) else as_index(row)
    if index is None or not 0 <= index < weight.shape[0]:
        raise SpecError(f"row={row!r} is out of range for this probe (allowed: 0..{weight.shape[0] - 1})")
    return vector_source(weight[index].detach(), model, layer, f"{name}/row-{index}", after_final_norm)


# ---- pyvene DAS ---------------------------------------------------------------------------------------------------
def das_directions(intervention: Any) -> torch.Tensor:
    """The learned basis of a pyvene rotated-space intervention (DAS, low-rank or boundless) as rows [k, d].

    pyvene rotates h to ``h @ W`` (``rotate_layer.weight``, [d, k], orthonormal columns) and interchanges the
    rotated coordinates: direction j in the hidden space is column j of W.
    """
    rotate = getattr(intervention, "rotate_layer", None)
    weight = getattr(rotate, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise SpecError(
            f"{type(intervention).__name__} has no learned rotation (allowed: a pyvene "
            "RotatedSpaceIntervention, LowRankRotatedSpaceIntervention or "
            "BoundlessRotatedSpaceIntervention)"
        )
    directions = weight.detach().T.float().cpu().clone()
    interchange = getattr(intervention, "interchange_dim", None)
    if isinstance(interchange, torch.Tensor) and interchange.numel() == 1 and directions.shape[0] > 1:
        directions = directions[: int(interchange)]  # a full rotation interchanges its first interchange_dim
    return directions


def das_source(intervenable: Any, model: ModelHandle, direction: int = 0, key: str | None = None) -> VectorSource:
    """Direction `direction` of the DAS intervention in a pyvene `IntervenableModel` (or of a bare intervention),
    at the layer its representation names; an intervention on another model (width, or the model wrapped) is
    refused."""
    intervention, layer, label = _das_intervention(intervenable, model, key)
    directions = das_directions(intervention)
    if directions.shape[1] != model.hidden_size:
        raise SpecError(
            f"DAS intervention {label!r} has width {directions.shape[1]}, but {model.name}'s hidden "
            f"size is {model.hidden_size} (allowed: an intervention learned on {model.name})"
        )
    index = None if isinstance(direction, bool) else as_index(direction)
    if index is None or not 0 <= index < directions.shape[0]:
        raise SpecError(
            f"direction={direction!r} is out of range for DAS intervention {label!r} (allowed: "
            f"0..{directions.shape[0] - 1})"
        )
    return vector_source(
        directions[index], model, layer, f"das:{label}/direction-{index}", after_final_norm=False
    )  # pyvene's block_output: before the final norm


def _das_intervention(intervenable: Any, model: ModelHandle, key: str | None) -> tuple[Any, int, str]:
    """(intervention, its layer, its key) from an IntervenableModel, or a bare intervention with its layer unknown."""
    import pyvene as pv

    if not isinstance(intervenable, pv.IntervenableModel):
        if key is not None:
            raise SpecError(
                "key= names an intervention of an IntervenableModel (allowed: None for a bare intervention)"
            )
        return intervenable, 0, type(intervenable).__name__
    if intervenable.model is not model.model:
        raise SpecError(
            f"the IntervenableModel wraps {type(intervenable.model).__name__} at "
            f"{id(intervenable.model):#x}, not {model.name}'s model (allowed: the DAS study of "
            f"{model.name})"
        )
    rotated = {
        k: (v[0] if isinstance(v, tuple) else v)
        for k, v in intervenable.interventions.items()
        if hasattr(v[0] if isinstance(v, tuple) else v, "rotate_layer")
    }
    if key is None and len(rotated) != 1:
        raise SpecError(
            f"the IntervenableModel holds {len(rotated)} rotated-space interventions (allowed: exactly "
            f"one, or key= one of {sorted(rotated)})"
        )
    key = key if key is not None else next(iter(rotated))
    if key not in rotated:
        raise SpecError(f"key={key!r} is not a rotated-space intervention here (allowed: {sorted(rotated)})")
    config = intervenable.representations[key]
    if config.component != "block_output":
        raise SpecError(
            f"DAS intervention {key!r} sits on {config.component!r} (allowed: 'block_output', the "
            "residual stream a Patchscope reads and writes)"
        )
    return rotated[key], int(config.layer), key


__all__ = [
    "SAEDecoder",
    "load_sae",
    "hook_layer",
    "check_against",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "vector_source",
    "sae_source",
    "probe_source",
    "das_directions",
    "das_source",
]
