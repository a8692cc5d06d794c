"""Fuzzing the command line: generated argument lists, valid and hostile, never end in a traceback.

Each list picks a command, then flags with values drawn from plausible ones and hostile ones (empty text, lone
surrogates, bad layer ranges, huge numbers, paths out of the tree, missing or non-UTF-8 files, folders that
cannot be made, unknown devices and models), and output paths that must be refused before any work (devices,
read-only and pseudo-file-system folders, a suffix no figure format has, an input file reused as an output).
`main` must return 0, or 2 with the library's one-line error: `patchscopes: error: ...`, or with --json on the
command line one JSON object (schema, command, error type, message, exit status); any exception that escapes it
fails the test. Models are tiny random Llamas behind the CLI's own checks of the
model name, device and dtype; evaluations are stubbed after the CLI has checked their options.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st
from tiny import tiny_loader

from pyvene_patchscopes import Patchscope, Source, Target, models
from pyvene_patchscopes.cli import json_requested, main
from pyvene_patchscopes.evaluate.report import Report

EXAMPLES = 320

HOSTILE = [
    "",
    " ",
    "\udcff",
    "x \ud800",
    "²",
    "\x00",
    "\n",
    "-1",
    "0",
    "-0",
    "5-",
    "a",
    "0-3:0",
    "1-0",
    "3:2",
    "0-3000000",
    "9" * 40,
    "1e9",
    "nan",
    "../../etc",
    "/",
    "https://example.com/model",
    "org/name",
    "all",
    "same",
    "cuda:7",
    "toaster",
    "--json",
    "--help",
    "💥",
    "a" * 300,
    "1,,2",
    "-9",
    "3-1:-1",
]
hostile = st.sampled_from(HOSTILE) | st.text(max_size=10)
PROMPTS = ["Amazon's former CEO attended Oscars", "The city of Paris is large", "Here is a word: dog"]


def _files(root: Path) -> dict[str, list[str]]:
    """Prepared inputs and outputs under `root`, valid and not."""
    (root / "prompts.txt").write_text("Here is a word: dog\nThe city of Paris is large\n")
    (root / "latin1.txt").write_bytes(b"caf\xe9\n")
    (root / "empty.txt").write_text("\n")
    (root / "a-file").write_text("not a folder")
    Patchscope(
        Source("The city of Paris is large", "Paris", 1), Target("The capital of x is", "x", 2), max_new_tokens=2
    ).save_json(root / "spec.json")
    (root / "spec-bad.json").write_bytes(b'{"format": "\xff"}')
    (root / "data.jsonl").write_text('{"text": "The capital of France is"}\n')
    (root / "folder").mkdir()
    (root / "read-only").mkdir()
    os.chmod(root / "read-only", 0o555)  # refused unless running as root, which may write anyway
    inputs = [
        "prompts.txt",
        "latin1.txt",
        "empty.txt",
        "missing.txt",
        "a-file",
        "folder",
        "spec.json",
        "spec-bad.json",
        "data.jsonl",
        "/dev/null",
        "/etc",
    ]
    outputs = [
        "out",
        "out/deeper/x",
        "a-file/sub",
        "plot.png",
        "folder",
        "/proc/forbidden/x",
        "/dev/full",
        "/dev/null",
        "/proc/x.html",
        "/sys/x.png",
        "read-only/x.png",
        "heat.out",
        "prompts.txt",
        "spec.json",
        "data.jsonl",
        "page.html",
    ]
    return {"inputs": inputs, "outputs": outputs}


def _values(pool: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(pool) | hostile


def arguments(files: dict[str, list[str]]) -> st.SearchStrategy[list[str]]:
    ints, layers = _values(["0", "1", "2", "3", "-1", "5"]), _values(["0", "1,3", "0-3", "all", "-1", "1-3:2"])
    prompt, position = _values(PROMPTS), _values(["-1", "1", "CEO", "Paris", "dog", "x"])
    flags = {
        "--source-prompt": prompt,
        "--target-prompt": _values(["The capital of x is", "cat -> cat; x ->"]),
        "--source-position": position,
        "--preset": _values(["token-identity", "logit-lens", "attribute", "entity-description", "multihop"]),
        "--max-new-tokens": ints,
        "--layers": layers,
        "--target-layer": ints,
        "--top": ints,
        "--source-layers": layers,
        "--target-layers": layers | st.just("same"),
        "--batch-size": ints,
        "--max-batch-tokens": _values(["1", "64", "32768"]),
        "--plot": _values(files["outputs"]),
        "--html": _values(files["outputs"]),
        "--prompts": _values(files["inputs"]),
        "--out": _values(files["outputs"]),
        "--variant": _values(["semantic", "fisher", "temperature", "gradient-x-input"]),
        "--fisher": _values(["low-rank", "exact"]),
        "--rank": ints,
        "--target-position": ints,
        "--target-token": _values([" Paris", "7", "²"]),
        "--limit": ints,
        "--n-train": ints,
        "--seed": ints,
        "--data": _values(files["inputs"]),
        "--target-model": _values(["gemma3-270m", "smollm2-135m"]),
        "--source-layer": ints,
        "--model": _values(["smollm2-135m", "gemma3-270m"]),
        "--device": _values(["cpu", "auto"]),
        "--dtype": _values(["float32", "bfloat16", "fp16"]),
    }
    commands = {
        "inspect": (
            None,
            [
                "--source-prompt",
                "--source-position",
                "--preset",
                "--target-prompt",
                "--max-new-tokens",
                "--layers",
                "--target-layer",
                "--top",
                "--html",
                "--model",
                "--device",
                "--dtype",
            ],
        ),
        "run": (
            _values(["token-identity", "logit-lens", "./missing", "no-such-entry"] + files["inputs"]),
            [
                "--source-prompt",
                "--source-position",
                "--source-layer",
                "--target-layer",
                "--top",
                "--model",
                "--device",
                "--dtype",
            ],
        ),
        "sweep": (
            None,
            [
                "--source-prompt",
                "--prompts",
                "--source-position",
                "--preset",
                "--target-prompt",
                "--max-new-tokens",
                "--source-layers",
                "--target-layers",
                "--batch-size",
                "--max-batch-tokens",
                "--plot",
                "--html",
                "--model",
                "--device",
                "--dtype",
            ],
        ),
        "jacobian": (
            prompt,
            [
                "--variant",
                "--fisher",
                "--rank",
                "--target-position",
                "--target-token",
                "--top",
                "--out",
                "--model",
                "--device",
                "--dtype",
            ],
        ),
        "demo": (None, ["--out", "--model", "--device", "--dtype"]),
        "eval": (
            _values(["next-token", "attributes", "entities", "cross-model", "multihop", "stages", "jacobian", "all"]),
            [
                "--out",
                "--limit",
                "--layers",
                "--target-layers",
                "--data",
                "--n-train",
                "--seed",
                "--batch-size",
                "--target-model",
                "--model",
                "--device",
                "--dtype",
            ],
        ),
        "list": (None, []),
        "presets": (None, []),
    }

    @st.composite
    def one(draw) -> list[str]:
        command = draw(st.sampled_from(list(commands) + ["no-such-command"]))
        positional, names = commands.get(command, (None, []))
        argv = [command]
        if positional is not None and draw(st.integers(0, 9)) > 0:
            argv.append(draw(positional))
        if command == "inspect" and draw(st.integers(0, 9)) > 0:
            argv += ["--source-prompt", draw(prompt)]
        for name in draw(st.lists(st.sampled_from(names), max_size=5, unique=True)) if names else []:
            argv += [name, draw(flags[name])]
        if draw(st.booleans()):
            argv.append("--json")
        if draw(st.integers(0, 19)) == 0:
            argv.insert(draw(st.integers(1, len(argv))), draw(hostile))
        return argv

    return one()


def _stub_evaluations(monkeypatch) -> None:
    """After the CLI has checked an evaluation's options, return an empty report instead of running it."""
    from pyvene_patchscopes import evaluate

    def run_task(name, load, options, out=None, source="smollm2-135m", target="gemma3-270m"):
        evaluate.get_task(name)
        load(source)
        return Report(task=name, title=name, model=source, command="", settings={}, summary={})

    def run_all(load, options, out):
        reports = [run_task(name, load, options) for name in evaluate.TASKS]
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "README.md").write_text("# stub\n")
        return reports

    monkeypatch.setattr(evaluate, "run_task", run_task)
    monkeypatch.setattr(evaluate, "run_all", run_all)


