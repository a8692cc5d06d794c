"""Jacobian Scopes on the real SmolLM2-135M: a plain-autograd reference, the exact Fisher form, the CLI's
PNG and HTML, and the faithfulness evaluation (the tutorial runs in tests/test_tutorials.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_jacobian import html_tokens

from pyvene_patchscopes.cli import main
from pyvene_patchscopes.evaluate import EvalOptions, run_task
from pyvene_patchscopes.jacobian import JacobianScope, attribute, jacobian_scope
from pyvene_patchscopes.result import show_text

pytestmark = pytest.mark.real_model
TEXT = "The old lighthouse keeper climbed the stairs every night, and when the storm came he lit the"


def test_semantic_scope_equals_a_plain_autograd_gradient(smollm2):
    """‖∂z_target/∂x_t‖ from HF alone (inputs_embeds, no pyvene), for a given target token."""
    model, tokenizer = smollm2.model, smollm2.tokenizer
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    target = tokenizer(" lamp", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        x = model.get_input_embeddings()(ids)
    x.requires_grad_(True)
    logit = model(inputs_embeds=x).logits[0, -1, target]
    (grad,) = torch.autograd.grad(logit, x)
    expected = grad[0].norm(dim=-1)
    attribution = jacobian_scope(TEXT, smollm2, "semantic", target_token=" lamp")
    assert attribution.target_id == target and attribution.positions[0] == 1  # the document start is not scored
    torch.testing.assert_close(torch.tensor(attribution.scores), expected[1:], rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_exact_fisher_is_usable_and_matches_full_rank(smollm2):
    """576 backward passes (the exact form) on a short text, against the low-rank form at k = d = 576."""
    text = "The capital of France is"
    exact, full = attribute(
        [text],
        smollm2,
        [
            JacobianScope("fisher", fisher="exact", model=smollm2.name),
            JacobianScope("fisher", rank=576, model=smollm2.name),
        ],
    )
    torch.testing.assert_close(torch.tensor(exact[0].scores), torch.tensor(full[0].scores), rtol=1e-3, atol=0)
    assert min(exact[0].scores) > 0 and len(exact[0].scores) == 5


def test_cli_writes_png_and_html_with_every_token(capsys, smollm2, tmp_path):
    assert main(["jacobian", TEXT, "--variant", "fisher", "--json", "--out", str(tmp_path / "scope.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["command"] == "jacobian" and out["scope"]["variant"] == "fisher"
    with torch.no_grad():
        logits = smollm2.model(**smollm2.tokenizer(TEXT, return_tensors="pt")).logits[0, -1]
    assert out["prediction_id"] == int(logits.argmax())
    tokens = [t["token"] for t in out["tokens"]]
    page = Path(out["files"]["html"]).read_text()
    assert html_tokens(page)[0] == [show_text(t) for t in tokens] and out["files"]["html"].endswith("scope.html")
    assert Path(out["files"]["png"]).stat().st_size > 10_000
    assert max(out["tokens"], key=lambda t: t["score"])["token"] == " lighthouse"


def test_cli_refuses_a_bad_variant(capsys):
    assert main(["jacobian", TEXT, "--variant", "entropy"]) == 2
    assert "variant='entropy' is not known (allowed: semantic, fisher, temperature" in capsys.readouterr().err


def test_deleting_top_tokens_hurts_more_than_random(smollm2, tmp_path):
    options = EvalOptions(limit=8, progress=False, extra={"exact_texts": 1})
    report = run_task("jacobian", lambda name: smollm2, options, tmp_path)
    intervals = report.data["intervals"]
    delta = {row[0]: intervals[f"{row[0]} Δ log p @5%"]["estimate"] for row in report.tables[0].rows}
    assert set(delta) == {"Semantic", "Fisher (k=1)", "Temperature", "gradient x input", "random"}
    per_text = report.data["per_text"]
    for method in ("Semantic", "Fisher (k=1)", "Temperature"):
        assert delta[method] < delta["random"] < 0, (method, delta)
        assert delta[method] == sum(t[method]["0.05"] for t in per_text) / 8
        versus = intervals[f"{method} - random @5%"]
        assert versus["test"].startswith("sign-flip") and versus["difference"]["estimate"] < 0
        assert versus["difference"]["n"] == 8 and 0 < versus["p_value"] <= 1
    assert report.summary["texts"] == 8
    assert (tmp_path / "deletion.png").exists() and (tmp_path / "report.md").exists()
    assert len(list(tmp_path.glob("example_*.html"))) == 4
