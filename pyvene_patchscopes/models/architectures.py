"""Where a model keeps layer l: found from the model itself, with a table for what cannot be found that way.

The engine never hard-codes a module path. The planned execution (`execution.stack`), the sites of
``hidden_states`` (`sites`), pyvene's model-type registry (`compat.register_model_types`) and the
Jacobian Scopes all read `architecture(model)`.

For any causal LM, `architecture` finds the pieces from the model (`discovery`): the embeddings, the
``ModuleList`` of decoder blocks, the final norm and the rotary embedding (what runs around the blocks in a
two-token forward pass), and the quirks, from the config. The table below holds the ten families the
library was first written for; an entry there overrides what was found (``tests/test_discovery.py`` holds
the two equal). A family needs an entry only for what discovery gets wrong:

1. Add an `Architecture` entry to `FAMILIES`: the HF class names, the dotted paths of the token embedding,
   the decoder layers, the final norm, the rotary embedding (None without one) and the unembedding, and
   the family's quirks. Open the family's ``modeling_<name>.py`` in transformers and copy the paths.
2. If pyvene 0.1.8 lacks the class, set ``pyvene_like`` to a family whose pyvene table has the same module
   names (most decoders: "llama"), and ``head_dim=True`` if ``config.head_dim`` sets the head size.
   Without an entry, a found family is registered with pyvene from its found paths, on first use.
3. If the planned execution cannot run it, set ``planned=False`` and say why in ``not_planned_because``;
   `run` then warns once and uses the plain pyvene path.

Every causal-LM class of the installed transformers is tested on a tiny random config
(``tests/test_every_family.py``); ``patchscopes families`` lists the path each one takes.
"""

from __future__ import annotations

import operator
import weakref
from dataclasses import dataclass
from typing import Literal, TypedDict

from torch import nn

from ..errors import PatchscopeError
from .parts import module_list

