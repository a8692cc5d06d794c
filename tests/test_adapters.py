"""Trained decoders as M* (issue 27): a PEFT LoRA adapter on the target model, equal to hand-written hooks on the
adapted forward on both paths, the base model left as it was, the adapter's identity in the spec, and the refusals.

The golden reference calls the PeftModel itself (its own forward, adapters as peft runs them) with a forward hook on
the block that writes at the slots, as pyvene's tests patch by hand.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from golden import WRITES, _generate_hooked, block, encode, read
from peft import LoraConfig, PrefixTuningConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from tiny import FAMILIES, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

from pyvene_patchscopes import (
    Patchscope,
    Source,
    SpecError,
    Target,
    load_model,
    load_patchscope,
    run,
    save_patchscope,
    wrap_model,
)
from pyvene_patchscopes.errors import ContextLengthWarning, SlowPathWarning
from pyvene_patchscopes.models.adapters import identity
from pyvene_patchscopes.presets import activation_oracle, latentqa, oracle_prompt
from pyvene_patchscopes.spec import Every, VectorSource
from pyvene_patchscopes.spec.positions import encode as encode_with_offsets, resolve_slots

PROMPT = "the word x means x and x"
SOURCE = "The capital city of Paris is large"


def _lora(model, seed: int = 0, targets="all-linear", r: int = 4):
    """A LoRA with random A and B (peft's default B = 0 would make the adapter the identity)."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config).eval()


def _pair(kind: str, seed: int = 5):
    """(base handle, adapted handle): the adapter sits on a copy, so the base is a separate model."""
    base = tiny_model(kind, seed=seed)
    peft_model = _lora(copy.deepcopy(base.model))
    return base, wrap_model(peft_model, base.tokenizer, name=f"{base.name}+lora")


def _hooked_logits(
    peft_model,
    handle,
    prompt: str,
    layer: int,
    slots: list[int],
    vectors: torch.Tensor,
    write: str = "replace",
    alpha: float = 1.0,
) -> torch.Tensor:
    """Last-position logits of the PeftModel's own forward with `vectors` written at `slots` after block `layer`."""
    formula = WRITES[write]

    def hook(mod, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        for k, slot in enumerate(slots):
            hidden[0, slot] = formula(hidden[0, slot].clone(), vectors[k] if vectors.ndim == 2 else vectors, alpha)
        return out

    handle_ = block(peft_model.get_base_model(), layer).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return peft_model(input_ids=encode(handle, prompt)).logits[0, -1]
    finally:
        handle_.remove()


def _logits(model, handle, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=encode(handle, prompt)).logits[0]


def _lora_state(peft_model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in peft_model.state_dict().items()}


def _slots(handle, target) -> list[int]:
    return list(
        resolve_slots(
            handle.tokenizer, target.prompt, target.position, encode_with_offsets(handle.tokenizer, target.prompt)
        )
    )


@pytest.mark.parametrize("kind", FAMILIES)
def test_a_patchscope_into_a_lora_decoder_equals_hooks_on_the_adapted_forward_on_both_paths(kind):
    base, adapted = _pair(kind)
    peft_model = adapted.peft
    before_base, before_state = _logits(base.model, base, PROMPT), _lora_state(peft_model)
    scopes = [
        Patchscope(Source(SOURCE, "Paris", 2, base.name), Target(PROMPT, 2, 1, model=adapted.name)),
        Patchscope(
            Source(SOURCE, "Paris", 2, base.name),
            Target(PROMPT, Every("x"), 1, model=adapted.name, write="norm-matched-add", alpha=0.7),
        ),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlowPathWarning)  # the planned execution runs the adapted model
        planned = run(scopes, [base, adapted], top=3)
    plain = run(scopes, [base, adapted], top=3, planned=False)
    state = read(base, SOURCE, 2, planned[0].source_position)
    for scope, fast, slow in zip(scopes, planned, plain):
        slots = _slots(adapted, scope.target)
        want = _hooked_logits(peft_model, adapted, PROMPT, 1, slots, state, scope.target.write, scope.target.alpha)
        for got in (fast, slow):
            torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)
            assert got.top[0].token_id == int(want.argmax())
        with peft_model.disable_adapter():
            unadapted = _hooked_logits(
                peft_model, adapted, PROMPT, 1, slots, state, scope.target.write, scope.target.alpha
            )
        assert not torch.allclose(unadapted, want, atol=1e-3)  # the adapter is in play
    # the base model and the adapter are as they were: nothing merged, unmerged, disabled or changed
    torch.testing.assert_close(_logits(base.model, base, PROMPT), before_base, atol=0, rtol=0)
    after = _lora_state(peft_model)
    assert after.keys() == before_state.keys() and all(torch.equal(after[k], before_state[k]) for k in after)
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.merged for m in layers) and not any(m.disable_adapters for m in layers)
    assert peft_model.active_adapters == ["default"]


