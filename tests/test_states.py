"""`hidden_states(prompts, model, layers, positions)` (issue 36, finding 8): the states a Patchscope's source reads,
in the paper's layer convention (layer l = HF ``hidden_states[l + 1]``, the last layer HF's last entry, after the
final norm), equal to what the engine's collect step and hand-written hooks read, and to HF's hidden_states with the
offset."""

from __future__ import annotations

import re
import textwrap
import warnings

import golden
import pytest
import torch
from docs_text import page
from tiny import FAMILIES, tiny_model

from pyvene_patchscopes import Patchscope, SinkPositionWarning, Source, SpecError, Target, hidden_states, run
from pyvene_patchscopes.execution.engine import _collect_all
from pyvene_patchscopes.resolve import resolve
from pyvene_patchscopes.spec.positions import resolve_position

PROMPTS = ["The capital of France is Paris", "Here is a word: dog", "Tokyo London Berlin Rome and Paris"]


def _hf(handle, prompt: str, layer: int, index: int) -> torch.Tensor:
    """HF's own hidden_states[layer + 1] at token `index`, the prompt run alone."""
    ids = handle.tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return handle.model(ids, output_hidden_states=True).hidden_states[layer + 1][0, index]


@pytest.mark.parametrize("kind", FAMILIES)
def test_states_are_hfs_hidden_states_one_layer_up_the_last_after_the_final_norm(kind):
    handle = tiny_model(kind)
    n = handle.n_layers
    states = hidden_states(PROMPTS, handle, layers=[0, 1, -1], positions=["Paris", -2, 3])
    assert states.shape == (3, 3, handle.hidden_size)
    for p, (prompt, position) in enumerate(zip(PROMPTS, ["Paris", -2, 3])):
        index = resolve_position(handle.tokenizer, prompt, position, "Source")
        for k, layer in enumerate([0, 1, n - 1]):
            torch.testing.assert_close(states[p, k], _hf(handle, prompt, layer, index), atol=1e-5, rtol=0)
    alone = hidden_states(PROMPTS[1], handle, layers=[0, 1, -1], positions=-2)  # one prompt, unpadded: exact
    assert torch.equal(alone, torch.stack([_hf(handle, PROMPTS[1], layer, -2) for layer in (0, 1, n - 1)]))


def test_a_str_prompt_and_an_int_layer_drop_their_axes_and_none_is_every_layer(tiny_llama):
    every = hidden_states(PROMPTS, tiny_llama, positions=-1)
    assert every.shape == (3, tiny_llama.n_layers, tiny_llama.hidden_size)
    assert hidden_states(PROMPTS, tiny_llama, 2).shape == (3, tiny_llama.hidden_size)
    assert hidden_states(PROMPTS[0], tiny_llama, [2]).shape == (1, tiny_llama.hidden_size)
    torch.testing.assert_close(hidden_states(PROMPTS[0], tiny_llama, 2), every[0, 2], atol=1e-5, rtol=0)  # unpadded


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_states_and_the_engines_collect_step_read_what_hand_written_hooks_read(kind):
    """hidden_states and run's collect step each read, bit for bit, the block output (the last layer's after the
    final norm) that a hand-written forward hook reads (tests/golden.py), each prompt read alone."""
    handle = tiny_model(kind)
    n, positions, layers = handle.n_layers, ["Paris", -2, 3], [0, 2, -1]
    scopes = [
        Patchscope(Source(prompt, position, layer, handle.name), Target("x", -1, 0))
        for prompt, position in zip(PROMPTS, positions)
        for layer in layers
    ]
    engine = _collect_all([resolve(scope, {handle.name: handle}) for scope in scopes], {handle.name: handle}, 1)
    states = hidden_states(PROMPTS, handle, layers, positions, batch_size=1)
    for p, (prompt, position) in enumerate(zip(PROMPTS, positions)):
        index = resolve_position(handle.tokenizer, prompt, position, "Source")
        for k, layer in enumerate(layer % n for layer in layers):
            hooked = golden.read(handle, prompt, layer, index, after_norm=layer == n - 1)
            assert torch.equal(states[p, k], hooked) and torch.equal(engine[p * len(layers) + k], hooked)


