"""The Future Lens (Pal et al., CoNLL 2023): its scoring, its preset, and its evaluation on SmolLM2."""

from __future__ import annotations

import re

import golden
import pytest
import torch

from pyvene_patchscopes import hidden_states
from pyvene_patchscopes.errors import SpecError
from pyvene_patchscopes.evaluate import TASKS, future
from pyvene_patchscopes.evaluate.common import EvalOptions
from pyvene_patchscopes.evaluate.scoring import MISSING, future_hits, repeat_guess
from pyvene_patchscopes.evaluate.stats import split
from pyvene_patchscopes.execution.engine import run as run_scopes
from pyvene_patchscopes.presets import FUTURE_LENS_PROMPT, PRESETS, build, future_lens
from pyvene_patchscopes.spec import Source
from pyvene_patchscopes.spec.positions import token_ids

PREFIXES = ["The quick brown fox jumps over the", "In the beginning God created the heaven and"]
INTERVAL = re.compile(r"^\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]$")


# ---- scoring ---------------------------------------------------------------------------------------------------------
def test_future_hits_scores_each_step_on_its_own():
    hits = future_hits([[1, 2, 3], [4, 9, 6]], torch.tensor([[1, 2, 3], [4, 5, 6]]), 3)
    assert hits.tolist() == [[True, True, True], [True, False, True]]  # a wrong step 2 does not void step 3


def test_a_generation_that_stops_early_misses_its_later_steps():
    assert future_hits([[1], [1, 2]], [[1, 2, 3], [1, 2, 3]], 3).tolist() == [[True, False, False], [True, True, False]]
    # both stopped after one token: the absent steps are misses, not matches of two absences
    assert future_hits([[1]], [[1]], 3).tolist() == [[True, False, False]]
    assert future_hits(torch.tensor([[MISSING, 2, 3]]), [[MISSING, 2, 3]], 3).tolist() == [[False, True, True]]


def test_future_hits_refuses_rows_that_do_not_pair():
    with pytest.raises(SpecError, match="one row of guesses per reference"):
        future_hits([[1, 2, 3]], [[1, 2, 3], [1, 2, 3]], 3)


def test_repeat_guess_guesses_the_next_token_for_every_step():
    guesses = repeat_guess(torch.tensor([7, 8]), 3)
    assert guesses.tolist() == [[7, 7, 7], [8, 8, 8]]
    assert future_hits(guesses, [[7, 5, 7], [1, 8, 8]], 3).tolist() == [[True, False, True], [False, True, True]]


def test_a_layer_is_chosen_on_dev_and_scored_on_test_or_else_on_all_texts():
    per_layer = {3: [1.0, 0.0, 1.0, 1.0], 5: [0.0, 1.0, 0.0, 0.0]}
    layer, interval, scored = future.choose_layer(per_layer, None, 0)  # the oracle: best on all texts
    assert (layer, interval.estimate, scored) == (3, 0.75, [0, 1, 2, 3])
    chosen = split(["a", "b", "c", "d"], 0)
    layer, interval, scored = future.choose_layer(per_layer, chosen, 0)
    dev = {l: sum(v[i] for i in chosen.dev) for l, v in per_layer.items()}
    assert layer == max(dev, key=dev.get) and scored == list(chosen.test)
    assert interval.estimate == sum(per_layer[layer][i] for i in chosen.test) / len(chosen.test)


def test_plain_paths_generated_ids_stop_at_the_first_eos_as_the_planned_paths_do():
    from pyvene_patchscopes.execution.plain import until_eos

    assert until_eos([5, 2, 2], eos_token_id=2) == [5, 2]  # after EOS, generate pads (SmolLM2 pads with EOS)
    assert until_eos([5, 6, 7], eos_token_id=2) == [5, 6, 7]


# ---- the preset ------------------------------------------------------------------------------------------------------
def test_future_lens_preset_patches_the_fixed_prompt_at_its_last_token_with_l_star_equal_l():
    scope = future_lens(Source("The cat sat on the", -1, 7))
    assert scope.target.prompt == FUTURE_LENS_PROMPT == 'Hello! Could you please tell me more about "'  # Pal et al.
    assert (scope.target.position, scope.target.layer, scope.max_new_tokens) == (-1, 7, 3)
    assert future_lens(Source("x", -1, 7), target_layer=2, max_new_tokens=5).target.layer == 2
    assert future_lens(Source("x", -1, 7), target_prompt="Tell me:").target.prompt == "Tell me:"
    assert PRESETS["future-lens"].recipe is future_lens
    assert build("future-lens", "The cat sat on the", layer=4) == future_lens(Source("The cat sat on the", -1, 4))
    assert TASKS["future"].module == "future" and list(TASKS).index("future") == list(TASKS).index("next-token") + 1


