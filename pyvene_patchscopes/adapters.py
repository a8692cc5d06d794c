"""PEFT adapters as the target model M*: a trained decoder (LoRA and the other tuners that change weights in place) on
a base model, checked before peft sees it, applied without merging, and identified by its config and weights.

LatentQA's decoders and the Activation Oracles ship as PEFT LoRA adapters on a base model. A handle made here runs
the adapted forward through the base model's own modules (peft replaces each adapted ``nn.Linear`` by a LoRA layer in
place), so pyvene, the hooks and the planned execution see an ordinary transformers model whose linear layers add
their low-rank update. Nothing here merges or unmerges an adapter, or enables or disables one: the model runs as the
user left it.

An adapter folder is someone else's: its files are read only inside the folder (a link that leaves it is refused),
its weights only from ``adapter_model.safetensors`` (a pickled ``adapter_model.bin`` is refused), and every adapted
module is matched against the base model's names and widths before peft loads anything, so an adapter trained on
another base model gets one line rather than peft's shape error or a silent partial load.
"""
from __future__ import annotations

import enum
import hashlib
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .errors import PatchscopeError, SpecError
from .files import expand, inside, is_dir, is_file, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_ADAPTER_BYTES = 1 << 34
# peft's types that add virtual tokens or prompts instead of changing weights: a patched position would move.
PROMPT_LEARNING = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT")
# The config fields that change the adapted forward (what `identity` records besides the weights' hash).
IDENTITY_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules", "exclude_modules", "use_rslora", "use_dora",
                   "fan_in_fan_out", "bias", "modules_to_save", "layers_to_transform", "layers_pattern",
                   "rank_pattern", "alpha_pattern", "lora_bias")
# Where a saved adapter's tensor names end: the adapted module is what comes before.
_PARAMETER = re.compile(r"\.(lora_[A-Za-z_]+|hada_[A-Za-z0-9_]+|lokr_[A-Za-z0-9_]+|ia3_l|oft_[A-Za-z_]+|"
                        r"boft_[A-Za-z_]+|vera_[A-Za-z_]+)(\.[A-Za-z0-9_]+)?(\.weight|\.bias)?$")
_PREFIX = "base_model.model."


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise PatchscopeError("a PEFT adapter needs the peft package, which is not installed here "
                              "(pip install peft)") from None
    return peft


def _refuse(folder: Path, why: str) -> SpecError:
    return SpecError(f"adapter {str(folder)!r}: {why}")


# ---- the folder ---------------------------------------------------------------------------------------------------
def adapter_folder(adapter: str | os.PathLike) -> Path:
    """A local adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``), every entry inside it.

    A name of the form ``org/name`` that is not a folder here is downloaded from the hub (those two files only)."""
    folder = expand(adapter)
    if not is_dir(folder):
        if isinstance(adapter, str) and re.fullmatch(r"[\w.\-]+/[\w.\-]+", adapter) and ".." not in adapter:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(repo_id=adapter, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]))
        else:
            raise SpecError(f"adapter={str(adapter)!r} is not a folder (allowed: a folder written by peft's "
                            "save_pretrained, holding adapter_config.json and adapter_model.safetensors)")
    root = folder.resolve()
    for entry in sorted(folder.rglob("*")):
        if entry.is_symlink() and not entry.resolve().is_relative_to(root):
            raise _refuse(folder, f"{entry.relative_to(folder).as_posix()!r} is a link to a path outside the "
                                  "folder (allowed: files inside the adapter folder)")
    for name in PICKLED_WEIGHTS:
        if (folder / name).exists() and not is_file(folder / ADAPTER_WEIGHTS):
            raise _refuse(folder, f"holds {name}, a pickle, which can run code when loaded (allowed: "
                                  f"{ADAPTER_WEIGHTS}; save the adapter with safe_serialization=True)")
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not is_file(inside(folder, name, "adapter file")):
            raise _refuse(folder, f"has no {name} (allowed: a folder written by peft's save_pretrained)")
    if (folder / ADAPTER_WEIGHTS).stat().st_size > MAX_ADAPTER_BYTES:
        raise _refuse(folder, f"{ADAPTER_WEIGHTS} is larger than {MAX_ADAPTER_BYTES} bytes")
    return folder


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, refused unless it names a peft type that changes weights in place."""
    config = read_json(inside(folder, ADAPTER_CONFIG, "adapter file"), f"{ADAPTER_CONFIG} of {folder}")
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise _refuse(folder, f"{ADAPTER_CONFIG} has no peft_type (allowed: a peft adapter config)")
    check_peft_type(config["peft_type"], str(folder))
    return config


def check_peft_type(peft_type: str, what: str) -> None:
    if str(peft_type).upper() in PROMPT_LEARNING:
        raise SpecError(f"adapter {what!r} is a {peft_type} adapter, which adds virtual tokens, so a patched "
                        "position would not be the prompt's (allowed: adapters that change weights in place, "
                        "such as LORA, LOHA, LOKR, IA3 or OFT)")


def adapted_shapes(folder: Path) -> dict[str, list[int]]:
    """Each tensor's name and shape, read from the safetensors header alone (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    path = inside(folder, ADAPTER_WEIGHTS, "adapter file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).split(":")[0].splitlines()[0][:80] if str(err) else type(err).__name__
        raise _refuse(folder, f"{ADAPTER_WEIGHTS} is not a valid safetensors file ({reason})") from None