def test_generation_through_a_lora_decoder_equals_hooks_on_both_paths():
    base, adapted = _pair("llama")
    scope = Patchscope(
        Source(SOURCE, "Paris", 2, base.name),
        Target(PROMPT, Every("x"), 1, model=adapted.name, write="add", alpha=2.0),
        max_new_tokens=4,
    )
    planned, plain = run(scope, [base, adapted])[0], run(scope, [base, adapted], planned=False)[0]
    state = read(base, SOURCE, 2, planned.source_position)
    slots = _slots(adapted, scope.target)

    def hook(mod, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[1] > 1:  # the prompt pass only
            for slot in slots:
                hidden[0, slot] = hidden[0, slot] + 2.0 * state
        return out

    want, _ = _generate_hooked(adapted, PROMPT, block(adapted.model, 1).register_forward_hook(hook), 4)
    assert planned.generated_ids == plain.generated_ids == want


def test_load_model_applies_an_adapter_folder_without_merging_and_records_its_identity(tmp_path):
    base = tiny_model("llama", seed=5)
    base.model.save_pretrained(tmp_path / "tiny")
    base.tokenizer.save_pretrained(tmp_path / "tiny")
    peft_model = _lora(copy.deepcopy(base.model))
    peft_model.save_pretrained(tmp_path / "oracle")
    loaded = load_model(str(tmp_path / "tiny"), adapter=tmp_path / "oracle")
    assert loaded.name == f"{tmp_path / 'tiny'}+oracle"
    assert loaded.origin["adapter"] == identity(peft_model)  # same config fields and weights hash as in memory
    record = loaded.origin["adapter"]["adapters"][0]
    assert record["config"]["peft_type"] == "LORA" and record["config"]["r"] == 4
    layers = [m for m in loaded.peft.modules() if isinstance(m, LoraLayer)]
    assert layers and not any(m.merged for m in layers)
    in_memory = wrap_model(peft_model, base.tokenizer, name=loaded.name)
    scope = Patchscope(Source(SOURCE, "Paris", 2, loaded.name), Target(PROMPT, 2, 1))
    torch.testing.assert_close(run(scope, loaded)[0].logits, run(scope, in_memory)[0].logits, atol=1e-5, rtol=0)


def test_the_spec_records_the_adapter_and_refuses_another_one_on_load(tmp_path):
    base, adapted = _pair("llama")
    scope = Patchscope(Source(SOURCE, "Paris", 2, base.name), Target(PROMPT, 2, 1, model=adapted.name))
    folder = save_patchscope(scope, tmp_path / "spec", models=[base, adapted])
    saved = json.loads((folder / "config.json").read_text())["models"]
    assert saved[adapted.name]["adapter"] == identity(adapted.peft) and "adapter" not in saved[base.name]
    assert load_patchscope(folder, models=[base, adapted]) == scope
    other = wrap_model(_lora(copy.deepcopy(base.model), seed=1), base.tokenizer, name=adapted.name)
    with pytest.raises(SpecError, match=r"its adapter is default \(LORA, r=4, weights [0-9a-f]{12}\) in hand") as err:
        load_patchscope(folder, models=[base, other])
    assert "\n" not in str(err.value)
    with torch.no_grad():  # trained further in place: the record is the adapter as it is now
        next(m for m in adapted.peft.modules() if isinstance(m, LoraLayer)).lora_A["default"].weight.add_(0.01)
    again = save_patchscope(scope, tmp_path / "again", models=[base, adapted])
    resaved = json.loads((again / "config.json").read_text())
    assert resaved["models"][adapted.name]["adapter"] == identity(adapted.peft) != saved[adapted.name]["adapter"]
    bare = wrap_model(copy.deepcopy(base.model), base.tokenizer, name=adapted.name)
    with pytest.raises(SpecError, match="saved with a PEFT adapter on it, the model in hand has none"):
        load_patchscope(folder, models=[base, bare])


def test_a_base_and_its_adapted_self_under_two_names_are_refused():
    base = tiny_model("llama", seed=5)
    peft_model = _lora(base.model)  # in place: base.model's linear layers now run the adapter
    adapted = wrap_model(peft_model, base.tokenizer, name="adapted")
    scope = Patchscope(Source(SOURCE, "Paris", 2, base.name), Target(PROMPT, 2, 1, model="adapted"))
    with pytest.raises(SpecError, match="are one model: peft applied 'adapted'"):
        run(scope, [base, adapted])


# ---- refusals: one line each, and nothing is loaded or run -------------------------------------------------------
def _refused(folder, adapter, match: str) -> None:
    with pytest.raises(SpecError, match=match) as err:
        load_model(str(folder), adapter=adapter)
    assert "\n" not in str(err.value)


def test_an_adapter_for_a_base_model_of_another_width_is_refused(tiny_folder, tmp_path):
    narrow = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    _lora(narrow).save_pretrained(tmp_path / "narrow")
    _refused(
        tiny_folder,
        tmp_path / "narrow",
        r"adapts 'model\.layers\.\d+\.\S+' with (input|output) width \d+, but "
        r".*'s has \d+, so it was trained on another base model \(allowed: an "
        r"adapter for .*, hidden size 64\)",
    )


def test_an_adapter_for_a_base_model_with_other_module_names_is_refused(tiny_folder, tmp_path):
    gpt2 = tiny_model("gpt2", seed=5)
    _lora(copy.deepcopy(gpt2.model)).save_pretrained(tmp_path / "gpt2-lora")
    _refused(tiny_folder, tmp_path / "gpt2-lora", r"adapts module 'transformer\.h\.\d+\.\S+', which .* does not have")


def test_an_adapter_folder_with_a_link_outside_it_is_refused(tiny_folder, tmp_path):
    base = tiny_model("llama", seed=5)
    _lora(copy.deepcopy(base.model)).save_pretrained(tmp_path / "real")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "adapter_config.json").write_text((tmp_path / "real" / "adapter_config.json").read_text())
    os.symlink(tmp_path / "real" / "adapter_model.safetensors", linked / "adapter_model.safetensors")
    _refused(tiny_folder, linked, r"'adapter_model\.safetensors' is a link to a path outside the folder")