Positions = Literal["rotary", "partial rotary", "learned absolute", "none"]
SlidingWindow = Literal["none", "every layer", "layer types"]


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its pieces, and the quirks the planned execution must reproduce."""

    family: str  # the name users see ("llama")
    classes: tuple[str, ...]  # HF causal-LM class names
    embed: str  # token embedding (its output is what the first block receives)
    layers: str  # the ModuleList of decoder blocks; block l's output is layer l
    final_norm: str | None  # applied before the unembedding (and before hidden_states[-1]); None: none
    unembed: str = "lm_head"
    rotary: str | None = "model.rotary_emb"
    positions: Positions = "rotary"
    position_embed: str | None = None  # learned absolute positions, added to the token embedding (GPT-2)
    scaled_embeddings: bool = False  # the embedding module itself multiplies by sqrt(d) (Gemma)
    logit_softcap: bool = False  # tanh soft-capping of the logits, config.final_logit_softcapping
    attention_softcap: bool = False  # tanh soft-capping of attention scores, config.attn_logit_softcapping
    sliding_window: SlidingWindow = "none"  # "every layer": config.sliding_window; "layer types": per layer
    cache_argument: str = "cache"  # the decoder layer's keyword for the key/value cache
    pyvene_like: str | None = None  # pyvene 0.1.8 lacks the class: register it with this family's table
    head_dim: bool = False  # config.head_dim sets the head size (not hidden_size / heads)
    attention_sinks: bool = False  # a learned per-head logit in every softmax (GPT-OSS's ``sinks``)
    planned: bool = True
    not_planned_because: str = ""
    found: bool = False  # found from the model (`discovery`), not read from the table
    layered: bool = False  # found, and its logits are read from the last block's output: where the
    # shared prefix cannot be exact, blocks run on the whole target (`layered`)
    logit_scale: float | None = 1.0  # logits = s · unembed(y) (Cohere, Granite); None: a head of its own layers
    final_norm_shared: bool = False  # the final norm module also runs before the first block (NanoChat):
    # a hook there fires twice, so layer n-1 is read at the last block

    def module(self, model: nn.Module, path: str) -> nn.Module:
        """The submodule at a dotted path of this entry (``self.layers``, ``self.final_norm``, ...)."""
        try:
            return operator.attrgetter(path)(model)
        except AttributeError:
            raise PatchscopeError(
                f"{type(model).__name__} has no module {path!r}, which the {self.family!r} "
                "entry of the architecture table expects"
            ) from None

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        """The ``ModuleList`` of decoder blocks (at ``self.layers``)."""
        return module_list(model, self.layers, self.module(model, self.layers))


class _Paths(TypedDict):
    embed: str
    layers: str
    final_norm: str


_LLAMA_LIKE = _Paths(embed="model.embed_tokens", layers="model.layers", final_norm="model.norm")

FAMILIES: tuple[Architecture, ...] = (
    Architecture("llama", ("LlamaForCausalLM",), **_LLAMA_LIKE),
    Architecture("mistral", ("MistralForCausalLM",), sliding_window="every layer", **_LLAMA_LIKE),
    Architecture("qwen2", ("Qwen2ForCausalLM",), sliding_window="layer types", **_LLAMA_LIKE),
    Architecture(
        "qwen3", ("Qwen3ForCausalLM",), sliding_window="layer types", pyvene_like="llama", head_dim=True, **_LLAMA_LIKE
    ),
    Architecture(
        "gemma2",
        ("Gemma2ForCausalLM",),
        scaled_embeddings=True,
        logit_softcap=True,
        attention_softcap=True,
        sliding_window="layer types",
        **_LLAMA_LIKE,
    ),
    Architecture(
        "gemma3",
        ("Gemma3ForCausalLM",),
        scaled_embeddings=True,
        logit_softcap=True,
        attention_softcap=True,
        sliding_window="layer types",
        pyvene_like="llama",
        head_dim=True,
        **_LLAMA_LIKE,
    ),
    Architecture(
        "phi3",
        ("Phi3ForCausalLM",),
        positions="partial rotary",
        sliding_window="every layer",
        pyvene_like="llama",
        **_LLAMA_LIKE,
    ),
    Architecture("olmo2", ("Olmo2ForCausalLM",), pyvene_like="llama", **_LLAMA_LIKE),
    Architecture(
        "gpt2",
        ("GPT2LMHeadModel",),
        embed="transformer.wte",
        layers="transformer.h",
        final_norm="transformer.ln_f",
        rotary=None,
        positions="learned absolute",
        position_embed="transformer.wpe",
    ),
    Architecture(
        "gpt_neox",
        ("GPTNeoXForCausalLM",),
        embed="gpt_neox.embed_in",
        layers="gpt_neox.layers",
        final_norm="gpt_neox.final_layer_norm",
        rotary="gpt_neox.rotary_emb",
        positions="partial rotary",
        cache_argument="layer_past",
    ),
)
_BY_CLASS = {name: entry for entry in FAMILIES for name in entry.classes}


def table_entry(model: nn.Module) -> Architecture | None:
    """The table entry for `model`'s class (or a class it derives from), None for a family not in the table."""
    for cls in type(model).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    return None


_FOUND: "weakref.WeakKeyDictionary[nn.Module, Architecture]" = weakref.WeakKeyDictionary()


def found(model: nn.Module) -> Architecture:
    """What `discovery` finds in `model`, whatever the table says (worked out once per model)."""
    if model not in _FOUND:
        from .discovery import found_pieces

        _FOUND[model] = Architecture(**found_pieces(model))
    return _FOUND[model]


def architecture(model: nn.Module) -> Architecture:
    """Where `model` keeps its pieces: its table entry where it has one, else what is found in the model.

    Raises `PatchscopeError` for an encoder or encoder-decoder model, or one whose layers cannot be found.
    """
    if model not in _CHOSEN:  # asked once per resolved scope: worked out once per model
        entry = table_entry(model)
        if entry is not None:
            from .discovery import check_decoder

            check_decoder(model)
        _CHOSEN[model] = entry if entry is not None else found(model)
    return _CHOSEN[model]


_CHOSEN: "weakref.WeakKeyDictionary[nn.Module, Architecture]" = weakref.WeakKeyDictionary()


def report(model: nn.Module) -> dict[str, object]:
    """`architecture(model)` as plain data, with where it came from: what a user reads to see what was found."""
    entry = architecture(model)
    data = {name: getattr(entry, name) for name in entry.__dataclass_fields__}
    data["classes"] = list(entry.classes)
    data["source"] = "found in the model" if entry.found else "the architecture table"
    return data


def family(name: str) -> Architecture:
    for entry in FAMILIES:
        if entry.family == name:
            return entry
    raise PatchscopeError(f"family={name!r} is not in the architecture table (allowed: {supported()})")


def supported() -> str:
    return ", ".join(entry.family for entry in FAMILIES)


__all__ = ["Architecture", "FAMILIES", "architecture", "table_entry", "found", "report", "family", "supported"]
