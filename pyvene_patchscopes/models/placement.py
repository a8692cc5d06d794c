"""Where and how a model's weights sit, checked before transformers sees them: dtype, device, device map, quantization
backend."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from ..errors import PatchscopeError, SpecError, UnknownNameError


def resolve_dtype(dtype: str | torch.dtype | None, auto: bool = False) -> torch.dtype | str:
    """A torch dtype from its name (float32 when None), or "auto" where `auto` allows it (the checkpoint's own
    dtype); else an `UnknownNameError` listing the names."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if auto and dtype == "auto":
        return "auto"
    if not isinstance(dtype, str) or dtype not in table:
        raise UnknownNameError(f"dtype={dtype!r} is not known (allowed: {', '.join(table)}, auto)")
    return table[dtype]


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device that exists on this machine, else a `SpecError` naming the choices."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SpecError(f"device={device!r} is not a device (allowed: cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise SpecError(f"device={device!r}: this machine has no CUDA device (allowed: cpu)")
        if dev.index is not None and dev.index >= count:
            raise SpecError(f"device={device!r} is out of range (allowed: cpu, cuda, cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise SpecError(f"device={device!r}: MPS is not available on this machine (allowed: cpu)")
    elif dev.type != "cpu":
        raise SpecError(f"device={device!r} is not supported (allowed: cpu, cuda, cuda:N, mps)")
    return dev


# Device-map strategies accelerate computes itself; any other string or int names one device.
MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def check_device_map(device_map: object) -> str | int | dict[str, Any]:
    """A `device_map` whose every device exists here: a strategy, one device, or {module: device | "disk"}."""
    allowed = f"allowed: {', '.join(MAP_STRATEGIES)}, a device, or a dict of module name -> device, 'cpu' or 'disk'"

    def device_of(where: str, value: object) -> str | int:
        if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
            raise SpecError(f"{where}={value!r} is not a device ({allowed})")
        if value == "disk":
            return value
        named = f"cuda:{value}" if isinstance(value, int) else value
        try:
            check_device(named)
        except SpecError as err:
            said, prefix = str(err), f"device={named!r}"
            rest = said[len(prefix) :] if said.startswith(prefix) else f": {said}"
            if " is not a device" in rest:
                rest = f" is not a device ({allowed})"
            raise SpecError(f"{where}={value!r}{rest}") from None
        return value if isinstance(value, int) else str(value)

    if isinstance(device_map, str) and device_map in MAP_STRATEGIES:
        return device_map
    if isinstance(device_map, dict):
        if not device_map or not all(isinstance(k, str) for k in device_map):
            raise SpecError(f"device_map={device_map!r} is not allowed ({allowed})")
        return {k: device_of(f"device_map[{k!r}]", v) for k, v in device_map.items()}
    return device_of("device_map", device_map)


# What each quantization method needs installed (the import name, and what to pip install).
QUANT_PACKAGES = {
    "bitsandbytes": ("bitsandbytes", "bitsandbytes"),
    "gptq": ("gptqmodel", "gptqmodel"),
    "awq": ("awq", "autoawq"),
    "torchao": ("torchao", "torchao"),
    "hqq": ("hqq", "hqq"),
    "quanto": ("optimum.quanto", "optimum-quanto"),
    "eetq": ("eetq", "eetq"),
    "compressed-tensors": ("compressed_tensors", "compressed-tensors"),
    "aqlm": ("aqlm", "aqlm"),
    "higgs": ("flute", "flute-kernel"),
    "vptq": ("vptq", "vptq"),
    "spqr": ("spqr_quant", "spqr_quant"),
    "bitnet": ("torch", "torch"),
    "fbgemm_fp8": ("fbgemm_gpu", "fbgemm-gpu"),
    "fp8": ("torch", "torch"),
}


def check_quantization(config: object) -> None:
    """A quantization config whose backend is installed, else one line naming the package to install."""
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method is None:
        raise SpecError(
            f"quantization_config={config!r} has no quant_method (allowed: a transformers "
            "quantization config such as BitsAndBytesConfig, or its dict)"
        )
    if str(method) not in QUANT_PACKAGES:
        return  # a method this table does not know: transformers checks it
    module, package = QUANT_PACKAGES[str(method)]
    if importlib.util.find_spec(module.split(".")[0]) is None or (
        "." in module and importlib.util.find_spec(module) is None
    ):
        raise PatchscopeError(
            f"quantization_config uses {method}, whose package is not installed here (pip install {package})"
        )


__all__ = [
    "resolve_dtype",
    "check_device",
    "MAP_STRATEGIES",
    "check_device_map",
    "QUANT_PACKAGES",
    "check_quantization",
]
