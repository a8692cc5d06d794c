"""What the command line writes, and where: a closed pipe ends it quietly, errors under --json are JSON, and a
token is shown one way (quoted, whitespace visible) in every table, figure and page.

Issue 36, finding 7. The pipes are real: the CLI runs in a subprocess whose reader closes early, as
``patchscopes list --json | head -c 600`` does.
"""

from __future__ import annotations

import fcntl
import html
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from docs_text import joined
from tiny import tiny_loader, tiny_model

from pyvene_patchscopes import Patchscope, Source, Target, models, run, sweep, verify
from pyvene_patchscopes.cli import CLOSED_PIPE_STATUS, DEMO_POSITION, DEMO_PROMPT, json_requested, layer_table, main
from pyvene_patchscopes.cli.commands import list as list_command
from pyvene_patchscopes.errors import SpecError
from pyvene_patchscopes.explore.service import Explorer
from pyvene_patchscopes.export import layers_table, sweep_grid
from pyvene_patchscopes.export.figures import CELL_WIDTH, layer_heatmap
from pyvene_patchscopes.jacobian import JacobianScope
from pyvene_patchscopes.jacobian.result import Attribution
from pyvene_patchscopes.presets import build
from pyvene_patchscopes.result import PatchscopeResult, TokenProb, show_text
from pyvene_patchscopes.result.verify import VERIFY_COLUMNS

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "pyvene_patchscopes.cli"]
PAGE = 4096  # the smallest pipe Linux makes (F_SETPIPE_SZ rounds up to a page)
# what the fake tokenizer decodes every id to: the whitespace tokens that printed as blanks, and two that printed
# as the same word ("Paris" in one table, "' Paris'" in another)
DECODED = (" ", "\n", " Paris", "Paris", "  ")


# ---- a closed pipe ---------------------------------------------------------------------------------------------
def _closed_early(argv: list[str], read: int, stderr_too: bool = False) -> subprocess.CompletedProcess:
    """Run the CLI with its standard output (and, with `stderr_too`, its standard error) into a one-page pipe;
    read `read` bytes, close the reading end, and wait: what ``| head -c READ`` does, without head's race."""
    proc = subprocess.Popen(
        CLI + argv,
        bufsize=0,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if stderr_too else subprocess.PIPE,
        cwd=REPO,
    )
    fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, PAGE)
    head = b""
    while len(head) < read:  # unbuffered: read no more than head would
        head += proc.stdout.read(read - len(head)) or b""
    proc.stdout.close()
    error = b"" if stderr_too else proc.stderr.read()
    proc.wait(timeout=300)
    return subprocess.CompletedProcess(argv, proc.returncode, head, error)


def test_list_json_into_head_c_600_ends_quietly_with_141(capsys):
    assert main(["list", "--json"]) == 0
    assert len(capsys.readouterr().out.encode()) > PAGE + 600  # so the CLI is still writing when head closes
    done = _closed_early(["list", "--json"], read=600)
    assert len(done.stdout) == 600 and done.stdout.startswith(b'{\n  "schema": 1')
    assert done.returncode == CLOSED_PIPE_STATUS == 128 + 13, done.stderr  # was 2, with the message below
    assert done.stderr == b"", done.stderr  # was: "patchscopes: error: cannot write ... (Broken pipe)"


@pytest.mark.real_model
def test_a_closed_pipe_under_progress_bars_ends_quietly_with_141():
    argv = ["inspect", "--source-prompt", "The capital of France is", "--preset", "logit-lens", "--layers", "20,21"]
    done = _closed_early(argv, read=0)  # standard output closed, standard error read: the bars, no error
    assert done.returncode == CLOSED_PIPE_STATUS, done.stderr.decode()
    assert b"patchscopes:" in done.stderr and b"error" not in done.stderr and b"Traceback" not in done.stderr
    done = _closed_early(argv, read=0, stderr_too=True)  # `2>&1 | head`: the first progress bar meets the pipe
    assert done.returncode == CLOSED_PIPE_STATUS  # was 1: a BrokenPipeError traceback from tqdm


def test_a_full_standard_output_stays_the_one_line_error(tmp_path):
    for flag, last in (
        ([], "patchscopes: error: cannot write the output to standard output (No space left on device)"),
        (["--json"], None),
    ):
        with open("/dev/full", "w") as full:
            done = subprocess.run(
                CLI + ["presets", *flag], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120, cwd=tmp_path
            )
        assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
        if last is not None:
            assert done.stderr.strip() == last
        else:
            error = json.loads(done.stderr)["error"]
            assert error["message"] == "cannot write the output to standard output (No space left on device)"


