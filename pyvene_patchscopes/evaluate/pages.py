"""Interactive HTML versions of the evaluations' (l, l*) heatmaps, built from a report's data alone.

Each page is written beside its PNG (``attributes.png`` -> ``attributes.html``) by `patchscopes eval`, and
since it needs only what ``report.json`` holds, the pages of finished runs can be rebuilt without rerunning
them: ``python -m pyvene_patchscopes.evaluate.pages reports``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from ..export import numeric_grid, write_page
from .report import Report
from .scoring import rate

Parts = list[tuple[str, dict[str, Any]]]


def _pairs(per_pair: dict[str, float], layers: list[int], target_layers: list[int]) -> list[list[float]]:
    """{"l,l*": value} (as the reports store a grid) -> rows over l, columns over l*."""
    return [[per_pair.get(f"{l},{t}", float("nan")) for t in target_layers] for l in layers]


def _attributes(report: Report) -> Parts:
    layers, targets = report.settings["layers"], report.settings["target_layers"]
    correct = report.data["correct"]
    grid = [[rate([fact[str(l)][str(t)] for fact in correct]) for t in targets] for l in layers]
    return [
        (
            "heatmap",
            numeric_grid(
                grid,
                layers,
                targets,
                f"Accuracy per (l, l*) over {len(correct)} facts, {report.model}",
                "source layer l",
                "target layer l*",
                vmin=0,
                vmax=1,
            ),
        )
    ]


def _cross_model(report: Report) -> Parts:
    layers, targets = report.settings["layers"], report.settings["target_layers"]
    source, _, target = report.model.partition(" -> ")
    return [
        (
            "heatmap",
            numeric_grid(
                _pairs(report.data[name], layers, targets),
                layers,
                targets,
                f"Precision@1, {name} mapping: source layer l of {source}, target layer l* of {target}",
                "source layer l",
                "target layer l*",
                vmin=0,
                vmax=1,
            ),
        )
        for name in ("affine", "identity")
    ]


def _multihop(report: Report) -> Parts:
    layers, targets = report.settings["layers"], report.settings["target_layers"]
    grid = _pairs(report.data["pair_accuracy"], layers, targets)
    return [
        (
            "heatmap",
            numeric_grid(
                grid,
                layers,
                targets,
                f"CoT Patchscope accuracy per (l, l*) over "
                f"{len(report.data['kept'])} queries: hop 1's last token at l, written over "
                "hop 2's last token at l*",
                "source layer l",
                "target layer l*",
                vmin=0,
                vmax=1,
            ),
        )
    ]


HEATMAPS: dict[str, Callable[[Report], Parts]] = {
    "attributes": _attributes,
    "cross-model": _cross_model,
    "multihop": _multihop,
}


def page_name(report: Report) -> str:
    """The page's file name: its PNG's, with .html."""
    png = next((name for name in report.figures if name.endswith(".png")), f"{report.task.replace('-', '_')}.png")
    return Path(png).with_suffix(".html").name


def write_pages(report: Report, out: str | Path) -> list[Path]:
    """Write the report's interactive heatmap page into `out` (tasks without an (l, l*) heatmap have none) and
    name it in the report's notes; returns the pages written."""
    build = HEATMAPS.get(report.task)
    if build is None:
        return []
    name = page_name(report)
    path = write_page(Path(out) / name, f"{report.title}: {report.model}", build(report))
    note = f"{name}: the (l, l*) heatmap as an interactive page (hover a cell for its value; no server needed)."
    if note not in report.notes:
        report.notes.append(note)
    return [path]


def rebuild(folder: str | Path) -> list[Path]:
    """Rebuild the pages of every report under `folder` (e.g. ``reports/``) from its report.json, and rewrite
    that report's report.json and report.md with the page named in its notes."""
    written = []
    for source in sorted(Path(folder).glob("*/report.json")):
        report = Report.load(source)
        pages = write_pages(report, source.parent)
        if pages:
            report.write(source.parent)
            written += pages
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m pyvene_patchscopes.evaluate.pages [reports]``; lists the pages written."""
    args = sys.argv[1:] if argv is None else argv
    sys.stdout.writelines(f"{page}\n" for page in rebuild(args[0] if args else "reports"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