def test_a_pickled_adapter_and_a_prompt_learning_adapter_are_refused(tiny_folder, tmp_path):
    base = tiny_model("llama", seed=5)
    pickled = tmp_path / "pickled"
    _lora(copy.deepcopy(base.model)).save_pretrained(pickled, safe_serialization=False)
    assert (pickled / "adapter_model.bin").exists() and not (pickled / "adapter_model.safetensors").exists()
    _refused(tiny_folder, pickled, r"holds adapter_model\.bin, a pickle, which can run code when loaded")
    prefix = tmp_path / "prefix"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(
            copy.deepcopy(base.model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
        ).save_pretrained(prefix)
    _refused(tiny_folder, prefix, r"is a PREFIX_TUNING adapter, which adds virtual tokens")
    _refused(tiny_folder, tmp_path / "nowhere", r"adapter='.*nowhere' is not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    save_file({"x": torch.zeros(2)}, str(empty / "adapter_model.safetensors"))
    _refused(tiny_folder, empty, r"has no adapter_config\.json")


# ---- the presets -----------------------------------------------------------------------------------------------
def test_activation_oracle_preset_adds_norm_matched_at_the_first_k_placeholders_at_layer_1():
    base, adapted = _pair("llama")
    torch.manual_seed(3)
    vectors = torch.randn(3, base.hidden_size)
    scope = activation_oracle(
        VectorSource(vectors, 2, base.name, "three"), decoder=adapted.name, question="What is it?", max_new_tokens=0
    )
    assert scope.target.prompt == oracle_prompt("What is it?", 2, 3) and scope.target.layer == 1
    assert (scope.target.write, scope.target.alpha) == ("norm-matched-add", 1.0)
    slots = _slots(adapted, scope.target)
    tokens = encode(adapted, scope.target.prompt)[0].tolist()
    question = len(tokens) - 1 - tokens[::-1].index(tokens[slots[0]])  # the question's own "?"
    assert len(slots) == 3 and slots[-1] < question  # the three placeholders, not the question's "?"
    assert all(adapted.tokenizer.decode(tokens[s]).strip() == "?" for s in slots)
    for got in (run(scope, [base, adapted])[0], run(scope, [base, adapted], planned=False)[0]):
        want = _hooked_logits(adapted.peft, adapted, scope.target.prompt, 1, slots, vectors, "norm-matched-add", 1.0)
        torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)


def test_latentqa_preset_replaces_its_placeholders_at_layer_0():
    base, adapted = _pair("llama")
    scope = latentqa(Source(SOURCE, "Paris", 2, base.name), decoder=adapted.name, max_new_tokens=0)
    assert scope.target.layer == 0 and scope.target.write == "replace" and "reflect" in scope.target.prompt
    slots = _slots(adapted, scope.target)
    assert len(slots) == 1 and scope.target.prompt.count("?") == 2  # the placeholder, then the question's
    with warnings.catch_warnings():  # the tiny tokenizer spells the chat tags byte by byte: past 128 positions
        warnings.simplefilter("ignore", ContextLengthWarning)
        got = run(scope, [base, adapted])[0]
    state = read(base, SOURCE, 2, got.source_position)
    want = _hooked_logits(adapted.peft, adapted, scope.target.prompt, 0, slots, state)
    torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)


