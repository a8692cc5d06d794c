"""The command line's paths (issue 37): no output overwrites an input, vector-source specs run from the command
line, and the placement flags and --lens say what is wrong with them.

The pair fuzzer at the end extends `tests/test_cli_fuzz.py`: every path option of each command is tried against
every other path option of the same command, at the same path and at a path inside the other's folder. Each
command line is refused in one line, or runs harmlessly; every input (the model folder, the adapter and its files,
the lens, the spec folder, the prompts, the data, a finished sweep folder) hashes the same afterwards; and where
an output would be, hold or lie inside an input, it is refused before any work: no model loaded, nothing written.
Models are tiny random Llamas saved as folders, loaded by the real `load_model`.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny import tiny_model

from pyvene_patchscopes import Patchscope, Source, Target, cli, load_model, models, run, save_patchscope
from pyvene_patchscopes.cli.commands import explore as explore_command
from pyvene_patchscopes.evaluate.report import Report
from pyvene_patchscopes.jlens import JacobianLens
from pyvene_patchscopes.presets import self_explanation
from pyvene_patchscopes.vectors import das_source, load_sae, probe_source, sae_source, vector_source

SOURCE = "The city of Paris is large"
SWEEP = [
    "--source-prompt",
    SOURCE,
    "--source-position",
    "Paris",
    "--source-layers",
    "1",
    "--target-layers",
    "1",
    "--max-new-tokens",
    "0",
]


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    """The inputs every command here reads: a tiny model folder, a LoRA adapter on it, a Jacobian lens for it, a
    saved spec, prompts, data, and a finished sweep folder."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("inputs")
    base = tiny_model("llama", seed=5)
    base.model.save_pretrained(root / "tiny")
    base.tokenizer.save_pretrained(root / "tiny")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(copy.deepcopy(base.model), config).save_pretrained(root / "adapter")
    JacobianLens({0: torch.eye(base.hidden_size), 1: 2 * torch.eye(base.hidden_size)}).to_file(root / "lens.pt")
    tiny = str(root / "tiny")
    save_patchscope(
        Patchscope(Source(SOURCE, "Paris", 1, tiny), Target("The capital of x is", "x", 2), max_new_tokens=2),
        root / "spec",
    )
    (root / "prompts.txt").write_text(SOURCE + "\nHere is a word: dog\n")
    (root / "data.jsonl").write_text('{"text": "The capital of France is"}\n')
    assert _main("sweep", *SWEEP, "--model", tiny, "--out", root / "sweep")[0] == 0
    return {
        "root": root,
        "tiny": root / "tiny",
        "adapter": root / "adapter",
        "lens": root / "lens.pt",
        "spec": root / "spec",
        "prompts": root / "prompts.txt",
        "data": root / "data.jsonl",
        "sweep": root / "sweep",
    }