def test_generated_argument_lists_end_in_0_or_the_librarys_one_line_error(monkeypatch):
    monkeypatch.setattr(models, "load_model", tiny_loader())
    _stub_evaluations(monkeypatch)
    root = Path(tempfile.mkdtemp(prefix="patchscopes-cli-fuzz-"))
    files = _files(root)
    monkeypatch.chdir(root)
    seen: list[list[str]] = []
    codes = {0: 0, 2: 0}
    json_errors = []

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(arguments(files))
    def one(argv: list[str]) -> None:
        seen.append(argv)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv)
            except SystemExit as exit_:  # only --help may exit, and it exits cleanly
                assert exit_.code == 0 and ("--help" in argv or "-h" in argv), argv
                return
        assert code in (0, 2), (argv, err.getvalue()[-500:])
        codes[code] += 1
        text = err.getvalue()
        assert "Traceback" not in text, (argv, text[-1000:])
        if code != 2:
            return
        last = text.rstrip("\n").split("\n")[-1]
        if not json_requested(argv):
            assert last.startswith("patchscopes: error: "), (argv, text[-500:])
            return
        error = json.loads(last)  # every error under --json is one line of JSON
        assert set(error) == {"schema", "command", "error"} and error["schema"] == 1, (argv, last)
        assert error["command"] == (None if argv[0] == "no-such-command" else argv[0]), (argv, last)
        assert set(error["error"]) == {"type", "message", "exit_status"} and error["error"]["exit_status"] == 2
        assert error["error"]["message"] and error["error"]["type"].endswith("Error"), (argv, last)
        json_errors.append(argv)

    one()
    assert not [p for p in ("/dev/full.png", "/dev/full.html", "/dev/null.png", "/dev/null.html") if Path(p).exists()]
    assert (root / "prompts.txt").read_text() == "Here is a word: dog\nThe city of Paris is large\n"  # never written
    assert Patchscope.load_json(root / "spec.json").source.prompt == "The city of Paris is large"
    assert len(seen) >= 300
    assert codes[0] >= 30 and codes[2] >= 100, codes  # both valid runs and refusals were exercised
    assert len(json_errors) >= 40, len(json_errors)
