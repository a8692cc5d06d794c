"""Rebuild the shipped catalogue with `save_patchscope`: ``python -m pyvene_patchscopes.catalogue.build``.

Each entry is a spec for SmolLM2-135M with an example source that the model decodes correctly; use it as
a template (``patchscopes run NAME --source-prompt ... --source-position ...``). The tuned-lens entries
carry affine maps fitted here by least squares (``fit_affine``) from layer l to the last layer, on
`fit.default_texts()` minus the paragraphs held out to score them.
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch

from pyvene_patchscopes import Patchscope, Source, Target, load_model, run, save_patchscope
from pyvene_patchscopes.analysis.fit import default_texts, fit_tuned_lens, gather_layers
from pyvene_patchscopes.presets import ATTRIBUTE_PROMPT, build, multihop

log = logging.getLogger("catalogue")
HERE = Path(__file__).parent
TUNED_LENS_LAYERS = (6, 12, 18, 24)
HELD_OUT = 60
CROSS_MODEL_CELLS = {(27, 12): 0.484, (24, 12): 0.422, (18, 15): 0.375}  # P@1 on reports/cross-model (64 positions)
CROSS_MODEL_TRAIN = 150  # training texts, as `patchscopes eval cross-model` uses by default
# The Jacobian lens (Gurnee et al., 2026), fitted by the reference estimator on the first 48 texts of the train split
# that `patchscopes eval next-token` uses (250 train, 100 evaluation, seed 0), so its evaluation texts stay unseen;
# 64 tokens each (the reference uses up to 128), the first 16 positions and the last left out.
JACOBIAN_LENS_LAYERS = TUNED_LENS_LAYERS
JACOBIAN_LENS_PROMPTS = 48
JACOBIAN_LENS_TOKENS = 64

ATTRIBUTES = {  # name: (target prompt with placeholder x, example source, subject)
    "attribute-capital": (ATTRIBUTE_PROMPT, "Here is a country: France", "France"),
    "attribute-currency": ("The official currency of x is the", "Here is a country: Japan", "Japan"),
    "attribute-language": ("The official language of x is", "Here is a country: Germany", "Germany"),
    "attribute-ceo": ("The CEO of x is", "Here is a company: Microsoft", "Microsoft"),
    "attribute-largest-city": ("The largest city in x is", "Here is a country: Australia", "Australia"),
}


def entries(handle) -> dict[str, tuple[Patchscope, str]]:
    out = {
        "token-identity": (
            build("token-identity", "Amazon's former CEO attended Oscars", "CEO", 8),
            "What token a state encodes: the official few-shot identity prompt, patched at '?', l* = l (paper §4.1).",
        ),
        "logit-lens": (
            build("logit-lens", "The Eiffel Tower is in the city of", -1, 28),
            "The model's own unembedding of a state: T = S, l* = last layer, f = I (paper Table 1).",
        ),
        "entity-description": (
            build("entity-description", "Let me tell you about Albert Einstein", "Einstein", 4),
            "A short description of the entity at the source position (paper §4.3).",
        ),
        "multihop-cot": (
            multihop("the company that created Windows", "The current CEO of", 8, 4, max_new_tokens=12),
            "CoT Patchscope (paper §5), a template: S = T = [hop 2][hop 1]; hop 1's last state is "
            "rerouted over hop 2's last token within one pass, the two segments isolated by an "
            "attention mask.",
        ),
        "selfie": (
            build("selfie", "Here is a city: Paris", "Paris", 8),
            "SelfIE (Chen et al., 2024): the state written at every placeholder '_' of the interpretation "
            "prompt at l* = 0 (SelfIE's k = 1), mixed at alpha = 1; the model summarises it. Give it a "
            "VectorSource to read a direction.",
        ),
        "self-explanation": (
            build("self-explanation", "Here is a city: Paris", "Paris", 6, target_layer=2),
            "Self-explanation (Kharlapenko et al., 2024): alpha * v replaces the word X in 'What "
            'is the meaning of the word "X"?\'. Made for SAE latents: scope.replace(source='
            "vectors.sae_source(sae, k, model)), alpha chosen by a scale search.",
        ),
    }
    for name, (prompt, source, subject) in ATTRIBUTES.items():
        relation = name.removeprefix("attribute-").replace("-", " ")
        out[name] = (
            build("attribute", source, subject, 4, target_layer=2, target_prompt=prompt),
            f"Attribute extraction, {relation}: the subject's state replaces x in {prompt!r} (paper §4.2).",
        )
    return out


def tuned_lens(handle, texts: list[str]) -> dict[str, tuple[Patchscope, str]]:
    out = {}
    for layer, f in fit_tuned_lens(texts, handle, TUNED_LENS_LAYERS, progress=True).items():
        scope = build("logit-lens", "The Eiffel Tower is in the city of", -1, layer).replace(mapping=f)
        description = (
            f"Tuned-lens-style Patchscope from layer {layer}: f affine, fitted by least squares to the "
            "last layer (paper §4.1), then the unembedding."
        )
        out[f"tuned-lens-l{layer:02d}"] = (scope, description)
    return out


def cross_model(source, target, texts: list[str]) -> dict[str, tuple[Patchscope, str]]:
    """SmolLM2-135M -> Gemma 3 270M token identity with the affine maps fitted as `patchscopes eval cross-model`
    fits them (same training split), for the (l, l*) cells that scored best in reports/cross-model."""
    from pyvene_patchscopes.evaluate.cross_model import fit_maps
    from pyvene_patchscopes.evaluate.next_token import IDENTITY_PROMPT

    layers, target_layers = sorted({l for l, _ in CROSS_MODEL_CELLS}), sorted({t for _, t in CROSS_MODEL_CELLS})
    maps = fit_maps(source, target, layers, target_layers, texts, progress=True)
    out = {}
    for l, t in CROSS_MODEL_CELLS:
        scope = Patchscope(
            Source("He opened the door and walked into the", -1, l, source.name),
            Target(IDENTITY_PROMPT, -1, t, target.name),
            mapping=maps[(l, t)],
        )
        out[f"cross-model-smollm2-gemma3-l{l:02d}-l{t:02d}"] = (
            scope,
            f"Cross-model token identity (paper §4.4): SmolLM2-135M's layer-{l} state, mapped by an affine "
            f"map fitted by least squares on prefix-aligned states, read by Gemma 3 270M at layer {t} with "
            f"'cat->cat; 1135->1135; hello->hello; ?'. Precision@1 of {CROSS_MODEL_CELLS[(l, t)]:.2f} on the 64 "
            "positions of reports/cross-model: mostly frequent tokens transfer.",
        )
    return out


def jacobian_lens_texts() -> list[str]:
    from pyvene_patchscopes.evaluate.data import prose_splits

    return list(prose_splits(250, 100)["train"]["text"][:JACOBIAN_LENS_PROMPTS])


def jacobian_lens(handle, checkpoint: Path | None = None) -> dict[str, tuple[Patchscope, str]]:
    """J-lens entries: f = J_l (an affine map without bias) into the logit lens, one entry per layer."""
    from pyvene_patchscopes.jlens import fit_jacobian_lens

    lens = fit_jacobian_lens(
        jacobian_lens_texts(),
        handle,
        JACOBIAN_LENS_LAYERS,
        dim_batch=64,
        max_seq_len=JACOBIAN_LENS_TOKENS,
        checkpoint=checkpoint,
        progress=True,
    )
    out = {}
    for layer in lens.source_layers:
        scope = build("jacobian-lens", "The Eiffel Tower is in the city of", -1, layer, model=handle.name, lens=lens)
        out[f"jacobian-lens-l{layer:02d}"] = (
            scope,
            (
                f"Jacobian lens from layer {layer} (Gurnee et al., 2026): f(h) = J_l h with J_l = "
                f"E[dh_final/dh_l], the reference estimator on {lens.n_prompts} prose texts of {JACOBIAN_LENS_TOKENS} "
                f"tokens (the first {JACOBIAN_LENS_PROMPTS} of the train split of `patchscopes eval next-token`, seed "
                f"0; texts sha256 {lens.metadata['prompts_sha256'][:16]}; the first 16 positions and the last left "
                "out), then the final norm and unembedding. All layers: "
                "pyvene_patchscopes.jlens.JacobianLens.from_catalogue()."
            ),
        )
    return out


def agreement(handle, scope: Patchscope, texts: list[str]) -> float:
    """Share of held-out tokens whose lens top-1 equals the model's own next-token top-1."""
    from pyvene_patchscopes.spec.mappings import build_mapping

    f = build_mapping(scope.mapping, handle.hidden_size, handle.hidden_size)
    last = handle.n_layers - 1
    states = gather_layers(handle, texts, [scope.source.layer, last], after_final_norm=True)
    hits = total = 0
    with torch.no_grad():
        for x, y in zip(states[scope.source.layer], states[last]):
            lens = handle.model.lm_head(handle.model.model.norm(f(x[2:])))
            hits += int((lens.argmax(-1) == handle.model.lm_head(y[2:]).argmax(-1)).sum())
            total += len(x) - 2
    return hits / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--skip-tuned-lens", action="store_true")
    parser.add_argument("--skip-cross-model", action="store_true")
    parser.add_argument("--skip-jacobian-lens", action="store_true")
    parser.add_argument("--jacobian-lens-checkpoint", default=None, help="resume the J-lens fit from this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    handle = load_model("smollm2-135m")
    texts = default_texts()
    made = entries(handle)
    if not args.skip_tuned_lens:
        made.update(tuned_lens(handle, texts[:-HELD_OUT]))
        for name in [n for n in made if n.startswith("tuned-lens")]:
            identity = made[name][0].replace(mapping="identity")
            log.info(
                "%s: top-1 agreement with the model on %d held-out paragraphs: tuned %.3f, logit lens %.3f",
                name,
                HELD_OUT,
                agreement(handle, made[name][0], texts[-HELD_OUT:]),
                agreement(handle, identity, texts[-HELD_OUT:]),
            )
    if not args.skip_jacobian_lens:
        checkpoint = Path(args.jacobian_lens_checkpoint) if args.jacobian_lens_checkpoint else None
        made.update(jacobian_lens(handle, checkpoint))
    models = [handle]
    if not args.skip_cross_model:
        from pyvene_patchscopes.evaluate.data import prose_splits

        gemma = load_model("gemma3-270m")
        models.append(gemma)
        made.update(cross_model(handle, gemma, prose_splits(CROSS_MODEL_TRAIN, 40)["train"]["text"]))
    for name, (scope, description) in made.items():
        folder = Path(args.out) / name
        if folder.exists():
            shutil.rmtree(folder)
        used = [m for m in models if m.name in (scope.source.model, scope.target_model)]
        save_patchscope(scope, folder, models=used, description=description)
        result = run(scope, used)[0]
        log.info("%-24s top %r  generation %r", name, result.token, result.generation)


if __name__ == "__main__":
    main()