def _main(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def _tree(path: Path) -> dict[str, str]:
    """Every name under `path` (or the file itself) -> its content's sha256 ('dir' for a folder)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {
        p.relative_to(path).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """The real `load_model`, recording each model it loaded."""
    real, loaded = models.load_model, []

    def load(name, *args, **options):
        handle = real(name, *args, **options)
        loaded.append(name)
        return handle

    monkeypatch.setattr(models, "load_model", load)
    return loaded


def _refused(argv: list, loads: list[str], *parts: str) -> str:
    """The command line exits 2 with one line holding each of `parts`, having loaded no model."""
    code, _, err = _main(*argv)
    line = err.strip()
    assert code == 2 and "\n" not in line and line.startswith("patchscopes: error: "), (argv, err[-600:])
    assert all(part in line for part in parts), (parts, line)
    assert loads == [], f"a model was loaded before {line!r}"
    return line


# ---- finding 1: an output that is, or lies inside, an input of the same command -----------------------------------
@pytest.mark.parametrize(
    "case", ["lens", "adapter config", "adapter weights", "sweep manifest", "sweep shard", "sweep folder"]
)
def test_an_output_is_refused_where_it_would_overwrite_the_commands_input(kit, loads, tmp_path, monkeypatch, case):
    monkeypatch.chdir(tmp_path)
    tiny, sweep = str(kit["tiny"]), kit["sweep"]
    inspect = ["inspect", "--model", tiny, "--source-prompt", SOURCE, "--source-position", "Paris", "--layers", "1"]
    argv, parts = {
        "lens": (
            inspect + ["--preset", "jacobian-lens", "--lens", kit["lens"], "--html", kit["lens"]],
            (f"--html='{kit['lens']}' is also an input of this command (--lens='{kit['lens']}')",),
        ),
        "adapter config": (
            inspect + ["--adapter", kit["adapter"], "--html", kit["adapter"] / "adapter_config.json"],
            (
                f"--html='{kit['adapter'] / 'adapter_config.json'}' is inside --adapter="
                f"'{kit['adapter']}', which this command reads",
            ),
        ),
        "adapter weights": (
            inspect + ["--adapter", kit["adapter"], "--html", kit["adapter"] / "adapter_model.safetensors"],
            ("--adapter=",),
        ),
        "sweep manifest": (
            ["sweep", *SWEEP, "--model", tiny, "--out", sweep, "--html", sweep / "manifest.json"],
            (f"--html='{sweep / 'manifest.json'}' is inside --out='{sweep}'",),
        ),
        "sweep shard": (
            ["sweep", *SWEEP, "--model", tiny, "--out", sweep, "--html", sweep / "unit-000000.parquet"],
            ("--out=",),
        ),
        "sweep folder": (
            ["sweep", *SWEEP, "--model", tiny, "--out", "grid", "--html", "grid"],
            ("--html='grid' is also an input of this command (--out='grid')",),
        ),
    }[case]
    before = {name: _tree(path) for name, path in kit.items() if name != "root"}
    line = _refused(argv, loads, *parts, "(allowed: ")
    assert line.endswith(")")
    assert {name: _tree(path) for name, path in kit.items() if name != "root"} == before
    assert list(tmp_path.iterdir()) == [], "something was written before the refusal"


def test_every_output_is_checked_against_every_input_and_every_other_output(kit, loads, tmp_path, monkeypatch):
    """Beyond the reported cases: the spec folder, the model folder, prompts, data, the offload folder, and two
    outputs where one would be the other's folder; a hard link is the same file."""
    monkeypatch.chdir(tmp_path)
    tiny, spec = str(kit["tiny"]), str(kit["spec"])
    (tmp_path / "hard.txt").hardlink_to(kit["prompts"])
    cases = [
        (
            ["run", spec, "--device-map", "cpu", "--offload-folder", Path(spec) / "weights"],
            ("--offload-folder=", f"is inside spec='{spec}'"),
        ),
        (["eval", "next-token", "--model", tiny, "--out", Path(tiny) / "reports"], (f"--model='{tiny}'",)),
        (
            ["eval", "next-token", "--model", tiny, "--data", kit["data"], "--out", kit["root"]],
            (f"--out='{kit['root']}' holds ",),
        ),
        (["demo", "--model", tiny, "--out", tiny], (f"--out='{tiny}/demo_heatmap.png' is inside --model='{tiny}'",)),
        (["jacobian", SOURCE, "--model", tiny, "--out", Path(tiny) / "config"], ("--out=", "--model=")),
        (
            ["sweep", "--prompts", "hard.txt", "--model", tiny, "--plot", kit["prompts"]],
            (f"--plot='{kit['prompts']}' is also an input of this command (--prompts='hard.txt')",),
        ),
        (
            ["sweep", *SWEEP, "--model", tiny, "--plot", "x/heat.png", "--html", "x"],
            ("--html='x' holds --plot='x/heat.png', which this command also writes",),
        ),
        (
            ["sweep", *SWEEP, "--model", tiny, "--device-map", "cpu", "--offload-folder", "o", "--html", "o/x.html"],
            ("--offload-folder='o' holds --html='o/x.html', which this command also writes",),
        ),
    ]
    before = _tree(kit["root"])
    for argv, parts in cases:
        _refused(argv, loads, *parts)
    assert _tree(kit["root"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.txt"]


# ---- finding 16: `patchscopes run` on a spec folder of each kind of vector source ---------------------------------
def _sae_folder(folder: Path, d: int) -> Path:
    torch.manual_seed(3)
    folder.mkdir()
    (folder / "cfg.json").write_text(
        json.dumps(
            {"d_in": d, "d_sae": 8, "architecture": "standard", "metadata": {"hook_name": "blocks.2.hook_resid_post"}}
        )
    )
    save_file(
        {"W_dec": torch.randn(8, d), "W_enc": torch.randn(d, 8), "b_enc": torch.zeros(8), "b_dec": torch.zeros(d)},
        str(folder / "sae_weights.safetensors"),
    )
    return folder


def _vector_source(kind: str, handle, tmp_path: Path):
    """The source of each kind, made with the documented API of `vectors.py`."""
    d = handle.hidden_size
    torch.manual_seed(11)
    if kind == "tensor":
        return vector_source(torch.randn(d), handle, 1, "random")
    if kind == "sae latent":
        return sae_source(load_sae(_sae_folder(tmp_path / "sae", d), handle), 5, handle)
    if kind == "probe row":
        return probe_source(torch.nn.Linear(d, 3).weight, 2, handle, 2)
    import pyvene as pv

    from pyvene_patchscopes import compat

    config = pv.RepresentationConfig(
        layer=1,
        component="block_output",
        unit="pos",
        max_number_of_units=1,
        low_rank_dimension=1,
        intervention=pv.LowRankRotatedSpaceIntervention(embed_dim=d, low_rank_dimension=1),
    )
    with compat.pyvene_guard(handle.model):
        study = compat.intervenable(pv.IntervenableConfig([config]), handle.model)
        return das_source(study, handle)


@pytest.mark.parametrize("kind", ["tensor", "sae latent", "probe row", "das direction"])
def test_patchscopes_run_reads_a_saved_vector_source_spec_as_python_does(kit, tmp_path, kind):
    handle = load_model(str(kit["tiny"]))
    source = _vector_source(kind, handle, tmp_path)
    scope = self_explanation(source, alpha=0.05, max_new_tokens=3)  # |alpha v| near the states there
    save_patchscope(scope, tmp_path / "spec", models=handle)
    want = run(scope, handle, top=10)[0]
    code, out, err = _main("run", tmp_path / "spec", "--json")
    assert code == 0, err[-600:]
    got = json.loads(out)["result"]
    assert [(t["token_id"], round(t["prob"], 6)) for t in got["top"]] == [
        (t.token_id, round(t.prob, 6)) for t in want.top
    ]
    assert got["generation"] == want.generation and got["agrees_with_null"] == want.agrees_with_null
    assert got["spec"]["source"]["name"] == source.name
    code, out, _ = _main("run", tmp_path / "spec")
    assert code == 0 and f"source vector {source.name!r} [{handle.hidden_size}], layer {source.layer}" in out


# ---- finding 23: what --lens is, and placement flags that would be ignored ---------------------------------------
@pytest.mark.parametrize(
    "lens, what",
    [("/dev/zero", "is a device or special file, not a regular file"), ("folder", "is a folder, not a file")],
)
def test_lens_that_is_no_file_says_what_it_is(kit, loads, tmp_path, monkeypatch, lens, what):
    monkeypatch.chdir(tmp_path)
    if lens == "folder":
        lens = str(kit["adapter"])
    _refused(
        ["inspect", "--model", kit["tiny"], "--source-prompt", SOURCE, "--preset", "jacobian-lens", "--lens", lens],
        loads,
        f"--lens='{lens}' {what} (allowed: a Jacobian lens .pt file",
    )
    with pytest.raises(cli.SpecError, match=f"Jacobian lens file '{lens}' {what}"):
        JacobianLens.from_file(lens)


@pytest.mark.parametrize("adapter, what", [("./missing", "does not exist"), ("lens", "is not a folder")])
def test_an_adapter_that_is_no_folder_is_refused_before_the_model_loads(
    kit, loads, tmp_path, monkeypatch, adapter, what
):
    monkeypatch.chdir(tmp_path)
    adapter = str(kit["lens"]) if adapter == "lens" else adapter
    _refused(
        ["inspect", "--model", kit["tiny"], "--source-prompt", SOURCE, "--adapter", adapter],
        loads,
        f"--adapter='{adapter}' {what} (allowed: a PEFT adapter folder",
    )


@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "--source-prompt", SOURCE],
        ["sweep", "--source-prompt", SOURCE],
        ["run", "token-identity"],
        ["demo"],
        ["jacobian", SOURCE],
        ["eval", "next-token"],
        ["explore"],
    ],
    ids=lambda command: command[0],
)
def test_placement_flags_that_would_be_ignored_are_refused(kit, loads, tmp_path, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    model = ["--model", str(kit["tiny"])]
    _refused(
        command + model + ["--offload-folder", "offload"],
        loads,
        "--offload-folder='offload' is given without --device-map",
        "(allowed: ",
    )
    _refused(
        command + model + ["--device", "cpu", "--device-map", "auto"],
        loads,
        "--device='cpu' and --device-map='auto' are both given (allowed: one of them",
    )
    assert list(tmp_path.iterdir()) == []


def test_device_map_with_an_offload_folder_still_runs(kit, loads, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _main(
        "inspect",
        "--model",
        kit["tiny"],
        "--source-prompt",
        SOURCE,
        "--layers",
        "1",
        "--device-map",
        "cpu",
        "--offload-folder",
        "offload",
        "--json",
    )
    assert code == 0, err[-600:]
    assert loads == [str(kit["tiny"])] and json.loads(out)["layers"][0]["source_layer"] == 1


# ---- the pair fuzzer: every path option against every other of the same command -----------------------------------
OPTIONS = {  # each command's path options
    "inspect": ["--lens", "--adapter", "--html", "--model", "--offload-folder"],
    "run": ["spec", "--model", "--offload-folder"],
    "sweep": ["--prompts", "--plot", "--html", "--out", "--model", "--offload-folder"],
    "demo": ["--out", "--model", "--offload-folder"],
    "jacobian": ["--out", "--model", "--offload-folder"],
    "eval": ["--out", "--data", "--model", "--target-model", "--offload-folder"],
    "explore": ["--model", "--offload-folder"],
}
READS = {"--lens", "--adapter", "--prompts", "--data", "spec", "--model", "--target-model"}


def _own(command: str, option: str, kit: dict[str, Path]) -> str:
    """The option's own value: an input of the kit, or an output path in the working folder."""
    if option == "--out":  # "./": an adapter named by a relative org/name would be a hub id (not a path)
        return {"sweep": str(kit["sweep"]), "demo": "./demo-out", "jacobian": "./jac/france", "eval": "./eval-out"}[
            command
        ]
    inputs = {
        "--lens": "lens",
        "--adapter": "adapter",
        "--prompts": "prompts",
        "--data": "data",
        "spec": "spec",
        "--model": "tiny",
        "--target-model": "tiny",
    }
    if option in inputs:
        return str(kit[inputs[option]])
    return {"--html": "./page.html", "--plot": "./heat.png", "--offload-folder": "./offload"}[option]


def _inside(value: str) -> str:
    """A path inside `value`'s folder: its key file where it is a folder of the kit, else a new name."""
    path = Path(value)
    for name in ("manifest.json", "adapter_config.json", "config.json"):
        if (path / name).is_file():
            return str(path / name)
    return value + "/inner.png"  # keeping its "./" (Path would drop it)


def _writes(command: str, option: str, value: str) -> list[Path]:
    """What the option makes the command write, as docs/guides/cli.md says (jacobian: FILE.png and FILE.html; demo: its
    heatmap in the folder; the others the path itself)."""
    if option == "--out" and command == "jacobian":
        stem = Path(value).with_suffix("") if Path(value).suffix in (".png", ".html", ".htm") else Path(value)
        return [stem.parent / f"{stem.name}.png", stem.parent / f"{stem.name}.html"]
    if option == "--out" and command == "demo":
        return [Path(value) / "demo_heatmap.png"]
    return [] if option in READS else [Path(value)]


def _overlap(a: Path, b: Path) -> bool:
    a, b = a.resolve(), b.resolve()
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _clash(command: str, values: dict[str, str]) -> list[str]:
    """The output options that would write where an existing input is, inside it or around it, or where another
    output goes."""
    writes = {o: _writes(command, o, v) for o, v in values.items()}
    reads = {
        o: Path(v) for o, v in values.items() if (o in READS or (o, command) == ("--out", "sweep")) and Path(v).exists()
    }
    return [
        o
        for o, paths in writes.items()
        for p in paths
        if any(_overlap(p, r) for other, r in reads.items() if other != o)
        or any(_overlap(p, q) for other, qs in writes.items() if other != o for q in qs)
    ]


NAMED = re.compile(r"(?:--[a-z-]+|spec)='")


def _argv(command: str, values: dict[str, str], kit: dict[str, Path]) -> list[str]:
    model = values.get("--model", str(kit["tiny"]))
    argv = {
        "inspect": [
            "inspect",
            "--source-prompt",
            SOURCE,
            "--source-position",
            "Paris",
            "--layers",
            "1",
            "--max-new-tokens",
            "0",
        ],
        "run": ["run", values.get("spec", str(kit["spec"]))],
        "sweep": ["sweep", *(SWEEP[2:] if "--prompts" in values else SWEEP)],
        "demo": ["demo"],
        "jacobian": ["jacobian", SOURCE],
        "eval": ["eval", "next-token"],
        "explore": ["explore", "--port", "0"],
    }[command] + ["--model", model]
    if "--lens" in values:
        argv += ["--preset", "jacobian-lens"]
    if "--offload-folder" in values:
        argv += ["--device-map", "cpu"]
    return argv + [
        text for option, value in values.items() if option not in ("spec", "--model") for text in (option, value)
    ]


def _stub_evaluations(monkeypatch) -> None:
    from pyvene_patchscopes import evaluate

    def run_task(name, load, options, out=None, source="smollm2-135m", target="gemma3-270m"):
        load(source)
        return Report(task=name, title=name, model=source, command="", settings={}, summary={})

    monkeypatch.setattr(evaluate, "run_task", run_task)


@pytest.mark.parametrize("command", list(OPTIONS))
def test_every_path_option_against_every_other_is_refused_before_any_work_or_harmless(
    kit, loads, tmp_path, monkeypatch, command
):
    _stub_evaluations(monkeypatch)
    served: list[list[str]] = []
    monkeypatch.setattr(explore_command, "execute", lambda args: served.append(args))
    inputs = {name: _tree(path) for name, path in kit.items() if name != "root"}
    problems, outcomes = [], {2: 0, "apart": 0}
    for first in OPTIONS[command]:
        for second in OPTIONS[command]:
            for mode in ("same", "inside") if second != first else ():
                own = _own(command, first, kit)
                values = {first: own, second: own if mode == "same" else _inside(own)}
                work = tmp_path / f"{first.strip('-')}-{second.strip('-')}-{mode}"
                work.mkdir()
                monkeypatch.chdir(work)
                argv = _argv(command, values, kit)
                base = {"--model": str(kit["tiny"]), **({"spec": str(kit["spec"])} if command == "run" else {})}
                clash = _clash(command, {**base, **values})  # before the run makes anything
                loads.clear()
                served.clear()
                code, _, err = _main(*argv)
                line = err.rstrip("\n").split("\n")[-1]
                written = {p.relative_to(work).as_posix() for p in work.rglob("*")}
                if (
                    code not in (0, 2)
                    or "Traceback" in err
                    or (code == 2 and not line.startswith("patchscopes: error: "))
                ):
                    problems.append((argv, code, err[-400:]))
                if clash and (
                    code != 2
                    or not any(f"{o}=" in line for o in clash)
                    or len(NAMED.findall(line)) < 2
                    or loads
                    or written
                    or served
                ):
                    problems.append(("not refused before any work", argv, code, line, list(loads), written))
                outcomes["apart" if not clash else code] = outcomes.get("apart" if not clash else code, 0) + 1
    after = {name: _tree(path) for name, path in kit.items() if name != "root"}
    assert [name for name in inputs if inputs[name] != after[name]] == [], "an input changed"
    assert problems == [], "\n".join(map(repr, problems))
    assert outcomes[2] >= 2 and outcomes["apart"] >= 2, outcomes  # refused clashes, and pairs that may run
