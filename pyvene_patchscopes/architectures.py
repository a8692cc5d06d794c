"""One entry per model family: everything the library needs to know about where a family keeps layer l.

The engine never hard-codes a module path. The planned execution (`execution.stack`), the sites of
``hidden_states`` (`sites`), pyvene's model-type registry (`compat.register_model_types`) and the
Jacobian Scopes all read this table.

Adding a family, step by step:

1. Add an `Architecture` entry to `FAMILIES` below: the HF class names, the dotted paths of the token
   embedding, the decoder layers, the final norm, the rotary embedding (None without one) and the
   unembedding, and the family's quirks (learned positions, soft-capping, sliding windows). Open the
   family's ``modeling_<name>.py`` in transformers and copy the paths from its ``forward``.
2. If pyvene 0.1.8 does not know the class (``type(model) in pyvene.type_to_module_mapping`` is False),
   set ``pyvene_like`` to a family whose pyvene table has the same module names (most decoders: "llama"),
   and ``head_dim=True`` if its config's ``head_dim`` sets the head size.
3. Add a tiny random config of the family to ``tests/tiny.py`` (``FAMILY_CONFIGS``, with the family's
   quirks switched on, and its quirks to ``QUIRKS`` in ``tests/test_families.py``) and the family's block
   and final-norm paths to ``tests/golden.py`` (``_PATHS``, written by hand, not read from this table):
   ``tests/test_families.py`` then runs every check
   (plain pyvene path against hand-written hooks, planned against plain, generation, reroute, Jacobian
   Scopes against an explicit Jacobian, the model left as it was) on it.
4. If the planned execution cannot run the family, set ``planned=False`` and say why in
   ``not_planned_because``; `run` then warns once and uses the plain pyvene path. Add the README row.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import PatchscopeError

Positions = Literal["rotary", "partial rotary", "learned absolute"]
SlidingWindow = Literal["none", "every layer", "layer types"]


@dataclass(frozen=True)
class Architecture:
    """Where one family keeps its pieces, and the quirks the planned execution must reproduce."""

    family: str                          # the name users see ("llama")
    classes: tuple[str, ...]             # HF causal-LM class names
    embed: str                           # token embedding (its output is what the first block receives)
    layers: str                          # the ModuleList of decoder blocks; block l's output is layer l
    final_norm: str                      # applied before the unembedding (and before hidden_states[-1])
    unembed: str = "lm_head"
    rotary: str | None = "model.rotary_emb"
    positions: Positions = "rotary"
    position_embed: str | None = None    # learned absolute positions, added to the token embedding (GPT-2)
    scaled_embeddings: bool = False      # the embedding module itself multiplies by sqrt(d) (Gemma)
    logit_softcap: bool = False          # tanh soft-capping of the logits, config.final_logit_softcapping
    attention_softcap: bool = False      # tanh soft-capping of attention scores, config.attn_logit_softcapping
    sliding_window: SlidingWindow = "none"  # "every layer": config.sliding_window; "layer types": per layer
    cache_argument: str = "cache"        # the decoder layer's keyword for the key/value cache
    pyvene_like: str | None = None       # pyvene 0.1.8 lacks the class: register it with this family's table
    head_dim: bool = False               # config.head_dim sets the head size (not hidden_size / heads)
    planned: bool = True
    not_planned_because: str = ""

    def module(self, model: nn.Module, path: str) -> nn.Module:
        """The submodule at a dotted path of this entry (``self.layers``, ``self.final_norm``, ...)."""
        try:
            return operator.attrgetter(path)(model)
        except AttributeError:
            raise PatchscopeError(f"{type(model).__name__} has no module {path!r}, which the {self.family!r} "
                                  "entry of the architecture table expects") from None


_LLAMA_LIKE = dict(embed="model.embed_tokens", layers="model.layers", final_norm="model.norm")

FAMILIES: tuple[Architecture, ...] = (
    Architecture("llama", ("LlamaForCausalLM",), **_LLAMA_LIKE),
    Architecture("mistral", ("MistralForCausalLM",), sliding_window="every layer", **_LLAMA_LIKE),
    Architecture("qwen2", ("Qwen2ForCausalLM",), sliding_window="layer types", **_LLAMA_LIKE),
    Architecture("qwen3", ("Qwen3ForCausalLM",), sliding_window="layer types", pyvene_like="llama",
                 head_dim=True, **_LLAMA_LIKE),
    Architecture("gemma2", ("Gemma2ForCausalLM",), scaled_embeddings=True, logit_softcap=True,
                 attention_softcap=True, sliding_window="layer types", **_LLAMA_LIKE),
    Architecture("gemma3", ("Gemma3ForCausalLM",), scaled_embeddings=True, logit_softcap=True,
                 attention_softcap=True, sliding_window="layer types", pyvene_like="llama", head_dim=True,
                 **_LLAMA_LIKE),
    Architecture("phi3", ("Phi3ForCausalLM",), positions="partial rotary", sliding_window="every layer",
                 pyvene_like="llama", **_LLAMA_LIKE),
    Architecture("olmo2", ("Olmo2ForCausalLM",), pyvene_like="llama", **_LLAMA_LIKE),
    Architecture("gpt2", ("GPT2LMHeadModel",), embed="transformer.wte", layers="transformer.h",
                 final_norm="transformer.ln_f", rotary=None, positions="learned absolute",
                 position_embed="transformer.wpe"),
    Architecture("gpt_neox", ("GPTNeoXForCausalLM",), embed="gpt_neox.embed_in", layers="gpt_neox.layers",
                 final_norm="gpt_neox.final_layer_norm", rotary="gpt_neox.rotary_emb",
                 positions="partial rotary", cache_argument="layer_past"),
)
_BY_CLASS = {name: entry for entry in FAMILIES for name in entry.classes}


def architecture(model: nn.Module) -> Architecture | None:
    """The table entry for `model`'s class (or a class it derives from), None for a family not in the table."""
    for cls in type(model).__mro__:
        if cls.__name__ in _BY_CLASS:
            return _BY_CLASS[cls.__name__]
    return None


def family(name: str) -> Architecture:
    for entry in FAMILIES:
        if entry.family == name:
            return entry
    raise PatchscopeError(f"family={name!r} is not in the architecture table (allowed: {supported()})")


def supported() -> str:
    return ", ".join(entry.family for entry in FAMILIES)


__all__ = ["Architecture", "FAMILIES", "architecture", "family", "supported"]
