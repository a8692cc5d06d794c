"""The evaluations' scoring functions on hand-made cases, and their model-side helpers on tiny models."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from docs_text import page
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pyvene_patchscopes import Patchscope, Source, SpecError, Target, hidden_states, run
from pyvene_patchscopes.analysis.fit import aligned_positions
from pyvene_patchscopes.evaluate import data
from pyvene_patchscopes.evaluate.attributes import fill, round_robin, source_prompt
from pyvene_patchscopes.evaluate.common import generate, lens_logits, sample_prefix
from pyvene_patchscopes.evaluate.entities import description
from pyvene_patchscopes.evaluate.probe import probe_accuracy
from pyvene_patchscopes.evaluate.scoring import (
    cut_at_next_example,
    object_in_generation,
    precision_at_1,
    rouge_l,
    same_token,
    saturation_layer,
    stages,
    starts_word,
    surprisal,
)


# ---- §4.1 metrics ---------------------------------------------------------------------------------------
def test_precision_at_1_compares_argmaxes_and_surprisal_is_the_source_log_prob_of_the_readout():
    source = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]]))
    patched = torch.tensor([[5.0, 1.0, 0.0], [0.0, 1.0, 9.0]])
    assert precision_at_1(patched, source).tolist() == [1.0, 0.0]
    torch.testing.assert_close(surprisal(patched, source), torch.tensor([-math.log(0.7), -math.log(0.3)]))


# ---- §4.2 object in the generation -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "generation,answer,aliases,expected",
    [
        (" Paris, the city of light", "Paris", (), True),
        (" paris.", "Paris", (), True),
        (" New   York City", "New York", (), True),
        (" the euros are", "euro", (), True),
        (" the European Union", "euro", (), False),  # a substring is not the object
        (" bored", "red", (), False),
        (" the US dollar", "United States dollar", ("dollar",), True),
        (" Berlin", "Paris", (), False),
        ("", "Paris", (), False),
    ],
)
def test_object_in_generation_matches_whole_words(generation, answer, aliases, expected):
    assert object_in_generation(generation, answer, aliases) is expected


def test_fill_replaces_only_the_placeholder_word():
    assert fill("The capital city of x is", "France") == "The capital city of France is"
    assert fill("x is next to the box", "Oslo") == "Oslo is next to the box"
    assert source_prompt({"subject_kind": "animal", "subject": "owl"}) == "Here is an animal: owl"


def test_round_robin_interleaves_relations_and_caps_each():
    facts = [{"relation": r, "n": k} for r in "ab" for k in range(3)] + [{"relation": "c", "n": 0}]
    picked = round_robin(facts, 2)
    assert [(f["relation"], f["n"]) for f in picked] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1)]


def test_probe_learns_separable_classes_and_cannot_name_an_unseen_label():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 16, generator=generator) * 4
    labels = ["red", "green", "blue"] * 10
    features = torch.stack([centres[k % 3] for k in range(30)]) + 0.3 * torch.randn(30, 16, generator=generator)
    assert sum(probe_accuracy(features, labels)) >= 28
    unique = [f"object {k}" for k in range(30)]  # one object per subject, as capitals: nothing to generalise
    assert sum(probe_accuracy(features, unique)) == 0


# ---- §4.3 descriptions ---------------------------------------------------------------------------------------
def test_rouge_l_is_the_lcs_f1_of_words():
    assert rouge_l("German physicist", "German-born theoretical physicist") == pytest.approx(2 / 3)
    assert rouge_l("capital city of France", "Capital city of France") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l("a b", "c d") == 0.0
    assert rouge_l("b a", "a b") == pytest.approx(0.5)  # order matters: the LCS is one word


def test_description_is_the_first_example_after_the_name():
    assert description(" Albert Einstein: German physicist, Paris: capital") == "German physicist"
    assert description(": American actor\nSyria: ...") == "American actor"
    assert cut_at_next_example("a, b\nc") == "a"


# ---- §4.4 prefix alignment across tokenizers -------------------------------------------------------------------
def _char_tokenizer() -> PreTrainedTokenizerFast:
    """Every character its own token (no merges), no special tokens added."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: k for k, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _word_tokenizer() -> PreTrainedTokenizerFast:
    """Whole words with their leading space, and a BOS before the text."""
    words = ["The", "Ġcat", "Ġsat", "Ġon", "Ġthe", "Ġmat", "."]
    vocab = {"<s>": 0, **{w: k + 1 for k, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<s>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


def test_prefix_alignment_pairs_tokens_where_both_have_read_the_same_text():
    text = "The cat sat on the mat."
    chars, words = SimpleNamespace(tokenizer=_char_tokenizer()), SimpleNamespace(tokenizer=_word_tokenizer())
    pairs = aligned_positions(text, chars, words)
    # word k (1-based after <s>) ends at these character indices; the first word is left out (sink-adjacent)
    ends = {"cat": 6, "sat": 10, "on": 13, "the": 17, "mat": 21, ".": 22}
    assert pairs == [(end, k + 2) for k, end in enumerate(ends.values())]
    reverse = aligned_positions(text, words, chars)
    assert reverse == [(j, i) for i, j in pairs]


def test_prefix_alignment_finds_nothing_when_the_texts_read_differ():
    chars = SimpleNamespace(tokenizer=_char_tokenizer())
    words = SimpleNamespace(tokenizer=_word_tokenizer())
    assert aligned_positions("A dog ran.", chars, words) == []  # every word is unknown: decodes to "<s>"


def test_same_token_ignores_surrounding_spaces_only():
    assert same_token(" Paris", "Paris") and not same_token(" Paris", " paris") and not same_token(" ", "")


# ---- stages ---------------------------------------------------------------------------------------------------
def test_stages_label_argument_then_answer_and_find_saturation():
    readouts = [" the", " Pol", " Poland", " War", " Warsaw", " Warsaw"]
    assert stages(readouts, "Poland", "Warsaw") == ["other", "argument", "argument", "answer", "answer", "answer"]
    assert saturation_layer([False, True, False, True, True]) == 3
    assert saturation_layer([True, True, False]) is None
    assert not starts_word(" W", "Warsaw")  # too short to name the answer


# ---- model-side helpers on tiny models -----------------------------------------------------------------------
def test_lens_logits_equal_the_pyvene_logit_lens_patchscope(tiny_llama):
    prompt = "the cat sat on the mat and"
    last = tiny_llama.n_layers - 1
    states = hidden_states([prompt], tiny_llama, [1, last], batch_size=4)
    for k, layer in enumerate((1, last)):
        scope = Patchscope(Source(prompt, -1, layer, tiny_llama.name), Target(prompt, -1, last))
        engine = run(scope, tiny_llama)[0].logits
        torch.testing.assert_close(
            lens_logits(tiny_llama, states[:, k], normalised=layer == last)[0], engine, atol=1e-4, rtol=0
        )


def test_attribute_logit_lens_names_the_object_when_the_logit_lens_patchscopes_top_token_begins_it(tiny_llama):
    """The attributes baseline is the paper's logit lens on the subject's state (T = S, f = I, l* = last), run
    here through the engine; a fact counts when that top-1 token is the first token of its object or an alias."""
    from pyvene_patchscopes.evaluate.attributes import first_tokens, logit_lens

    tokenizer, last = tiny_llama.tokenizer, tiny_llama.n_layers - 1
    checked = set()
    for subject in ("Paris", "the river", "a cat", "Rome", "the mat", "Seine"):  # a random model's top token is
        prompt = source_prompt({"subject_kind": "city", "subject": subject})  # often a byte: find whole words
        for layer in (2, last):
            engine = run(Patchscope(Source(prompt, -1, layer, tiny_llama.name), Target(prompt, -1, last)), tiny_llama)
            first, second = engine[0].logits.topk(2).indices.tolist()
            top, runner_up = (tokenizer.decode([t]).strip() for t in (first, second))
            if layer in checked or not top.isalpha() or first not in first_tokens(tokenizer, {"object": top}):
                continue
            facts = [{"object": top}, {"object": runner_up}, {"object": runner_up, "aliases": [top]}, {"object": " "}]
            state = hidden_states([prompt], tiny_llama, layer, batch_size=4)
            assert logit_lens(tiny_llama, facts, {layer: state.expand(4, -1)}) == {layer: [True, False, True, False]}
            checked.add(layer)
    assert checked == {2, last}


def _dummy_prefix_tokenizer() -> PreTrainedTokenizerFast:
    """Llama 2's and Mistral's tokenizer.json, built offline: the normalizer puts '▁' before the text and turns each
    space into '▁', so " Paris" is ['▁', '▁Paris'] while "Paris" is ['▁Paris'] (BPE; merges spell each word)."""
    vocab, merges = {"<unk>": 0}, []
    for word in ("▁Paris", "▁Rome", "▁Madrid"):
        for character in word:
            vocab.setdefault(character, len(vocab))
        for k in range(2, len(word) + 1):
            if word[:k] not in vocab:
                merges.append((word[: k - 1], word[k - 1]))
                vocab[word[:k]] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def test_a_dummy_prefixs_lone_space_never_counts_as_the_first_token_of_an_object(monkeypatch):
    """Issue 36 review: the attribute logit lens kept the first id of " " + object, which a dummy-prefix tokenizer
    makes its lone '▁' for every object, so a lens whose top-1 is that space named every fact (and the stages
    evaluation read the answer's probability off the same space). The probe and the Patchscope score text."""
    from pyvene_patchscopes.evaluate import attributes, stages

    tokenizer = _dummy_prefix_tokenizer()
    space, paris, rome, madrid = tokenizer.convert_tokens_to_ids(["▁", "▁Paris", "▁Rome", "▁Madrid"])
    assert tokenizer(" Paris", add_special_tokens=False)["input_ids"] == [space, paris]
    facts = [{"object": "Paris"}, {"object": "Rome"}, {"object": "Madrid", "aliases": ["Paris"]}]
    assert [attributes.first_tokens(tokenizer, fact) for fact in facts] == [{paris}, {rome}, {madrid, paris}]
    vocab = len(tokenizer)
    monkeypatch.setattr(
        attributes,
        "lens_logits",  # a lens whose top-1 token is the state's one entry
        lambda handle, states, normalised: torch.nn.functional.one_hot(states[:, 0], vocab).float(),
    )
    tops = {0: torch.full((3, 1), space), 1: torch.full((3, 1), paris)}
    handle = SimpleNamespace(tokenizer=tokenizer, n_layers=2)
    assert attributes.logit_lens(handle, facts, tops) == {0: [False, False, False], 1: [True, False, True]}
    on_space = torch.nn.functional.one_hot(torch.tensor(space), vocab).float() * 20
    assert stages._prob_of(handle, on_space, "Paris") < 1e-6  # the answer's own first token, not the space

    from pyvene_patchscopes.evaluate.scoring import first_word_id  # the one helper both use

    assert first_word_id(tokenizer, " Paris") == first_word_id(tokenizer, "Paris") == paris
    assert first_word_id(tokenizer, " ") is None


def test_sampled_prefixes_never_cut_at_the_sink_and_retokenise_the_same(tiny_llama):
    import random

    rng = random.Random(0)
    text = "The river Seine is long and the city of Paris is large."
    tokenizer = tiny_llama.tokenizer
    full = tokenizer(text)["input_ids"]
    for _ in range(20):
        prefix = sample_prefix(tiny_llama, text, rng)
        ids = tokenizer(prefix)["input_ids"]
        assert len(ids) >= 3 and ids == full[: len(ids)]


def test_batched_generation_equals_one_prompt_at_a_time(tiny_llama):
    prompts = ["the cat", "the river Seine is long and", "a"]
    together = generate(tiny_llama, prompts, max_new_tokens=5, batch_size=8, progress=False)
    alone = [generate(tiny_llama, [p], max_new_tokens=5, progress=False)[0] for p in prompts]
    assert together == alone


# ---- data ------------------------------------------------------------------------------------------------------
def test_shipped_facts_cover_eight_relations_of_twenty_subjects_in_both_categories():
    facts = data.rows(data.load_jsonl("facts"))
    by_relation: dict[str, int] = {}
    for fact in facts:
        by_relation[fact["relation"]] = by_relation.get(fact["relation"], 0) + 1
        assert fill(fact["template"], fact["subject"]) != fact["template"]
    assert len(by_relation) >= 8 and min(by_relation.values()) >= 20
    assert {f["category"] for f in facts} == {"factual", "commonsense"}


def test_shipped_entities_and_multihop_sets_load_with_their_fields():
    entities = data.rows(data.load_jsonl("entities"))
    assert {e["popularity"] for e in entities} == {"popular", "rare"}
    queries = data.rows(data.load_jsonl("multihop"))
    assert len(queries) >= 40 and all(q["bridge"] in q["hop2_prompt"] for q in queries)


def test_user_jsonl_missing_a_field_or_malformed_is_refused_by_name(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"relation": "r", "subject": "s"}) + "\n")
    with pytest.raises(SpecError, match="lacks field.*template"):
        data.load_jsonl("facts", path)
    path.write_text("{not json\n")
    with pytest.raises(SpecError, match="not valid JSONL"):
        data.load_jsonl("facts", path)
    with pytest.raises(SpecError, match="is not a file"):
        data.load_jsonl("facts", tmp_path / "absent.jsonl")


