"""The manual (docs/, built by mkdocs) and the README: the site builds strictly, with the API from the docstrings;
the pages say what the code does; every Python block in them runs here or says why not."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
from docs_text import DOCS, ROOT, page, pages, python_blocks

import pyvene_patchscopes

PACKAGE = ROOT / "pyvene_patchscopes"


def test_mkdocs_builds_the_site_strictly_with_the_api_from_the_docstrings(tmp_path):
    """As `make test` builds it: a missing page, a broken link or an unresolved reference fails the build."""
    built = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert built.returncode == 0, built.stderr
    api = (tmp_path / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    documented = set(re.findall(r'id="pyvene_patchscopes\.(\w+)"', api))
    assert set(pyvene_patchscopes.__all__) - {"FAMILIES"} <= documented  # FAMILIES: a table, not a docstring
    assert "One Patchscope: source" in api and "A copy with some fields changed" in api  # Patchscope, .replace
    assert all((tmp_path / "tutorials" / name.stem / "index.html").exists() for name in ROOT.glob("tutorials/*.ipynb"))


def test_the_readme_stays_short_and_points_at_every_page():
    readme = page("README")
    assert len(readme.splitlines()) < 150
    assert "make demo" in readme and "make test" in readme
    linked = set(re.findall(r"\]\(docs/([\w/-]+)\.md\)", readme)) - {"index"}
    assert linked == set(pages()) - {"README", "index"}, sorted(set(pages()) ^ linked)


def test_every_page_is_linked_from_the_docs_home():
    linked = set(re.findall(r"\]\(([\w/-]+)\.md\)", page("index")))
    assert linked == set(pages()) - {"README", "index"}, sorted(set(pages()) ^ linked)


# ---- every Python block runs, or says why it does not ---------------------------------------------------------
BLOCKS = [(name, n, code, marker) for name in pages() for n, (code, marker) in enumerate(python_blocks(page(name)))]


def test_every_python_block_runs_here_or_says_why_not():
    assert len(BLOCKS) >= 15
    for name, n, _, marker in BLOCKS:
        if marker and marker.startswith("run by "):
            test = ROOT / marker.removeprefix("run by ")
            assert test.exists() and f'"{name}"' in test.read_text(), (name, n, marker)  # the test reads this page


@pytest.mark.real_model
@pytest.mark.parametrize("name", sorted({name for name, _, _, marker in BLOCKS if marker is None}))
def test_the_python_blocks_of_a_page_run_in_order(name, tmp_path, monkeypatch):
    """The page's unmarked blocks, in order, in one namespace (as a reader pastes them), in an empty folder."""
    monkeypatch.chdir(tmp_path)
    space: dict = {}
    for code, marker in python_blocks(page(name)):
        if marker is None:
            with contextlib.redirect_stdout(io.StringIO()):
                exec(compile(code, f"docs/{name}.md", "exec"), space)  # noqa: S102 (the page's own code)


# ---- the pages say what the code does ------------------------------------------------------------------------
@pytest.mark.real_model
def test_the_ten_line_example_prints_what_its_comment_says(capsys, monkeypatch, tmp_path):
    """The README's example, which Getting started repeats: its `# ` line under the print is the printed line."""
    ((code, _),) = python_blocks(page("README"))
    assert python_blocks(page("getting-started"))[0][0] == code
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})  # noqa: S102 (the README's own code)
    shown = [line.removeprefix("# ") for line in code.splitlines() if line.startswith("# ")]
    assert capsys.readouterr().out.splitlines() == shown and shown


def test_the_tutorials_page_counts_and_lists_every_notebook():
    notebooks = sorted(p.stem for p in (ROOT / "tutorials").glob("*.ipynb"))
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    text = page("tutorials/index")
    assert f"{words[len(notebooks) - 1].capitalize()} notebooks in" in text  # it said "Five" beside six
    assert all(f"[tutorials/{name}.ipynb]({name}.ipynb)" in text for name in notebooks)
    assert sorted(p.stem for p in (DOCS / "tutorials").glob("*.ipynb")) == notebooks  # each one a page


def _names_in_code() -> set[str]:
    """Every name the package and its tests define or use (identifiers and string constants)."""
    names: set[str] = set()
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]:
        names.add(path.stem)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Name):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                names.add(node.name)
            elif isinstance(node, ast.Attribute):
                names.add(node.attr)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                names.update(re.findall(r"\w+", node.value))
    return names