def check_adapter_fits(model: nn.Module, folder: Path, name: str) -> None:
    """Refuse an adapter trained on another base model: every adapted module must exist in `model` with the widths
    the adapter's tensors have (a LoRA A is [r, in], a LoRA B [out, r])."""
    shapes = adapted_shapes(folder)
    if not shapes:
        raise _refuse(folder, f"{ADAPTER_WEIGHTS} holds no tensors")
    modules = dict(model.named_modules())
    width = int(model.config.get_text_config().hidden_size)
    for key, shape in shapes.items():
        match = _PARAMETER.search(key)
        if match is None:
            continue  # modules_to_save copies and other whole-module tensors: checked by peft's load
        path = key[:match.start()]
        path = path[len(_PREFIX):] if path.startswith(_PREFIX) else path
        module = modules.get(path)
        if module is None:
            raise _refuse(folder, f"adapts module {path!r}, which {name} does not have, so it was trained on another "
                                  f"base model (allowed: an adapter for {name}, hidden size {width})")
        kind = match.group(1)
        if isinstance(module, nn.Linear) and len(shape) == 2 and kind in ("lora_A", "lora_B"):
            have, want, side = ((module.in_features, shape[1], "input") if kind == "lora_A"
                                else (module.out_features, shape[0], "output"))
            if have != want:
                raise _refuse(folder, f"adapts {path!r} with {side} width {want}, but {name}'s has {have}, so it was "
                                      f"trained on another base model (allowed: an adapter for {name}, hidden size "
                                      f"{width})")


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
    peft = _peft()
    names = list(getattr(peft_model, "active_adapters", None) or [getattr(peft_model, "active_adapter", "default")])
    adapters = []
    for name in names:
        config = peft_model.peft_config[name].to_dict()
        weights = peft.get_peft_model_state_dict(peft_model, adapter_name=name)
        adapters.append({"name": name, "config": {k: _json_safe(config[k]) for k in IDENTITY_FIELDS if k in config},
                         "weights_sha256": tensors_sha256(weights.items())})
    return {"adapters": adapters}


# ---- making the adapted model -------------------------------------------------------------------------------------
def is_peft_model(model: object) -> bool:
    """Whether `model` is a peft ``PeftModel``; peft is not imported for it (if peft was never imported, it is not)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(peft_model: Any, what: str) -> nn.Module:
    """The transformers model inside a PeftModel, whose adapted layers run the adapter (checked to be in place)."""
    for name, config in peft_model.peft_config.items():
        if getattr(config, "is_prompt_learning", False):
            check_peft_type(str(_json_safe(config.peft_type)), f"{what}[{name}]")
    inner = peft_model.get_base_model()
    if not isinstance(inner, nn.Module) or not hasattr(inner, "config"):
        raise PatchscopeError(f"{what} wraps a {type(inner).__name__}, not a transformers model")
    return inner


def apply_adapter(model: nn.Module, adapter: str | os.PathLike, name: str) -> tuple[Any, Path]:
    """Load the adapter in `adapter` onto `model` (in place, not merged) after the checks above: (PeftModel, folder)."""
    peft = _peft()
    folder = adapter_folder(adapter)
    read_adapter_config(folder)
    check_adapter_fits(model, folder, name)
    try:
        with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; nothing to act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            adapted = peft.PeftModel.from_pretrained(model, str(folder), is_trainable=False)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise _refuse(folder, f"could not be loaded by peft: {reason}") from None
    adapted.eval()
    return adapted, folder


__all__ = ["adapter_folder", "read_adapter_config", "check_adapter_fits", "apply_adapter", "identity", "unwrap",
           "is_peft_model", "tensors_sha256", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS"]