def test_prose_splits_are_disjoint_and_seeded():
    splits = data.prose_splits(50, 20, seed=3)
    assert not set(splits["train"]["text"]) & set(splits["evaluation"]["text"])
    assert data.prose_splits(50, 20, seed=3)["evaluation"]["text"] == splits["evaluation"]["text"]
    with pytest.raises(SpecError, match="n_train \\+ n_eval"):
        data.prose_splits(10_000, 1)


def test_eval_all_runs_attributes_multihop_and_verify_on_both_embedded_models(monkeypatch, tmp_path):
    """`eval all` adds the second model's columns, each in its own folder, with that model's default layer grid."""
    import pyvene_patchscopes.evaluate as evaluate
    from pyvene_patchscopes.evaluate import EvalOptions, Report, run_all

    calls = []

    def fake(name, load, options, out, source="smollm2-135m", target="gemma3-270m"):
        calls.append((name, source, Path(out).name, options.layers))
        model = f"{source} -> {target}" if name == "cross-model" else source
        return Report(
            task=name,
            title=name,
            model=model,
            command=f"patchscopes eval {name}",
            settings={},
            summary={"accuracy": "0.500 [0.250, 0.750]"},
            seconds=1.0,
        )

    monkeypatch.setattr(evaluate, "run_task", fake)
    reports = run_all(lambda name: None, EvalOptions(layers=[27]), tmp_path)
    assert [c[:3] for c in calls[-3:]] == [
        ("attributes", "gemma3-270m", "attributes-gemma3-270m"),
        ("multihop", "gemma3-270m", "multihop-gemma3-270m"),
        ("verify", "gemma3-270m", "verify-gemma3-270m"),
    ]
    assert [c[0] for c in calls[:-3]] == list(evaluate.TASKS) and {c[1] for c in calls[:-3]} == {"smollm2-135m"}
    assert [c[3] for c in calls] == [[27]] * len(evaluate.TASKS) + [None] * 3  # 27 is out of Gemma's range
    index = (tmp_path / "README.md").read_text()
    assert "(multihop-gemma3-270m/report.md)" in index and "(multihop/report.md)" in index
    assert "(cross-model/report.md)" in index and "(verify-gemma3-270m/report.md)" in index
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary) == {*evaluate.TASKS, *(f"{task}-gemma3-270m" for task in evaluate.ON_BOTH_MODELS)}
    assert len(reports) == len(evaluate.TASKS) + 3


