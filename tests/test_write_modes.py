"""The write modes of vector readers (issue 26, first part): mix, add and norm-matched add, as registered pyvene
interventions, at one slot and at several, equal to hand-written hooks; α survives save and load.

SelfIE (Chen et al., 2024) mixes h ← α·v + (1 − α)·h or adds h ← h + α·v at placeholder positions; Activation
Oracles add h ← h + ‖h‖·α·v/‖v‖. Here they are checked through pyvene's IntervenableModel on tiny models.
"""

from __future__ import annotations

import pytest
import pyvene as pv
import torch
from tiny import tiny_model

from pyvene_patchscopes import SpecError, compat
from pyvene_patchscopes.interventions import INTERVENTIONS, AddIntervention, MixIntervention, NormMatchedAddIntervention

PROMPT = "The city of Paris is large and old"
FORMULAS = {
    MixIntervention: lambda h, v, a: a * v + (1 - a) * h,
    AddIntervention: lambda h, v, a: h + a * v,
    NormMatchedAddIntervention: lambda h, v, a: h + h.norm(dim=-1, keepdim=True) * a * v / v.norm(dim=-1, keepdim=True),
}
LAYER = 1


def _blocks(handle):
    model = handle.model
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def by_hooks(handle, slots: list[int], vectors: torch.Tensor, formula, alpha: float) -> torch.Tensor:
    """The golden reference: a forward hook on block LAYER that rewrites the state at each slot."""

    def write(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        for k, slot in enumerate(slots):
            hidden[0, slot] = formula(hidden[0, slot], vectors[k], alpha)
        return output

    hook = _blocks(handle)[LAYER].register_forward_hook(write)
    try:
        with torch.no_grad():
            return handle.model(**handle.tokenizer(PROMPT, return_tensors="pt")).logits[0, -1]
    finally:
        hook.remove()


def by_pyvene(handle, slots: list[int], vectors: torch.Tensor, cls, alpha: float) -> torch.Tensor:
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=LAYER,
                component="block_output",
                unit="pos",
                max_number_of_units=len(slots),
                intervention=cls(embed_dim=handle.hidden_size, alpha=alpha),
            )
        ]
    )
    with compat.pyvene_guard(handle.model), torch.no_grad():
        pvm = compat.intervenable(config, handle.model)
        _, out = pvm(
            base=dict(handle.tokenizer(PROMPT, return_tensors="pt")),
            unit_locations={"base": [[slots]]},
            source_representations={pvm.sorted_keys[0]: vectors[None]},
        )
    return out.logits[0, -1]


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("cls", list(FORMULAS), ids=lambda c: c.registered_name)
@pytest.mark.parametrize("slots", [[4], [2, 5, 7]], ids=["one slot", "three slots"])
def test_each_write_mode_equals_hand_written_hooks(kind, cls, slots):
    handle = tiny_model(kind, seed=3)
    torch.manual_seed(1)
    vectors = torch.randn(len(slots), handle.hidden_size)
    alpha = 0.7
    want = by_hooks(handle, slots, vectors, FORMULAS[cls], alpha)
    got = by_pyvene(handle, slots, vectors, cls, alpha)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    plain = by_hooks(handle, [], vectors, FORMULAS[cls], alpha)
    assert not torch.allclose(got, plain, atol=1e-3)  # the write is in play


def test_mix_with_alpha_one_is_replacement_and_add_with_alpha_zero_leaves_the_state():
    handle = tiny_model("llama", seed=3)
    vectors = torch.randn(1, handle.hidden_size)
    replaced = by_hooks(handle, [4], vectors, lambda h, v, a: v, 1.0)
    torch.testing.assert_close(by_pyvene(handle, [4], vectors, MixIntervention, 1.0), replaced, atol=1e-5, rtol=0)
    untouched = by_hooks(handle, [], vectors, None, 0.0)
    torch.testing.assert_close(by_pyvene(handle, [4], vectors, AddIntervention, 0.0), untouched, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", list(FORMULAS), ids=lambda c: c.registered_name)
def test_alpha_survives_save_and_load(cls, tmp_path):
    handle = tiny_model("llama", seed=3)
    vectors = torch.randn(2, handle.hidden_size)
    # two slots: pyvene rebuilds a loaded intervention with embed_dim = hidden size x 2; the saved size is used
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=LAYER,
                component="block_output",
                unit="pos",
                max_number_of_units=2,
                intervention=cls(embed_dim=handle.hidden_size, alpha=-2.5),
            )
        ]
    )
    with compat.pyvene_guard(handle.model):
        compat.save_intervenable(compat.intervenable(config, handle.model), tmp_path)
        loaded = compat.load_intervenable(tmp_path, handle.model)
    intervention = next(iter(loaded.interventions.values()))
    intervention = intervention[0] if isinstance(intervention, tuple) else intervention
    assert type(intervention) is cls and float(intervention.alpha) == -2.5
    assert INTERVENTIONS[cls.registered_name] is cls
    with compat.pyvene_guard(handle.model), torch.no_grad():
        _, out = loaded(
            base=dict(handle.tokenizer(PROMPT, return_tensors="pt")),
            unit_locations={"base": [[[2, 5]]]},
            source_representations={loaded.sorted_keys[0]: vectors[None]},
        )
    torch.testing.assert_close(
        out.logits[0, -1], by_hooks(handle, [2, 5], vectors, FORMULAS[cls], -2.5), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "big", True, None])
def test_an_alpha_that_is_not_a_finite_number_is_refused_naming_it(alpha):
    with pytest.raises(SpecError, match=r"alpha=.* is not allowed \(allowed: a finite number\)"):
        MixIntervention(embed_dim=8, alpha=alpha)


def test_a_state_saved_before_the_target_size_was_kept_still_loads(tmp_path):
    """Folders written before `target_dim` was saved (one slot, as every Patchscope writes) load as before."""
    from safetensors.torch import load_file, save_file

    handle = tiny_model("llama", seed=3)
    vectors = torch.randn(1, handle.hidden_size)
    config = pv.IntervenableConfig(
        representations=[
            pv.RepresentationConfig(
                layer=LAYER,
                component="block_output",
                unit="pos",
                max_number_of_units=1,
                intervention=MixIntervention(embed_dim=handle.hidden_size, alpha=0.25),
            )
        ]
    )
    with compat.pyvene_guard(handle.model):
        compat.save_intervenable(compat.intervenable(config, handle.model), tmp_path)
    for path in tmp_path.glob("intkey_*.safetensors"):
        state = load_file(str(path))
        assert "target_dim" in state
        del state["target_dim"]
        save_file(state, str(path))
    with compat.pyvene_guard(handle.model), torch.no_grad():
        loaded = compat.load_intervenable(tmp_path, handle.model)
        _, out = loaded(
            base=dict(handle.tokenizer(PROMPT, return_tensors="pt")),
            unit_locations={"base": [[[5]]]},
            source_representations={loaded.sorted_keys[0]: vectors[None]},
        )
    torch.testing.assert_close(
        out.logits[0, -1], by_hooks(handle, [5], vectors, FORMULAS[MixIntervention], 0.25), atol=1e-5, rtol=0
    )
