"""Resolve: a Patchscope checked against its models, every index made concrete (spec + models -> rows).

Layers are checked against each model's depth, positions resolved in its tokenizer, hidden sizes
checked through the mapping f, the context length checked, α and a vector source checked in the dtypes they run
in, and the pyvene sites chosen (`sites`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from .compat import check_hookable
from .core.files import check_finite
from .errors import ContextLengthWarning, SpecError, UninformativeScopeWarning, UnknownNameError
from .models import ModelHandle
from .models.sites import Site, hidden_state_site
from .spec.mappings import MappingFunction, build_mapping
from .spec.parts import VectorSource
from .spec.positions import encode, resolve_position, resolve_slots
from .spec.writes import check_alpha_runs

if TYPE_CHECKING:
    from .spec import Patchscope, Source, VectorSource

Models = Mapping[str, ModelHandle]


def as_models(model: ModelHandle | Models | Sequence[ModelHandle]) -> dict[str, ModelHandle]:
    """Accept one handle, a list of handles or a name -> handle mapping.

    Two different handles under one name are refused: a scope names its models, and picking one of the
    two silently would run another model than the one meant (e.g. an A -> B Patchscope as B -> B).
    """
    if isinstance(model, ModelHandle):
        return {model.name: model}
    items = list(model.items()) if isinstance(model, Mapping) else [(getattr(h, "name", None), h) for h in model]
    out: dict[str, ModelHandle] = {}
    for key, handle in items:
        if not isinstance(handle, ModelHandle):
            raise SpecError(
                f"models entry {key!r} is a {type(handle).__name__} (allowed: a ModelHandle from "
                "load_model or wrap_model)"
            )
        name = handle.name if key is None else key  # a listed handle goes under its own name
        known = out.get(name)
        if known is not None and known is not handle:
            raise SpecError(
                f"two different models are both named {name!r} (allowed: one model per name); "
                "name them apart with wrap_model(model, tokenizer, name=...) or pass a dict "
                "{name: handle}"
            )
        out[name] = handle
    if not out:
        raise SpecError("models is empty (allowed: one ModelHandle, a list of them, or a dict name -> handle)")
    _check_shared_weights(out)
    return out


def _check_shared_weights(models: Mapping[str, ModelHandle]) -> None:
    """Refuse a base model and its PEFT-adapted self under two names: peft adapts the modules in place, so the
    "base" would run the adapter too (LatentQA and Activation Oracles read the base with the adapter off)."""
    adapted = [(name, h) for name, h in models.items() if h.peft is not None]
    for name, handle in adapted:
        embedding = handle.model.get_input_embeddings()
        for other, each in models.items():
            if other != name and each.peft is None and each.model.get_input_embeddings() is embedding:
                raise SpecError(
                    f"models {other!r} and {name!r} are one model: peft applied {name!r}'s adapter in "
                    f"place, so {other!r} runs it too (allowed: a separate base, e.g. load_model(base) "
                    "and load_model(base, adapter=...), or a copy of the base made before get_peft_model)"
                )


@dataclass(frozen=True)
class Resolved:
    """A Patchscope with every index made concrete for the models it runs on."""

    scope: Patchscope
    source_position: int
    target_position: int
    source_layer: int
    target_layer: int
    source_site: Site
    target_site: Site
    target_tokens: int = 0  # tokens in the target prompt
    # False when the patch cannot reach the readout: written at the target model's last layer (after its last
    # block, or after the final norm when l = l* = last) at a position before the target's last. No later
    # layer reads that state and the final norm and unembedding act per position, so the readout at the last
    # token (and every generated token) is the same for every source.
    informative: bool = True
    target_slots: tuple[int, ...] = ()  # every slot i* written, sorted; target_position is the first

    @property
    def slots(self) -> tuple[int, ...]:
        return self.target_slots or (self.target_position,)


def concrete_layer(owner: str, layer: int, handle: ModelHandle) -> int:
    """`layer` checked against the model's layers and made non-negative; `owner` names the field."""
    n = handle.n_layers
    if not -n <= layer < n:
        raise SpecError(f"{owner}.layer={layer} is out of range for {handle.name} (allowed: {-n}..{n - 1})")
    return layer % n


def pick_model(models: Mapping[str, ModelHandle], name: str, owner: str) -> ModelHandle:
    if name in models:
        return models[name]
    raise UnknownNameError(
        f"{owner}.model={name!r} is not among the loaded models (allowed: {', '.join(sorted(models))})"
    )


