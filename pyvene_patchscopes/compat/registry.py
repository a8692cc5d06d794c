"""Workaround #6: register with pyvene the model classes it lacks, on first use (never on import).

pyvene knows a few dozen classes, keyed by exact ``type(model)``; Qwen 3, Gemma 3, Phi-3, OLMo 2, any subclass of a
known class, and every family found in a model (`models.architectures`) raise ``KeyError: <class ...>`` when wrapped
-> `register_model_types`, from the architecture table and the found paths; `check_hookable` before a run.

Test: tests/test_compat.py (test_bug6_gemma3_is_registered_and_matches_hooks).
Remove when: the pinned pyvene registers every family in `models.architectures.FAMILIES` (main adds Qwen 3 and
OLMo 2, not Gemma 3 or Phi-3, as of 9e33390) and matches subclasses; the found-paths part stays until pyvene can
hook a class it was never told about.
"""

from __future__ import annotations

import copy

import pyvene as pv
from torch import nn

from ..models.architectures import FAMILIES, Architecture, architecture, family
from ..models.parts import hf_config


def register_model_types(model: nn.Module | None = None) -> None:
    """Register the table's families that pyvene 0.1.8 lacks (Qwen 3, Gemma 3, Phi-3, OLMo 2), and `model`'s class.

    Each table family borrows the module table of a family pyvene knows (``Architecture.pyvene_like``), with
    per-head sizes read from ``config.head_dim`` where the family sets its head size so
    (``Architecture.head_dim``). A class pyvene lacks and the table does not hold gets the paths found in the
    model (`found_module_table`). Done on first use (`intervenable`, `check_hookable`), never on import.
    """
    import transformers

    for arch in FAMILIES:
        if arch.pyvene_like is None:
            continue
        like = _pyvene_class(family(arch.pyvene_like))
        for name in arch.classes:
            cls = getattr(transformers, name, None)
            if cls is None or like is None or cls in pv.type_to_module_mapping:
                continue
            dims = dict(pv.type_to_dimension_mapping[like])
            if arch.head_dim:
                for component in (
                    "head_attention_value_output",
                    "head_query_output",
                    "head_key_output",
                    "head_value_output",
                ):
                    dims[component] = ("head_dim",)
            pv.type_to_module_mapping[cls] = copy.deepcopy(pv.type_to_module_mapping[like])
            pv.type_to_dimension_mapping[cls] = dims
    if model is not None and type(model) not in pv.type_to_module_mapping:
        modules, dims = found_module_table(model)
        pv.type_to_module_mapping[type(model)] = modules
        pv.type_to_dimension_mapping[type(model)] = dims


def found_module_table(model: nn.Module) -> tuple[dict, dict]:
    """pyvene's two tables for `model`'s class, from its found architecture: blocks, and their attention and MLP."""
    from pyvene.models.constants import CONST_INPUT_HOOK, CONST_OUTPUT_HOOK

    arch = architecture(model)
    block = f"{arch.layers}[%s]"
    modules = {"block_input": (block, CONST_INPUT_HOOK), "block_output": (block, CONST_OUTPUT_HOOK)}
    children = dict(arch.blocks(model)[0].named_children())
    for name in ("self_attn", "attention", "attn", "self_attention"):
        if name in children:
            modules["attention_output"] = (f"{block}.{name}", CONST_OUTPUT_HOOK)
            modules["attention_input"] = (f"{block}.{name}", CONST_INPUT_HOOK)
            break
    for name in ("mlp", "feed_forward", "block_sparse_moe", "ffn"):
        if name in children:
            modules["mlp_output"] = (f"{block}.{name}", CONST_OUTPUT_HOOK)
            modules["mlp_input"] = (f"{block}.{name}", CONST_INPUT_HOOK)
            break
    config = hf_config(model)
    text = "" if config.get_text_config() is config else _text_config_path(config)
    size = (f"{text}hidden_size",)
    return modules, {component: size for component in modules}


def _text_config_path(config) -> str:
    """Where a multimodal config keeps its language model's config, as pyvene's dotted lookup reads it."""
    text = config.get_text_config()
    for name, value in vars(config).items():
        if value is text:
            return f"{name}."
    return ""


def _pyvene_class(arch: Architecture) -> type | None:
    import transformers

    for name in arch.classes:
        cls = getattr(transformers, name, None)
        if cls is not None and cls in pv.type_to_module_mapping:
            return cls
    return None


def check_hookable(model: nn.Module) -> None:
    """A model pyvene can hook (its class in pyvene's registry, after ours), else an error naming the families."""
    if type(model) in pv.type_to_module_mapping:
        return
    register_model_types(model)
