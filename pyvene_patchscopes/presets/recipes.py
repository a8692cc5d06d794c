"""The presets' recipes: each turns a source (S, i, M, l) into a full Patchscope, the paper's (token identity,
logit lens, attribute extraction, entity description, multi-hop CoT rerouting, the Future Lens), two readers of
vectors (SelfIE, self-explanation), two trained decoders as M* (a PEFT adapter, see `adapters`: Activation Oracles
and LatentQA), and the Jacobian lens."""

from __future__ import annotations

from ..errors import SpecError
from ..spec import DEFAULT_MODEL, Every, Patchscope, Reroute, Source, Target, VectorSource
from ..spec.parts import lens_target
from .prompts import (
    ATTRIBUTE_PROMPT,
    ENTITY_DESCRIPTION_PROMPT,
    FUTURE_LENS_PROMPT,
    LATENTQA_CHATML,
    LATENTQA_QUESTION,
    LATENTQA_WRITE_LAYER,
    ORACLE_LAYER,
    ORACLE_PLACEHOLDER,
    ORACLE_QUESTION,
    SELF_EXPLANATION_PROMPT,
    SELFIE_PROMPT,
    TOKEN_IDENTITY_PROMPT,
    oracle_prompt,
)


def _slots(source: Source | VectorSource, k: int | None) -> int:
    rows = source.tensor.shape[0] if isinstance(source, VectorSource) and source.tensor.ndim == 2 else 1
    if k is not None and rows > 1 and k != rows:
        raise SpecError(f"k={k} does not match the VectorSource's {rows} vectors (allowed: k={rows}, or None)")
    return rows if k is None else k


def token_identity(
    source: Source, target_layer: int | None = None, max_new_tokens: int = 4, target_prompt: str | None = None
) -> Patchscope:
    """Decode the state with the few-shot identity prompt, at l* = l by default (paper §4.1)."""
    target = Target(
        target_prompt or TOKEN_IDENTITY_PROMPT,
        "?" if target_prompt is None else -1,
        source.layer if target_layer is None else target_layer,
    )
    return Patchscope(source, target, max_new_tokens=max_new_tokens)


def logit_lens(
    source: Source,
    target_layer: int | None = None,
    max_new_tokens: int = 0,
    target_prompt: str | None = None,
    tokenizer=None,
) -> Patchscope:
    """T = S up to i, i* = i, l* = last layer: the model's own unembedding of the state (paper Table 1).

    Without a tokenizer the source prompt must end at the source position (position -1).
    """
    return Patchscope(
        source, lens_target(source, target_layer, target_prompt, tokenizer), max_new_tokens=max_new_tokens
    )


def attribute(
    source: Source, target_layer: int | None = None, max_new_tokens: int = 20, target_prompt: str | None = None
) -> Patchscope:
    """Attribute extraction: the subject's state replaces the placeholder x in a relation prompt (§4.2)."""
    return Patchscope(
        source,
        Target(target_prompt or ATTRIBUTE_PROMPT, "x", source.layer if target_layer is None else target_layer),
        max_new_tokens=max_new_tokens,
    )


def entity_description(
    source: Source, target_layer: int | None = None, max_new_tokens: int = 20, target_prompt: str | None = None
) -> Patchscope:
    """Describe an entity with the paper's few-shot description prompt, ending in the placeholder x (§4.3)."""
    return Patchscope(
        source,
        Target(target_prompt or ENTITY_DESCRIPTION_PROMPT, "x", source.layer if target_layer is None else target_layer),
        max_new_tokens=max_new_tokens,
    )


def multihop(
    hop1_prompt: str,
    hop2_prompt: str,
    source_layer: int = 0,
    target_layer: int | None = None,
    max_new_tokens: int = 20,
    isolate: bool = True,
    model: str = DEFAULT_MODEL,
) -> Patchscope:
    """The CoT Patchscope (paper §5): S = T = [hop 2][hop 1], read and written within one pass.

    E.g. hop 2 = "The current CEO of", hop 1 = "the company that created Visual Basic Script". The state of
    hop 1's last token at layer l (which should hold hop 1's answer, Microsoft) is written at layer l* over
    hop 2's last token, and the model generates on from the end. With ``isolate`` the two segments cannot
    attend to each other, so the answer can only travel through the rerouted state.
    """
    for name, text in (("hop1_prompt", hop1_prompt), ("hop2_prompt", hop2_prompt)):
        if not isinstance(text, str) or not text.strip():
            raise SpecError(f"multihop {name}={text!r} is not allowed (allowed: a non-empty string)")
    first = " ".join(hop2_prompt.split())
    prompt = f"{first} {' '.join(hop1_prompt.split())}"
    return Patchscope(
        Source(prompt, -1, source_layer, model),
        Target(prompt, first, source_layer if target_layer is None else target_layer),
        max_new_tokens=max_new_tokens,
        reroute=Reroute(len(first) + 1 if isolate else None),
    )


