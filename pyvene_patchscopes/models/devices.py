"""Where a model computes: accelerate's execution devices for split and offloaded models, else its tensors' device.

A model loaded with ``device_map`` (layers on several GPUs, or offloaded to the CPU or to disk) or wrapped by
``accelerate.cpu_offload`` keeps its offloaded weights on the ``meta`` device and moves them in for each call,
through a hook on the module (``module._hf_hook``). Such a module computes on the hook's ``execution_device``;
its ``.weight`` is an empty placeholder. Every device this package asks for comes from here.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch import nn

from .parts import input_embeddings


def _as_device(value: int | str | torch.device) -> torch.device:
    return torch.device(f"cuda:{value}" if isinstance(value, int) else value)


def hook_device(module: nn.Module) -> torch.device | None:
    """The execution device of accelerate's hook on `module` itself, if it has one."""
    hook = getattr(module, "_hf_hook", None)
    for part in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        device = getattr(part, "execution_device", None)
        if device is not None:
            return _as_device(device)
    return None


def module_device(module: nn.Module) -> torch.device:
    """Where `module` computes: the first accelerate hook's execution device in it, else its first tensor that
    holds data (not ``meta``), else the CPU."""
    for part in module.modules():
        device = hook_device(part)
        if device is not None:
            return device
    for tensor in chain(module.parameters(), module.buffers()):
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where the model's token ids go: the device its input embedding computes on."""
    embedding = input_embeddings(model)
    return module_device(embedding if embedding is not None else model)


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate moves any of the model's weights in and out (a device map, or CPU or disk offload)."""
    return any(hook_device(part) is not None for part in model.modules())


def dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype of the model's floating-point weights (offloaded placeholders keep theirs)."""
    for tensor in model.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


__all__ = ["hook_device", "module_device", "input_device", "is_dispatched", "dtype_of"]
