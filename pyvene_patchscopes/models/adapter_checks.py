"""An adapter folder checked like a spec before peft loads anything, so that no check lets peft allocate.

An adapter folder is someone else's: only its two files are read (a link that leaves the folder, or loops, is
refused; its subtree is never walked), its weights only from ``adapter_model.safetensors`` (a pickled
``adapter_model.bin`` is refused); its config's numbers are finite and its ranks integers; every adapted module is
matched against the base model's names and widths, so an adapter trained on another base model gets one line rather
than peft's shape error or a silent partial load; every tensor peft expects is present with the shape the config
gives it (checked on a copy of the model on the meta device, so a false ``r`` allocates nothing), and no other tensor
is (peft would load it into the base model); every tensor is a float, finite in the dtype it runs in; and each LoRA's
update, scale * B @ A, is bounded within the range the forward computes in. `adapters` applies what passes.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from ..core.files import check_finite, expand, inside, is_dir, is_file, is_hub_id, read_json
from ..errors import PatchscopeError, SpecError, first_line, load_failure
from .parts import text_config

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
MAX_ADAPTER_BYTES = 1 << 34
# peft's types that add virtual tokens or prompts instead of changing weights: a patched position would move.
PROMPT_LEARNING = ("PROMPT_TUNING", "MULTITASK_PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING", "ADAPTION_PROMPT", "CPT")
# Where a saved adapter's tensor names end: the adapted module is what comes before.
_PARAMETER = re.compile(
    r"\.(lora_[A-Za-z_]+|hada_[A-Za-z0-9_]+|lokr_[A-Za-z0-9_]+|ia3_l|oft_[A-Za-z_]+|"
    r"boft_[A-Za-z_]+|vera_[A-Za-z_]+)(\.[A-Za-z0-9_]+)?(\.weight|\.bias)?$"
)
_PREFIX = "base_model.model."


def peft_package() -> Any:
    try:
        import peft
    except ImportError:
        raise PatchscopeError(
            "a PEFT adapter needs the peft package, which is not installed here (pip install peft)"
        ) from None
    return peft


def refused(folder: Path, why: str) -> SpecError:
    return SpecError(f"adapter {str(folder)!r}: {why}")


# ---- the folder ---------------------------------------------------------------------------------------------------
def adapter_folder(adapter: str | os.PathLike) -> Path:
    """A local adapter folder holding ``adapter_config.json`` and ``adapter_model.safetensors``, each a file inside it.

    Only those two entries (and the pickled names) are looked at, never the folder's subtree: the loader reads
    nothing else, and ``/`` or ``~`` is answered at once. A name of the form ``org/name`` that is not a folder here
    is downloaded from the hub (those two files only); offline, it gets the line a model's hub id gets."""
    folder = expand(adapter)
    if not is_dir(folder):
        if isinstance(adapter, str) and is_hub_id(adapter):
            folder = _download(adapter)
        else:
            raise SpecError(
                f"adapter={str(adapter)!r} is not a folder (allowed: a folder written by peft's "
                "save_pretrained, holding adapter_config.json and adapter_model.safetensors)"
            )
    for name in PICKLED_WEIGHTS:
        if (folder / name).exists() and not is_file(folder / ADAPTER_WEIGHTS):
            raise refused(
                folder,
                f"holds {name}, a pickle, which can run code when loaded (allowed: "
                f"{ADAPTER_WEIGHTS}; save the adapter with safe_serialization=True)",
            )
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        _check_entry(folder, name)
    if (folder / ADAPTER_WEIGHTS).stat().st_size > MAX_ADAPTER_BYTES:
        raise refused(folder, f"{ADAPTER_WEIGHTS} is larger than {MAX_ADAPTER_BYTES} bytes")
    return folder


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS]))
    except (OSError, ValueError) as err:  # offline (LocalEntryNotFoundError), unknown repo, no access
        raise load_failure("adapter", repo_id, "hub", err) from None


def _check_entry(folder: Path, name: str) -> None:
    """`name` is a file in `folder`, or a link that stays inside it (a loop of links, or one that leaves, refused)."""
    path = folder / name
    try:
        root, target = folder.resolve(strict=True), path.resolve(strict=False)
    except (OSError, RuntimeError):  # RuntimeError: Python 3.11's "Symlink loop"
        raise refused(
            folder, f"{name!r} is a loop of symbolic links (allowed: files inside the adapter folder)"
        ) from None
    if not target.is_relative_to(root):
        raise refused(
            folder, f"{name!r} is a link to a path outside the folder (allowed: files inside the adapter folder)"
        )
    if not is_file(path):
        raise refused(folder, f"has no {name} (allowed: a folder written by peft's save_pretrained)")