@pytest.fixture
def closed_pipe():
    """A pipe whose reader has gone, for this process's standard output: every write to it fails (EPIPE). The
    test sets it (pytest's own capture sets sys.stdout again after the fixtures)."""
    reader, writer = os.pipe()
    os.close(reader)
    with open(writer, "w") as stream:
        yield stream


@pytest.mark.parametrize("how", ["writelines", "buffer.write", "buffer.writelines"])
def test_every_way_of_writing_to_a_closed_pipe_ends_the_command_with_141(how, closed_pipe, monkeypatch):
    def command(args):  # a command, or a library it calls, that writes other than by `write`
        stream = sys.stdout.buffer if how.startswith("buffer") else sys.stdout
        text = (b"x" if how.startswith("buffer") else "x") * (4 * PAGE)  # past the stream's own buffer
        stream.writelines([text]) if how.endswith("writelines") else stream.write(text)

    monkeypatch.setattr(list_command, "execute", command)
    monkeypatch.setattr(sys, "stdout", closed_pipe)
    assert main(["list"]) == CLOSED_PIPE_STATUS  # was: BrokenPipeError out of main


def test_a_closed_standard_output_leaves_standard_error_open(closed_pipe, monkeypatch, tmp_path):
    with open(tmp_path / "stderr", "w") as err:
        monkeypatch.setattr(sys, "stdout", closed_pipe)
        monkeypatch.setattr(sys, "stderr", err)
        assert main(["list", "--json"]) == CLOSED_PIPE_STATUS
        print("patchscopes: a later error", file=sys.stderr, flush=True)
    assert (tmp_path / "stderr").read_text() == "patchscopes: a later error\n"  # was: "" (sent to /dev/null)