# names the pages show in code that belong to other projects (sae-lens, pyvene, peft, transformers, the paper's code)
OTHERS = {
    "hook_resid_post",
    "hook_resid_pre",
    "hook_name",
    "W_dec",
    "d_in",
    "output_hidden_states",
    "skip_final_ln",
    "cpu_offload",
    "load_in_4bit",
    "init_lora_weights",
    "modules_to_save",
    "lora_alpha",
    "rank_pattern",
    "alpha_pattern",
    "lora_B",
    "adapter_model",
    "adapter_config",
    "position_ids",
    "use_fast",
    "unit_locations",
    "source_representation",
    "source_representations",
    "split_dataset_by_node",
    "num_hidden_layers",
    "num_layers",
    "logit_scale",
    "logits_scaling",
    "layer_types",
    "shared_kv_states",
    "weights_only",
    "trust_remote_code",
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "get_input_embeddings",
    "get_output_embeddings",
    "hidden_states",
    "max_memory",
    "offload_folder",
    "attn_implementation",
    "quantization_config",
    "device_map",
    "save_intervention",
    "load_intervention",
    "patchscope_lens",
    "steering_hooks",
    "activation_utils",
    "scale_tuning_gemma",
    "causal_methods",
    "model_bridge",
    "LATENTQA_LLAMA3",
    "intkey_layer_20_comp_block_output_unit_pos_nunit_1",
    "overlay_strength",
    "jacobian_sum",
    "n_done",
    "next_idx",
    "dim_batch",
    "n_prompts",
    "d_model",
    "my_plugins",
    "pydoc_data",
    "nl_probes",
}


def test_every_snake_case_name_the_pages_show_in_code_exists():
    """A name in backticks with an underscore (a function, a field, a key) is one the code has: the README named
    `interpret_vectors`, which never existed."""
    known = _names_in_code() | OTHERS
    shown = {
        name
        for page_name in pages()
        for span in re.findall(r"`([^`\n]+)`", page(page_name))
        for name in re.findall(r"(?<![\w./-])([a-z][a-z0-9]*_[a-z0-9_]+)(?=\W|$)", span)
    }
    assert "interpret_vectors" not in shown
    assert not sorted(shown - known), sorted(shown - known)


def test_the_errors_page_names_every_error_and_warning_class_of_the_package():
    classes = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", "").endswith(("Error", "Warning", "Full")) for base in node.bases
            ):
                classes.add(node.name)
    text = page("reference/errors")
    assert len(classes) >= 14 and all(f"| `{name}` |" in text for name in classes), sorted(classes)


def test_sweep_out_prints_the_keys_the_cli_page_lists(tmp_path, capsys):
    """`patchscopes sweep --out DIR --json` prints what it computed and skipped, not the cells: the page's row for
    it lists exactly its keys (the README listed `cells` and none of the four it prints)."""
    from tiny import tiny_model

    from pyvene_patchscopes.cli import main

    handle = tiny_model("llama", seed=4)
    handle.model.save_pretrained(tmp_path / "tiny")
    handle.tokenizer.save_pretrained(tmp_path / "tiny")
    assert (
        main(
            [
                "sweep",
                "--model",
                str(tmp_path / "tiny"),
                "--source-prompt",
                "Here is a word: Paris",
                "--source-position",
                "Paris",
                "--source-layers",
                "1",
                "--target-layers",
                "1",
                "--max-new-tokens",
                "0",
                "--out",
                str(tmp_path / "grid"),
                "--json",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    row = next(line for line in page("guides/cli").splitlines() if line.startswith("| `sweep --out DIR` |"))
    listed = re.findall(r"`(\w+)`", row.split("|")[2].split(";")[0])
    assert listed == [key for key in printed if key not in ("schema", "command")]
    assert printed["computed_units"] == [0] and printed["skipped_units"] == [] and "cells" not in printed
    cells = next(line for line in page("guides/cli").splitlines() if line.startswith("| `sweep` |"))
    assert "`cells`" in cells and "without `--out`" in cells


def test_the_testing_page_names_every_step_of_make_test():
    """docs/developing/testing.md says what `make test` runs; each command of the Makefile's test recipe is there."""
    makefile = (ROOT / "Makefile").read_text().split("\ntest:", 1)[1].split("\n\n", 1)[0]
    steps = [line.split("#", 1)[0].strip() for line in makefile.splitlines()[1:] if line.startswith("\t")]
    commands = [re.sub(r"^(NO_MKDOCS_2_WARNING=1 )?\$\((VENV)\)/bin/|^\$\(PY\) -m ", "", step) for step in steps]
    assert commands == ["mkdocs build --strict --quiet", "ruff check .", "ruff format --check .", "mypy", "pytest -q"]
    text = " ".join(page("developing/testing").split())
    assert all(f"`{command.removesuffix(' --quiet')}" in text for command in commands), text[:400]
