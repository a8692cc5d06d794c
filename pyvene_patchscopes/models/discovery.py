"""Find where a causal LM keeps its pieces from the model itself: its modules, its config and one tiny forward pass.

- the token embedding and the unembedding: ``get_input_embeddings()`` / ``get_output_embeddings()``;
- the decoder blocks: the ``ModuleList`` of ``config.num_hidden_layers`` entries beside the embedding;
- the final norm: what runs, in a two-token forward pass, between the last block and the unembedding;
- the rotary embedding: the base model's child holding ``inv_freq``, run before the first block;
- the quirks the planned execution must reproduce, from the config and the modules (soft-capping, scaled
  embeddings, sliding windows and ``layer_types``, partial rotary, learned positions, attention sinks), and
  the logits' scale, measured (`logit_scale`).

A model is refused (`PatchscopeError`, naming what was looked for) where "the state after block l" does not
exist: an encoder or encoder-decoder, blocks whose outputs are not HF's ``hidden_states`` (several residual
streams, a second stream), blocks run twice per pass, layers a text-only pass does not run. Whether the
planned execution may run the family is decided here from what cannot be shared exactly (layers that keep a
recurrent state, attention outside transformers' attention interface, per-layer inputs), and then checked on
the model itself (`execution.check`). Every probe (`probes`, `logit_scale`) runs on a few tokens and leaves the
model as it was.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any

import torch
from torch import nn

from ..errors import PatchscopeError
from .parts import blocks_at, input_embeddings, output_embeddings, text_config
from .probes import check_blocks, children_in_order, hooks_restored, probe_ids

ATTENTION_KINDS = ("full_attention", "sliding_attention", "chunked_attention")
_CACHE_KEYWORDS = ("cache", "past_key_values", "past_key_value", "layer_past")
# keywords the planned execution passes to a decoder layer itself; any other required one it cannot supply
_SUPPLIED = {
    "hidden_states",
    "attention_mask",
    "position_ids",
    "position_embeddings",
    "use_cache",
    "cache_position",
    "output_attentions",
    *_CACHE_KEYWORDS,
}


def path_of(model: nn.Module, target: nn.Module | None) -> str | None:
    """The dotted path of `target` inside `model` (None when it is not a submodule)."""
    for name, module in model.named_modules():
        if module is target:
            return name
    return None


def not_a_decoder(model_type: str) -> str:
    """Why a model type is no decoder-only LM ("" when it is): half of a seq2seq model, or a masked-LM encoder."""
    from transformers.models.auto import modeling_auto as auto

    if (
        model_type in auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES
        or model_type in auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES
    ):
        return "encoder-decoder"
    if model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    return ""


def drafter(cls: type) -> bool:
    """Whether a causal-LM class is an assistant (drafter) whose layers read another model's keys and values."""
    forward = getattr(cls, "forward", None)
    return forward is not None and "shared_kv_states" in inspect.signature(forward).parameters


DRAFTER = (
    "an assistant (a drafter for speculative decoding) whose layers read another model's keys and values "
    "(shared_kv_states): it does not run from a prompt alone"
)