def test_every_first_k_round_trips_and_too_few_placeholders_are_refused(tmp_path):
    handle = tiny_model("llama", seed=5)
    scope = Patchscope(Source(SOURCE, "Paris", 2, handle.name), Target("a ? ? b ? c?", Every("?", first=2), 1))
    folder = save_patchscope(scope, tmp_path / "spec", models=[handle])
    assert json.loads((folder / "config.json").read_text())["target"]["position"] == {"every": "?", "first": 2}
    assert load_patchscope(folder) == scope
    assert len(_slots(handle, scope.target)) == 2
    with pytest.raises(SpecError, match=r"the placeholder occurs 4 times in Target.prompt \(allowed: first in 1..4\)"):
        run(scope.replace(target=Target("a ? ? b ? c?", Every("?", first=5), 1)), handle)
    with pytest.raises(SpecError, match=r"Every.first=0 is not allowed"):
        Every("?", first=0)


def test_an_activation_oracle_on_smollm2_with_a_lora_equals_hooks_on_both_paths(smollm2):
    """The real model: SmolLM2 with a small random LoRA as the oracle, three vectors, four tokens generated."""
    peft_model = _lora(copy.deepcopy(smollm2.model), targets=["q_proj", "v_proj"], r=2)
    oracle = wrap_model(peft_model, smollm2.tokenizer, name="smollm2-135m+oracle")
    states = torch.stack([read(smollm2, "Here is a city: Paris", 15, p) for p in (-3, -2, -1)])
    scope = activation_oracle(
        VectorSource(states, 15, smollm2.name, "paris"),
        decoder=oracle.name,
        tokenizer=smollm2.tokenizer,
        question="Which city is it?",
        max_new_tokens=0,
    )
    assert "Layer: 15\n ? ? ? \nWhich city is it?" in scope.target.prompt
    slots = _slots(oracle, scope.target)
    assert slots == list(range(slots[0], slots[0] + 3))  # SmolLM2 has " ?" as one token: three in a row
    want = _hooked_logits(peft_model, oracle, scope.target.prompt, 1, slots, states, "norm-matched-add", 1.0)
    for got in (run(scope, [smollm2, oracle])[0], run(scope, [smollm2, oracle], planned=False)[0]):
        torch.testing.assert_close(got.logits, want, atol=1e-3, rtol=0)
        assert got.top[0].token_id == int(want.argmax())
    with peft_model.disable_adapter():
        plain = _hooked_logits(peft_model, oracle, scope.target.prompt, 1, slots, states, "norm-matched-add", 1.0)
    assert not torch.allclose(plain, want, atol=1e-2)


