"""Ready-made Patchscopes from the paper: token identity, logit lens, attribute extraction, entity description,
multi-hop CoT rerouting, and the Future Lens; two readers of vectors, SelfIE and self-explanation; two trained
decoders as M* (a PEFT adapter, see `adapters`), Activation Oracles and LatentQA; and the Jacobian lens."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from .errors import SpecError, UnknownNameError
from .spec import DEFAULT_MODEL, Every, Patchscope, Position, Reroute, Source, Target, VectorSource
from .spec.parts import lens_target

# A modification of the official few-shot identity prompt. The official next_token_prediction notebook uses
# "cat -> cat\n1135 -> 1135\nhello -> hello\n?" with the patch on its last token "?", read at that same
# position: what it reads is the *next* token after the patched state (the paper's next-token experiment).
# We append " ->" and patch "?", so the model reads the patched token's *identity*, as the demonstrations
# show it: that is what the token-identity preset asks. Measured on SmolLM2-135M, 16 words, l = l* in 0..16:
# 16/16 decoded at every layer with " ->", against 2/16 for the prompt patched at its end, whose next token
# is nearly always the arrow rather than the word. Pass target_prompt=OFFICIAL_TOKEN_IDENTITY_PROMPT to use the
# official form (the preset then patches and reads its last token, "?").
OFFICIAL_TOKEN_IDENTITY_PROMPT = "cat -> cat\n1135 -> 1135\nhello -> hello\n?"
TOKEN_IDENTITY_PROMPT = OFFICIAL_TOKEN_IDENTITY_PROMPT + " ->"
ENTITY_DESCRIPTION_PROMPT = ("Syria: Country in the Middle East, Leonardo DiCaprio: American actor, Samsung: "
                             "South Korean multinational major appliance and consumer electronics corporation, x")
ATTRIBUTE_PROMPT = "The capital city of x is"
# The Future Lens (Pal et al., CoNLL 2023) with a fixed prompt: the first of the "natural, normal contexts" that
# their causal baseline patches instead of the learned soft prompt (github.com/KoyenaPal/future-lens,
# causal_methods/module.py, GPTJModule._COMPARE_CONTEXT[10][0], the default --context_idx 0); the state goes on
# its last token ' "'. The Patchscopes paper (Table 1) lists the learned prompt, which must be trained per model.
# Measured on SmolLM2-135M (100 prose prefixes, l = l* in 0..28 step 2 and 29; `patchscopes eval future`), none of
# three alternatives did better beyond the noise (±0.08) at steps 2-3: Pal et al.'s second context
# 'The multi-tokens present here are "' (best step 2 / 3 over layers: 0.23 / 0.06), a few-shot quotation
# prompt (0.19 / 0.08) and a few-shot "Repeat the text" prompt (0.22 / 0.06), against 0.22 / 0.10 for this one.
FUTURE_LENS_PROMPT = 'Hello! Could you please tell me more about "'


# SelfIE (Chen et al., 2024, arXiv:2403.10949; github.com/tonychenxyz/selfie, README and interpret()): the
# interpretation prompt InterpretationPrompt(tokenizer, ("[INST]", 0, 0, 0, 0, 0, "[/INST] Sure, I will summarize the
# message:")), each 0 a "_ " placeholder. The state is written at every placeholder at the input of layer k = 1 (here
# l* = 0, block 0's output), on the prompt pass only, in the 'normalized' mode with overlay_strength 1 (a mix at
# α = 1, which replaces). Here in SmolLM2's chat format (ChatML) instead of Llama 2's [INST] tags.
SELFIE_PROMPT = "<|im_start|>user\n_ _ _ _ _<|im_end|>\n<|im_start|>assistant\nSure, I will summarize the message:"
# Self-explaining SAE features (Kharlapenko, neverix, Nanda and Conmy, 2024;
# alignmentforum.org/posts/8ev6coxChSWcxCDy8):
# "we give the model a prompt like 'What does X mean?', replace the residual stream on X with the decoder direction
# times some scale, and have it generate an explanation". Their Gemma prompt asks for the meaning of the word "X" and
# starts the answer; here in ChatML, X written at both of its occurrences, scaled by α (write="replace", alpha=α).
SELF_EXPLANATION_PROMPT = ('<|im_start|>user\nWhat is the meaning of the word "X"?<|im_end|>\n<|im_start|>assistant\n'
                           'The meaning of the word "X" is "')

# Activation Oracles (Karvonen et al., 2025; github.com/adamkarvonen/activation_oracles at 55f153f,
# nl_probes/utils/dataset_utils.py get_introspection_prefix and nl_probes/utils/steering_hooks.py): the oracle, a LoRA
# on the base model, gets the user turn f"Layer: {l}\n" + " ?" * K + " \n" + question in the base model's chat template
# (a generation prompt, no system turn, thinking off). The K vectors (states read at the output of block l of the
# base model, adapter off; 25/50/75 % of the depth, 50 % their default) are added at the first K " ?" tokens at the
# output of block 1, matched to the norm there: h <- h + c * ||h|| * v/||v||, c = 1, on the prompt pass only.
ORACLE_PLACEHOLDER = " ?"
ORACLE_LAYER = 1
ORACLE_QUESTION = "Can you describe what is happening in this text?"
# LatentQA (Pan et al., 2024, arXiv:2412.08686; github.com/aypan17/latentqa at e40cc44, lit/configs/interpret_config.py
# and lit/utils/activation_utils.py): the decoder (a LoRA on Llama-3-8B-Instruct, aypan17/latentqa_llama-3-8b-instruct)
# reads states of block 15's output of the target model and has them replace, in order, the "?" placeholders of its
# first user turn at the output of its block 0. Its chat template renames the assistant "reflect" and starts with a
# fixed exchange (lit/utils/dataset_utils.py BASE_DIALOG); here in ChatML, as SmolLM2 and the other presets use it.
LATENTQA_READ_LAYER, LATENTQA_WRITE_LAYER = 15, 0
LATENTQA_QUESTION = "What type of persona will the assistant adopt?"
LATENTQA_LLAMA3 = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{placeholders}<|eot_id|>"
                   "<|start_header_id|>reflect<|end_header_id|>\n\nSure, I've analyzed the assistant.<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\n{question}<|eot_id|>"
                   "<|start_header_id|>reflect<|end_header_id|>\n\n")
LATENTQA_CHATML = ("<|im_start|>user\n{placeholders}<|im_end|>\n<|im_start|>reflect\nSure, I've analyzed the "
                   "assistant.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>reflect\n")


def chat_prompt(user: str, tokenizer=None) -> str:
    """`user` as one user turn with a generation prompt: the tokenizer's own chat template where it has one
    (thinking off, as the oracles are trained), else ChatML (SmolLM2's)."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def _slots(source: Source | VectorSource, k: int | None) -> int:
    rows = source.tensor.shape[0] if isinstance(source, VectorSource) and source.tensor.ndim == 2 else 1
    if k is not None and rows > 1 and k != rows:
        raise SpecError(f"k={k} does not match the VectorSource's {rows} vectors (allowed: k={rows}, or None)")
    return rows if k is None else k


def oracle_prompt(question: str, source_layer: int, k: int = 1, tokenizer=None) -> str:
    """The Activation Oracle's prompt: "Layer: l" then K placeholders " ?" then the question, chat-templated."""
    return chat_prompt(f"Layer: {source_layer}\n{ORACLE_PLACEHOLDER * k} \n{question}", tokenizer)


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

    def build(self, source: Source | VectorSource, target_layer: int | None = None, n_layers: int | None = None,
              **options) -> Patchscope:
        """The preset's Patchscope for `source`; where the preset fixes l*, `target_layer` may only name it (-1 for
        the last layer, or on a model of `n_layers` also n_layers - 1)."""
        self.check(target_layer, n_layers)
        self.check_options(options)
        return self.recipe(source, target_layer=target_layer if self.target_layer is None else self.target_layer,
                           **options)

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
            raise SpecError(f"{unknown[0]}={shown} is not allowed: preset {self.name!r} takes no option "
                            f"{unknown[0]!r} (allowed: {', '.join(allowed or ())})")

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
            raise SpecError(f"{field}={target_layer!r} is not allowed: {self.fixes(n_layers)} (allowed: the "
                            f"default, {names})")

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
        raise SpecError(f"{field}={value!r} is not allowed: {self.fixes(n_layers)}, and a sweep reads it only there "
                        f"(allowed: the default, {names})")

    def _names(self, n_layers: int | None) -> list[int]:
        """The indices that name the fixed l*: itself, and on a model of `n_layers` both its forms (29 and -1)."""
        assert self.target_layer is not None
        if n_layers is None:
            return [self.target_layer]
        return [self.target_layer % n_layers, self.target_layer % n_layers - n_layers]


def token_identity(source: Source, target_layer: int | None = None, max_new_tokens: int = 4,
                   target_prompt: str | None = None) -> Patchscope:
    """Decode the state with the few-shot identity prompt, at l* = l by default (paper §4.1)."""
    target = Target(target_prompt or TOKEN_IDENTITY_PROMPT, "?" if target_prompt is None else -1,
                    source.layer if target_layer is None else target_layer)
    return Patchscope(source, target, max_new_tokens=max_new_tokens)


def logit_lens(source: Source, target_layer: int | None = None, max_new_tokens: int = 0,
               target_prompt: str | None = None, tokenizer=None) -> Patchscope:
    """T = S up to i, i* = i, l* = last layer: the model's own unembedding of the state (paper Table 1).

    Without a tokenizer the source prompt must end at the source position (position -1).
    """
    return Patchscope(source, lens_target(source, target_layer, target_prompt, tokenizer),
                      max_new_tokens=max_new_tokens)


def attribute(source: Source, target_layer: int | None = None, max_new_tokens: int = 20,
              target_prompt: str | None = None) -> Patchscope:
    """Attribute extraction: the subject's state replaces the placeholder x in a relation prompt (§4.2)."""
    return Patchscope(source, Target(target_prompt or ATTRIBUTE_PROMPT, "x",
                                     source.layer if target_layer is None else target_layer),
                      max_new_tokens=max_new_tokens)


def entity_description(source: Source, target_layer: int | None = None, max_new_tokens: int = 20,
                       target_prompt: str | None = None) -> Patchscope:
    """Describe an entity with the paper's few-shot description prompt, ending in the placeholder x (§4.3)."""
    return Patchscope(source, Target(target_prompt or ENTITY_DESCRIPTION_PROMPT, "x",
                                     source.layer if target_layer is None else target_layer),
                      max_new_tokens=max_new_tokens)


def multihop(hop1_prompt: str, hop2_prompt: str, source_layer: int = 0, target_layer: int | None = None,
             max_new_tokens: int = 20, isolate: bool = True, model: str = DEFAULT_MODEL) -> Patchscope:
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
    return Patchscope(Source(prompt, -1, source_layer, model),
                      Target(prompt, first, source_layer if target_layer is None else target_layer),
                      max_new_tokens=max_new_tokens, reroute=Reroute(len(first) + 1 if isolate else None))


def future_lens(source: Source, target_layer: int | None = None, max_new_tokens: int = 3,
                target_prompt: str | None = None) -> Patchscope:
    """The Future Lens: the state at (i, l) patched at l* = l into a fixed generic prompt's last token; generated
    token j is the guess for the token j steps after i (Pal et al. 2023; the paper's Table 1)."""
    return Patchscope(source, Target(target_prompt or FUTURE_LENS_PROMPT, -1,
                                     source.layer if target_layer is None else target_layer),
                      max_new_tokens=max_new_tokens)


def selfie(source: Source | VectorSource, target_layer: int | None = None, max_new_tokens: int = 20,
           target_prompt: str | None = None, write: str = "mix", alpha: float = 1.0) -> Patchscope:
    """SelfIE: the state (or vector) written at every placeholder "_" of the interpretation prompt at l* = 0 by
    default (SelfIE's k = 1), mixed with α (α = 1 replaces, SelfIE's default); the model summarises it."""
    return Patchscope(source, Target(target_prompt or SELFIE_PROMPT, Every("_"), 0 if target_layer is None
                                     else target_layer, write=write, alpha=alpha), max_new_tokens=max_new_tokens)


def self_explanation(source: Source | VectorSource, target_layer: int | None = None, max_new_tokens: int = 20,
                     target_prompt: str | None = None, alpha: float = 1.0, write: str = "replace") -> Patchscope:
    """Self-explanation of an SAE latent (or any vector): α·v replaces the word X at both of its occurrences in
    "What is the meaning of the word "X"?", at l* = l by default; pick α with a scale search."""
    return Patchscope(source, Target(target_prompt or SELF_EXPLANATION_PROMPT, Every("X"), source.layer
                                     if target_layer is None else target_layer, write=write, alpha=alpha),
                      max_new_tokens=max_new_tokens)


def activation_oracle(source: Source | VectorSource, target_layer: int | None = None, max_new_tokens: int = 20,
                      target_prompt: str | None = None, question: str = ORACLE_QUESTION, k: int | None = None,
                      decoder: str | None = None, alpha: float = 1.0, tokenizer=None) -> Patchscope:
    """An Activation Oracle: the state (or K vectors) added, norm-matched, at the first K " ?" of the oracle prompt
    at l* = 1 of `decoder` (the oracle: the base model with its LoRA, see `load_model(adapter=...)`)."""
    k = _slots(source, k)
    prompt = target_prompt or oracle_prompt(question, source.layer, k, tokenizer)
    target = Target(prompt, Every(ORACLE_PLACEHOLDER.strip(), first=k), ORACLE_LAYER if target_layer is None
                    else target_layer, model=decoder, write="norm-matched-add", alpha=alpha)
    return Patchscope(source, target, max_new_tokens=max_new_tokens)


def latentqa(source: Source | VectorSource, target_layer: int | None = None, max_new_tokens: int = 100,
             target_prompt: str | None = None, question: str = LATENTQA_QUESTION, k: int | None = None,
             decoder: str | None = None, template: str = LATENTQA_CHATML) -> Patchscope:
    """LatentQA: the state (or K vectors, a read sequence) replaces the first K "?" of the decoder's dialogue at
    l* = 0 of `decoder` (the LatentQA LoRA); read the source at layer 15 of a 32-layer model, or its equivalent."""
    k = _slots(source, k)
    prompt = target_prompt or template.format(placeholders=" ".join(["?"] * k), question=question)
    target = Target(prompt, Every("?", first=k), LATENTQA_WRITE_LAYER if target_layer is None else target_layer,
                    model=decoder)
    return Patchscope(source, target, max_new_tokens=max_new_tokens)


def as_lens(lens=None):
    """A `JacobianLens` as given, read from a .pt path, or (None) the shipped SmolLM2 lens: read once per sweep or
    command, not once per scope."""
    from .persist.jlens import JacobianLens

    if lens is None:
        return JacobianLens.from_catalogue()
    return lens if isinstance(lens, JacobianLens) else JacobianLens.from_file(lens)


def jacobian_lens(source: Source, target_layer: int | None = None, max_new_tokens: int = 0,
                  target_prompt: str | None = None, tokenizer=None, lens=None) -> Patchscope:
    """The Jacobian lens (Gurnee et al., 2026): the logit lens with f = J_l, from `lens` (a `JacobianLens`, or a
    path to a lens .pt file) or, by default, the shipped SmolLM2 lens (its fitted layers only)."""
    lens = as_lens(lens)
    if source.layer not in lens.jacobians:
        raise SpecError(f"Source.layer={source.layer!r} has no fitted J in the Jacobian lens (allowed: "
                        f"{lens.source_layers}; fit other layers with jlens.fit_jacobian_lens)")
    scope = logit_lens(source, target_layer, max_new_tokens, target_prompt, tokenizer)
    return scope.replace(mapping=lens.mapping(source.layer))


def _multihop_preset(source: Source, target_layer: int | None = None, max_new_tokens: int = 20,
                     target_prompt: str | None = None, isolate: bool = True) -> Patchscope:
    """As a preset: the source prompt is hop 1, `target_prompt` is hop 2."""
    if target_prompt is None:
        raise SpecError("preset 'multihop' needs target_prompt= the hop-2 prompt, e.g. 'The current CEO of'")
    return multihop(source.prompt, target_prompt, source.layer, target_layer, max_new_tokens, isolate, source.model)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("token-identity", "what token the state encodes (few-shot identity prompt, l* = l)", token_identity),
    Preset("logit-lens", "the model's own unembedding of the state (l* = last layer, T = S)", logit_lens,
           target_layer=LAST_LAYER, needs_tokenizer=True),
    Preset("attribute", "an attribute of the subject (target prompt with placeholder x, 20 tokens)", attribute),
    Preset("entity-description", "a short description of the entity (few-shot description prompt)",
           entity_description),
    Preset("multihop", "CoT Patchscope: hop 1's answer rerouted into hop 2 within one pass (S = T)",
           _multihop_preset, reroutes=True),
    Preset("future-lens", "the tokens 1..k steps after the source position (Future Lens fixed prompt, l* = l)",
           future_lens),
    Preset("selfie", "SelfIE: the state at every placeholder '_' of an interpretation prompt (l* = 0), summarised",
           selfie),
    Preset("self-explanation", "what a vector (an SAE latent) means: α·v replaces the word X (l* = l)",
           self_explanation),
    Preset("jacobian-lens", "the logit lens after J_l = E[dh_final/dh_l] (Gurnee et al., 2026; fitted layers only)",
           jacobian_lens, target_layer=LAST_LAYER, needs_tokenizer=True, needs_lens=True),
    Preset("activation-oracle", "an Activation Oracle (a LoRA decoder): norm-matched add at K ' ?' slots, l* = 1",
           activation_oracle, needs_tokenizer=True, needs_decoder=True),
    Preset("latentqa", "a LatentQA decoder (a LoRA): the state replaces its '?' placeholders at l* = 0",
           latentqa, needs_decoder=True),
)}

# Presets whose M* is a trained decoder (`Preset.needs_decoder`).
DECODER_PRESETS = tuple(name for name, preset in PRESETS.items() if preset.needs_decoder)


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UnknownNameError(f"preset={name!r} is not known (allowed: {', '.join(PRESETS)})")
    return PRESETS[name]


def build(preset: str, source_prompt: str, source_position: Position = -1, layer: int = 0,
          target_layer: int | None = None, model: str = DEFAULT_MODEL, **options) -> Patchscope:
    """Build preset `preset` for one source; `options` go to the preset (target_prompt, max_new_tokens, ...).

    A preset that fixes l* (`Preset.target_layer`: logit-lens and jacobian-lens, the last layer) takes
    `target_layer` None or -1 only, or its index on a model of ``n_layers=`` (29 of 30); others are refused."""
    source = Source(source_prompt, source_position, layer, model)
    return get_preset(preset).build(source, target_layer=target_layer, **options)