def check_decoder(model: nn.Module) -> None:
    """Refuse encoder-only and encoder-decoder models, and models without a language-model head."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        raise PatchscopeError(f"{name} has no Hugging Face config (allowed: a transformers causal LM)")
    model_type = getattr(config, "model_type", "")
    if drafter(type(model)):
        raise PatchscopeError(
            f"{name} is {DRAFTER}; Patchscopes need a decoder that reads a prompt (allowed: the model it drafts for)"
        )
    kind = "encoder-decoder" if getattr(config, "is_encoder_decoder", False) else not_a_decoder(model_type)
    if kind == "encoder-decoder":
        raise PatchscopeError(
            f"{name} is an encoder-decoder model; Patchscopes need a decoder-only causal LM "
            "(allowed: a model in transformers' causal-LM mapping whose family is not seq2seq)"
        )
    if kind == "encoder":
        raise PatchscopeError(
            f"{name} is an encoder ({model_type!r} models are masked LMs); Patchscopes need a "
            "decoder-only causal LM that reads its prompt left to right"
        )
    if output_embeddings(model) is None:
        raise PatchscopeError(
            f"{name} has no unembedding (get_output_embeddings() is None); Patchscopes need the "
            "causal-LM class with its head (for example LlamaForCausalLM, not LlamaModel)"
        )


_KEYS: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()


def block_count(model: nn.Module) -> int | None:
    """How many decoder blocks the model has: ``config.num_hidden_layers``, or the config key its own hidden-state
    recorder names instead (LongCat-Flash: ``num_layers``, each block holding two attention sublayers)."""
    config = text_config(model)
    if model not in _KEYS:
        keys = [
            getattr((getattr(m, "_can_record_outputs", None) or {}).get("hidden_states"), "num_hidden_layers_key", None)
            for m in model.modules()
        ]
        _KEYS[model] = next((k for k in keys if isinstance(k, str)), "num_hidden_layers")
    n = getattr(config, _KEYS[model], None)
    n = n if isinstance(n, int) else getattr(config, "num_hidden_layers", None)
    return int(n) if isinstance(n, int) else None


def find_layers(model: nn.Module) -> str:
    """The path of the ModuleList of ``num_hidden_layers`` decoder blocks (the one beside the embedding)."""
    n = block_count(model)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    matching = [name for name, m in lists if len(m) == n]
    if not matching:
        seen = ", ".join(f"{name or '<root>'} ({len(m)})" for name, m in lists[:8]) or "none"
        key = _KEYS.get(model, "num_hidden_layers")
        looped = (
            ""
            if key == "num_hidden_layers"
            else (
                f" (its forward records config.{key}={n} hidden states, more than its config.num_hidden_layers="
                f"{text_config(model).num_hidden_layers} blocks: blocks run more than once, as in a looped "
                "model, so layer l has no one block to read and write)"
            )
        )
        raise PatchscopeError(
            f"cannot find the decoder layers of {type(model).__name__}: looked for a ModuleList "
            f"of config.{key}={n} blocks; ModuleLists found: {seen}{looped}"
        )
    embed = path_of(model, input_embeddings(model)) or ""
    beside = [name for name in matching if _parent(name) == _parent(embed)]
    return (beside or sorted(matching, key=lambda name: name.count(".")))[0]


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")  # Gemma 2, RecurrentGemma, xLSTM


def softcap(config: Any) -> float | None:
    """The final-logit soft cap c (z = c·tanh(z_raw / c)), under the name its family gives it."""
    value = next((getattr(config, name, None) for name in _SOFTCAPS if getattr(config, name, None)), None)
    return float(value) if value else None


def logit_scale(model: nn.Module, y_path: str, unembed: str) -> float | None:
    """The factor s with logits = cap(s · unembed(y)), y the output of the module at `y_path` (the final norm, or
    the last block where none runs after it); None when the logits are no scaled copy of unembed(y) (a
    prediction head with its own layers). Cohere multiplies by ``logit_scale``, Granite divides by
    ``logits_scaling``, MiniCPM3 divides y by its width ratio: measured here, whatever the family calls it."""
    seen: dict[str, torch.Tensor] = {}
    site = model.get_submodule(y_path)

    def keep(module: nn.Module, args: tuple, output: Any) -> None:
        seen["y"] = (output[0] if isinstance(output, tuple) else output).detach()

    handle = site.register_forward_hook(keep)
    try:
        with torch.no_grad():
            logits = model(input_ids=probe_ids(model, 4), use_cache=False).logits[0, -1].double()
            raw = model.get_submodule(unembed)(seen["y"][:, -1])[0].double()
    finally:
        handle.remove()
    cap = softcap(text_config(model))
    if cap:
        logits = cap * torch.atanh((logits / cap).clamp(-1 + 1e-12, 1 - 1e-12))
    scale = float((logits * raw).sum() / (raw * raw).sum().clamp_min(1e-30))
    error = float((logits - scale * raw).abs().max() / logits.abs().max().clamp_min(1e-12))
    return (1.0 if abs(scale - 1.0) < 1e-6 else scale) if error < 1e-4 else None


def _config_has(config: Any, name: str) -> bool:
    return name in config.to_dict() or hasattr(type(config), name)


def layer_types(config: Any) -> list[str]:
    """Each layer's attention kind as the config states it ("full_attention", "sliding_attention", or another)."""
    n = config.num_hidden_layers
    kinds = getattr(config, "layer_types", None)
    if kinds:
        return list(kinds)
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False:
        return ["sliding_attention"] * n
    return ["full_attention"] * n


