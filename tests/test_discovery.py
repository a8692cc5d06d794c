"""The architecture found from the model itself: equal to the table for its ten families, reported to the user,
refusing what is not a decoder; MoE blocks, attention sinks, latent attention and a multimodal checkpoint run
on the planned execution, equal to hand-written hooks."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import golden
import pytest
import torch
from test_golden import TARGET
from test_planned import LONG_TARGET, SOURCES
from tiny import FAMILIES, VOCAB, tiny_model, tiny_tokenizer
from torch import nn
from transformers import (
    BertConfig,
    BertForMaskedLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from pyvene_patchscopes import Patchscope, PatchscopeError, Source, Target, run, wrap_model
from pyvene_patchscopes.execution.check import stack_for
from pyvene_patchscopes.models.architectures import architecture, found, report, table_entry

# what the planned execution and the sites read; pyvene_like and head_dim are how the table registers a class
# with pyvene, and the family's name is the config's model_type ("gemma3_text" for the table's "gemma3")
STRUCTURE = (
    "embed",
    "layers",
    "final_norm",
    "unembed",
    "rotary",
    "positions",
    "position_embed",
    "scaled_embeddings",
    "logit_softcap",
    "attention_softcap",
    "sliding_window",
    "cache_argument",
    "planned",
    "logit_scale",
    "final_norm_shared",
)
SPECIAL = dict(bos_token_id=0, eos_token_id=0, pad_token_id=1)
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=128,
    **SPECIAL,
)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_architecture_found_in_the_model_equals_the_table_entry(kind):
    model = tiny_model(kind).model
    entry, seen = table_entry(model), found(model)
    assert entry is not None and seen.found and not entry.found
    assert {f: getattr(seen, f) for f in STRUCTURE} == {f: getattr(entry, f) for f in STRUCTURE}


def test_architecture_reports_what_it_found_and_where_from():
    mixtral = MixtralForCausalLM(
        MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **SMALL)
    ).eval()
    data = report(mixtral)
    assert data["source"] == "found in the model" and data["classes"] == ["MixtralForCausalLM"]
    assert (data["layers"], data["final_norm"], data["rotary"], data["unembed"]) == (
        "model.layers",
        "model.norm",
        "model.rotary_emb",
        "lm_head",
    )
    assert data["planned"] and report(tiny_model("llama").model)["source"] == "the architecture table"


# ---- bad input -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model,words",
    [
        (
            lambda: BertForMaskedLM(
                BertConfig(
                    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128
                )
            ),
            "is an encoder",
        ),
        (
            lambda: T5ForConditionalGeneration(
                T5Config(vocab_size=VOCAB, d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)
            ),
            "is an encoder-decoder model",
        ),
    ],
)
def test_encoders_and_encoder_decoders_are_refused_naming_the_class(model, words):
    built = model()
    with pytest.raises(PatchscopeError, match=f"{type(built).__name__} {words}.*decoder"):
        wrap_model(built, tiny_tokenizer())


def test_a_drafter_that_reads_another_models_keys_and_values_is_refused_naming_the_class():
    import transformers

    from pyvene_patchscopes.tools import families

    built = transformers.Gemma4AssistantForCausalLM(families.tiny_config("Gemma4AssistantForCausalLM"))
    with pytest.raises(
        PatchscopeError,
        match="Gemma4AssistantForCausalLM is an assistant .*shared_kv_states.*need a decoder that reads a prompt",
    ):
        wrap_model(built, tiny_tokenizer())
    assert families.verdict("Gemma4AssistantForCausalLM", "gemma4_assistant").path == "not a decoder"


def test_layers_that_cannot_be_found_name_what_was_looked_for():
    model = _mixtral().eval()  # not in the table: its layers are looked for
    model.config.num_hidden_layers = 7  # no ModuleList has 7 blocks
    with pytest.raises(
        PatchscopeError,
        match=r"looked for a ModuleList of config.num_hidden_layers=7 blocks; "
        r"ModuleLists found: model.layers \(4\)",
    ):
        architecture(model)


# ---- MoE, attention sinks, latent attention: the planned execution against hand-written hooks -----------
def _mixtral() -> nn.Module:
    return MixtralForCausalLM(
        MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, sliding_window=None, **SMALL)
    )


def _gpt_oss() -> nn.Module:
    model = GptOssForCausalLM(
        GptOssConfig(
            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=16, sliding_window=8, **SMALL
        )
    )
    with torch.no_grad():  # learned sinks start at zero: make them matter
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) * 2)
    return model


def _deepseek_v3() -> nn.Module:
    return DeepseekV3ForCausalLM(
        DeepseekV3Config(
            num_key_value_heads=4,
            kv_lora_rank=16,
            q_lora_rank=32,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            n_routed_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
            **SMALL,
        )
    )


def quirk_of(name: str, model: nn.Module) -> bool:
    """The quirk really is in the built model, read from its modules."""
    block = model.model.layers[-1]
    if name == "MoE blocks":
        return any("experts" in n for n, _ in block.named_modules())
    if name == "attention sinks":
        return block.self_attn.sinks.abs().max() > 0.1
    attention = block.self_attn  # latent attention: keys of nope + rope = 24 dims, values of 16
    return attention.qk_head_dim != attention.v_head_dim and hasattr(attention, "kv_a_proj_with_mqa")


QUIRKY = {"MoE blocks": _mixtral, "attention sinks": _gpt_oss, "latent attention": _deepseek_v3}


@pytest.mark.parametrize("quirk", QUIRKY)
def test_moe_sinks_and_latent_attention_take_the_planned_path_equal_to_hand_written_hooks(quirk):
    torch.manual_seed(7)
    model = QUIRKY[quirk]().eval()
    assert quirk_of(quirk, model)
    handle = wrap_model(model, tiny_tokenizer(), name="quirky")
    assert architecture(model).found and stack_for(model) is not None
    scopes = [
        Patchscope(Source(SOURCES[0], -1, 1, "quirky"), Target(TARGET, -1, 2)),
        Patchscope(Source(SOURCES[1], -2, 2, "quirky"), Target(TARGET, -3, 0)),
        Patchscope(Source(SOURCES[2], -1, 2, "quirky"), Target(LONG_TARGET, "x", 1), max_new_tokens=6),
    ]
    results = run(scopes, handle)
    for s, got in zip(scopes, results):
        h = golden.read(handle, s.source.prompt, s.source.layer, got.source_position)
        want = golden.patched_logits(handle, s.target.prompt, s.target.layer, got.target_position, h)
        torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)
        assert int(got.logits.argmax()) == int(want.argmax())
    s, got = scopes[2], results[2]
    h = golden.read(handle, s.source.prompt, 2, got.source_position)
    ids, _ = golden.patched_generate(handle, s.target.prompt, 1, got.target_position, h, 6)
    assert got.generation == handle.tokenizer.decode(ids, skip_special_tokens=True)


def test_a_multimodal_checkpoint_runs_patchscopes_on_its_text_stack():
    torch.manual_seed(5)
    config = Gemma3Config(
        text_config=dict(num_key_value_heads=1, head_dim=16, sliding_window=16, **SMALL),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            image_size=28,
            patch_size=14,
        ),
        mm_tokens_per_image=4,
        **SPECIAL,
    )
    model = Gemma3ForConditionalGeneration(config).eval()
    handle = wrap_model(model, tiny_tokenizer(), name="tiny-gemma3-vlm")
    assert architecture(model).layers == "model.language_model.layers" and handle.n_layers == 4
    scopes = [
        Patchscope(Source(SOURCES[0], -1, layer, handle.name), Target(TARGET, -1, target), max_new_tokens=4)
        for layer, target in [(1, 2), (2, 0), (0, 3)]
    ]
    for planned in (True, False):
        for s, got in zip(scopes, run(scopes, handle, planned=planned)):
            h = golden.read(handle, s.source.prompt, s.source.layer, got.source_position)
            want = golden.patched_logits(handle, s.target.prompt, s.target.layer, got.target_position, h)
            torch.testing.assert_close(got.logits, want, atol=1e-4, rtol=0)
            ids, _ = golden.patched_generate(handle, s.target.prompt, s.target.layer, got.target_position, h, 4)
            assert got.generation == handle.tokenizer.decode(ids, skip_special_tokens=True)


# ---- pyvene registration happens on first use -------------------------------------------------------------
def test_a_found_familys_pyvene_registration_happens_on_first_use_not_on_import():
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(golden.__file__).rsplit("/", 1)[0]!r})
        import pyvene as pv
        from transformers import MixtralForCausalLM
        import pyvene_patchscopes
        from pyvene_patchscopes import run
        assert MixtralForCausalLM not in pv.type_to_module_mapping, "registered on import"
        from test_discovery import _mixtral
        from tiny import tiny_tokenizer
        from pyvene_patchscopes import Patchscope, Source, Target, wrap_model
        handle = wrap_model(_mixtral().eval(), tiny_tokenizer(), name="m")
        run(Patchscope(Source("The city of Paris", -1, 1, "m"), Target("cat->cat; ?", -1, 2)), handle, planned=False)
        assert pv.type_to_module_mapping[MixtralForCausalLM]["block_output"][0] == "model.layers[%s]"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_wrapping_reads_the_model_and_changes_nothing():
    model = _mixtral().eval()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    wrap_model(model, tiny_tokenizer())
    architecture(model)
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert dataclasses.is_dataclass(architecture(model))