def test_the_explorer_keeps_serving_when_the_pipe_of_its_log_closes(tmp_path):
    """`patchscopes explore 2>&1 | head -1`: the address is read, then the reader goes. A request the server logs
    (uvicorn warns of an invalid one) meets the closed pipe; the server drops the line and keeps serving, as
    Python's logging drops a record it cannot write, until Ctrl-C."""
    handle = tiny_model("llama", seed=2)
    handle.model.save_pretrained(tmp_path / "tiny")
    handle.tokenizer.save_pretrained(tmp_path / "tiny")
    server = subprocess.Popen(
        CLI + ["explore", "--model", str(tmp_path / "tiny"), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        lines = iter(server.stdout.readline, b"")  # the loader's lines on standard error come first
        address = next(found for line in lines if (found := re.search(rb"http://([0-9.]+):([0-9]+)/", line)))
        host, port = address.group(1).decode(), int(address.group(2))
        server.stdout.close()
        with socket.create_connection((host, port), timeout=30) as sock:
            sock.sendall(b"NOT HTTP\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 400")  # logged: "Invalid HTTP request received."
        info = json.loads(urllib.request.urlopen(f"http://{host}:{port}/api/info", timeout=30).read())
        assert info["n_layers"] == handle.n_layers  # was: connection refused, the server ended (status 141)
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()


# ---- errors under --json ---------------------------------------------------------------------------------------
ERRORS = [  # argv, command, the error's type, a piece of its message
    (
        ["inspect", "--source-prompt", "x", "--no-such-flag", "--json"],
        "inspect",
        "UsageError",
        "unrecognized arguments: --no-such-flag (see: patchscopes inspect --help)",
    ),
    (["list", "--bogus", "--js"], "list", "UsageError", "unrecognized arguments: --bogus"),
    (["inspect", "--top", "0", "--json"], "inspect", "UsageError", "argument --top: '0' is not allowed"),
    (["--json"], None, "UsageError", "the following arguments are required: command"),
    (["no-such-command", "--json"], None, "UsageError", "invalid choice: 'no-such-command'"),
    (
        ["inspect", "--source-prompt", "x", "--preset", "telepathy", "--json"],
        "inspect",
        "UnknownNameError",
        "preset='telepathy' is not known (allowed: token-identity",
    ),
    (["sweep", "--json"], "sweep", "SpecError", "give exactly one of --source-prompt and --prompts"),
    (
        ["inspect", "--source-prompt", "x", "--layers", "0-99", "--json"],
        "inspect",
        "SpecError",
        "--layers='0-99': layer 99 is out of range (allowed: -4..3)",
    ),
    (["run", "./missing.json", "--json"], "run", "SpecError", "missing.json"),
    (["eval", "all", "--json"], "eval", "PatchscopeError", "eval all needs --out DIR"),
]


@pytest.mark.parametrize("argv, command, kind, message", ERRORS, ids=[" ".join(e[0]) for e in ERRORS])
def test_every_error_under_json_is_one_json_line_on_stderr(argv, command, kind, message, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(models, "load_model", tiny_loader())
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, err  # was: patchscopes: error: ...
    line = json.loads(err)
    assert line == {
        "schema": 1,
        "command": command,
        "error": {"type": kind, "message": line["error"]["message"], "exit_status": 2},
    }
    assert message in line["error"]["message"]
    plain = [word for word in argv if word not in ("--json", "--js")]
    assert main(plain) == 2
    assert capsys.readouterr().err == f"patchscopes: error: {line['error']['message']}\n"  # the same, for people


def test_json_is_asked_for_anywhere_before_a_lone_double_dash():
    assert json_requested(["inspect", "--json"]) and json_requested(["--json", "inspect"])
    assert json_requested(["list", "--js"]) and not json_requested(["list", "--"])
    assert not json_requested(["jacobian", "--", "--json"]) and not json_requested(["run", "--source-prompt=--json"])


def test_the_readmes_json_error_is_what_the_cli_prints(capsys):
    readme = joined("guides/cli")
    shown = re.search(r'`(\{"schema": 1, "command": "inspect", "error": .*?\}\})`', readme).group(1)
    assert main(["inspect", "--source-prompt", "x", "--preset", "telepathy", "--json"]) == 2
    printed = capsys.readouterr().err.strip()
    assert re.sub(r"\(allowed: [^)]*\)", "(allowed: ...)", printed) == shown
    assert "patchscopes list --json | head -c 600" in readme and "status 141" in readme


# ---- tokens, one way -------------------------------------------------------------------------------------------
def test_show_text_quotes_so_that_whitespace_is_visible():
    assert [show_text(t) for t in DECODED] == ["' '", "'\\n'", "' Paris'", "'Paris'", "'  '"]
    assert show_text("it's") == '"it\'s"' and show_text("\udcff") == "'\\udcff'"  # printable on any terminal
    assert show_text(" Washington", 7) == "' Washi…'" and show_text(" Paris\n", 4) == "' Pa…'"
    assert show_text("", 3) == "''" and show_text("abc", 1) == "'…'"


def test_a_heatmap_cell_keeps_its_quotes_and_six_letters_of_a_word():
    """The CLI page's examples; the quotes have their own room (CELL_WIDTH counts the text between them)."""
    assert show_text(" London", CELL_WIDTH) == "' London'"  # was "' Londo…": the quotes took two letters' room
    assert show_text(" Washington", CELL_WIDTH) == "' Washi…'"
    assert "a heatmap cell keeps 7: `' London'`, `' Washi…'`" in joined("guides/cli") and CELL_WIDTH == 7


class _Grid:
    """What `layer_heatmap` reads of a SweepResult: SmolLM2's 30 x 30 grid, each cell a word token."""

    same_layer, preset, source_layers, target_layers = False, "token-identity", list(range(30)), list(range(30))
    words = (" London", " Washington", " Amazon", " Oscars", " CEO", " Paris\n", " ?", "hello")
    verifications = None  # not verified: no verdict marks

    def cell(self, prompt: int, layer: int, target_layer: int) -> SimpleNamespace:
        source = SimpleNamespace(prompt=DEMO_PROMPT, position=DEMO_POSITION)
        return SimpleNamespace(
            token=self.words[(layer + target_layer) % len(self.words)],
            prob=layer / 30,
            informative=True,
            scope=SimpleNamespace(source=source, prompt_source=source),
        )


def test_the_heatmap_labels_fit_their_cells_at_the_default_size():
    """The demo's heatmap size (30 x 30): a word's seven characters and its quotes stay inside its cell."""
    figure = layer_heatmap(_Grid())
    renderer = figure.canvas.get_renderer()
    cell = figure.axes[0].get_window_extent(renderer).width / 30
    widths = {text.get_text(): text.get_window_extent(renderer).width for text in figure.axes[0].texts}
    assert set(widths) == {show_text(word, CELL_WIDTH) for word in _Grid.words}
    assert max(widths.values()) < 0.95 * cell, (cell, widths)  # ' Amazon' overflowed 0.42-inch columns


def test_generations_are_quoted_as_tokens_are_in_tables_and_pages():
    """A generation is written as a token is (show_text), cut to the table's width; it was unquoted with only line
    breaks escaped in inspect's table, `repr` in `run` and the tooltips, and stripped in the HTML table."""
    generation = " Paris\n\tis  "
    row = {"source_layer": 3, "target_layer": 3, "token": " Paris", "prob": 0.5, "generation": generation}
    assert layer_table([row]).splitlines()[2] == "  3   3  ' Paris'        0.500  ' Paris\\n\\tis  '"
    long = {**row, "generation": "word " * 20}
    assert layer_table([long]).splitlines()[2].endswith("  '" + ("word " * 6)[:29] + "…'")
    scope = Patchscope(Source("The city of Paris", -1, 3, "tiny"), Target("x", "x", 3))
    result = PatchscopeResult(
        scope=scope, source_position=3, target_position=0, top=[TokenProb(" Paris", 7, 0.5)], generation=generation
    )
    [html_row] = layers_table([result])["rows"]
    assert html_row["cells"][2] == show_text(generation) == "' Paris\\n\\tis  '"  # was: Paris\\n\\tis, stripped
    assert html_row["tip"][-1] == f"generated: {show_text(generation)}"


def _decode_as(monkeypatch, texts: tuple[str, ...]) -> None:
    """Every token id decodes to one of `texts` (the id modulo their number), wherever a readout or an input
    token is decoded; the CLI loads tiny random Llamas."""

    def fake(tokenizer, token_id: int) -> str:
        return texts[int(token_id) % len(texts)]

    for module in ("result.patchscope", "result.sweep", "jacobian.engine"):
        monkeypatch.setattr(importlib.import_module(f"pyvene_patchscopes.{module}"), "token_text", fake)
    monkeypatch.setattr(models, "load_model", tiny_loader())


@pytest.fixture
def decoded_as_whitespace(monkeypatch):
    _decode_as(monkeypatch, DECODED)


@pytest.fixture
def decoded_as_blanks(monkeypatch):
    _decode_as(monkeypatch, tuple(t for t in DECODED if t.isspace()))


def _both(capsys, argv: list[str]) -> tuple[str, dict]:
    """The table and the JSON of one command line."""
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert main([*argv, "--json"]) == 0
    return table, json.loads(capsys.readouterr().out)


def _quoted(text: str) -> list[str]:
    return re.findall(r"'(?:[^'\\]|\\.)*'", text)


def test_every_cli_table_shows_tokens_as_show_text(decoded_as_whitespace, capsys, tmp_path):
    table, out = _both(
        capsys, ["inspect", "--source-prompt", "The city of Paris", "--layers", "0-3", "--max-new-tokens", "0"]
    )
    rows = table.splitlines()[3 : 3 + len(out["layers"])]
    assert [_quoted(line) for line in rows] == [[show_text(r["token"])] for r in out["layers"]]

    spec = Patchscope(
        Source("The city of Paris is large", "Paris", 1), Target("The capital of x is", "x", 2), max_new_tokens=0
    ).save_json(tmp_path / "spec.json")
    table, out = _both(capsys, ["run", str(spec)])
    assert [_quoted(line) for line in table.splitlines()[1:]] == [[show_text(t["token"])] for t in out["result"]["top"]]

    table, out = _both(
        capsys, ["sweep", "--source-prompt", "Here is a word: dog", "--source-layers", "0-2", "--target-layers", "1,2"]
    )
    assert sorted(_quoted(table)) == sorted(show_text(c["token"]) for c in out["cells"])  # was: the raw text

    table, out = _both(capsys, ["jacobian", "The city of Paris is large", "--variant", "semantic", "--top", "3"])
    header, _, body = table.partition("-" * 52)
    assert show_text(out["prediction"]) in header.splitlines()[0]
    assert [_quoted(line) for line in body.strip().splitlines()] == [[show_text(t["token"])] for t in out["tokens"]]

    table, out = _both(capsys, ["demo", "--out", str(tmp_path / "demo")])
    rows = [line for line in table.splitlines() if re.match(r"^ *\d+ +\d+ ", line)]
    assert [_quoted(line)[0] for line in rows] == [show_text(r["token"]) for r in out["layers"]]


def test_the_demo_on_a_model_verify_refuses_prints_its_table_with_the_reason(monkeypatch, capsys, tmp_path):
    """A tiny tokenizer has too few single-token control words for verify's defaults: the demo still prints every
    row, its verdict column says `not checked`, and the line under the table is verify's own refusal."""
    monkeypatch.setattr(models, "load_model", tiny_loader())
    handle = tiny_loader()()
    scopes = [build("token-identity", DEMO_PROMPT, DEMO_POSITION, l, max_new_tokens=4) for l in range(handle.n_layers)]
    with pytest.raises(SpecError) as refused:
        verify(run(scopes, handle, progress=False), handle)
    table, out = _both(capsys, ["demo", "--out", str(tmp_path / "demo")])
    rows = [line for line in table.splitlines() if re.match(r"^ *\d+ +\d+ ", line)]
    assert len(rows) == len(out["layers"]) == handle.n_layers and all("  not checked  " in row for row in rows)
    assert f"No reading was verified on this model (verdict: null): {refused.value}" in table
    assert all(row[key] is None for row in out["layers"] for key in VERIFY_COLUMNS)


def _axes_labels(figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].texts]


def test_figures_and_pages_show_whitespace_tokens_quoted(decoded_as_blanks, tiny_llama):
    grid = sweep(
        "Here is a word: dog",
        tiny_llama,
        source_layers=[0, 1, 2],
        target_layers=[1, 2],
        max_new_tokens=0,
        progress=False,
    )
    tokens = [[grid.cell(0, l, t).token for t in (1, 2)] for l in (0, 1, 2)]
    assert {t for row in tokens for t in row} <= {" ", "\n", "  "}
    want = [[show_text(t, CELL_WIDTH) for t in row] for row in tokens]
    assert _axes_labels(layer_heatmap(grid)) == [label for row in want for label in row]  # was: blank cells
    page = sweep_grid(grid)
    assert [[cell["label"] for cell in row] for row in page["cells"]] == want
    assert page["cells"][0][0]["tip"][1].startswith(show_text(grid.cell(0, 0, 1).top[0].token) + "  ")

    same = sweep(
        ["Here is a word: dog", "one two"],
        tiny_llama,
        source_layers=[1, 2],
        target_layers="same",
        max_new_tokens=0,
        progress=False,
    )
    assert _axes_labels(layer_heatmap(same)) == [show_text(row[0], CELL_WIDTH) for per in same.tokens() for row in per]
    results = [grid.cell(0, l, 1) for l in (0, 1, 2)]
    assert [row["cells"][0] for row in layers_table(results)["rows"]] == [show_text(r.token, 40) for r in results]


def test_jacobian_views_show_whitespace_tokens_quoted(tmp_path):
    scope = JacobianScope(variant="semantic", model="tiny")
    attribution = Attribution(
        text="a \n  Paris",
        scope=scope,
        tokens=("a", " ", "\n", "  ", " Paris"),
        positions=(1, 2, 3, 4, 5),
        scores=(0.1, 0.9, 0.5, 0.3, 0.2),
        target_position=5,
        prediction=" ",
        prediction_id=7,
        prediction_prob=0.5,
        target_token=" ",
        target_id=7,
    )
    page = attribution.to_html(tmp_path / "a.html")
    spans = [html.unescape(s) for s in re.findall(r'<span class="(?:tok|pred)"[^>]*>([^<]*)</span>', page)]
    assert spans == ["'a'", "' '", "'\\n'", "'  '", "' Paris'", "' '"]  # was: blanks and a line break
    assert "prediction &#x27; &#x27;" in page
    figure = attribution.plot(tmp_path / "a.png")
    assert _axes_labels(figure) == [show_text(t) for t in (*attribution.tokens, attribution.prediction)]


def test_the_explorers_token_chips_are_labelled_by_show_text():
    explorer = Explorer(tiny_model("llama", seed=2))
    tokens = explorer.tokens("one  two\nthree ")["tokens"]
    assert [t["label"] for t in tokens] == [show_text(t["text"]) for t in tokens]  # the page draws `label`
    assert any(t["text"].strip() != t["text"] for t in tokens)
    script = (REPO / "pyvene_patchscopes" / "explore" / "static" / "explore.js").read_text()
    assert "chip.textContent = token.label" in script and "textContent = token.text" not in script