def non_attention_kinds(model: nn.Module) -> list[str]:
    """The layer kinds of `model` that are not softmax attention over keys and values (empty for a transformer)."""
    other = sorted(set(layer_types(text_config(model))) - set(ATTENTION_KINDS))
    if other:
        return other
    block = blocks_at(model, find_layers(model))[0]
    if not any(_is_attention(type(m)) for m in block.modules()):
        return ["recurrent (no attention module in its blocks)"]
    return []


def _is_attention(cls: type) -> bool:
    name = cls.__name__.lower()
    return "attn" in name or "attention" in name


def not_planned_reason(model: nn.Module, layers: str, after: list[str], scale: float | None) -> str:
    """Why the shared-prefix trick cannot be exact for this model, in one line; "" when nothing stands in its way."""
    config = text_config(model)
    other = sorted(set(layer_types(config)) - set(ATTENTION_KINDS))
    if other:
        return (
            f"its layers of kind {', '.join(other)} are not softmax attention over every earlier key and value "
            "(linear attention, state-space and convolution layers keep a recurrent state; indexed and compressed "
            "attention choose their keys), so the target prompt's prefix cannot be computed once and shared"
        )
    block = blocks_at(model, layers)[0]
    parameters = inspect.signature(block.forward).parameters
    first = next(iter(parameters), None)  # the hidden states, whatever the family calls them (x, hidden)
    required = [
        n
        for n, p in parameters.items()
        if p.default is p.empty
        and n not in _SUPPLIED
        and n != first
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    ]
    per_layer = [n for n in parameters if "per_layer" in n]
    if per_layer:
        return (
            f"its decoder layers take {', '.join(per_layer)}, per-layer inputs its model's forward computes from "
            "the token ids of the whole sequence (Gemma 3n, Gemma 4), which the shared prefix does not supply"
        )
    if required:
        return (
            f"its decoder layers need {', '.join(required)}, which its model's forward computes for the whole "
            "sequence (per-layer inputs or position biases), so a layer cannot run on the suffix alone"
        )
    if not any(keyword in parameters for keyword in _CACHE_KEYWORDS):
        return "its decoder layers take no key/value cache, so the shared prefix cannot reach their attention"
    if not any(_uses_attention_interface(type(m)) for m in block.modules() if _is_attention(type(m))):
        return (
            "its attention does not go through transformers' attention interface, so the shared prefix cannot "
            "be given to it"
        )
    return head_reason(after, scale)


def head_reason(after: list[str], scale: float | None) -> str:
    """Why the planned execution cannot read the logits from the last block's output ("" when it can)."""
    if scale is None:
        return (
            "its logits are not a scaled copy of its unembedding of the final hidden state (a prediction head "
            "of its own layers runs between them), where the planned execution unembeds that state directly"
        )
    if len(after) > 1:
        return (
            f"more than one module runs between its last block and its unembedding ({', '.join(after)}), where "
            "the planned execution applies one final norm"
        )
    return ""


def _uses_attention_interface(cls: type[nn.Module]) -> bool:
    """Whether the module's forward picks its attention function from transformers' interface (and so ours)."""
    try:
        return "ALL_ATTENTION_FUNCTIONS" in inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False


def _inverse_frequencies(module: nn.Module) -> list[torch.Tensor]:
    """A rotary embedding's frequency buffers (``inv_freq``, or one per layer type: ``sliding_attention_inv_freq``)."""
    return [
        buffer
        for name, buffer in module.named_buffers(recurse=False)
        if name.endswith("inv_freq") and "original" not in name
    ]


