"""The model handle: a loaded causal LM with its prepared tokenizer and the facts a Patchscope needs about it, made by
`load_model` or, from a model already in memory, by `wrap_model`."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from ..errors import PatchscopeError
from .hashes import weights_sha256

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

        n = block_count(self.model)
        if n is None:  # wrap_model found the blocks by this count: only a config edited since lacks it
            raise PatchscopeError(
                f"{type(self.model).__name__}'s config names no layer count (allowed: a config with num_hidden_layers)"
            )
        return n

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
        return (
            f"ModelHandle(name={self.name!r}, n_layers={self.n_layers}, hidden_size={self.hidden_size}, "
            f"device={self.device}, dtype={self.dtype})"
        )


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


def prepare_tokenizer(tokenizer: Any, document_start: str | None = None) -> Any:
    """Make every prompt start with a document-start token, left-pad, and have a pad token, in place.

    The document-start token becomes position 0, the attention sink, so a user's first word is never
    at position 0 (see docs/concepts.md, "Position 0"). Left padding puts every row's last token at -1. It changes
    the object it is given: `load_model` passes the tokenizer it made, `wrap_model` a copy of the user's.
    """
    if document_start is not None:
        tokenizer.bos_token = document_start
    if tokenizer.bos_token is not None and not _adds_bos(tokenizer):
        tokenizer.add_bos_token = True
        if not _adds_bos(tokenizer):
            log.warning(
                "tokenizer %s does not prepend %s; position 0 will be the prompt's first word",
                type(tokenizer).__name__,
                tokenizer.bos_token,
            )
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
        raise PatchscopeError(
            f"tokenizer of type {type(tokenizer).__name__} cannot be copied ({err}) "
            "(allowed: a tokenizer that copy.deepcopy can copy, as Hugging Face tokenizers "
            "can; the handle prepares a copy so that yours keeps its settings)"
        ) from None
    return ModelHandle(
        name=name or getattr(model.config, "name_or_path", "") or type(model).__name__,
        model=model,
        tokenizer=prepare_tokenizer(own),
        origin=origin,
        peft=peft,
    )


__all__ = ["ModelHandle", "context_limit", "prepare_tokenizer", "wrap_model"]
