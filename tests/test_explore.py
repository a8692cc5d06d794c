"""The explorer's service and JSON API (no browser: tests/test_browser.py drives the page in Chromium).

A table row or heatmap cell must be exactly what `run` gives for the same Patchscope; bad input gets a
422 naming the field, and the server keeps serving.
"""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from fastapi.testclient import TestClient
from test_verify import TINY
from tiny import tiny_model

from pyvene_patchscopes import Patchscope, run, verify
from pyvene_patchscopes.explore.app import create_app
from pyvene_patchscopes.explore.service import Explorer, Query
from pyvene_patchscopes.export.figures import VERDICT_MARKS
from pyvene_patchscopes.result import show_text
from pyvene_patchscopes.result.verify import VERIFY_COLUMNS, verify_columns

PROMPT = "Amazon's former CEO attended Oscars"


@pytest.fixture(scope="module")
def handle():
    return tiny_model("llama", seed=2)


@pytest.fixture(scope="module")
def client(handle):
    with TestClient(create_app(Explorer(handle)), base_url="http://127.0.0.1") as client:
        yield client


def wait(client: TestClient, job_id: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/api/jobs/{job_id}").json()
        if job["state"] in ("done", "error", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def submit(client: TestClient, **body) -> dict:
    response = client.post("/api/jobs", json={"prompt": PROMPT, **body})
    assert response.status_code == 200, response.text
    return wait(client, response.json()["id"])


def test_the_page_and_its_scripts_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="heatmap"' in page.text and "/static/explore.js" in page.text
    for name in ("explore.js", "heatmap.js", "style.css"):
        assert client.get(f"/static/{name}").status_code == 200, name


def test_tokens_are_the_models_own_with_the_sink_marked(client, handle):
    tokens = client.post("/api/tokens", json={"prompt": PROMPT}).json()["tokens"]
    ids = handle.tokenizer(PROMPT)["input_ids"]
    assert [t["text"] for t in tokens] == [handle.tokenizer.decode([i]) for i in ids]
    assert tokens[0]["special"] and not any(t["special"] for t in tokens[1:])


def test_each_table_row_is_what_run_gives_for_the_same_scope(client, handle):
    explorer = Explorer(handle)
    position = 3
    job = submit(client, kind="layers", position=position, preset="token-identity")
    assert job["state"] == "done", job
    scopes = [explorer.scope(Query(PROMPT, position), layer) for layer in range(handle.n_layers)]
    expected = run(scopes, handle, top=5)
    rows = job["result"]["results"]
    assert [r["layer"] for r in rows] == list(range(handle.n_layers))
    for row, want in zip(rows, expected):
        assert [t[0] for t in row["top"]] == [t.token for t in want.top]
        assert row["top"][0][1] == pytest.approx(want.top[0].prob, abs=1e-6)
        assert row["generation"] == want.generation
    assert [r["key"] for r in job["result"]["table"]["rows"]] == list(range(handle.n_layers))


def test_each_heatmap_cell_is_what_run_gives_and_its_spec_reruns_it(client, handle):
    job = submit(client, kind="grid", position=2, preset="attribute")
    grid = job["result"]["grid"]
    n = handle.n_layers
    assert grid["rows"] == grid["cols"] == list(range(n)) and len(grid["cells"]) == n
    made = client.post(
        "/api/spec", json={"prompt": PROMPT, "position": 2, "preset": "attribute", "source_layer": 2, "target_layer": 1}
    ).json()
    scope = Patchscope.from_dict(made["spec"])
    assert (scope.source.layer, scope.target.layer, scope.target.prompt) == (2, 1, "The capital city of x is")
    assert Patchscope.from_json(made["json"]) == scope and "patchscopes run ./cell" in made["cli"]
    want = run(scope, handle, top=5)[0]
    cell = grid["cells"][2][1]
    assert cell["tip"][1].startswith(show_text(want.top[0].token)) and cell["shade"] == pytest.approx(want.top[0].prob)
    assert want.generation is not None and f"generated: {show_text(want.generation)}" in cell["tip"]


def test_a_custom_target_prompt_and_a_catalogue_entry_run(client, handle):
    custom = submit(client, kind="layers", position=3, preset="custom", target_prompt="Here is a word: x")
    assert custom["state"] == "done" and len(custom["result"]["results"]) == handle.n_layers
    info = client.get("/api/info").json()
    assert "attribute-capital" in info["catalogue"] and not any(n.startswith("tuned-lens") for n in info["catalogue"])
    saved = submit(client, kind="layers", position=3, preset="attribute-capital")
    assert saved["state"] == "done", saved


def test_jacobian_scopes_score_the_prompts_tokens(client, handle):
    from pyvene_patchscopes import jacobian_scope

    job = submit(client, kind="jacobian", variant="semantic")
    want = jacobian_scope(PROMPT, handle, variant="semantic")
    assert [t["text"] for t in job["result"]["tokens"]] == list(want.tokens)
    assert [t["score"] for t in job["result"]["tokens"]] == pytest.approx(list(want.scores), rel=1e-5)


@pytest.mark.parametrize(
    "body,field",
    [
        ({"prompt": "   ", "kind": "layers"}, "prompt"),
        ({"prompt": PROMPT, "kind": "layers", "position": 99}, "position"),
        ({"prompt": PROMPT, "kind": "layers", "preset": "no-such-preset"}, "preset"),
        (
            {"prompt": PROMPT, "kind": "layers", "preset": "custom", "target_prompt": "no placeholder here"},
            "target_prompt",
        ),
        ({"prompt": PROMPT, "kind": "jacobian", "variant": "telepathy"}, "variant"),
        ({"prompt": PROMPT, "kind": "dance"}, "kind"),
    ],
)
def test_bad_input_names_the_field_and_the_server_keeps_serving(client, body, field):
    response = client.post("/api/jobs", json=body)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == field and field.split("_")[0] in error["message"].lower()
    assert submit(client, kind="layers", position=3)["state"] == "done"


def test_a_layer_out_of_range_in_a_spec_names_the_field(client, handle):
    response = client.post(
        "/api/spec", json={"prompt": PROMPT, "position": 2, "source_layer": handle.n_layers, "target_layer": 0}
    )
    assert response.status_code == 422 and response.json()["error"]["field"] == "source_layer"
    assert f"0..{handle.n_layers - 1}" in response.json()["error"]["message"]


def test_a_queued_job_can_be_cancelled(client, monkeypatch):
    """The first job is held on a gate while the second is cancelled, so the second is surely still queued (on a
    tiny model the first could otherwise finish before the DELETE arrives, and the second would be running)."""
    import threading

    jobs = client.app.state.jobs
    gate, started = threading.Event(), threading.Event()
    real = jobs._run

    def held(job):
        started.set()
        gate.wait(60)
        real(job)

    monkeypatch.setattr(jobs, "_run", held)
    first = client.post("/api/jobs", json={"prompt": PROMPT, "kind": "grid", "position": 2}).json()["id"]
    assert started.wait(60)  # the worker holds the first job
    second = client.post("/api/jobs", json={"prompt": PROMPT, "kind": "grid", "position": 3}).json()["id"]
    try:
        assert client.delete(f"/api/jobs/{second}").json()["state"] == "cancelled"
    finally:
        gate.set()
    assert wait(client, first)["state"] == "done" and wait(client, second)["state"] == "cancelled"


def test_the_model_is_left_as_it_was(client, handle):
    before = [p.detach().clone() for p in handle.model.parameters()]
    submit(client, kind="grid", position=4)
    submit(client, kind="jacobian")
    assert all(torch.equal(a, b) for a, b in zip(before, handle.model.parameters()))
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in handle.model.modules())
    assert not handle.model.training


def test_the_command_serves_the_page_on_a_model_folder(tmp_path, handle):
    """`patchscopes explore --model ./folder --port P` loads the model, prints its address and serves."""
    import os
    import socket
    import subprocess
    import sys
    import urllib.request

    handle.model.save_pretrained(tmp_path / "tiny")
    handle.tokenizer.save_pretrained(tmp_path / "tiny")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "pyvene_patchscopes.cli",
        "explore",
        "--model",
        str(tmp_path / "tiny"),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        line = server.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line, line + server.stderr.read()
        deadline, page = time.time() + 60, None
        while page is None and time.time() < deadline:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read().decode()
            except OSError:
                time.sleep(0.2)
        assert page is not None and 'id="heatmap"' in page
        info = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5).read())
        assert info["n_layers"] == handle.n_layers and "token-identity" in info["presets"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_logit_lens_heatmap_reads_only_its_last_layer_column(client, handle):
    """Issue 36: the logit lens fixes l* at the last layer, so only that column of its heatmap is the logit lens;
    the others are marked n/a and a cell's spec there is refused, naming the preset and its l*."""
    from pyvene_patchscopes import build

    n = handle.n_layers
    grid = submit(client, kind="grid", position=3, preset="logit-lens")["result"]["grid"]
    assert grid["note"] == f"cells marked n/a: preset 'logit-lens' fixes l* = {n - 1}, the last layer"
    for layer, row in enumerate(grid["cells"]):
        assert [cell["label"] for cell in row[:-1]] == ["n/a"] * (n - 1)
        want = run(build("logit-lens", PROMPT, 3, layer, model=handle.name, tokenizer=handle.tokenizer), handle, top=5)[
            0
        ]
        assert row[-1]["tip"][1].startswith(repr(want.top[0].token))
        assert row[-1]["shade"] == pytest.approx(want.top[0].prob, abs=1e-6)
    refused = client.post(
        "/api/spec",
        json={"prompt": PROMPT, "position": 3, "preset": "logit-lens", "source_layer": 1, "target_layer": 0},
    )
    assert refused.status_code == 422 and refused.json()["error"] == {
        "field": "target_layer",
        "message": f"preset 'logit-lens' fixes l* = {n - 1}, the last layer; not run at other l*",
    }
    made = client.post(
        "/api/spec",
        json={"prompt": PROMPT, "position": 3, "preset": "logit-lens", "source_layer": 1, "target_layer": n - 1},
    ).json()
    assert Patchscope.from_dict(made["spec"]).target.layer == -1


def test_a_verified_job_gives_each_row_and_cell_the_numbers_verify_gives_on_the_same_results(handle):
    settings = dataclasses.replace(TINY, positions="last")
    explorer = Explorer(handle, verify=settings)
    assert explorer.info()["verify"] == settings.to_dict()
    with TestClient(create_app(explorer), base_url="http://127.0.0.1") as client:
        job = submit(client, kind="layers", position=3, preset="token-identity", verify=True)
        scopes = [explorer.scope(Query(PROMPT, 3), layer) for layer in range(handle.n_layers)]
        golden = [verify_columns(c) for c in verify(run(scopes, handle, top=5), handle, settings)]
        for row, want in zip(job["result"]["results"], golden):
            assert {k: row[k] for k in VERIFY_COLUMNS} == pytest.approx(want, abs=1e-6), row["layer"]
        assert [r["verdict"] for r in job["result"]["table"]["rows"]] == [w["verdict"] for w in golden]
        # a catalogue entry's heatmap runs cell by cell (`run`), not as a planned sweep: its verdicts too
        grid = submit(client, kind="grid", position=3, preset="attribute-capital", verify=True)["result"]["grid"]
        pairs = [(l, t) for l in range(handle.n_layers) for t in range(handle.n_layers)]
        cells = [explorer.scope(Query(PROMPT, 3, "attribute-capital"), l, t, grid=True) for l, t in pairs]
        want = dict(zip(pairs, verify(run(cells, handle, top=5), handle, settings)))
        for l, t in pairs:
            assert grid["cells"][l][t]["verdict"] == want[l, t].verdict, (l, t)
        shown = {c.verdict for c in want.values()}
        assert [e["verdict"] for e in grid["legend"]] == [v for v in VERDICT_MARKS if v in shown] and len(shown) >= 2
        body = {"prompt": PROMPT, "position": 3, "preset": "token-identity", "source_layer": 1, "target_layer": 1}
        made = client.post("/api/spec", json={**body, "verify": True}).json()
        assert Patchscope.from_dict(made["spec"]).verify == settings  # the download reruns the same check
        assert "verify" not in client.post("/api/spec", json=body).json()["spec"]
        assert "verdict" not in submit(client, kind="layers", position=3)["result"]["results"][0]
