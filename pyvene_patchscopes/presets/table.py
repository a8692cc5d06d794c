"""The named presets: the `Preset` type (what each needs, the l* it fixes, the options it takes), the `PRESETS`
table, `get_preset` and `build`."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import SpecError, UnknownNameError
from ..spec import DEFAULT_MODEL, Patchscope, Position, Source, VectorSource
from .recipes import (
    activation_oracle,
    attribute,
    entity_description,
    future_lens,
    jacobian_lens,
    latentqa,
    logit_lens,
    multihop,
    self_explanation,
    selfie,
    token_identity,
)

LAST_LAYER = -1


@functools.cache
def recipe_options(recipe: Callable[..., Patchscope]) -> tuple[str, ...] | None:
    """What `Preset.options` reads from a recipe's signature, once per recipe: `Preset.build` checks the options of
    every cell of a sweep."""
    parameters = list(inspect.signature(recipe).parameters.values())[1:]
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return tuple(p.name for p in parameters if p.name != "target_layer" and p.kind is not p.VAR_POSITIONAL)


@dataclass(frozen=True)
class Preset:
    """A named recipe that turns a source (S, i, M, l) into a full Patchscope.

    ``target_layer`` is the l* the preset fixes (`LAST_LAYER`, -1: the model's last layer, for the logit lens and
    the J-lens), or None where the caller picks l* (each recipe has its own default). ``needs_tokenizer``: the
    recipe takes the model's tokenizer (``tokenizer=``), to cut T = S after i or for the model's chat template.
    ``needs_lens``: the recipe takes a fitted lens (``lens=``, a `JacobianLens`). ``needs_decoder``: M* is a trained
    decoder (a PEFT adapter on the model), so the preset means something only with ``decoder=`` that model.
    ``reroutes``: the recipe reroutes one hop's answer into another within one pass (S = T), so it reads no single
    source state.
    """

    name: str
    summary: str
    recipe: Callable[..., Patchscope]
    target_layer: int | None = None
    needs_tokenizer: bool = False
    needs_lens: bool = False
    needs_decoder: bool = False
    reroutes: bool = False

    def build(
        self, source: Source | VectorSource, target_layer: int | None = None, n_layers: int | None = None, **options
    ) -> Patchscope:
        """The preset's Patchscope for `source`; where the preset fixes l*, `target_layer` may only name it (-1 for
        the last layer, or on a model of `n_layers` also n_layers - 1)."""
        self.check(target_layer, n_layers)
        self.check_options(options)
        return self.recipe(
            source, target_layer=target_layer if self.target_layer is None else self.target_layer, **options
        )

    def options(self) -> tuple[str, ...] | None:
        """The options the recipe takes by name (beside the source and l*); None where it takes any (``**options``)."""
        return recipe_options(self.recipe)

    def check_options(self, options: dict[str, Any]) -> None:
        """Refuse, in one line, an option the recipe does not take (``write=`` to token-identity), before it runs."""
        allowed = self.options()
        unknown = [name for name in options if allowed is not None and name not in allowed]
        if unknown:
            shown = " ".join(repr(options[unknown[0]]).split())
            shown = shown if len(shown) <= 60 else f"{shown[:57]}..."
            raise SpecError(
                f"{unknown[0]}={shown} is not allowed: preset {self.name!r} takes no option "
                f"{unknown[0]!r} (allowed: {', '.join(allowed or ())})"
            )

    def allows(self, target_layer: int | None, n_layers: int | None = None) -> bool:
        """Whether the preset reads at l* = `target_layer`: any l* where it leaves l* free; where it fixes l*, None
        or that layer (on a model of `n_layers`, both -1 and n_layers - 1 name the last one)."""
        if self.target_layer is None or target_layer is None:
            return True
        return not isinstance(target_layer, bool) and target_layer in self._names(n_layers)

    def check(self, target_layer: int | None, n_layers: int | None = None, field: str = "target_layer") -> None:
        """Refuse, in one line, an l* the preset does not read at (see `allows`)."""
        if not self.allows(target_layer, n_layers):
            names = " or ".join(map(str, self._names(n_layers)))
            raise SpecError(
                f"{field}={target_layer!r} is not allowed: {self.fixes(n_layers)} (allowed: the default, {names})"
            )

    def fixes(self, n_layers: int | None = None) -> str:
        """The l* the preset fixes, in words: "preset 'logit-lens' fixes l* = 29, the last layer"."""
        layer = self._names(n_layers)[0]
        return f"preset {self.name!r} fixes l* = {layer}{', the last layer' if self.target_layer == LAST_LAYER else ''}"

    def target_layers(self, target_layers: Any, n_layers: int, field: str = "target_layers", shown: Any = None) -> Any:
        """A sweep's target layers: as given where the preset leaves l* free; where it fixes l*, that one layer as
        an index (n_layers - 1 for the last, whether given as the default, as -1 or as n_layers - 1, so that the
        column, `SweepResult.cell` and the folder's manifest name it one way), and anything else is refused in
        one line. `shown` is the value as the user wrote it, for the refusal (the CLI's ``'0-3'``, not the parsed
        list)."""
        if self.target_layer is None:
            return target_layers
        given = list(target_layers) if isinstance(target_layers, (list, tuple, range)) else None
        if target_layers is None or (given is not None and len(given) == 1 and self.allows(given[0], n_layers)):
            return [self._names(n_layers)[0]]
        names = " or ".join(f"[{layer}]" for layer in self._names(n_layers))
        value = target_layers if shown is None else shown
        raise SpecError(
            f"{field}={value!r} is not allowed: {self.fixes(n_layers)}, and a sweep reads it only there "
            f"(allowed: the default, {names})"
        )

    def _names(self, n_layers: int | None) -> list[int]:
        """The indices that name the fixed l*: itself, and on a model of `n_layers` both its forms (29 and -1)."""
        assert self.target_layer is not None
        if n_layers is None:
            return [self.target_layer]
        return [self.target_layer % n_layers, self.target_layer % n_layers - n_layers]


def _multihop_preset(
    source: Source,
    target_layer: int | None = None,
    max_new_tokens: int = 20,
    target_prompt: str | None = None,
    isolate: bool = True,
) -> Patchscope:
    """As a preset: the source prompt is hop 1, `target_prompt` is hop 2."""
    if target_prompt is None:
        raise SpecError("preset 'multihop' needs target_prompt= the hop-2 prompt, e.g. 'The current CEO of'")
    return multihop(source.prompt, target_prompt, source.layer, target_layer, max_new_tokens, isolate, source.model)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("token-identity", "what token the state encodes (few-shot identity prompt, l* = l)", token_identity),
        Preset(
            "logit-lens",
            "the model's own unembedding of the state (l* = last layer, T = S)",
            logit_lens,
            target_layer=LAST_LAYER,
            needs_tokenizer=True,
        ),
        Preset("attribute", "an attribute of the subject (target prompt with placeholder x, 20 tokens)", attribute),
        Preset(
            "entity-description", "a short description of the entity (few-shot description prompt)", entity_description
        ),
        Preset(
            "multihop",
            "CoT Patchscope: hop 1's answer rerouted into hop 2 within one pass (S = T)",
            _multihop_preset,
            reroutes=True,
        ),
        Preset(
            "future-lens",
            "the tokens 1..k steps after the source position (Future Lens fixed prompt, l* = l)",
            future_lens,
        ),
        Preset(
            "selfie",
            "SelfIE: the state at every placeholder '_' of an interpretation prompt (l* = 0), summarised",
            selfie,
        ),
        Preset(
            "self-explanation",
            "what a vector (an SAE latent) means: α·v replaces the word X (l* = l)",
            self_explanation,
        ),
        Preset(
            "jacobian-lens",
            "the logit lens after J_l = E[dh_final/dh_l] (Gurnee et al., 2026; fitted layers only)",
            jacobian_lens,
            target_layer=LAST_LAYER,
            needs_tokenizer=True,
            needs_lens=True,
        ),
        Preset(
            "activation-oracle",
            "an Activation Oracle (a LoRA decoder): norm-matched add at K ' ?' slots, l* = 1",
            activation_oracle,
            needs_tokenizer=True,
            needs_decoder=True,
        ),
        Preset(
            "latentqa",
            "a LatentQA decoder (a LoRA): the state replaces its '?' placeholders at l* = 0",
            latentqa,
            needs_decoder=True,
        ),
    )
}

# Presets whose M* is a trained decoder (`Preset.needs_decoder`).
DECODER_PRESETS = tuple(name for name, preset in PRESETS.items() if preset.needs_decoder)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnknownNameError(f"preset={name!r} is not known (allowed: {', '.join(PRESETS)})")
    return PRESETS[name]


def build(
    preset: str,
    source_prompt: str,
    source_position: Position = -1,
    layer: int = 0,
    target_layer: int | None = None,
    model: str = DEFAULT_MODEL,
    **options,
) -> Patchscope:
    """Build preset `preset` for one source; `options` go to the preset (target_prompt, max_new_tokens, ...).

    A preset that fixes l* (`Preset.target_layer`: logit-lens and jacobian-lens, the last layer) takes
    `target_layer` None or -1 only, or its index on a model of ``n_layers=`` (29 of 30); others are refused."""
    source = Source(source_prompt, source_position, layer, model)
    return get_preset(preset).build(source, target_layer=target_layer, **options)


__all__ = ["LAST_LAYER", "recipe_options", "Preset", "PRESETS", "DECODER_PRESETS", "get_preset", "build"]
