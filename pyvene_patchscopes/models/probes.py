"""Tiny forward passes that discovery runs on a causal LM, each on a few tokens, leaving the model as it was.

- `probe_ids`: the token ids every probe feeds (3, 7, 11, ... inside the vocabulary);
- `hooks_restored`: the output-capturing hooks transformers 5 installs on a first ``output_hidden_states`` call,
  taken off again (the planned execution's runners use it too);
- `children_in_order`: the base model's children that run before the first block and after the last (the final
  norm is the last of those after);
- `check_blocks`: a model is refused where block l does not output what HF reports as layer l's hidden state (blocks
  run twice per pass, several residual streams, a second stream).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import PatchscopeError
from .parts import blocks_at, input_embeddings, text_config, weight_of


def children_in_order(model: nn.Module, base: str, layers: str) -> tuple[list[str], list[str]]:
    """The base model's direct children that run before the first block and after the last, in a tiny forward."""
    base_module = model.get_submodule(base) if base else model
    blocks = blocks_at(model, layers)
    order: list[tuple[str, str]] = []  # (name, "done") in completion order
    handles = []

    def record(name: str):
        return lambda module, args, output: order.append((name, "done"))

    for name, child in base_module.named_children():
        if child is not blocks:
            handles.append(child.register_forward_hook(record(name)))
    handles.append(blocks[0].register_forward_pre_hook(lambda module, args: order.append(("<first>", "start"))))
    handles.append(blocks[-1].register_forward_hook(lambda module, args, output: order.append(("<last>", "done"))))
    ids = probe_ids(model, 2)
    try:
        with torch.no_grad():
            _forward_text(model, ids)
    finally:
        for handle in handles:
            handle.remove()
    names = [name for name, _ in order]
    if "<first>" not in names or "<last>" not in names:
        raise PatchscopeError(
            f"{type(model).__name__}'s decoder layers ({layers}) did not all run in a text-only "
            "forward pass (cross-attention layers wait for another input); Patchscopes need a "
            "decoder whose every layer reads the text"
        )
    first, last = names.index("<first>"), len(names) - 1 - names[::-1].index("<last>")
    prefix = f"{base}." if base else ""
    before = [prefix + name for name in dict.fromkeys(names[:first]) if not name.startswith("<")]
    after = [prefix + name for name in dict.fromkeys(names[last + 1 :]) if not name.startswith("<")]
    return before, after


def check_blocks(model: nn.Module, layers: str) -> None:
    """Refuse a model whose block l does not output one state per token that HF reports as layer l's.

    Patchscopes read and write "the hidden state after block l": a tensor [batch, tokens, hidden_size] that
    HF returns as ``hidden_states[l + 1]`` (``[l]`` in Mamba and RWKV, which leave the embeddings out).
    """
    blocks = blocks_at(model, layers)
    outputs: list[Any] = []
    calls = [0] * len(blocks)

    def record(j: int):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            calls[j] += 1
            outputs.append(output)

        return hook

    handles = [block.register_forward_hook(record(j)) for j, block in enumerate(blocks)]
    ids = probe_ids(model, 4)
    try:
        with torch.no_grad(), hooks_restored(model):
            states = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
    name, width = type(model).__name__, text_config(model).hidden_size
    if max(calls) > 1:
        raise PatchscopeError(
            f"{name}'s decoder layers ({layers}) run {max(calls)} times in one forward pass (a "
            "looped, recurrent-depth model), so layer l has no one state to read and write"
        )
    first = outputs[0] if outputs else None
    if isinstance(first, list) or not isinstance(first[0] if isinstance(first, tuple) else first, torch.Tensor):
        raise PatchscopeError(
            f"{name}'s decoder layers return a {type(first).__name__}, where pyvene reads a "
            "tensor or a tuple whose first entry is the hidden state"
        )
    hidden = [out[0] if isinstance(out, tuple) else out for out in outputs]
    if tuple(hidden[-1].shape[2:]) != (width,):
        raise PatchscopeError(
            f"{name}'s decoder layers output {list(hidden[-1].shape[2:])} per token, not one "
            f"hidden state of hidden_size={width} (several residual streams, as in "
            "hyper-connections); Patchscopes read and write one state per token"
        )
    if states is not None and not any(
        all(torch.equal(hidden[l], states[l + shift]) for l in range(len(hidden) - 1))
        for shift in (0, 1)
        if len(states) >= len(hidden) + shift - 1
    ):
        raise PatchscopeError(
            f"{name}'s decoder layers ({layers}) do not output what its hidden_states report "
            "as their layers (a second stream or a rescaling between blocks), so layer l has no "
            "one state to read and write"
        )


@contextmanager
def hooks_restored(model: nn.Module) -> Iterator[None]:
    """Undo what transformers 5 does on a model's first ``output_hidden_states`` call: it installs output-capturing
    hooks on every layer for good and marks the model. The user's model keeps neither."""
    marked = {m: m.__dict__.get(_CAPTURING) for m in model.modules()}
    hooks = {m: (set(m._forward_hooks), set(m._forward_pre_hooks)) for m in model.modules()}
    try:
        yield
    finally:
        for module, (forward, pre) in hooks.items():
            for key in set(module._forward_hooks) - forward:
                del module._forward_hooks[key]
            for key in set(module._forward_pre_hooks) - pre:
                del module._forward_pre_hooks[key]
        for module, value in marked.items():
            if value is None:
                module.__dict__.pop(_CAPTURING, None)


_CAPTURING = "_output_capturing_hooks_installed"


def probe_ids(model: nn.Module, length: int) -> torch.Tensor:
    """[1, length] token ids for the probes here and in `execution.reroute` (3, 7, 11, ... inside the vocabulary)."""
    from .devices import input_device

    vocab = int(weight_of(input_embeddings(model)).shape[0])  # the shape is known even when offloaded
    return (torch.arange(length, device=input_device(model))[None] * 4 + 3).clamp(max=vocab - 1)


def _forward_text(model: nn.Module, ids: torch.Tensor) -> Any:
    """A text-only forward pass without a cache (multimodal checkpoints take input_ids alone too)."""
    return model(input_ids=ids, use_cache=False)


__all__ = ["probe_ids", "hooks_restored", "children_in_order", "check_blocks"]