def resolve(scope: Patchscope, models: Mapping[str, ModelHandle]) -> Resolved:
    """Check `scope` against its models (layers, positions, hidden sizes) and make every index concrete."""
    source_model = pick_model(models, scope.source.model, "Source")
    target_model = pick_model(models, scope.target_model, "Target")
    check_hookable(source_model.model)
    check_hookable(target_model.model)
    mapping = build_mapping(scope.mapping_spec, source_model.hidden_size, target_model.hidden_size)  # checks the sizes
    vector = scope.source if isinstance(scope.source, VectorSource) else None
    owner = "VectorSource" if vector is not None else "Source"
    source_layer = concrete_layer(owner, scope.source.layer, source_model)
    target_layer = concrete_layer("Target", scope.target.layer, target_model)
    target_encoding = encode(target_model.tokenizer, scope.target.prompt)
    check_context(target_model, "Target.prompt", len(target_encoding[0]), scope.max_new_tokens)
    slots = resolve_slots(target_model.tokenizer, scope.target.prompt, scope.target.position, target_encoding)
    if isinstance(scope.source, VectorSource):
        check_vector(scope.source, source_model, len(slots))
        source_position = -1  # no prompt: the vector is the state
    else:
        source_position = source_index(source_model, scope.source)
    check_write_dtypes(scope, mapping, source_model, target_model)
    target_position = slots[0]
    # the source state after the final norm: a prompt's at the last layer (HF's last hidden_states entry), a vector's
    # only where it says it lives there; written there again when l* is the last layer of the same model
    source_normed = source_layer == source_model.n_layers - 1 and (vector is None or vector.after_final_norm)
    skip_final_ln = source_normed and target_layer == target_model.n_layers - 1 and source_model is target_model
    return Resolved(
        scope=scope,
        source_position=source_position,
        target_position=target_position,
        source_layer=source_layer,
        target_layer=target_layer,
        source_site=hidden_state_site(source_model.model, source_layer, source_model.n_layers, source_normed),
        target_site=hidden_state_site(target_model.model, target_layer, target_model.n_layers, skip_final_ln),
        target_tokens=len(target_encoding[0]),
        informative=target_layer < target_model.n_layers - 1 or slots[-1] == len(target_encoding[0]) - 1,
        target_slots=slots if scope.target.several else (),
    )


def source_index(handle: ModelHandle, source: Source) -> int:
    """The token index `source.position` names in `source.prompt`, its length checked against the model."""
    encoding = encode(handle.tokenizer, source.prompt)
    check_context(handle, "Source.prompt", len(encoding[0]))
    return resolve_position(handle.tokenizer, source.prompt, source.position, "Source", encoding)


def warn_uninformative(resolved: list[Resolved]) -> None:
    """Warn once about scopes whose patch cannot reach the readout (see `Resolved.informative`)."""
    bad = [item for item in resolved if not item.informative]
    if bad:
        first = bad[0]
        warnings.warn(
            f"{len(bad)} of {len(resolved)} Patchscope(s) write at the target's last layer (l*={first.target_layer}) "
            f"at position {first.target_position}, before the target's last ({first.target_tokens - 1}): no later "
            "layer reads that state and the readout never sees it, so their output is the same for every source "
            "(result.informative is False). Use l* below the last layer, or patch the target's last position.",
            UninformativeScopeWarning,
            stacklevel=3,
        )


def check_vector(vector: VectorSource, handle: ModelHandle, n_slots: int) -> None:
    """A vector source fits its model's width, and has one row per slot when it has several."""
    if vector.width != handle.hidden_size:
        raise SpecError(
            f"VectorSource.tensor has width {vector.width}, but {handle.name}'s hidden size is "
            f"{handle.hidden_size} (allowed: {handle.hidden_size})"
        )
    if vector.tensor.ndim == 2 and vector.tensor.shape[0] != n_slots:
        raise SpecError(
            f"VectorSource.tensor has {vector.tensor.shape[0]} rows for {n_slots} target slot(s) "
            f"(allowed: a [d] tensor, or one row per slot: [{n_slots}, d])"
        )


def check_write_dtypes(scope: Patchscope, mapping: MappingFunction, source: ModelHandle, target: ModelHandle) -> None:
    """α, and a vector source's v and α·f(v), finite in the dtypes they run in, as mapping weights are: v in M's (the
    collect step casts it there), α and α·f(v) in M*'s (the write casts them there). ``norm-matched-add`` writes
    α·‖h‖·f(v)/‖f(v)‖, and a prompt's state h is known only at run time: a write that leaves the dtype's range
    there is refused after the run (`execution.unpatched.check_readouts`)."""
    written = None
    if isinstance(scope.source, VectorSource):
        check_finite({"tensor": scope.source.tensor}, "VectorSource", source.dtype)
        if scope.target.write != "norm-matched-add":
            with torch.no_grad():
                written = mapping(scope.source.tensor.to(source.dtype))
    check_alpha_runs(scope.target.alpha, target.dtype, written, where=target.name)


def check_context(handle: ModelHandle, field: str, n_tokens: int, max_new_tokens: int = 0) -> None:
    """Refuse a prompt (plus generated tokens) longer than learned absolute positions allow; warn for rotary
    models run past their trained length, where the output is an extrapolation."""
    limit, encoding = handle.context
    total = n_tokens + max_new_tokens
    if limit is None or total <= limit:
        return
    what = f"{field} has {n_tokens} tokens" + (
        f" + max_new_tokens={max_new_tokens} = {total}" if max_new_tokens else ""
    )
    if encoding == "absolute":
        raise SpecError(
            f"{what}, past {handle.name}'s {limit} learned positions (allowed: at most {limit} tokens "
            "in all, prompt and generation)"
        )
    warnings.warn(
        f"a prompt plus the tokens to generate runs past {handle.name}'s trained length of {limit} "
        f"tokens ({encoding} positions extrapolate; expect degraded outputs)",
        ContextLengthWarning,
        stacklevel=4,
    )


__all__ = [
    "Resolved",
    "resolve",
    "source_index",
    "warn_uninformative",
    "check_vector",
    "check_write_dtypes",
    "as_models",
    "pick_model",
    "check_context",
    "Models",
]