def read_adapter_config(folder: Path) -> dict[str, Any]:
    """``adapter_config.json`` as a dict, refused unless it names a peft type that changes weights in place and its
    numbers are finite, its ranks positive integers and its scales finite in float32, the dtype they run in."""
    config = read_json(inside(folder, ADAPTER_CONFIG, "adapter file"), f"{ADAPTER_CONFIG} of {folder}")
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise refused(folder, f"{ADAPTER_CONFIG} has no peft_type (allowed: a peft adapter config)")
    check_peft_type(config["peft_type"], str(folder))
    check_config_numbers(folder, config)
    return config


def _numbers(field: str, value: Any) -> Iterable[tuple[str, Any]]:
    """(where, number) for every number in a config value, lists and dicts included (bools are not numbers)."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(f"{field}[{key!r}]", item)
    elif isinstance(value, list):
        for k, item in enumerate(value):
            yield from _numbers(f"{field}[{k}]", item)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield field, value


def _pattern(folder: Path, config: dict[str, Any], field: str, what: str) -> list[tuple[str, Any]]:
    """A rank_pattern's or alpha_pattern's (where, value) pairs; the pattern itself must be an object."""
    value = config.get(field) or {}
    if not isinstance(value, dict):
        raise refused(
            folder, f"{ADAPTER_CONFIG} {field}={value!r} is not allowed (allowed: an object of module name -> {what})"
        )
    return [(f"{field}[{key!r}]", item) for key, item in value.items()]


def check_config_numbers(folder: Path, config: dict[str, Any]) -> None:
    """Every number in the config finite (JSON's NaN, Infinity and 1e400 parse); ``r`` and ``rank_pattern`` positive
    integers (OFT's r may be 0); ``lora_alpha``, ``alpha`` and ``alpha_pattern`` finite in float32: peft's scale
    (alpha / r) multiplies the adapter's float32 output, so 1e39 gives inf and NaN probabilities."""

    def refuse(where: str, value: Any, allowed: str) -> SpecError:
        return refused(folder, f"{ADAPTER_CONFIG} {where}={value!r} is not allowed (allowed: {allowed})")

    low = 0 if str(config["peft_type"]).upper() == "OFT" else 1
    ranks = [("r", config["r"])] if config.get("r") is not None else []
    for where, value in ranks + _pattern(folder, config, "rank_pattern", "rank"):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise refuse(where, value, f"an integer >= {low}")
    largest = float(torch.finfo(torch.float32).max)
    scales = [(name, config[name]) for name in ("lora_alpha", "alpha") if config.get(name) is not None]
    for where, value in scales + _pattern(folder, config, "alpha_pattern", "alpha"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= largest:
            raise refuse(
                where,
                value,
                f"a finite number within float32's range, at most {largest:.4g} in size: "
                "the scale multiplies the adapter's float32 output",
            )
    for field, value in config.items():
        for where, number in _numbers(field, value):
            if isinstance(number, float) and not math.isfinite(number):
                raise refuse(where, number, "finite numbers")


def check_peft_type(peft_type: str, what: str) -> None:
    if str(peft_type).upper() in PROMPT_LEARNING:
        raise SpecError(
            f"adapter {what!r} is a {peft_type} adapter, which adds virtual tokens, so a patched "
            "position would not be the prompt's (allowed: adapters that change weights in place, "
            "such as LORA, LOHA, LOKR, IA3 or OFT)"
        )


def adapted_shapes(folder: Path) -> dict[str, list[int]]:
    """Each tensor's name and shape, read from the safetensors header alone (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    path = inside(folder, ADAPTER_WEIGHTS, "adapter file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        reason = str(err).split(":")[0].splitlines()[0][:80] if str(err) else type(err).__name__
        raise refused(folder, f"{ADAPTER_WEIGHTS} is not a valid safetensors file ({reason})") from None


def check_adapter_fits(model: nn.Module, folder: Path, name: str, shapes: dict[str, list[int]] | None = None) -> None:
    """Refuse an adapter trained on another base model: every adapted module must exist in `model` with the widths
    the adapter's tensors have (a LoRA A is [r, in], a LoRA B [out, r]). `shapes`: `adapted_shapes(folder)`, where
    the caller has read them already."""
    shapes = adapted_shapes(folder) if shapes is None else shapes
    if not shapes:
        raise refused(folder, f"{ADAPTER_WEIGHTS} holds no tensors")
    modules = dict(model.named_modules())
    width = int(text_config(model).hidden_size)
    for key, shape in shapes.items():
        match = _PARAMETER.search(key)
        if match is None:
            continue  # modules_to_save copies and other whole-module tensors: checked by peft's load
        path = key[: match.start()]
        path = path[len(_PREFIX) :] if path.startswith(_PREFIX) else path
        module = modules.get(path)
        if module is None:
            raise refused(
                folder,
                f"adapts module {path!r}, which {name} does not have, so it was trained on another "
                f"base model (allowed: an adapter for {name}, hidden size {width})",
            )
        kind = match.group(1)
        if isinstance(module, nn.Linear) and len(shape) == 2 and kind in ("lora_A", "lora_B"):
            have, want, side = (
                (module.in_features, shape[1], "input")
                if kind == "lora_A"
                else (module.out_features, shape[0], "output")
            )
            if have != want:
                raise refused(
                    folder,
                    f"adapts {path!r} with {side} width {want}, but {name}'s has {have}, so it was "
                    f"trained on another base model (allowed: an adapter for {name}, hidden size "
                    f"{width})",
                )


def check_expected_tensors(model: nn.Module, folder: Path, shapes: dict[str, list[int]]) -> dict[str, float]:
    """Every tensor peft will load for this config on this model is in the file, with the shape the config gives it,
    and the file holds no other: the LoRA scale (alpha / r, as peft computes it) of each adapted module is returned.

    peft builds the adapter on a copy of the model on the meta device (no memory), so ``r`` = 262,144 against
    weights of rank 4 is refused before peft allocates anything, and a missing tensor is refused rather than left
    at peft's initialisation (random with ``init_lora_weights: false``: each load a different adapter). peft loads
    non-strictly, so a tensor the config does not account for (``base_model.model.lm_head.weight`` without
    ``modules_to_save``) would overwrite the base model's weights: refused, and so is a wrongly shaped one, before
    peft's own error."""
    peft = peft_package()
    try:
        with warnings.catch_warnings():  # the real load below warns, if at all
            warnings.simplefilter("ignore")
            config = peft.PeftConfig.from_pretrained(str(folder))
            for init in ("init_lora_weights", "init_weights", "init_ia3_weights"):
                if hasattr(config, init):  # peft's plain initialisation, which the file's values replace (PiSSA's
                    setattr(config, init, True)  # SVD, say, cannot run on meta)
            with torch.device("meta"):  # the model and the adapter peft builds in it: no memory
                built = peft.get_peft_model(type(model)(copy.deepcopy(model.config)), config)
            expected = peft.get_peft_model_state_dict(built, save_embedding_layers=False)
            # an adapted embedding or head is saved whole beside its LoRA (peft's save_embedding_layers="auto")
            adapted = [getattr(built, f"get_{side}_embeddings")() for side in ("input", "output")]
            allowed = (
                set(peft.get_peft_model_state_dict(built, save_embedding_layers=True))
                if any(hasattr(layer, "base_layer") for layer in adapted)
                else set(expected)
            )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, OverflowError, AttributeError) as err:
        raise refused(folder, f"could not be loaded by peft: {first_line(err)}") from None
    extra = sorted(set(shapes) - allowed)
    if extra:
        raise refused(
            folder,
            f"{ADAPTER_WEIGHTS} holds {len(extra)} tensor(s) that {ADAPTER_CONFIG} does not account "
            f"for, first {extra[0]!r} (shape {shapes[extra[0]]}): peft would load it into the base "
            f"model, overwriting its weights (allowed: the {len(allowed)} tensors peft expects for "
            "this config, as its save_pretrained writes them; a module's whole copy only where "
            "modules_to_save names it)",
        )
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise refused(
            folder,
            f"{ADAPTER_WEIGHTS} lacks {len(missing)} of the {len(expected)} tensors peft expects for "
            f"this config, first {missing[0]!r} (allowed: every tensor peft expects, as its "
            "save_pretrained writes them; peft would leave the missing ones at their initialisation)",
        )
    for key, tensor in sorted(expected.items()):
        if list(tensor.shape) != shapes[key] and _PARAMETER.search(key) is None:  # a whole module's copy
            raise refused(
                folder,
                f"{ADAPTER_WEIGHTS} {key!r} has shape {shapes[key]}, but the base model's module "
                f"has {list(tensor.shape)} (allowed: a copy of the base model's module, as "
                "modules_to_save saves it)",
            )
        if list(tensor.shape) != shapes[key]:
            ranks = ", ".join(
                f"{field}={getattr(config, field)!r}" for field in ("r", "rank_pattern") if getattr(config, field, None)
            )
            raise refused(
                folder,
                f"{ADAPTER_WEIGHTS} {key!r} has shape {shapes[key]}, but {ADAPTER_CONFIG} ({ranks}) "
                f"makes peft expect {list(tensor.shape)} (allowed: the r and rank_pattern the "
                "weights were saved with)",
            )
    return {
        name: float(module.scaling["default"])
        for name, module in built.named_modules()
        if isinstance(getattr(module, "scaling", None), dict) and "default" in module.scaling
    }


def run_dtype(key: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a saved tensor runs in: peft keeps an adapter's own parameters in float32 (float16 and bfloat16
    upcast; float64 stays), and a whole-module copy (``modules_to_save``) in the model's dtype."""
    if _PARAMETER.search(key) is None:
        return model_dtype
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def check_adapter_weights(folder: Path, model_dtype: torch.dtype, scales: dict[str, float] | None = None) -> None:
    """Every tensor a float, finite in the dtype it runs in (1e300 in float64 is inf in float32), read one at a time;
    then each LoRA module's update within range (`check_update`), with its `scales` (`check_expected_tensors`)."""
    from safetensors import safe_open

    with safe_open(str(inside(folder, ADAPTER_WEIGHTS, "adapter file")), framework="pt") as handle:
        keys = set(handle.keys())
        for key in sorted(keys):
            check_finite(
                {key: handle.get_tensor(key)},
                f"adapter {str(folder)!r}: {ADAPTER_WEIGHTS} tensor",
                run_dtype(key, model_dtype),
            )
        for module, scale in sorted((scales or {}).items()):
            pair = [f"{module}.lora_{side}.weight" for side in ("A", "B")]
            if all(key in keys for key in pair):
                a, b = (handle.get_tensor(key) for key in pair)
                check_update(folder, module, scale, a, b, model_dtype)


def check_update(
    folder: Path, module: str, scale: float, a: torch.Tensor, b: torch.Tensor, model_dtype: torch.dtype
) -> None:
    """Refuse a LoRA whose update, scale * B @ A, can leave the range the forward computes in, each entry finite:
    lora_alpha 1e30 (finite in float32) or a lora_B of 3e38 gave NaN readouts. A cheap bound, in float64: for an
    input whose entries are at most 1 in size, no output entry of the update exceeds |scale| * ||B|| * ||A|| (the
    largest absolute row sums). It must be finite in the model's dtype (the update is added to its outputs), and its
    square summed over the module's outputs finite in float32 (the norm that follows sums squares in float32)."""
    if a.ndim != 2 or b.ndim != 2:
        return  # a convolution's LoRA: not bounded here
    bound = abs(scale) * float(b.double().abs().sum(1).max()) * float(a.double().abs().sum(1).max())
    limit = min(float(torch.finfo(model_dtype).max), math.sqrt(float(torch.finfo(torch.float32).max) / b.shape[0]))
    if not bound <= limit:
        name = module.removeprefix(_PREFIX)
        raise refused(
            folder,
            f"the update of {name!r}, scale {scale:.4g} (lora_alpha / r) * lora_B @ lora_A, can "
            f"reach {bound:.4g} for an input of entries at most 1, beyond what the forward computes "
            f"finitely in {str(model_dtype).removeprefix('torch.')} (allowed: an update bounded by "
            f"{limit:.4g} here, |scale| * the largest row sums of |lora_B| and |lora_A|: a smaller "
            "lora_alpha or smaller weights)",
        )


def check_adapter(model: nn.Module, adapter: str | os.PathLike, name: str) -> Path:
    """Every check above, in order, none of which lets peft allocate: the folder, the config, the modules and their
    widths, the tensors peft expects and their shapes, then the weights' dtypes and values. The folder is returned."""
    folder = adapter_folder(adapter)
    read_adapter_config(folder)
    shapes = adapted_shapes(folder)  # the header, read once for both checks
    check_adapter_fits(model, folder, name, shapes)
    scales = check_expected_tensors(model, folder, shapes)
    check_adapter_weights(
        folder, next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32), scales
    )
    return folder


__all__ = [
    "adapter_folder",
    "read_adapter_config",
    "check_config_numbers",
    "check_peft_type",
    "adapted_shapes",
    "check_adapter_fits",
    "check_expected_tensors",
    "check_adapter_weights",
    "check_update",
    "check_adapter",
    "peft_package",
    "refused",
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
]
