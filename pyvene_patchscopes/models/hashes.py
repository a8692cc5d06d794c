"""Hashes that identify weights: a file's sha256, and a model's state dict's (read in from where offloaded)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import PatchscopeError


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 of a model's state dict: each tensor's name, dtype, shape and bytes, in name order (a tied tensor
    once, its other names as aliases). Offloaded tensors (accelerate's ``meta`` placeholders) are read in from
    where they live, one module at a time."""
    digest = hashlib.sha256()
    seen: dict[int, str] = {}
    tensors = model.state_dict(keep_vars=True) if tensors is None else tensors
    for name in sorted(tensors):
        tensor = tensors[name]
        if id(tensor) in seen:
            digest.update(f"{name}={seen[id(tensor)]}|".encode())
            continue
        seen[id(tensor)] = name
        data = _onloaded(model, name) if tensor.device.type == "meta" else tensor.detach()
        data = data.to("cpu").contiguous()
        digest.update(f"{name}|{str(data.dtype).removeprefix('torch.')}|{list(data.shape)}|".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().data if data.numel() else b"")  # the bytes, uncopied
    return digest.hexdigest()


def _onloaded(model: torch.nn.Module, name: str) -> torch.Tensor:
    """The tensor `name` of an offloaded model, read in from disk or its CPU copy by the accelerate hook of the
    nearest module above it that holds one."""
    from accelerate.utils import align_module_device, has_offloaded_params

    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        module = model.get_submodule(".".join(parts[:cut]))
        if has_offloaded_params(module):
            owner = module.get_submodule(".".join(parts[cut:-1]))
            with align_module_device(module, torch.device("cpu")):
                data = getattr(owner, parts[-1]).detach().clone()
            if data.device.type != "meta":
                return data
    raise PatchscopeError(
        f"the weight {name} is on the meta device with no offloaded copy to read, so the model's "
        "weights cannot be hashed (allowed: a model whose every weight is loaded, or offloaded by "
        "accelerate)"
    )


__all__ = ["file_sha256", "weights_sha256"]
