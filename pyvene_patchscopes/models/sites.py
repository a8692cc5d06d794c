"""Where layer l lives: the pyvene site of HF ``hidden_states[l + 1]``, a block's output or the final norm's.

HF's last ``hidden_states`` entry is already after the final norm; the paper's code therefore reads
the last layer there, and writes there when source and target are both the last layer
(``skip_final_ln``). Module paths come from `architectures` (the table, or what is found in the model).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import PatchscopeError
from .architectures import architecture

BLOCK_OUTPUT = "block_output"  # pyvene's abstract name for a decoder block's output


@dataclass(frozen=True)
class Site:
    """A pyvene hook point: a component name (pyvene's abstract one, or a raw module path) and its layer."""

    component: str
    layer: int

    @property
    def after_final_norm(self) -> bool:
        """Whether this site is the final norm's output (the paper's ``skip_final_ln``), not a block output."""
        return self.component != BLOCK_OUTPUT


def final_norm_path(model: nn.Module) -> str:
    """Dotted path of the final norm that HF applies before the unembedding (and before hidden_states[-1])."""
    path = architecture(model).final_norm
    if path is None:
        raise PatchscopeError(
            f"{type(model).__name__} has no final norm: nothing runs between its last block and "
            "its unembedding, so hidden_states[-1] is the last block's output"
        )
    return path


def final_norm(model: nn.Module) -> nn.Module:
    return model.get_submodule(final_norm_path(model))


def hidden_state_site(model: nn.Module, layer: int, n_layers: int, after_final_norm: bool) -> Site:
    """The pyvene site of HF ``hidden_states[layer + 1]``.

    For layers below the last it is the block output. For the last layer HF's entry is already after
    the final norm; reading it there, and writing it there when source and target are both the last
    layer, is what the paper's code calls ``skip_final_ln``.
    """
    arch = architecture(model)
    if layer == n_layers - 1 and after_final_norm and arch.final_norm is not None and not arch.final_norm_shared:
        return Site(component=f"{final_norm_path(model)}.output", layer=layer)
    return Site(component=BLOCK_OUTPUT, layer=layer)


__all__ = ["Site", "BLOCK_OUTPUT", "final_norm_path", "final_norm", "hidden_state_site"]