def _head_size(config: Any) -> int:
    """Each attention head's size: ``head_dim`` where the config sets it (per-layer configs may refuse it)."""
    try:
        size = getattr(config, "head_dim", None)
    except (AttributeError, ValueError, RuntimeError):  # Gemma 4 keeps head_dim per layer, refusing a global read
        size = None
    heads = getattr(config, "num_attention_heads", None)
    return int(size or (config.hidden_size // heads if heads else 0))


def found_pieces(model: nn.Module) -> dict[str, Any]:
    """Every field of an `architectures.Architecture`, found from `model` (see the module docstring)."""
    check_decoder(model)
    config = text_config(model)
    for role, module in (("input", input_embeddings(model)), ("output", output_embeddings(model))):
        weight = getattr(module, "weight", None)
        if module is not None and (not isinstance(weight, torch.Tensor) or weight.ndim != 2):
            raise PatchscopeError(
                f"{type(model).__name__}'s {role} embeddings are a {type(module).__name__}, not one matrix over "
                "one vocabulary (several token streams, as in Musicgen's codebooks); Patchscopes read and write "
                "one token stream"
            )
    embed = path_of(model, input_embeddings(model))
    unembed = path_of(model, output_embeddings(model))
    if embed is None or unembed is None:
        raise PatchscopeError(
            f"cannot find the embeddings of {type(model).__name__}: get_input_embeddings() or "
            "get_output_embeddings() is not one of its submodules"
        )
    layers = find_layers(model)
    check_blocks(model, layers)
    base = _parent(layers)
    before, after = children_in_order(model, base, layers)
    base_module = model.get_submodule(base) if base else model
    rotary = next(
        (
            f"{base}.{name}" if base else name
            for name, child in base_module.named_children()
            if _inverse_frequencies(child) or "rotary" in type(child).__name__.lower()
        ),
        None,
    )
    embedding = model.get_submodule(embed)
    positions = [p for p in before if p not in (embed, rotary) and isinstance(model.get_submodule(p), nn.Embedding)]
    kinds = getattr(config, "layer_types", None)
    block = blocks_at(model, layers)[0]
    cache = next((k for k in _CACHE_KEYWORDS if k in inspect.signature(block.forward).parameters), "cache")
    scale = logit_scale(model, after[-1] if after else f"{layers}.{len(blocks_at(model, layers)) - 1}", unembed)
    reason = not_planned_reason(model, layers, after, scale)
    if rotary is None:
        kind = "learned absolute" if positions else "none"
    else:
        frequencies = _inverse_frequencies(model.get_submodule(rotary))
        rotated = (
            2 * max(buffer.numel() for buffer in frequencies)
            if frequencies
            else (getattr(config, "rotary_dim", None) or _head_size(config))
        )  # GPT-J keeps sin/cos tables instead
        kind = "partial rotary" if rotated < _head_size(config) else "rotary"
    return dict(
        family=str(config.model_type),
        classes=(type(model).__name__,),
        embed=embed,
        layers=layers,
        final_norm=after[-1] if after else None,
        unembed=unembed,
        rotary=rotary,
        positions=kind,
        position_embed=positions[0] if positions else None,
        scaled_embeddings=hasattr(embedding, "embed_scale"),
        logit_softcap=any(_config_has(config, name) for name in _SOFTCAPS),
        attention_softcap=_config_has(config, "attn_logit_softcapping"),
        sliding_window="layer types"
        if kinds
        else (
            "every layer"
            if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) is not False
            else "none"
        ),
        cache_argument=cache,
        attention_sinks=any(hasattr(m, "sinks") for m in block.modules()),
        planned=not reason,
        not_planned_because=reason,
        found=True,
        layered=not head_reason(after, scale),
        final_norm_shared=bool(after) and after[-1] in before,
        logit_scale=scale,
    )


# hooks_restored and probe_ids live in probes; they stay importable from here, where they were before the split.
__all__ = [
    "found_pieces",
    "check_decoder",
    "drafter",
    "DRAFTER",
    "block_count",
    "find_layers",
    "layer_types",
    "not_planned_reason",
    "head_reason",
    "path_of",
    "non_attention_kinds",
    "softcap",
    "logit_scale",
    "hooks_restored",
    "not_a_decoder",
    "probe_ids",
    "ATTENTION_KINDS",
]
