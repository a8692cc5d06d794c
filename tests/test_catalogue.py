"""The shipped catalogue (interventions/): every entry loads by name and runs on SmolLM2, the tuned lens is a
fitted affine Patchscope, and `patchscopes list` / by-name loading work from an installed wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyvene_patchscopes import load_patchscope, run
from pyvene_patchscopes.cli import main
from pyvene_patchscopes.persist import catalogue, catalogue_root, describe

REPO = Path(__file__).resolve().parent.parent
EXPECTED = {  # entry -> text its example must produce (top token or generation), measured on SmolLM2-135M
    "token-identity": "CEO",
    "logit-lens": "Paris",
    "attribute-capital": "Paris",
    "attribute-currency": "yen",
    "attribute-language": "German",
    "attribute-largest-city": "Sydney",
    "entity-description": "physicist",
    "tuned-lens-l24": "Paris",
    "jacobian-lens-l24": "Paris",
    "cross-model-smollm2-gemma3-l24-l12": "room",  # SmolLM2 predicts ' room'; Gemma 3 reads it through the map
    "selfie": "Paris, France",
    "self-explanation": "Western Europe",
}
REQUIRED = {
    "token-identity",
    "logit-lens",
    "entity-description",
    "multihop-cot",
    "attribute-capital",
    "attribute-currency",
    "attribute-ceo",
    "attribute-language",
}


def test_catalogue_holds_the_required_entries_in_the_save_format():
    names = set(catalogue())
    assert REQUIRED <= names and any(n.startswith("tuned-lens-") for n in names)
    for name in names:
        files = sorted(p.name for p in (catalogue_root() / name).iterdir())
        assert files in (["config.json"], ["config.json", "mapping.safetensors"]), (name, files)
        config = json.loads((catalogue_root() / name / "config.json").read_text())
        # version 3 only where an entry uses its fields (several slots, write modes): the others stay readable by
        # older releases
        several = isinstance(config["target"]["position"], (list, dict))
        assert config["version"] == (3 if several else 2) and config["description"]


def test_patchscopes_list_shows_every_entry(capsys):
    assert main(["list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["catalogue"]
    assert sorted(listed) == catalogue() and all(listed.values())


@pytest.mark.real_model
def test_every_catalogue_entry_loads_against_its_models_and_runs(smollm2, gemma3):
    for name in catalogue():
        models = [smollm2, gemma3] if name.startswith("cross-model-") else [smollm2]
        scope = load_patchscope(name, models=models)  # checks the GGUF hashes and sizes
        result = run(scope, models)[0]
        assert torch.isfinite(result.logits).all(), name
        if scope.max_new_tokens:
            assert result.generation and result.generation.strip(), name
        if name in EXPECTED:
            assert EXPECTED[name] in result.token + (result.generation or ""), (name, result.token, result.generation)


def test_cross_model_entries_map_smollm2_states_into_gemma3():
    names = [n for n in catalogue() if n.startswith("cross-model-smollm2-gemma3-")]
    assert names
    for name in names:
        scope = load_patchscope(name)
        assert (scope.source.model, scope.target_model, scope.mapping.name) == ("smollm2-135m", "gemma3-270m", "affine")
        assert scope.mapping.weights["weight"].shape == (640, 576)


@pytest.mark.real_model
def test_tuned_lens_entries_are_fitted_affine_maps_to_the_last_layer(smollm2):
    for name in [n for n in catalogue() if n.startswith("tuned-lens-")]:
        scope = load_patchscope(name, models=smollm2)
        assert scope.mapping.name == "affine" and scope.target.layer == -1
        assert scope.mapping.weights["weight"].shape == (576, 576)
        assert not torch.allclose(scope.mapping.weights["weight"], torch.eye(576), atol=1e-2)


@pytest.mark.real_model
def test_jacobian_lens_entries_are_fitted_maps_without_bias_to_the_last_layer(smollm2):
    names = [n for n in catalogue() if n.startswith("jacobian-lens-")]
    assert names == ["jacobian-lens-l06", "jacobian-lens-l12", "jacobian-lens-l18", "jacobian-lens-l24"]
    for name in names:
        scope = load_patchscope(name, models=smollm2)
        assert scope.mapping.name == "affine" and scope.target.layer == -1 and scope.source.layer == int(name[-2:])
        assert scope.mapping.weights["weight"].shape == (576, 576)
        assert torch.count_nonzero(scope.mapping.weights["bias"]) == 0  # f(h) = J h
        assert not torch.allclose(scope.mapping.weights["weight"], torch.eye(576), atol=1e-2)
        assert "48 prose texts of 64 tokens" in describe(name) and "texts sha256" in describe(name)


def test_catalogue_and_list_work_from_an_installed_wheel(tmp_path):
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheel_dir),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(wheel_dir.glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    # Only the wheel's copy can be imported: the checkout is not on the path and cwd is elsewhere.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    code = (
        "import pyvene_patchscopes as ps, sys; from pyvene_patchscopes.cli import main; "
        "assert ps.__file__.startswith(sys.argv[1]), ps.__file__; "
        "print(ps.load_patchscope('token-identity').target.prompt.splitlines()[0]); "
        "from pyvene_patchscopes.evaluate.data import load_jsonl; "
        "print(sum(len(load_jsonl(k)) for k in ('facts', 'entities', 'multihop'))); "
        "import pyvene_patchscopes.execution.sweeps, pyvene_patchscopes.execution.planned; "
        "stray = [n for n, m in list(sys.modules.items()) if n.startswith('pyvene_patchscopes') "
        "and getattr(m, '__file__', None) and not m.__file__.startswith(sys.argv[1])]; "
        "assert not stray, f'modules not in the wheel: {stray}'; "
        "sys.exit(main(['list']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(target)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == "cat -> cat" and any(line.startswith("tuned-lens-") for line in lines)
    assert int(lines[1]) >= 300  # the evaluations' JSONL data ships in the wheel too
    assert set(catalogue()) <= {line.split()[0] for line in lines[2:] if line.strip()}
