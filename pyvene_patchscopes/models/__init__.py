"""Models: load one by name or wrap one in memory (`loading`, `handle`), where its weights sit (`placement`), what
identifies them (`hashes`), and what it is made of (`architectures`, `discovery`, `probes`, `devices`, `adapters`,
`adapter_checks`, `sites`).

``from pyvene_patchscopes.models import load_model`` keeps working: the names of the old ``models`` module are
re-exported here. A test that stubs a name that `load_model` looks up (``AutoTokenizer``, ``_converted_dir``) patches
`models.loading`; callers look ``load_model`` itself up on this package when called, so patching it here reaches them.
"""

from .handle import ModelHandle, context_limit, prepare_tokenizer, wrap_model
from .hashes import file_sha256, weights_sha256
from .loading import ALIASES, DOCUMENT_START, EMBEDDED, cache_root, load_model, model_source
from .placement import MAP_STRATEGIES, QUANT_PACKAGES, check_device, check_device_map, check_quantization, resolve_dtype

__all__ = [
    "ModelHandle",
    "load_model",
    "wrap_model",
    "model_source",
    "prepare_tokenizer",
    "context_limit",
    "EMBEDDED",
    "ALIASES",
    "DOCUMENT_START",
    "cache_root",
    "file_sha256",
    "weights_sha256",
    "resolve_dtype",
    "check_device",
    "MAP_STRATEGIES",
    "check_device_map",
    "QUANT_PACKAGES",
    "check_quantization",
]
