"""PEFT adapters as the target model M*: a trained decoder (LoRA and the other tuners that change weights in place) on
a base model, applied without merging after `adapter_checks` passed it, and identified by its config and weights.

LatentQA's decoders and the Activation Oracles ship as PEFT LoRA adapters on a base model. A handle made here runs
the adapted forward through the base model's own modules (peft replaces each adapted ``nn.Linear`` by a LoRA layer in
place), so pyvene, the hooks and the planned execution see an ordinary transformers model whose linear layers add
their low-rank update. Nothing here merges or unmerges an adapter, or enables or disables one: the model runs as the
user left it.
"""

from __future__ import annotations

import enum
import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn
from transformers import PreTrainedModel

from ..errors import PatchscopeError, first_line
from .adapter_checks import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapter_folder,
    check_adapter,
    check_adapter_fits,
    check_peft_type,
    peft_package,
    read_adapter_config,
    refused,
)

# The config fields that change the adapted forward (what `identity` records besides the weights' hash).
IDENTITY_FIELDS = (
    "peft_type",
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "use_rslora",
    "use_dora",
    "fan_in_fan_out",
    "bias",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
)


# ---- identity -----------------------------------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return _json_safe(value.value)  # PeftType, a str enum
    if isinstance(value, (set, frozenset)):
        return sorted(_json_safe(v) for v in value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


def tensors_sha256(tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A hash of named tensors (name, dtype, shape and bytes, in name order), the same for a file and for memory."""
    digest = hashlib.sha256()
    for key, tensor in sorted(tensors, key=lambda kv: kv[0]):
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{key}|{str(data.dtype).removeprefix('torch.')}|{list(data.shape)}|".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def identity(peft_model: Any) -> dict[str, Any]:
    """What identifies the active adapter(s): the config fields that change the forward and a hash of the weights.

    Recorded in a saved spec's model record (as a GGUF model's hash is) and checked again when the spec is loaded."""
    peft = peft_package()
    names = list(getattr(peft_model, "active_adapters", None) or [getattr(peft_model, "active_adapter", "default")])
    adapters = []
    for name in names:
        config = peft_model.peft_config[name].to_dict()
        weights = peft.get_peft_model_state_dict(peft_model, adapter_name=name)
        adapters.append(
            {
                "name": name,
                "config": {k: _json_safe(config[k]) for k in IDENTITY_FIELDS if k in config},
                "weights_sha256": tensors_sha256(weights.items()),
            }
        )
    return {"adapters": adapters}


# ---- making the adapted model -------------------------------------------------------------------------------------
def is_peft_model(model: object) -> bool:
    """Whether `model` is a peft ``PeftModel``; peft is not imported for it (if peft was never imported, it is not)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(peft_model: Any, what: str) -> PreTrainedModel:
    """The transformers model inside a PeftModel, whose adapted layers run the adapter (checked to be in place)."""
    for name, config in peft_model.peft_config.items():
        if getattr(config, "is_prompt_learning", False):
            check_peft_type(str(_json_safe(config.peft_type)), f"{what}[{name}]")
    inner = peft_model.get_base_model()
    if not isinstance(inner, PreTrainedModel):
        raise PatchscopeError(f"{what} wraps a {type(inner).__name__}, not a transformers model")
    return inner


def apply_adapter(model: nn.Module, adapter: str | os.PathLike, name: str) -> tuple[Any, Path]:
    """Load the adapter in `adapter` onto `model` (in place, not merged) after `check_adapter`: (PeftModel, folder)."""
    peft = peft_package()
    folder = check_adapter(model, adapter, name)
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; nothing to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            adapted = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        raise refused(folder, f"could not be loaded by peft: {first_line(err)}") from None
    adapted.eval()
    return adapted, folder


# adapter_folder, read_adapter_config, check_adapter_fits and the file names live in adapter_checks; they stay
# importable from here, where they were before the split.
__all__ = [
    "adapter_folder",
    "read_adapter_config",
    "check_adapter_fits",
    "check_adapter",
    "apply_adapter",
    "identity",
    "unwrap",
    "is_peft_model",
    "tensors_sha256",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
]
