"""A DAS direction learned with pyvene, read in words by a Patchscope in the same IntervenableModel pipeline
(issue 26): the natural next question after a causal-abstraction study is what the learned direction means.

The direction is trained here with pyvene's LowRankRotatedSpaceIntervention, taken from the IntervenableModel by
`vectors.das_source`, and written by the Patchscope's own pyvene intervention beside the DAS intervention in one
config; both are checked against hand-written hooks. The spec, vector included, saves and reruns bit for bit in a
fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pyvene as pv
import torch
from golden import block, encode, read, written_logits
from tiny import tiny_model

from pyvene_patchscopes import Patchscope, SpecError, Target, compat, load_patchscope, run, save_patchscope, to_pyvene
from pyvene_patchscopes.vectors import das_directions, das_source

LAYER, POSITION = 1, 7  # the last token of each 8-token sequence
TARGET = "the word x means"
ALPHA = 3.0


def _das_config(handle) -> pv.RepresentationConfig:
    torch.manual_seed(0)
    return pv.RepresentationConfig(
        layer=LAYER,
        component="block_output",
        unit="pos",
        max_number_of_units=1,
        low_rank_dimension=1,
        intervention=pv.LowRankRotatedSpaceIntervention(embed_dim=handle.hidden_size, low_rank_dimension=1),
    )


def _pairs(handle, n: int = 16):
    """Base and source sequences of one length (BOS, then random tokens); the label is what the source itself
    predicts."""
    g = torch.Generator().manual_seed(7)

    def make() -> dict:
        ids = torch.cat([torch.zeros(n, 1, dtype=torch.long), torch.randint(60, 120, (n, 7), generator=g)], 1)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    base, source = make(), make()
    with torch.no_grad():
        labels = handle.model(**source).logits[:, -1].argmax(-1)
    return base, source, labels


@pytest.fixture(scope="module")
def study():
    """A trained DAS study: (handle, the IntervenableModel, the loss before and after training)."""
    handle = tiny_model("llama", seed=1)
    base, source, labels = _pairs(handle)
    n = labels.shape[0]
    with compat.pyvene_guard(handle.model):
        pvm = compat.intervenable(pv.IntervenableConfig([_das_config(handle)]), handle.model)
        intervention = next(iter(pvm.interventions.values()))
        intervention = intervention[0] if isinstance(intervention, tuple) else intervention
        optimizer = torch.optim.Adam(intervention.parameters(), lr=0.1)
        where = {"sources->base": ([[[POSITION]] * n], [[[POSITION]] * n])}
        losses = []
        for _ in range(40):
            _, out = pvm(base=base, sources=[source], unit_locations=where)
            loss = torch.nn.functional.cross_entropy(out.logits[:, -1], labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    return handle, pvm, losses


def test_the_das_direction_is_learned_and_is_the_rotations_column(study):
    handle, pvm, losses = study
    assert losses[-1] < losses[0] - 0.05  # training moved it (a random tiny model: the loss stays near ln V)
    source = das_source(pvm, handle)
    weight = next(iter(pvm.interventions.values()))
    weight = (weight[0] if isinstance(weight, tuple) else weight).rotate_layer.weight.detach()
    torch.testing.assert_close(source.tensor, weight[:, 0], atol=0, rtol=0)
    assert source.layer == LAYER and source.model == handle.name
    assert das_directions(pv.LowRankRotatedSpaceIntervention(embed_dim=8, low_rank_dimension=3)).shape == (3, 8)


def _by_hooks(handle, pvm, base_prompt: str, source_prompt: str, slot: int, vector: torch.Tensor) -> torch.Tensor:
    """DAS's interchange at LAYER from the source's last token to the base's, h + ((s W) − (h W)) Wᵀ, and the
    Patchscope's add at `slot`, by hand."""
    intervention = next(iter(pvm.interventions.values()))
    weight = (intervention[0] if isinstance(intervention, tuple) else intervention).rotate_layer.weight.detach()
    seen = {}
    grab = block(handle.model, LAYER).register_forward_hook(lambda m, a, out: seen.update(s=out[0, -1].clone()))
    with torch.no_grad():
        handle.model(encode(handle, source_prompt))
    grab.remove()

    def write(module, args, out):
        h = out[0, -1].clone()
        out[0, -1] = h + (seen["s"] @ weight - h @ weight) @ weight.T
        out[0, slot] = out[0, slot] + ALPHA * vector
        return out

    hook = block(handle.model, LAYER).register_forward_hook(write)
    try:
        with torch.no_grad():
            return handle.model(encode(handle, base_prompt)).logits[0, -1]
    finally:
        hook.remove()


