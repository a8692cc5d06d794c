"""Typed access to the parts of a causal LM that torch types as ``Tensor | Module``: its config, blocks and weights.

``nn.Module.__getattr__`` says every attribute a module holds is a ``Tensor | Module``; a model's ``config``, the
``ModuleList`` of its decoder blocks and a head's ``weight`` are narrower. These read each once, check what they
got, and say what it is; a model that holds something else is refused with a `PatchscopeError` naming it.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig

from ..errors import PatchscopeError


def hf_config(model: nn.Module) -> PreTrainedConfig:
    """The model's transformers config (``model.config``)."""
    config = getattr(model, "config", None)
    if not isinstance(config, PreTrainedConfig):
        raise PatchscopeError(
            f"{type(model).__name__}.config is a {type(config).__name__} (allowed: a transformers PreTrainedConfig)"
        )
    return config


def text_config(model: nn.Module) -> PreTrainedConfig:
    """The config of the model's text stack (``config.get_text_config()``: a multimodal config holds one per stack)."""
    return hf_config(model).get_text_config()


def module_list(model: nn.Module, path: str, module: nn.Module) -> nn.ModuleList:
    """`module`, found at `path` in `model`, as the ``ModuleList`` of decoder blocks that it must be."""
    if not isinstance(module, nn.ModuleList):
        raise PatchscopeError(
            f"{type(model).__name__}.{path} is a {type(module).__name__} (allowed: the ModuleList of decoder blocks)"
        )
    return module


def blocks_at(model: nn.Module, path: str) -> nn.ModuleList:
    """The ``ModuleList`` of decoder blocks at `path` (what `discovery.find_layers` found)."""
    return module_list(model, path, model.get_submodule(path))


def input_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's token embedding (``get_input_embeddings()``); None where it has none."""
    return _embeddings(model, "get_input_embeddings")


def output_embeddings(model: nn.Module) -> nn.Module | None:
    """The model's unembedding (``get_output_embeddings()``, its LM head); None where it has none."""
    return _embeddings(model, "get_output_embeddings")


def _embeddings(model: nn.Module, getter_name: str) -> nn.Module | None:
    getter = getattr(model, getter_name, None)
    module = getter() if callable(getter) else None
    return module if isinstance(module, nn.Module) else None


def unembedding(model: nn.Module) -> nn.Module:
    """The model's unembedding, which the caller needs: refused where ``get_output_embeddings()`` gives none."""
    head = output_embeddings(model)
    if head is None:
        raise PatchscopeError(
            f"{type(model).__name__} has no unembedding (get_output_embeddings() is None) "
            "(allowed: the causal-LM class with its head, for example LlamaForCausalLM)"
        )
    return head


def weight_of(module: nn.Module | None) -> torch.Tensor:
    """A linear or embedding module's ``weight`` ([vocabulary, width] for an unembedding)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise PatchscopeError(f"{type(module).__name__}.weight is a {type(weight).__name__} (allowed: a tensor)")
    return weight


def generator(model: nn.Module) -> GenerationMixin:
    """The model as transformers' ``GenerationMixin``, whose ``generate`` the readouts call."""
    if not isinstance(model, GenerationMixin):
        raise PatchscopeError(
            f"{type(model).__name__} has no generate (allowed: a transformers causal LM, a "
            "GenerationMixin such as LlamaForCausalLM)"
        )
    return model


__all__ = [
    "hf_config",
    "text_config",
    "module_list",
    "blocks_at",
    "input_embeddings",
    "output_embeddings",
    "unembedding",
    "weight_of",
    "generator",
]