# ---- on SmolLM2 ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def report(smollm2, tmp_path_factory):
    out = tmp_path_factory.mktemp("future")
    return future.run(smollm2, EvalOptions(limit=4, layers=[16, 29]), str(out)), out


@pytest.mark.real_model
def test_eval_future_reports_three_steps_per_layer_with_intervals(report):
    report, out = report
    assert report.task == "future" and report.command == future.COMMAND
    assert report.settings["target prompt"] == FUTURE_LENS_PROMPT and report.settings["K (steps ahead)"] == 3
    assert report.settings["layers"] == [16, 29] and report.settings["layers chosen on"] == "dev split (50%)"
    table = report.tables[0]
    assert table.columns[0] == "layer" and len(table.columns) == 1 + 2 * 3
    assert [row[0] for row in table.rows] == [16, 29]
    assert all(INTERVAL.match(cell) for row in table.rows for cell in row[1:])
    n = report.summary["evaluation texts (one random position each)"]
    assert n >= 3 and set(report.data["hits"]) == {"future lens", "logit lens (repeated)"}
    assert all(
        len(rows) == n and all(len(r) == 3 for r in rows)
        for per in report.data["hits"].values()
        for rows in per.values()
    )
    dev, test = report.data["split"]["dev"], report.data["split"]["test"]
    assert sorted(dev + test) == list(range(n)) and not set(dev) & set(test)
    for step in (1, 2, 3):
        assert report.data["chosen layers"][f"step {step}"]["future lens"] in (16, 29)
        assert (
            "exact McNemar"
            in report.summary[f"step {step}: future lens - logit lens (repeated) at that layer, test split"]
        )
    assert report.figures == ["future.png"] and (out / "future.png").stat().st_size > 1000


@pytest.mark.real_model
def test_future_lens_step_1_at_the_last_layer_is_the_models_own_next_token(report):
    report, _ = report
    for method in ("future lens", "logit lens (repeated)"):  # both read the final-normed state's unembedding there
        assert {row[0] for row in report.data["hits"][method]["29"]} == {1}
    assert (
        report.summary["step 1: future lens Precision@1 at the last layer (exact: the model's own next token)"]
        == "1.000 [1.000, 1.000]"
    )


@pytest.mark.real_model
def test_the_reference_is_the_models_own_greedy_continuation(smollm2):
    reference = future.continuations(smollm2, PREFIXES, 3, batch_size=2)  # batched, left-padded
    for prefix, ids in zip(PREFIXES, reference):
        alone = smollm2.tokenizer(prefix, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = smollm2.model.generate(
                alone,
                attention_mask=torch.ones_like(alone),
                max_new_tokens=3,
                do_sample=False,
                pad_token_id=smollm2.tokenizer.pad_token_id,
            )
        assert ids == out[0, alone.shape[1] :].tolist()
    assert smollm2.tokenizer.decode(reference[0]).startswith(" lazy")


@pytest.mark.real_model
def test_future_lens_generation_equals_a_hand_written_forward_hook_patch(smollm2):
    layer = 16
    states = {layer: hidden_states(PREFIXES, smollm2, layer, batch_size=2)}
    guesses = future.future_guesses(smollm2, PREFIXES, [layer], states, EvalOptions(batch_size=4))[layer]
    position = len(token_ids(smollm2.tokenizer, FUTURE_LENS_PROMPT)) - 1  # the prompt's last token, ' "'
    scopes = [future_lens(Source(p, -1, layer, smollm2.name)) for p in PREFIXES]
    plain = run_scopes(scopes, smollm2, top=1, planned=False)  # pyvene's generate, not the planned stack
    for k, prefix in enumerate(PREFIXES):
        vector = golden.read(smollm2, prefix, layer, -1)
        expected, _ = golden.patched_generate(smollm2, FUTURE_LENS_PROMPT, layer, position, vector, 3)
        assert len(expected) == 3
        assert guesses[k] == expected
        assert plain[k].generated_ids == expected and plain[k].target_position == position
        assert smollm2.tokenizer.decode(expected, skip_special_tokens=True) == plain[k].generation