def test_run_keeps_each_distinct_source_state_once_however_many_rows_read_it(tiny_llama):
    """Issue 36 review: the collect step gathered one copy of every unit's states at every source site per row,
    so a 30 x 30 grid of 32 prompts held 28,800 x 30 states (2 GB at d = 576) where the 32 x 30 read are 2 MB.
    Each row's state is now a view of the one tensor of distinct states."""
    handle, layers = tiny_llama, [0, 1, 2, 3]
    scopes = [
        Patchscope(Source(prompt, -1, layer, handle.name), Target("x", -1, target_layer))
        for prompt in PROMPTS
        for layer in layers
        for target_layer in range(4)
    ]
    rows = _collect_all([resolve(scope, {handle.name: handle}) for scope in scopes], {handle.name: handle}, 32)
    assert len(rows) == 48 and len({row.untyped_storage().data_ptr() for row in rows}) == 1
    held = rows[0].untyped_storage().nbytes()
    assert held == len(PROMPTS) * len(layers) * handle.hidden_size * rows[0].element_size()  # not 48 x 4 rows' worth
    states = hidden_states(PROMPTS, handle, layers)  # the same batch: bit-equal
    assert all(torch.equal(row, states[k // 16, k // 4 % 4]) for k, row in enumerate(rows))


def test_on_smollm2_states_equal_the_engines_and_hfs_and_run_reads_them(smollm2):
    layers, positions = [0, 6, 15, 29], ["Paris", "dog", "Rome"]
    states = hidden_states(PROMPTS, smollm2, layers, positions)
    scopes = [
        Patchscope(Source(prompt, position, layer, smollm2.name), Target("cat->cat; 1135->1135; x", "x", layer))
        for prompt, position in zip(PROMPTS, positions)
        for layer in layers
    ]
    engine = _collect_all([resolve(scope, {smollm2.name: smollm2}) for scope in scopes], {smollm2.name: smollm2}, 32)
    assert torch.equal(states.flatten(0, 1), torch.stack(engine))
    for p, (prompt, position) in enumerate(zip(PROMPTS, positions)):
        index = resolve_position(smollm2.tokenizer, prompt, position, "Source")
        for k, layer in enumerate(layers):  # batched with left padding here, alone in HF's call
            torch.testing.assert_close(states[p, k], _hf(smollm2, prompt, layer, index), atol=2e-4, rtol=1e-4)
    ours = run(scopes, smollm2, source_states=list(states.flatten(0, 1)))
    theirs = run(scopes, smollm2)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(ours, theirs))


def test_position_zero_warns_as_a_source_does(tiny_llama):
    with pytest.warns(SinkPositionWarning, match="Source.position resolves to token 0"):
        hidden_states("Paris is large", tiny_llama, 1, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SinkPositionWarning)
        hidden_states("Paris is large", tiny_llama, 1, 1)


def test_bad_input_gets_one_line_naming_the_field(tiny_llama):
    with pytest.raises(SpecError, match=r"layers=4 is out of range for tiny-llama \(allowed: -4..3\)"):
        hidden_states(PROMPTS, tiny_llama, [0, 4])
    with pytest.raises(SpecError, match=r"positions has 2 entries for 3 prompts \(allowed: one position"):
        hidden_states(PROMPTS, tiny_llama, 0, [1, 2])
    with pytest.raises(SpecError, match=r"Source.position='Madrid': the token is not in Source.prompt"):
        hidden_states(PROMPTS[0], tiny_llama, 0, "Madrid")
    with pytest.raises(SpecError, match=r"prompts is empty"):
        hidden_states([], tiny_llama, 0)
    with pytest.raises(SpecError, match=r"layers is empty"):
        hidden_states(PROMPTS, tiny_llama, [])
    with pytest.raises(SpecError, match=r"model is a str \(allowed: a ModelHandle"):
        hidden_states(PROMPTS, "smollm2-135m", 0)


def test_the_readmes_example_runs_and_says_what_it_prints(smollm2, capsys):
    section = page("guides/vectors")
    blocks = [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", section, re.S)]
    example = next(block for block in blocks if "hidden_states(" in block)
    exec(compile(example, "docs/guides/vectors.md", "exec"), {})  # noqa: S102 (the page's own code)
    printed = capsys.readouterr().out.splitlines()
    shown = [line.split("# ", 1)[1] for line in example.splitlines() if line.startswith("# ")]
    assert printed == shown