def test_the_direction_is_read_by_a_patchscope_in_the_same_pyvene_pipeline(study):
    handle, pvm, _ = study
    scope = Patchscope(das_source(pvm, handle), Target(TARGET, "x", LAYER, write="add", alpha=ALPHA))
    plan = to_pyvene(scope, handle)
    slot = plan.patch_locations["sources->base"][1][0][0][0]
    trained = next(iter(pvm.interventions.values()))
    trained = trained[0] if isinstance(trained, tuple) else trained
    das = pv.RepresentationConfig(
        layer=LAYER,
        component="block_output",
        unit="pos",
        max_number_of_units=1,
        low_rank_dimension=1,
        intervention=trained,
    )  # the study's trained intervention
    base, source = (
        dict(handle.tokenizer(TARGET, return_tensors="pt")),
        dict(handle.tokenizer("e d c b a", return_tensors="pt")),
    )
    with compat.pyvene_guard(handle.model), torch.no_grad():
        pipeline = compat.intervenable(pv.IntervenableConfig([das, plan.patch.representations[0]]), handle.model)
        second = pipeline.sorted_keys[1]
        first = pipeline.interventions[pipeline.sorted_keys[0]]
        assert (first[0] if isinstance(first, tuple) else first) is trained
        src_last, base_last = source["input_ids"].shape[1] - 1, base["input_ids"].shape[1] - 1
        # pyvene 0.1.8 feeds either `sources` or `source_representations`, not both: the DAS study's source state is
        # read first and handed over as a representation, as the Patchscope's vector is
        state = read(handle, "e d c b a", LAYER, src_last)
        _, out = pipeline(
            base=base,
            unit_locations={"sources->base": (None, [[[base_last]], [[slot]]])},
            source_representations={pipeline.sorted_keys[0]: state[None, None], second: plan.source_representation},
        )
    want = _by_hooks(handle, pvm, TARGET, "e d c b a", slot, scope.source.tensor)
    torch.testing.assert_close(out.logits[0, -1], want, atol=1e-4, rtol=0)  # the 1e-4 in fp32 logits
    alone = written_logits(handle, TARGET, LAYER, [slot], scope.source.tensor, "add", ALPHA)
    assert not torch.allclose(out.logits[0, -1], alone, atol=1e-3)  # the DAS interchange is in play too
    for planned in (True, False):
        torch.testing.assert_close(run(scope, handle, planned=planned)[0].logits, alone, atol=1e-5, rtol=0)


_FRESH = """
import json, sys, torch, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {tests!r})
from safetensors.torch import save_file
from pyvene_patchscopes import load_patchscope, run
from tiny import tiny_model
handle = tiny_model("llama", seed=1)
scope = load_patchscope({folder!r}, models=handle)
result = run(scope, handle)[0]
save_file({{"logits": result.logits.contiguous()}}, {out!r})
print(json.dumps({{"name": scope.source.name, "layer": scope.source.layer, "write": scope.target.write}}))
"""


def test_the_spec_with_its_vector_saves_and_reruns_identically_in_a_fresh_process(study, tmp_path):
    from safetensors.torch import load_file

    handle, pvm, _ = study
    scope = Patchscope(das_source(pvm, handle), Target(TARGET, "x", LAYER, write="add", alpha=ALPHA), max_new_tokens=2)
    folder = save_patchscope(scope, tmp_path / "das-read", models=handle)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "vector.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    # version 5: the spec records that a DAS direction (pyvene's block_output) lives before the final norm
    assert config["version"] == 5 and config["source"]["after_final_norm"] is False
    assert config["source"]["sha256"] == scope.source.sha256
    assert load_patchscope(folder) == scope
    script = _FRESH.format(tests=str(Path(__file__).parent), folder=str(folder), out=str(tmp_path / "out.safetensors"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "name": scope.source.name,
        "layer": LAYER,
        "write": "add",
    }
    torch.testing.assert_close(
        load_file(str(tmp_path / "out.safetensors"))["logits"], run(scope, handle)[0].logits, atol=0, rtol=0
    )


def test_a_das_intervention_of_another_model_is_refused(study):
    handle, pvm, _ = study
    other = tiny_model("llama", hidden=32, seed=1)
    with pytest.raises(SpecError, match=r"the IntervenableModel wraps .* not tiny-llama's model"):
        das_source(pvm, other)
    bare = pv.LowRankRotatedSpaceIntervention(embed_dim=32, low_rank_dimension=1)
    with pytest.raises(SpecError, match=r"DAS intervention .* has width 32, but tiny-llama's hidden size is 64"):
        das_source(bare, handle)
    with pytest.raises(SpecError, match=r"has no learned rotation"):
        das_source(pv.VanillaIntervention(embed_dim=64), handle)


def test_a_saved_vector_file_that_does_not_match_its_spec_is_refused(study, tmp_path):
    from safetensors.torch import save_file

    handle, pvm, _ = study
    folder = save_patchscope(Patchscope(das_source(pvm, handle), Target(TARGET, "x", LAYER)), tmp_path / "spec")
    save_file({"vector": torch.ones(64)}, str(folder / "vector.safetensors"))
    with pytest.raises(SpecError, match=r"source.sha256 does not match the vector file"):
        load_patchscope(folder)
    save_file({"vector": torch.ones(64), "extra": torch.ones(1)}, str(folder / "vector.safetensors"))
    with pytest.raises(SpecError, match=r"holds \['extra', 'vector'\] \(allowed: one tensor named 'vector'\)"):
        load_patchscope(folder)