# ---- --data: the fields a user's JSONL needs, listed from one table -------------------------------------------
def test_eval_help_and_readme_list_the_fields_of_each_tasks_data_from_one_table(capsys):
    from pyvene_patchscopes.cli import main
    from pyvene_patchscopes.evaluate import TASKS, data_fields

    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    help_text = capsys.readouterr().out
    assert data_fields() in help_text and data_fields(markdown=True) in page("guides/paper")
    readers = {task.name: task.data for task in TASKS.values() if task.data is not None}
    assert readers == {"attributes": "facts", "entities": "entities", "multihop": "multihop", "jacobian": "texts"}
    for kind in readers.values():
        for field in data.FIELDS[kind]:
            assert f"    {field.name}{'' if field.required else ' (optional)'}: {field.meaning}" in help_text
            assert f"`{field.name}`" in data_fields(markdown=True)
        if kind != "texts":  # the shipped rows carry every listed field, so the listing is the loader's own
            assert set(data.load_jsonl(kind).column_names) >= {f.name for f in data.FIELDS[kind]}
    assert data.REQUIRED["facts"] == ("relation", "category", "subject_kind", "template", "subject", "object")


def test_user_rows_lacking_each_listed_required_field_are_refused_by_its_name(tmp_path):
    shipped = {kind: data.rows(data.load_jsonl(kind), 1)[0] for kind in ("facts", "entities", "multihop")}
    shipped["texts"] = {"text": "The capital of France is Paris."}
    for kind, row in shipped.items():
        for field in data.FIELDS[kind]:
            path = tmp_path / f"{kind}-{field.name}.jsonl"
            path.write_text(
                json.dumps({"note": "other fields are ignored", **{k: v for k, v in row.items() if k != field.name}})
                + "\n"
            )
            if field.required:
                with pytest.raises(SpecError, match=f"lacks field\\(s\\) {field.name} "):
                    data.load_jsonl(kind, path)
            else:
                assert data.load_jsonl(kind, path).num_rows == 1


def test_data_for_a_task_that_reads_none_or_for_eval_all_is_refused_before_any_model_loads(tmp_path):
    from pyvene_patchscopes.evaluate import EvalOptions, run_all, run_task

    def load(name):
        raise AssertionError("no model may load")

    options = EvalOptions(data=str(tmp_path / "mine.jsonl"))
    with pytest.raises(
        SpecError,
        match=r"--data='.*mine.jsonl' is not read by next-token \(allowed: --data with "
        r"attributes, entities, multihop, jacobian\)$",
    ):
        run_task("next-token", load, options, tmp_path / "out")
    with pytest.raises(SpecError, match=r"is not allowed with eval all \(allowed: --data with one task: "):
        run_all(load, options, tmp_path / "all")
    assert not (tmp_path / "out").exists() and not (tmp_path / "all").exists()