@pytest.mark.parametrize("tuner", ["loha", "ia3", "dora"])
def test_other_in_place_tuners_equal_hooks_on_both_paths(tuner, tmp_path):
    """LoHa, IA3 and DoRA change weights in place as LoRA does; each is saved, loaded through the folder checks and
    run on both paths."""
    from peft import IA3Config, LoHaConfig

    base = tiny_model("llama", seed=5)
    config = {
        "loha": LoHaConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False),
        "ia3": IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"], init_ia3_weights=False
        ),
        "dora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True, init_lora_weights=False),
    }
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(copy.deepcopy(base.model), config[tuner]).eval()
    base.model.save_pretrained(tmp_path / "tiny")
    base.tokenizer.save_pretrained(tmp_path / "tiny")
    peft_model.save_pretrained(tmp_path / tuner)
    adapted = load_model(str(tmp_path / "tiny"), adapter=tmp_path / tuner)
    assert adapted.origin["adapter"]["adapters"][0]["config"]["peft_type"] == tuner.upper().replace("DORA", "LORA")
    scope = Patchscope(
        Source(SOURCE, "Paris", 2, base.name), Target(PROMPT, Every("x"), 1, model=adapted.name, write="mix", alpha=0.5)
    )
    state = read(base, SOURCE, 2, run(scope, [base, adapted])[0].source_position)
    want = _hooked_logits(adapted.peft, adapted, PROMPT, 1, _slots(adapted, scope.target), state, "mix", 0.5)
    for planned in (True, False):
        got = run(scope, [base, adapted], planned=planned)[0]
        torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)
    with adapted.peft.disable_adapter():
        unadapted = _hooked_logits(adapted.peft, adapted, PROMPT, 1, _slots(adapted, scope.target), state, "mix", 0.5)
    assert not torch.allclose(unadapted, want, atol=1e-3)


def test_patchscopes_inspect_writes_into_an_adapter_and_reads_the_base(tmp_path, capsys):
    from pyvene_patchscopes.cli import main

    base = tiny_model("llama", seed=5)
    base.model.save_pretrained(tmp_path / "tiny")
    base.tokenizer.save_pretrained(tmp_path / "tiny")
    _lora(copy.deepcopy(base.model)).save_pretrained(tmp_path / "oracle")
    folder = str(tmp_path / "tiny")
    assert (
        main(
            [
                "inspect",
                "--model",
                folder,
                "--adapter",
                str(tmp_path / "oracle"),
                "--preset",
                "activation-oracle",
                "--source-prompt",
                SOURCE,
                "--source-position",
                "Paris",
                "--layers",
                "1,2",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    reader, oracle = load_model(folder), load_model(folder, adapter=tmp_path / "oracle")
    for row in out["layers"]:
        scope = activation_oracle(
            Source(SOURCE, "Paris", row["source_layer"], reader.name), decoder=oracle.name, tokenizer=reader.tokenizer
        )
        want = run(scope, [reader, oracle], top=5)[0]
        assert row["token"] == want.token and abs(row["prob"] - want.prob) < 1e-5
        assert [t["token"] for t in row["top"]] == [t.token for t in want.top]
