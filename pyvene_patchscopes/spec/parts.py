"""The spec's parts: where a state is read (`Source`, `VectorSource`), where it is written (`Target`, `lens_target`),
and rerouting within one sequence (`Reroute`); each a frozen dataclass checked on construction."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import torch

from ..core.files import check_finite
from ..errors import SpecError
from .checks import Slots, check_layer, check_model, check_position, check_prompt, check_text, target_position
from .positions import Every, Position, prefix_through
from .writes import check_alpha, check_mode

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class Source:
    """Where the hidden state is read: prompt S, position i, model M, layer l."""

    prompt: str
    position: Position = -1
    layer: int = 0
    model: str = DEFAULT_MODEL

    def __post_init__(self) -> None:
        check_prompt("Source", self.prompt)
        check_position("Source", self.position)
        check_layer("Source", self.layer)
        check_model("Source", self.model, optional=False)


@dataclass(frozen=True, eq=False)
class VectorSource:
    """A source that is a vector v rather than a prompt's state, written as if read at layer l of model M.

    ``tensor`` is ``[d]`` (the same vector at every target slot) or ``[slots, d]`` (one per slot); ``name`` says
    what it is (``"sae/latent-17"``). A saved spec folder carries the tensor in ``vector.safetensors``;
    `vectors` builds these from an SAE, a pyvene DAS intervention or a probe. Compared by value.

    ``after_final_norm`` says which space v lives in when l is the last layer (below it there is one: the block
    output). False, the default: the residual stream at the last block's output, before the final norm, where an
    SAE on ``blocks.{last}.hook_resid_post``, a DAS intervention on ``block_output`` and a steering vector live;
    at l* = l it is written there and the final norm runs on it. True: after the final norm, where HF's last
    ``hidden_states`` entry, `hidden_states` and a `Source` read the last layer; at l* = l on M it is written
    after the final norm, as a last-layer `Source` is (the paper's ``skip_final_ln``).
    """

    tensor: torch.Tensor
    layer: int = 0
    model: str = DEFAULT_MODEL
    name: str = "vector"
    after_final_norm: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.tensor, torch.Tensor) or self.tensor.ndim not in (1, 2) or 0 in self.tensor.shape:
            shape = list(self.tensor.shape) if isinstance(self.tensor, torch.Tensor) else type(self.tensor).__name__
            raise SpecError(
                f"VectorSource.tensor={shape} is not allowed (allowed: a tensor [d], or [slots, d] "
                "with one vector per target slot)"
            )
        check_finite({"tensor": self.tensor}, "VectorSource", torch.float32)
        check_layer("VectorSource", self.layer)
        check_model("VectorSource", self.model, optional=False)
        if not isinstance(self.name, str) or not self.name.strip():
            raise SpecError(f"VectorSource.name={self.name!r} is not allowed (allowed: a non-empty string)")
        check_text("VectorSource.name", self.name)
        if not isinstance(self.after_final_norm, bool):
            raise SpecError(
                f"VectorSource.after_final_norm={self.after_final_norm!r} is not allowed (allowed: True or False)"
            )
        object.__setattr__(self, "tensor", self.tensor.detach().cpu().float().contiguous())

    @property
    def width(self) -> int:
        return int(self.tensor.shape[-1])

    @property
    def sha256(self) -> str:
        """The tensor's identity: a hash of its shape and float32 bytes."""
        digest = hashlib.sha256(json.dumps(list(self.tensor.shape)).encode())
        digest.update(self.tensor.numpy().tobytes())
        return digest.hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, VectorSource):
            return NotImplemented
        return (
            (self.layer, self.model, self.name, self.after_final_norm)
            == (other.layer, other.model, other.name, other.after_final_norm)
            and self.tensor.shape == other.tensor.shape
            and torch.equal(self.tensor, other.tensor)
        )

    def __hash__(self) -> int:
        return hash((self.layer, self.model, self.name, self.after_final_norm, tuple(self.tensor.shape)))

    def __repr__(self) -> str:
        normed = ", after_final_norm=True" if self.after_final_norm else ""
        return (
            f"VectorSource(name={self.name!r}, shape={list(self.tensor.shape)}, layer={self.layer}, "
            f"model={self.model!r}{normed})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Its JSON object; ``after_final_norm: false`` is written (spec version 5) because versions 3 and 4, which
        lack the field, mean true."""
        data = {
            "name": self.name,
            "layer": self.layer,
            "model": self.model,
            "shape": list(self.tensor.shape),
            "sha256": self.sha256,
        }
        return data if self.after_final_norm else {**data, "after_final_norm": False}


@dataclass(frozen=True)
class Target:
    """Where the mapped state is written: prompt T, position(s) i*, model M* (None = M), layer l*, and how.

    ``position`` is one position, a list of them, or `Every` occurrence of a placeholder; ``write`` and
    ``alpha`` say how f(v) lands on the state h at each slot (`writes`: replace, mix, add, norm-matched-add).
    """

    prompt: str
    position: Slots = -1
    layer: int = 0
    model: str | None = None
    write: str = "replace"
    alpha: float = 1.0

    def __post_init__(self) -> None:
        check_prompt("Target", self.prompt)
        object.__setattr__(self, "position", target_position(self.position))
        check_layer("Target", self.layer)
        check_model("Target", self.model, optional=True)
        check_mode("Target.write", self.write)
        object.__setattr__(self, "alpha", check_alpha(self.alpha, "Target.alpha"))

    @property
    def several(self) -> bool:
        """Whether the target names several slots (a list, or every occurrence of a placeholder)."""
        return isinstance(self.position, (tuple, Every))

    def position_data(self) -> Any:
        if isinstance(self.position, Every):
            first = {} if self.position.first is None else {"first": self.position.first}
            return {"every": self.position.text, **first}
        return list(self.position) if isinstance(self.position, tuple) else self.position

    def to_dict(self) -> dict[str, Any]:
        data = {"prompt": self.prompt, "position": self.position_data(), "layer": self.layer, "model": self.model}
        if self.write != "replace" or self.alpha != 1.0:
            data.update(write=self.write, alpha=self.alpha)
        return data

    @property
    def uses_version_3(self) -> bool:
        return self.several or self.write != "replace" or self.alpha != 1.0


def lens_target(
    source: Source, target_layer: int | None = None, target_prompt: str | None = None, tokenizer: Any = None
) -> Target:
    """The logit lens's target: T = S cut after i, i* = its last token, l* = the last layer (or `target_layer`)."""
    prompt, position = target_prompt or source.prompt, source.position
    if target_prompt is None and source.position != -1:
        if tokenizer is None:
            raise SpecError(
                f"logit-lens at Source.position={source.position!r} needs the model's tokenizer "
                "to cut the prompt there (allowed without one: Source.position=-1)"
            )
        prompt, position = prefix_through(tokenizer, source.prompt, source.position), -1
    return Target(prompt, position, -1 if target_layer is None else target_layer)


@dataclass(frozen=True)
class Reroute:
    """S = T: read (l, i) and write (l*, i*) in the same pass of one sequence (the CoT Patchscope, paper §5).

    ``split`` is the character offset where the prompt's second segment starts. When given, the two
    segments cannot attend to each other (tokens the tokenizer adds before the text, such as BOS, stay
    visible to both); tokens generated afterwards see everything. ``None`` means plain causal attention.
    """

    split: int | None = None

    def __post_init__(self) -> None:
        if self.split is not None and (
            isinstance(self.split, bool) or not isinstance(self.split, int) or self.split < 1
        ):
            raise SpecError(f"Reroute.split={self.split!r} is not allowed (allowed: None, or a character offset >= 1)")


__all__ = ["DEFAULT_MODEL", "Source", "VectorSource", "Target", "lens_target", "Reroute"]