def future_lens(
    source: Source, target_layer: int | None = None, max_new_tokens: int = 3, target_prompt: str | None = None
) -> Patchscope:
    """The Future Lens: the state at (i, l) patched at l* = l into a fixed generic prompt's last token; generated
    token j is the guess for the token j steps after i (Pal et al. 2023; the paper's Table 1)."""
    return Patchscope(
        source,
        Target(target_prompt or FUTURE_LENS_PROMPT, -1, source.layer if target_layer is None else target_layer),
        max_new_tokens=max_new_tokens,
    )


def selfie(
    source: Source | VectorSource,
    target_layer: int | None = None,
    max_new_tokens: int = 20,
    target_prompt: str | None = None,
    write: str = "mix",
    alpha: float = 1.0,
) -> Patchscope:
    """SelfIE: the state (or vector) written at every placeholder "_" of the interpretation prompt at l* = 0 by
    default (SelfIE's k = 1), mixed with α (α = 1 replaces, SelfIE's default); the model summarises it."""
    return Patchscope(
        source,
        Target(
            target_prompt or SELFIE_PROMPT,
            Every("_"),
            0 if target_layer is None else target_layer,
            write=write,
            alpha=alpha,
        ),
        max_new_tokens=max_new_tokens,
    )


def self_explanation(
    source: Source | VectorSource,
    target_layer: int | None = None,
    max_new_tokens: int = 20,
    target_prompt: str | None = None,
    alpha: float = 1.0,
    write: str = "replace",
) -> Patchscope:
    """Self-explanation of an SAE latent (or any vector): α·v replaces the word X at both of its occurrences in
    "What is the meaning of the word "X"?", at l* = l by default; pick α with a scale search."""
    return Patchscope(
        source,
        Target(
            target_prompt or SELF_EXPLANATION_PROMPT,
            Every("X"),
            source.layer if target_layer is None else target_layer,
            write=write,
            alpha=alpha,
        ),
        max_new_tokens=max_new_tokens,
    )


def activation_oracle(
    source: Source | VectorSource,
    target_layer: int | None = None,
    max_new_tokens: int = 20,
    target_prompt: str | None = None,
    question: str = ORACLE_QUESTION,
    k: int | None = None,
    decoder: str | None = None,
    alpha: float = 1.0,
    tokenizer=None,
) -> Patchscope:
    """An Activation Oracle: the state (or K vectors) added, norm-matched, at the first K " ?" of the oracle prompt
    at l* = 1 of `decoder` (the oracle: the base model with its LoRA, see `load_model(adapter=...)`)."""
    k = _slots(source, k)
    prompt = target_prompt or oracle_prompt(question, source.layer, k, tokenizer)
    target = Target(
        prompt,
        Every(ORACLE_PLACEHOLDER.strip(), first=k),
        ORACLE_LAYER if target_layer is None else target_layer,
        model=decoder,
        write="norm-matched-add",
        alpha=alpha,
    )
    return Patchscope(source, target, max_new_tokens=max_new_tokens)


def latentqa(
    source: Source | VectorSource,
    target_layer: int | None = None,
    max_new_tokens: int = 100,
    target_prompt: str | None = None,
    question: str = LATENTQA_QUESTION,
    k: int | None = None,
    decoder: str | None = None,
    template: str = LATENTQA_CHATML,
) -> Patchscope:
    """LatentQA: the state (or K vectors, a read sequence) replaces the first K "?" of the decoder's dialogue at
    l* = 0 of `decoder` (the LatentQA LoRA); read the source at layer 15 of a 32-layer model, or its equivalent."""
    k = _slots(source, k)
    prompt = target_prompt or template.format(placeholders=" ".join(["?"] * k), question=question)
    target = Target(
        prompt, Every("?", first=k), LATENTQA_WRITE_LAYER if target_layer is None else target_layer, model=decoder
    )
    return Patchscope(source, target, max_new_tokens=max_new_tokens)


def as_lens(lens=None):
    """A `JacobianLens` as given, read from a .pt path, or (None) the shipped SmolLM2 lens: read once per sweep or
    command, not once per scope."""
    from ..persist.jlens import JacobianLens

    if lens is None:
        return JacobianLens.from_catalogue()
    return lens if isinstance(lens, JacobianLens) else JacobianLens.from_file(lens)


def jacobian_lens(
    source: Source,
    target_layer: int | None = None,
    max_new_tokens: int = 0,
    target_prompt: str | None = None,
    tokenizer=None,
    lens=None,
) -> Patchscope:
    """The Jacobian lens (Gurnee et al., 2026): the logit lens with f = J_l, from `lens` (a `JacobianLens`, or a
    path to a lens .pt file) or, by default, the shipped SmolLM2 lens (its fitted layers only)."""
    lens = as_lens(lens)
    if source.layer not in lens.jacobians:
        raise SpecError(
            f"Source.layer={source.layer!r} has no fitted J in the Jacobian lens (allowed: "
            f"{lens.source_layers}; fit other layers with jlens.fit_jacobian_lens)"
        )
    scope = logit_lens(source, target_layer, max_new_tokens, target_prompt, tokenizer)
    return scope.replace(mapping=lens.mapping(source.layer))


__all__ = [
    "token_identity",
    "logit_lens",
    "attribute",
    "entity_description",
    "multihop",
    "future_lens",
    "selfie",
    "self_explanation",
    "activation_oracle",
    "latentqa",
    "as_lens",
    "jacobian_lens",
]
