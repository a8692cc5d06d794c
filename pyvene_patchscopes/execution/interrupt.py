"""Stopping work part-way: a check that runs before every decoder layer, forward and backward, inside a block.

One forward pass over a long prompt can take seconds, and a Jacobian job adds a backward pass; a Cancel that
waits for the end of a batch waits for all of it. `checkpoints(model, check)` calls ``check()`` before each
decoder layer runs (a forward pre-hook) and before each layer's gradient flows back (a hook on that layer's
output tensor, which lives and dies with the autograd graph). ``check`` stops the work by raising. The hooks
act only on the thread that opened the block, so the same model can serve other threads meanwhile, and they
are removed when the block ends, raise or not: the model is left as it was.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..models.architectures import architecture


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks (see `architectures.architecture`)."""
    entry = architecture(model)
    return list(entry.blocks(model))


@contextmanager
def checkpoints(model: nn.Module, check: Callable[[], None]) -> Iterator[None]:
    """Run ``check()`` before every decoder layer of `model`, forward and backward, on this thread, in the block."""
    owner = threading.get_ident()

    def before(module: nn.Module, args: Any) -> None:
        if threading.get_ident() == owner:
            check()

    def after(module: nn.Module, args: Any, output: Any) -> None:
        tensor = output[0] if isinstance(output, (tuple, list)) and output else output
        if threading.get_ident() == owner and isinstance(tensor, torch.Tensor) and tensor.requires_grad:
            tensor.register_hook(lambda grad: check())  # returns None: the gradient passes unchanged

    handles = []
    try:
        for layer in decoder_layers(model):
            handles.append(layer.register_forward_pre_hook(before))
            handles.append(layer.register_forward_hook(after))
        yield
    finally:
        for handle in handles:
            handle.remove()


__all__ = ["checkpoints", "decoder_layers"]
