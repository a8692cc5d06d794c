"""The paper's experiments as evaluations: `patchscopes eval TASK` (see each module's docstring)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from ..core.outputs import write_text
from ..errors import SpecError, UnknownNameError
from ..models import ModelHandle
from ..spec import DEFAULT_MODEL
from .common import EvalOptions, folder_name
from .data import FIELDS
from .report import Report, Table


@dataclass(frozen=True)
class Task:
    name: str
    summary: str
    module: str
    cross_model: bool = False
    data: str | None = None  # the kind of JSONL that --data replaces (a key of data.FIELDS); None: takes none


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "next-token",
            "§4.1 Precision@1 and surprisal per layer: logit lens, tuned lens, token identity (+ affine)",
            "next_token",
        ),
        Task("future", "Future Lens (Pal et al.): tokens 1-3 steps ahead from one state, vs the logit lens", "future"),
        Task(
            "attributes",
            "§4.2 attribute extraction over (l, l*) against a logistic-regression probe and the logit lens",
            "attributes",
            data="facts",
        ),
        Task("entities", "§4.3 entity descriptions per layer, ROUGE-L, popular vs rare", "entities", data="entities"),
        Task(
            "cross-model",
            "§4.4 SmolLM2-135M -> Gemma 3 270M with fitted affine maps, Precision@1 heatmaps",
            "cross_model",
            cross_model=True,
        ),
        Task("multihop", "§5 vanilla vs CoT vs CoT Patchscope with rerouting", "multihop", data="multihop"),
        Task("stages", "stages of function application: abstractive vs extractive", "stages"),
        Task(
            "jacobian",
            "Jacobian Scopes: delete the top 5% / 20% of tokens by score, change in log p of the "
            "prediction, vs random and gradient x input",
            "jacobian",
            data="texts",
        ),
        Task(
            "verify",
            "whether to trust verify: AUROC of its score for a right token-identity reading (per layer) and for "
            "an entity description that names the entity; precision and recall of 'supported'",
            "verify",
        ),
    )
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UnknownNameError(f"task={name!r} is not known (allowed: {', '.join(TASKS)}, all)")
    return TASKS[name]


def data_readers() -> list[str]:
    """The tasks that read ``--data``, in `TASKS` order."""
    return [task.name for task in TASKS.values() if task.data is not None]


def data_fields(markdown: bool = False) -> str:
    """What ``--data`` holds for each task that reads one: the fields of its JSONL rows (from `data.FIELDS`).

    Plain text for ``patchscopes eval --help``; with `markdown`, the README's table.
    """
    others = [name for name in TASKS if name not in data_readers()]
    readers = {task.name: task.data for task in TASKS.values() if task.data is not None}  # data_readers()' order
    if markdown:
        lines = ["| task | field | what it is |", "|---|---|---|"]
        for name, data in readers.items():
            lines += [
                f"| {f'`{name}`' if k == 0 else ''} | `{f.name}`{'' if f.required else ' (optional)'} | {f.meaning} |"
                for k, f in enumerate(FIELDS[data])
            ]
        listed = ", ".join(f"`{name}`" for name in others)
        return "\n".join(lines) + f"\n\nThe other tasks ({listed}) read no `--data`; giving one is refused.\n"
    lines = ["--data FILE is your own JSONL, one JSON object per line; for each task, the fields of a row:"]
    for name, data in readers.items():
        lines.append(f"  {name}:")
        lines += [f"    {f.name}{'' if f.required else ' (optional)'}: {f.meaning}" for f in FIELDS[data]]
    return "\n".join([*lines, f"The other tasks ({', '.join(others)}) read no --data."])


def check_data(task: Task, options: EvalOptions) -> None:
    """Refuse ``--data`` for a task that reads none (before any model loads)."""
    if options.data is not None and task.data is None:
        raise SpecError(
            f"--data={options.data!r} is not read by {task.name} (allowed: --data with {', '.join(data_readers())})"
        )


def run_task(
    name: str,
    load: Callable[[str], ModelHandle],
    options: EvalOptions,
    out: str | Path | None = None,
    source: str = "smollm2-135m",
    target: str = "gemma3-270m",
) -> Report:
    """Run one evaluation; `load(name)` returns a model handle. Writes report.json/.md, plots and the interactive
    heatmap page (`pages`) into `out`."""
    from importlib import import_module

    from .pages import write_pages

    task = get_task(name)
    check_data(task, options)
    module = import_module(f".{task.module}", __name__)
    folder = None if out is None else str(out)
    if task.cross_model:
        report = module.run(load(source), load(target), options, folder)
    else:
        report = module.run(load(source), options, folder)
    report.check_samples()
    if folder is not None:
        write_pages(report, folder)
        report.write(folder)
    return report


# Tasks also run on the larger embedded model by `eval all`, so the reports hold both models side by side.
SECOND_MODEL = "gemma3-270m"
ON_BOTH_MODELS = ("attributes", "multihop", "verify")


def run_all(
    load: Callable[[str], ModelHandle], options: EvalOptions, out: str | Path, model: str = DEFAULT_MODEL
) -> list[Report]:
    """Every task on `model`, each into ``out/TASK/``, then `ON_BOTH_MODELS` on the second embedded model into
    ``out/TASK-gemma3-270m/``, and an index ``out/README.md`` with every headline number."""
    if options.data is not None:
        raise SpecError(
            f"--data={options.data!r} is not allowed with eval all (allowed: --data with one task: "
            f"{', '.join(data_readers())})"
        )
    start = time.perf_counter()
    runs = [(name, model) for name in TASKS]
    runs += [(name, SECOND_MODEL) for name in ON_BOTH_MODELS if model != SECOND_MODEL]
    # Layer lists given for `model` need not fit the second model: there each task takes its own default grid.
    second = replace(options, layers=None, target_layers=None)
    reports = [
        run_task(
            name, load, options if source == model else second, Path(out) / folder_name(name, source), source=source
        )
        for name, source in runs
    ]
    write_index(reports, Path(out), time.perf_counter() - start)
    return reports


def write_index(reports: list[Report], out: Path, seconds: float) -> Path:
    lines = [
        "# Evaluation reports",
        "",
        f"Written by `patchscopes eval all --out {out}` in {seconds / 60:.1f} min. Each folder has report.md "
        "(tables), report.json (every number) and the plots.",
        "",
    ]
    for report in reports:
        folder = folder_name(report.task, report.model) if " -> " not in report.model else report.task
        lines += [
            f"## [{report.title}: {report.model}]({folder}/report.md)",
            "",
            f"`{report.command}` ({report.seconds:.0f} s)",
            "",
        ]
        lines += [f"- **Warning:** {warning}" for warning in report.warnings]
        lines += [
            f"- {key}: {value:.3f}" if isinstance(value, float) else f"- {key}: {value}"
            for key, value in report.summary.items()
        ]
        lines.append("")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "README.md"
    write_text(path, "\n".join(lines))
    write_text(
        out / "summary.json",
        json.dumps(
            {
                (folder_name(r.task, r.model) if " -> " not in r.model else r.task): {"seconds": r.seconds, **r.summary}
                for r in reports
            },
            indent=1,
            default=float,
        )
        + "\n",
    )
    return path


__all__ = [
    "TASKS",
    "Task",
    "run_task",
    "run_all",
    "folder_name",
    "SECOND_MODEL",
    "ON_BOTH_MODELS",
    "EvalOptions",
    "Report",
    "Table",
    "get_task",
    "data_fields",
    "data_readers",
]
