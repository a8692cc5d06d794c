"""Trust a reading: put it back where h was read, and compare how much the model notices with what control words do.

For a reading r of h, the state at (S, i, l) on M: r is written into a neutral carrier (``"Here is a word: r"``), its
state at layer l is read at r's last token, and that state is written in place of h at (S, i, l). The disruption D
is the mean KL(original || patched) of S's next-token distributions over the positions the settings name (from i
on, by default). Control words put back the same way give D's null distribution; the source token's own text put
back gives the self-check, which says whether the layer can be judged at all (`judge`).

A pyvene ``CollectIntervention`` reads the carrier states (`states.read_states`). The interchange intervention at
(S, i, l) runs on the planned execution where the model takes it, S computed once and each row from l up; else, or
with ``planned=False``, as a pyvene `MappingIntervention` fed with them (``source_representations``), the config `run`
uses (`disruption`). Every text put back at one (S, i, l),
readings, self-check and controls, is one batch of rows over the same S; the controls of one (S, i, l) are shared by
every reading of it (in a sweep, by every l*).
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Iterable, NamedTuple, Sequence

import torch

from ..errors import SpecError, check_int
from ..models import ModelHandle
from ..models.sites import Site, hidden_state_site
from ..resolve import Models, as_models, concrete_layer, source_index
from ..result import PatchscopeResult, SweepResult
from ..result.verify import Verification
from ..spec import Patchscope, VectorSource
from ..spec.positions import encode, token_ids, warn_if_sink
from ..spec.verify import CONTROL_WORDS, PLACEHOLDER, VerifySettings
from .disruption import disruptions
from .states import layer_site, read_states

SUPPORTED_SCORE = 0.5
"""A reading is supported only if putting it back removes at least half of a random word's disruption (score >= 0.5):
the demo's right readings score +0.96 and more where the test works, a near-synonym +0.85 and more, a wrong one about
0 (issue 39's table)."""
SUPPORTED_P_VALUE = 0.05
"""... and only if at most 5% of the controls disrupt as little (rank p-value <= 0.05): with 32 controls, none of them
at or below the reading's D (p = 1/33); with 40, at most one."""
SELF_CHECK_SCORE = 0.5
"""Where the source token's own text, put back from the same carrier, scores below 0.5, the carrier does not
reproduce what h holds (the layer carries more than the token: the demo's layers 18 and 26 score +0.38 and +0.19),
so no reading of h can be judged there: the verdict is "cannot tell", whatever the reading scores."""


class Carried(NamedTuple):
    """A text placed in the carrier: the prompt, its last token's index (last), and how many tokens it has there."""

    prompt: str
    last: int
    tokens: int


class Plan(NamedTuple):
    """One reading's check, every index concrete: the state h at (prompt, position, site) on model `name`, or the
    vector h (no prompt) of a vector source."""

    name: str
    site: Site
    reading: Carried
    text: str
    prompt: str | None = None
    position: int = -1
    own: Carried | None = None  # the source token's own text in the carrier (the self-check)
    own_text: str | None = None
    vector: torch.Tensor | None = None


def verify(
    results: PatchscopeResult | Sequence[PatchscopeResult] | SweepResult,
    model: ModelHandle | Models | Sequence[ModelHandle],
    settings: VerifySettings | None = None,
    batch_size: int = 64,
    planned: bool = True,
) -> list[Verification]:
    """Check each result's reading by putting it back (see the module's docstring); one `Verification` per result,
    in order. `settings` default to each result's own (``Patchscope.verify``, saved with the spec), else to
    `VerifySettings()`. The check runs on the source model M, where h came from (a cross-model reading's text goes
    into M's carrier). The disruptions run on the planned execution where M takes it (`disruption`), else, or with
    ``planned=False``, as pyvene interventions. Every input is checked before anything runs."""
    if settings is not None and not isinstance(settings, VerifySettings):
        raise SpecError(f"settings is a {type(settings).__name__} (allowed: a VerifySettings, or None)")
    batch_size = check_int("batch_size", batch_size)
    listed = _listed(results)
    models = as_models(model)
    chosen = [settings or _own_settings(result) for result in listed]
    plans = [_plan(k, result, models, chosen[k]) for k, result in enumerate(listed)]
    groups = list(dict.fromkeys((p.name, s) for p, s in zip(plans, chosen)))
    controls = {(name, s): control_words(models[name], s) for name, s in groups}
    out: dict[int, Verification] = {}
    for name, s in groups:
        rows = [k for k, p in enumerate(plans) if (p.name, chosen[k]) == (name, s)]
        chosen_plans = [plans[k] for k in rows]
        out.update(_verify_model(models[name], chosen_plans, rows, controls[(name, s)], s, batch_size, planned))
    return [out[k] for k in range(len(plans))]


def _own_settings(result: PatchscopeResult) -> VerifySettings:
    own = getattr(result.scope, "verify", None)
    return own if isinstance(own, VerifySettings) else VerifySettings()


def _listed(results: object) -> list[PatchscopeResult]:
    if isinstance(results, SweepResult):
        results = results.results
    listed = [results] if isinstance(results, PatchscopeResult) else results
    if not isinstance(listed, (list, tuple)) or not listed:
        raise SpecError(
            f"results={type(results).__name__} is not allowed (allowed: a PatchscopeResult, a non-empty list of "
            "them, or a SweepResult)"
        )
    for k, result in enumerate(listed):
        if not isinstance(result, PatchscopeResult):
            raise SpecError(f"results[{k}] is a {type(result).__name__} (allowed: a PatchscopeResult)")
    return list(listed)


def carried(tokenizer: object, carrier: str, text: str, field: str) -> Carried:
    """`text` in place of the carrier's placeholder (a leading space dropped where the carrier has one before it, so
    the reading ``' CEO'`` gives ``'Here is a word: CEO'``); its last token's index, and its number of tokens."""
    before, after = carrier.split(PLACEHOLDER)
    if before.endswith(" ") and text.startswith(" ") and text.strip():
        text = text[1:]
    if not text:
        raise SpecError(f"{field}={text!r} is empty (allowed: a reading with text to put into the carrier)")
    prompt = before + text + after
    _, offsets = encode(tokenizer, prompt)
    start, end = len(before), len(before) + len(text)
    inside = [k for k, (first, last) in enumerate(offsets) if first < end and last > start]
    if not inside:
        raise SpecError(
            f"{field}={text!r} gives no token in the carrier {prompt!r} (allowed: text the model's tokenizer encodes)"
        )
    return Carried(prompt, inside[-1], len(inside))


def control_words(handle: ModelHandle, settings: VerifySettings) -> list[str]:
    """The control words for `handle`: the user's, each checked to be one token in the carrier; or `controls` of the
    shipped words that are, drawn with `seed`."""
    carrier = settings.carrier
    if isinstance(settings.controls, tuple):
        split = [w for w in settings.controls if carried(handle.tokenizer, carrier, w, "control").tokens != 1]
        if split:
            raise SpecError(
                f"VerifySettings.controls {split} are not single tokens in the carrier on {handle.name} (allowed: "
                "words the model's tokenizer encodes as one token there)"
            )
        return list(settings.controls)
    single = [w for w in CONTROL_WORDS if carried(handle.tokenizer, carrier, w, "control").tokens == 1]
    if len(single) < settings.controls:
        raise SpecError(
            f"VerifySettings.controls={settings.controls} but only {len(single)} shipped words are single tokens in "
            f"the carrier on {handle.name} (allowed: {len(single)} or fewer, or a list of your own words)"
        )
    return random.Random(settings.seed).sample(single, settings.controls)


def _plan(k: int, result: PatchscopeResult, models: Models, settings: VerifySettings) -> Plan:
    scope = result.scope
    if not isinstance(scope, Patchscope):
        raise SpecError(
            f"results[{k}].scope is a {type(scope).__name__}: the result did not keep its source (allowed: a "
            "PatchscopeResult of run or sweep, which keeps its Patchscope)"
        )
    name = scope.source.model
    if name not in models:
        raise SpecError(
            f"results[{k}]: the check runs on the source model M={name!r}, where h came from, not on "
            f"M*={scope.target_model!r} (allowed: pass M's handle; loaded: {', '.join(sorted(models))})"
        )
    handle = models[name]
    text = _reading(k, result, settings.reading)
    reading = carried(handle.tokenizer, settings.carrier, text, f"results[{k}] reading")
    n = handle.n_layers
    layer = concrete_layer(f"results[{k}] Source", scope.source.layer, handle)
    if isinstance(scope.source, VectorSource):
        if scope.source.tensor.ndim != 1:
            raise SpecError(
                f"results[{k}] VectorSource.tensor has {scope.source.tensor.shape[0]} slots (allowed here: one "
                "vector [d], whose reading the cosine compares)"
            )
        site = hidden_state_site(handle.model, layer, n, layer == n - 1 and scope.source.after_final_norm)
        return Plan(name, site, reading, text, vector=scope.source.tensor)
    position = source_index(handle, scope.source)
    if position == 0:  # the existing sink warning, then the refusal: nothing runs
        warn_if_sink(position, handle.tokenizer, scope.source.prompt)
        first = handle.tokenizer.convert_ids_to_tokens(token_ids(handle.tokenizer, scope.source.prompt)[:1])[0]
        raise SpecError(
            f"results[{k}] Source.position resolves to token 0 ({first!r}), the attention sink, which no carrier "
            "state stands in for (allowed: a source at token 1 or later)"
        )
    own_text = handle.tokenizer.decode(token_ids(handle.tokenizer, scope.source.prompt)[position])
    own = carried(handle.tokenizer, settings.carrier, own_text, f"results[{k}] source token")
    return Plan(name, layer_site(handle, layer), reading, text, scope.source.prompt, position, own, own_text)


def _reading(k: int, result: PatchscopeResult, which: str) -> str:
    if which == "token":
        return result.top[0].token
    if result.generation is None:
        raise SpecError(
            f"results[{k}].generation is None (allowed with reading='generation': a result of a run with "
            "max_new_tokens > 0)"
        )
    return result.generation


def _verify_model(
    handle: ModelHandle,
    plans: list[Plan],
    rows: list[int],
    controls: list[str],
    settings: VerifySettings,
    batch_size: int,
    planned: bool,
) -> dict[int, Verification]:
    """The checks of one model's readings: every carrier state read in one pass per batch, then the rows of every
    layer l put back at one (S, i) together (`disruptions`), the controls of each (S, i, l) shared by its readings."""
    words = {w: carried(handle.tokenizer, settings.carrier, w, "control") for w in controls}
    units = [(c.prompt, c.last) for c in words.values()]
    units += [(p.reading.prompt, p.reading.last) for p in plans]
    units += [
        u
        for p in plans
        if p.own is not None and p.prompt is not None
        for u in ((p.prompt, p.position), (p.own.prompt, p.own.last))
    ]
    sites = list(dict.fromkeys(p.site for p in plans))
    read = read_states(handle, units, sites, batch_size)
    where = dict(zip(units, read.rows))

    def state(unit: tuple, site: Site) -> torch.Tensor:
        return read.states[where[unit], sites.index(site)]

    out: dict[int, Verification] = {}
    groups: dict[tuple, list[int]] = defaultdict(list)
    for k, p in enumerate(plans):
        if p.vector is None:
            groups[(p.prompt, p.position)].append(k)
        else:
            h = p.vector.to(handle.device)
            out[rows[k]] = Verification(
                p.text,
                "cannot tell",
                "a vector source has no prompt S to put the reading back into: the reconstruction cosine only",
                _cosine(h, state((p.reading.prompt, p.reading.last), p.site)),
            )
    for (prompt, position), members in groups.items():
        own = plans[members[0]].own
        assert own is not None  # a prompt's state: set by _plan
        rows_of = {  # per site of this (S, i): the texts put back there, controls first
            site: list(
                dict.fromkeys([*words.values(), *(plans[k].reading for k in members if plans[k].site == site), own])
            )
            for site in dict.fromkeys(plans[k].site for k in members)
        }
        texts = [(site, t) for site, listed in rows_of.items() for t in listed]
        vectors = torch.stack([state((t.prompt, t.last), site) for site, t in texts])
        found = disruptions(
            handle, prompt, position, [site for site, _ in texts], vectors, settings.positions, batch_size, planned
        )
        d = dict(zip(texts, found.tolist()))
        for site in rows_of:
            control_d = {w: d[(site, words[w])] for w in controls}
            self_score, _ = _rank(d[(site, own)], control_d)
            h = state((prompt, position), site)
            for k in (k for k in members if plans[k].site == site):
                p = plans[k]
                score, p_value = _rank(d[(site, p.reading)], control_d)
                verdict, reason = judge(score, p_value, self_score)
                out[rows[k]] = Verification(
                    reading=p.text,
                    verdict=verdict,
                    reason=reason,
                    cosine=_cosine(h, state((p.reading.prompt, p.reading.last), site)),
                    disruption=d[(site, p.reading)],
                    controls=control_d,
                    control_median=upper_median(control_d.values()),
                    score=score,
                    p_value=p_value,
                    self_text=p.own_text,
                    self_score=self_score,
                )
    return out


def _rank(d: float, controls: dict[str, float]) -> tuple[float | None, float]:
    """The score 1 - D / upper_median(controls) (None where the controls do not disrupt S at all) and the rank p-value
    (1 + the controls with D <= d) / (1 + the controls): a tie counts against the reading, and the reading itself is
    counted as one of the draws, so that under the null (the reading is one more random word) P(p <= a) <= a."""
    median = upper_median(controls.values())
    score = 1 - d / median if median > 0 else None
    return score, (1 + sum(c <= d for c in controls.values())) / (1 + len(controls))


def upper_median(values: Iterable[float]) -> float:
    """The upper median, ``sorted(values)[n // 2]``: an actual control's D (so that control scores 0), and the median
    issue 39's table was computed with (its control medians are the 21st of 40 values)."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def judge(score: float | None, p_value: float, self_score: float | None) -> tuple[str, str]:
    """The verdict and its reason: "cannot tell" where the self-check fails (`SELF_CHECK_SCORE`); else "supported"
    where the score and the rank both pass (`SUPPORTED_SCORE`, `SUPPORTED_P_VALUE`), else "not supported"."""
    if score is None or self_score is None:
        return "cannot tell", "the control words do not disrupt S at this layer (median D = 0)"
    if self_score < SELF_CHECK_SCORE:
        return "cannot tell", (
            f"the source token's own text put back scores {self_score:+.2f} (< {SELF_CHECK_SCORE}): the carrier does "
            "not reproduce what this layer holds"
        )
    if score >= SUPPORTED_SCORE and p_value <= SUPPORTED_P_VALUE:
        return "supported", f"score {score:+.2f} (>= {SUPPORTED_SCORE}), p = {p_value:.3f} (<= {SUPPORTED_P_VALUE})"
    return "not supported", (
        f"score {score:+.2f} (needs >= {SUPPORTED_SCORE}), p = {p_value:.3f} (needs <= {SUPPORTED_P_VALUE})"
    )


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.float().flatten(), b.float().flatten().to(a.device), dim=0))


__all__ = [
    "verify",
    "control_words",
    "carried",
    "judge",
    "SUPPORTED_SCORE",
    "SUPPORTED_P_VALUE",
    "SELF_CHECK_SCORE",
]
