"""The command line describes itself: `--version`, a help line for every option naming its default and its
choices, an example at the end of each command's `--help`, one module per command registering its own
subcommand, and the keys of each command's --json object written down once (`cli.output.JSON_KEYS`)."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_loader

from pyvene_patchscopes import Patchscope, Source, Target, models
from pyvene_patchscopes.cli import JSON_KEYS, build_parser, main
from pyvene_patchscopes.cli.commands import COMMANDS
from pyvene_patchscopes.evaluate import TASKS
from pyvene_patchscopes.evaluate.report import Report
from pyvene_patchscopes.jacobian.spec import FISHER_FORMS, VARIANTS
from pyvene_patchscopes.models import EMBEDDED, MAP_STRATEGIES
from pyvene_patchscopes.presets import PRESETS
from pyvene_patchscopes.tools import families

REPO = Path(__file__).resolve().parent.parent
VERSION = importlib.metadata.version("pyvene-patchscopes")
# Options whose values the library checks (so that its errors stay what they were): the help names each value
# of the table that allows them.
CHOICES = {
    "--preset": PRESETS,
    "--variant": VARIANTS,
    "--fisher": FISHER_FORMS,
    "--device-map": MAP_STRATEGIES,
    "--model": EMBEDDED,
    "task": [*TASKS, "all"],
}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def _help_lines(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each argument's help line as --help prints it (%(default)s filled in), by its flag or positional name."""
    formatter = parser._get_formatter()
    return {
        (a.option_strings[-1] if a.option_strings else a.dest): formatter._expand_help(a)
        for a in parser._actions
        if a.help is not None and not isinstance(a, argparse._HelpAction)
    }


def test_version_prints_the_installed_packages_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out == f"patchscopes {VERSION}\n"
    proc = subprocess.run(
        [sys.executable, "-m", "pyvene_patchscopes.cli", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert (proc.returncode, proc.stdout) == (0, f"patchscopes {VERSION}\n"), proc.stderr[-800:]


def test_the_console_script_runs_the_package_cli():
    script = Path(sys.executable).with_name("patchscopes")
    assert script.is_file(), "pip install -e . makes the patchscopes script (setup.cfg console_scripts)"
    proc = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout) == (0, f"patchscopes {VERSION}\n"), proc.stderr[-800:]


@pytest.mark.parametrize("command", list(_subcommands(build_parser())))
def test_every_option_has_a_help_line_naming_its_default_and_its_choices(command):
    parser = _subcommands(build_parser())[command]
    lines = _help_lines(parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        line = lines[action.option_strings[-1]]
        assert ("required" if action.required else "(default: ") in line, (command, action.option_strings, line)
        if action.default not in (None, False, [], argparse.SUPPRESS):
            assert f"(default: {action.default}" in line, (command, action.option_strings, line)
        for choice in action.choices or ():
            assert choice in line, (command, action.option_strings, choice, line)
    for flag, allowed in CHOICES.items():
        if flag in lines:
            assert all(name in lines[flag] for name in allowed), (command, flag, lines[flag])


@pytest.mark.parametrize("command", list(_subcommands(build_parser())))
def test_each_commands_help_ends_with_an_example_it_parses(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    last = capsys.readouterr().out.rstrip("\n").splitlines()[-1]
    assert done.value.code == 0 and last.startswith(f"example: patchscopes {command}"), last
    example = shlex.split(last.removeprefix("example: "))
    assert build_parser().parse_args(example[1:]).command == command


def test_each_command_module_registers_its_own_subcommand():
    folder = REPO / "pyvene_patchscopes" / "cli" / "commands"
    names = [module.__name__.rpartition(".")[2] for module in COMMANDS]
    assert sorted(names) == sorted(p.stem for p in folder.glob("*.py") if p.stem != "__init__")
    for module, name in zip(COMMANDS, names):
        parser = argparse.ArgumentParser()
        subcommands = parser.add_subparsers(dest="command")
        module.register(subcommands)
        assert list(subcommands.choices) == [name]
        assert subcommands.choices[name].get_default("func") is module.execute
    assert list(_subcommands(build_parser())) == names


def test_every_json_output_key_is_listed_in_cli_json_keys(capsys, monkeypatch, tmp_path):
    """Each command's --json object holds "schema", "command" and then its `JSON_KEYS` entry, in that order."""
    monkeypatch.setattr(models, "load_model", tiny_loader())
    monkeypatch.setattr(
        families, "survey", lambda progress=False: [families.Verdict("TinyForCausalLM", "tiny", "planned")]
    )
    monkeypatch.setattr(
        "pyvene_patchscopes.evaluate.run_task",
        lambda name, load, options, out=None, source="", target="": Report(
            task=name, title=name, model=source, command="", settings={}, summary={}
        ),
    )
    spec = Patchscope(
        Source("The city of Paris is large", "Paris", 1), Target("The capital of x is", "x", 2), max_new_tokens=0
    ).save_json(tmp_path / "spec.json")
    sweep = [
        "sweep",
        "--source-prompt",
        "Here is a word: dog",
        "--source-layers",
        "0-1",
        "--target-layers",
        "1",
        "--max-new-tokens",
        "0",
    ]
    runs = {
        "list": ["list"],
        "presets": ["presets"],
        "run": ["run", str(spec)],
        "inspect": ["inspect", "--source-prompt", "The city of Paris", "--layers", "0-1", "--max-new-tokens", "0"],
        "sweep": sweep,
        "sweep --out": [*sweep, "--out", str(tmp_path / "grid")],
        "demo": ["demo", "--out", str(tmp_path / "demo")],
        "jacobian": ["jacobian", "The city of Paris is large", "--variant", "semantic"],
        "eval": ["eval", "next-token", "--limit", "1"],
        "families": ["families"],
        "families --markdown": ["families", "--markdown"],
    }
    assert sorted(runs) == sorted(set(JSON_KEYS) - {"eval all", "explore"})  # eval all: every task; explore serves
    for shape, argv in runs.items():
        assert main([*argv, "--json"]) == 0, (shape, capsys.readouterr().err[-800:])
        printed = json.loads(capsys.readouterr().out)
        assert list(printed) == ["schema", "command", *JSON_KEYS[shape]], shape
    assert JSON_KEYS["sweep --out"] == (
        "model",
        "preset",
        "out",
        "spec_hash",
        "computed_units",
        "skipped_units",
        "plot",
        "html",
    )  # the docs' schema of `sweep --out` (issue 38)
